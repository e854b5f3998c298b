#include "common.cuh"

#include <atomic>
#include <cstdlib>

namespace moe::kernels {

bool env_is_zero(const char* name) {
  const char* v = std::getenv(name);
  return v && v[0] == '0' && v[1] == 0;
}

bool pdl_enabled() {
  static const bool env_on = !env_is_zero("MOE_PDL");
  if (!env_on) return false;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices];  // 0: not asked yet, 1: >= 9.0, 2: older
  if (dev < 0 || dev >= kMaxDevices) return false;
  int v = known[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    int major = 0;
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess;
    v = ok && major >= 9 ? 1 : 2;
    known[dev].store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

}  // namespace moe::kernels
