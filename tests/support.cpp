#include "support.h"

#include <atomic>
#include <chrono>

namespace moe_test {

DLDataType dl_dtype(DT t) {
  switch (t) {
    case DT::f32: return DLDataType{kDLFloat, 32, 1};
    case DT::f16: return DLDataType{kDLFloat, 16, 1};
    case DT::bf16: return DLDataType{kDLBfloat, 16, 1};
    case DT::i32: return DLDataType{kDLInt, 32, 1};
    case DT::u8: return DLDataType{kDLUInt, 8, 1};
    case DT::e4m3: return DLDataType{MOE_DLPACK_CODE_FLOAT8_E4M3FN, 8, 1};
  }
  return DLDataType{kDLFloat, 32, 1};
}

size_t dt_bytes(DT t) {
  switch (t) {
    case DT::f32: case DT::i32: return 4;
    case DT::f16: case DT::bf16: return 2;
    case DT::u8: case DT::e4m3: return 1;
  }
  return 4;
}

const char* dt_name(DT t) {
  switch (t) {
    case DT::f32: return "f32";
    case DT::f16: return "f16";
    case DT::bf16: return "bf16";
    case DT::i32: return "i32";
    case DT::u8: return "u8";
    case DT::e4m3: return "e4m3";
  }
  return "?";
}

static float bits_f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static uint32_t f_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

float bf16_to_f32(uint16_t h) { return bits_f(uint32_t(h) << 16); }
uint16_t f32_to_bf16(float f) {
  uint32_t u = f_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) { float v = std::ldexp(float(man), -24); return sign ? -v : v; }
  if (exp == 31) return bits_f(sign | 0x7f800000u | (man << 13));
  return bits_f(sign | ((exp + 112u) << 23) | (man << 13));
}
uint16_t f32_to_f16(float f) {
  uint32_t u = f_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);
  if (a < 0x38800000u) return uint16_t(sign | uint16_t(std::nearbyint(bits_f(a) * 16777216.0f)));
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
  return uint16_t(sign | ((r - 0x38000000u) >> 13));
}

HostTensor::HostTensor(DT dt, std::vector<int64_t> shape_) : dtype(dt), shape(std::move(shape_)) {
  strides.assign(shape.size(), 1);
  for (int i = int(shape.size()) - 2; i >= 0; --i) strides[i] = strides[i + 1] * shape[i + 1];
  int64_t n = numel();
  storage.assign(size_t(std::max<int64_t>(n, 1)) * dt_bytes(dt), 0);
  t.data = storage.data();
  t.device = DLDevice{kDLCPU, 0};
  t.ndim = int(shape.size());
  t.dtype = dl_dtype(dt);
  t.shape = shape.data();
  t.strides = strides.data();
  t.byte_offset = 0;
}

int64_t HostTensor::numel() const {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

double HostTensor::get(int64_t i) const {
  switch (dtype) {
    case DT::f32: return as<float>()[i];
    case DT::f16: return f16_to_f32(as<uint16_t>()[i]);
    case DT::bf16: return bf16_to_f32(as<uint16_t>()[i]);
    case DT::i32: return as<int32_t>()[i];
    case DT::u8: case DT::e4m3: return as<uint8_t>()[i];
  }
  return 0;
}

void HostTensor::set(int64_t i, double v) {
  switch (dtype) {
    case DT::f32: as<float>()[i] = float(v); break;
    case DT::f16: as<uint16_t>()[i] = f32_to_f16(float(v)); break;
    case DT::bf16: as<uint16_t>()[i] = f32_to_bf16(float(v)); break;
    case DT::i32: as<int32_t>()[i] = int32_t(v); break;
    case DT::u8: case DT::e4m3: as<uint8_t>()[i] = uint8_t(v); break;
  }
}

void HostTensor::fill_normal(std::mt19937_64& rng, double stddev, double mean) {
  std::normal_distribution<double> d(mean, stddev);
  for (int64_t i = 0; i < numel(); ++i) set(i, d(rng));
}

void HostTensor::fill_uniform(std::mt19937_64& rng, double lo, double hi) {
  std::uniform_real_distribution<double> d(lo, hi);
  for (int64_t i = 0; i < numel(); ++i) set(i, d(rng));
}

void HostTensor::poison() {
  if (dtype == DT::i32) {
    std::memset(storage.data(), 0x7f, storage.size());
    return;
  }
  for (int64_t i = 0; i < numel(); ++i) set(i, std::numeric_limits<double>::quiet_NaN());
}

std::mt19937_64 fresh_rng() {
  static std::atomic<uint64_t> counter{0};
  uint64_t seed = uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count()) ^
                  (0x9e3779b97f4a7c15ull * ++counter);
  return std::mt19937_64(seed);
}

double rel_error(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return std::numeric_limits<double>::infinity();
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  if (den == 0) return num == 0 ? 0 : std::numeric_limits<double>::infinity();
  return std::sqrt(num / den);
}

void check_error_mentions(moe_status_t st, moe_status_t expected,
                          std::initializer_list<const char*> words) {
  std::string msg = moe_last_error();
  INFO("status: ", std::string(moe_status_string(st)), ", message: ", msg);
  CHECK(st == expected);
  CHECK(!msg.empty());
  for (const char* w : words) CHECK(msg.find(w) != std::string::npos);
}

}  // namespace moe_test
