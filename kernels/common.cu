#include "common.cuh"

#include <atomic>
#include <cstdlib>

namespace moe::kernels {

namespace {
constexpr int kMaxDevices = 64;

// The current device, or -1 when it cannot be asked or is out of the caches' range.
int current_device() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return -1;
  return dev;
}
}  // namespace

bool env_is_zero(const char* name) {
  const char* v = std::getenv(name);
  return v && v[0] == '0' && v[1] == 0;
}

bool pdl_enabled() {
  static const bool env_on = !env_is_zero("MOE_PDL");
  if (!env_on) return false;
  const int dev = current_device();
  if (dev < 0) return false;
  static std::atomic<int> known[kMaxDevices];  // 0: not asked yet, 1: >= 9.0, 2: older
  int v = known[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    int major = 0;
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess;
    v = ok && major >= 9 ? 1 : 2;
    known[dev].store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

bool sm90a_device() {
#if defined(MOE_CUDA_WGMMA)
  const int dev = current_device();
  if (dev < 0) return false;
  static std::atomic<int> known[kMaxDevices];  // 0: not asked yet, 1: 9.0, 2: other
  int v = known[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    int major = 0, minor = 0;
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess;
    v = ok && major == 9 && minor == 0 ? 1 : 2;
    known[dev].store(v, std::memory_order_relaxed);
  }
  return v == 1;
#else
  return false;
#endif
}

int sm_count() {
  const int dev = current_device();
  if (dev < 0) return 0;
  static std::atomic<int> known[kMaxDevices];  // 0: not asked yet
  int v = known[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || v <= 0) return 0;
    known[dev].store(v, std::memory_order_relaxed);
  }
  return v;
}

}  // namespace moe::kernels
