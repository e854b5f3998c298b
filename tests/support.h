// Test support shared by every suite: host tensors that own their storage and
// expose a DLTensor, random data, dtype conversions, error checks.
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "moe/moe.h"

namespace moe_test {

enum class DT { f32, f16, bf16, i32, u8, e4m3 };

DLDataType dl_dtype(DT t);
size_t dt_bytes(DT t);
const char* dt_name(DT t);

float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// A contiguous host tensor. dl() points into this object: keep it alive and
// do not move it while the DLTensor is in use.
struct HostTensor {
  DT dtype = DT::f32;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // elements; contiguous unless changed by a test
  std::vector<unsigned char> storage;
  DLTensor t{};

  HostTensor() = default;
  HostTensor(DT dt, std::vector<int64_t> shape_);
  HostTensor(const HostTensor&) = delete;
  HostTensor& operator=(const HostTensor&) = delete;

  int64_t numel() const;
  DLTensor* dl() { return &t; }
  const DLTensor* cdl() const { return &t; }
  void* data() { return storage.data(); }
  template <class T> T* as() { return reinterpret_cast<T*>(storage.data()); }
  template <class T> const T* as() const { return reinterpret_cast<const T*>(storage.data()); }

  // Element i as float (f32/f16/bf16/i32), and set from float with rounding.
  double get(int64_t i) const;
  void set(int64_t i, double v);

  void fill_normal(std::mt19937_64& rng, double stddev = 1.0, double mean = 0.0);
  void fill_uniform(std::mt19937_64& rng, double lo, double hi);
  void poison();  // NaN for floats, 0x7f7f7f7f for ints
};

// A fresh generator; seeds differ between calls so every case sees new data.
std::mt19937_64 fresh_rng();

// ||a - b|| / ||b|| over n values; NaN in a or b gives +inf.
double rel_error(const std::vector<double>& a, const std::vector<double>& b);

// The last error is non-empty and contains every given substring.
void check_error_mentions(moe_status_t st, moe_status_t expected,
                          std::initializer_list<const char*> words);

}  // namespace moe_test

#define MOE_CHECK_OK(expr)                                                   \
  do {                                                                       \
    moe_status_t st_ = (expr);                                               \
    INFO("last error: ", moe_last_error());                                  \
    REQUIRE(st_ == MOE_STATUS_SUCCESS);                                      \
  } while (0)
