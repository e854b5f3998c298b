// GPU test support: device tensors that mirror a moe_test::HostTensor (same
// dtype and shape), copies both ways, NaN poisoning, and a CUDA status check.
#pragma once

#include <cuda_runtime.h>

#include "support.h"

#define CUDA_OK(expr)                                                    \
  do {                                                                   \
    cudaError_t err_ = (expr);                                           \
    INFO("CUDA error: ", cudaGetErrorString(err_));                      \
    REQUIRE(err_ == cudaSuccess);                                        \
  } while (0)

namespace moe_test {

// A contiguous device tensor; dl() points into this object (do not move it).
struct DeviceTensor {
  DT dtype = DT::f32;
  std::vector<int64_t> shape, strides;
  void* ptr = nullptr;
  size_t bytes = 0;
  DLTensor t{};

  DeviceTensor(DT dt, std::vector<int64_t> shape_);
  // Same dtype and shape as host, with its contents uploaded.
  explicit DeviceTensor(const HostTensor& host);
  ~DeviceTensor();
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;

  int64_t numel() const;
  DLTensor* dl() { return &t; }
  void upload(const HostTensor& host);
  void download(HostTensor& host) const;  // host must have the same dtype and shape
  void poison();                          // NaN for floats, 0x7f7f7f7f for ints
};

// Fast uniform fill in [-a, a] for large tensors (weights of the model shapes).
void fill_uniform_fast(HostTensor& h, uint64_t seed, double a);

// Values of a host tensor as doubles.
std::vector<double> values(const HostTensor& h);

// Restores an environment variable (or its absence) when it goes out of
// scope: for tests that switch a kernel choice read at each launch.
struct ScopedEnv {
  std::string name, old;
  bool had;
  explicit ScopedEnv(const char* name_);
  ~ScopedEnv();
  void set(const char* value) const;
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;
};

}  // namespace moe_test
