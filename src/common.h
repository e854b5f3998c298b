// Shared internals: the error type that carries a status to the boundary,
// the thread-local last error, and scalar conversions (host side).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "moe/moe.h"

namespace moe {

// Thrown below the boundary; the entry macro turns it into a status + message.
struct Error {
  moe_status_t status;
  std::string message;
};

[[noreturn]] void fail(moe_status_t status, std::string message);

void set_last_error(const std::string& message);
void clear_last_error();

// Every exported function body runs inside MOE_ENTRY { ... } MOE_EXIT: no
// exception crosses the C boundary.
#define MOE_ENTRY                     \
  ::moe::clear_last_error();          \
  try {
#define MOE_EXIT                                                        \
  }                                                                     \
  catch (const ::moe::Error& e) {                                       \
    ::moe::set_last_error(e.message);                                   \
    return e.status;                                                    \
  }                                                                     \
  catch (const std::bad_alloc&) {                                       \
    ::moe::set_last_error("host allocation failed");                    \
    return MOE_STATUS_OUT_OF_MEMORY;                                    \
  }                                                                     \
  catch (const std::exception& e) {                                     \
    ::moe::set_last_error(std::string("internal error: ") + e.what());  \
    return MOE_STATUS_INTERNAL_ERROR;                                   \
  }                                                                     \
  catch (...) {                                                         \
    ::moe::set_last_error("internal error: unknown exception");         \
    return MOE_STATUS_INTERNAL_ERROR;                                   \
  }                                                                     \
  return MOE_STATUS_SUCCESS;

// Scalar conversions ------------------------------------------------------

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

// Round to nearest even; NaN stays NaN (quiet).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0) {
    // zero or subnormal: man * 2^-24
    float v = std::ldexp(float(man), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13));
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round to nearest even, with overflow to inf and gradual underflow.
inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_to_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                                  // below 2^-14: subnormal
    float v = bits_to_f32(a);
    float scaled = v * 16777216.0f;  // v / 2^-24, exact in f32
    return uint16_t(sign | uint16_t(std::nearbyint(scaled)));
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
  return uint16_t(sign | ((r - 0x38000000u) >> 13));
}

// FP8 E4M3 (fn: no inf, 0x7f/0xff are NaN, max 448).
inline float e4m3_to_f32(uint8_t b) {
  uint32_t sign = b >> 7;
  uint32_t exp = (b >> 3) & 0xfu;
  uint32_t man = b & 0x7u;
  float v;
  if (exp == 0xf && man == 0x7) return std::nanf("");
  if (exp == 0)
    v = std::ldexp(float(man), -9);
  else
    v = std::ldexp(float(8 + man), int(exp) - 10);
  return sign ? -v : v;
}

// Saturating round-to-nearest-even to E4M3FN (NaN stays NaN).
uint8_t f32_to_e4m3(float f);

}  // namespace moe
