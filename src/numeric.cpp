// Out-of-line numeric helpers declared in common.h and plan.h.
#include <cmath>

#include "common.h"
#include "plan.h"

namespace moe {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::e4m3: return "float8_e4m3fn";
    case DType::i32: return "int32";
  }
  return "unknown";
}

uint8_t f32_to_e4m3(float f) {
  uint32_t u = f32_to_bits(f);
  uint8_t sign = uint8_t((u >> 24) & 0x80u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint8_t(sign | 0x7fu);  // NaN
  if (a >= 0x43e00000u) return uint8_t(sign | 0x7eu);  // >= 448 (inf included) saturates
  if (a < 0x3c800000u) {
    // Below 2^-6, the smallest normal: multiples of 2^-9. The product is exact
    // in f32 and nearbyint rounds half to even; 8 lands on the first normal.
    float scaled = bits_to_f32(a) * 512.0f;
    return uint8_t(sign | uint8_t(std::nearbyint(scaled)));
  }
  // Normal: keep 3 mantissa bits, round half to even on the dropped 20 bits.
  uint32_t r = a + 0x7ffffu + ((a >> 20) & 1u);
  uint32_t exp = (r >> 23) - 127u + 7u;
  uint32_t man = (r >> 20) & 7u;
  return uint8_t(sign | (exp << 3) | man);
}

}  // namespace moe
