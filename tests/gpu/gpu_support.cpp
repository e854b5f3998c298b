#include "gpu_support.h"

#include <cstdlib>
#include <thread>

namespace moe_test {

DeviceTensor::DeviceTensor(DT dt, std::vector<int64_t> shape_) : dtype(dt), shape(std::move(shape_)) {
  strides.assign(shape.size(), 1);
  for (int i = int(shape.size()) - 2; i >= 0; --i) strides[size_t(i)] = strides[size_t(i) + 1] * shape[size_t(i) + 1];
  bytes = size_t(std::max<int64_t>(numel(), 1)) * dt_bytes(dt);
  CUDA_OK(cudaMalloc(&ptr, bytes));
  t.data = ptr;
  t.device = DLDevice{kDLCUDA, 0};
  t.ndim = int(shape.size());
  t.dtype = dl_dtype(dt);
  t.shape = shape.data();
  t.strides = strides.data();
  t.byte_offset = 0;
}

DeviceTensor::DeviceTensor(const HostTensor& host) : DeviceTensor(host.dtype, host.shape) {
  upload(host);
}

DeviceTensor::~DeviceTensor() { cudaFree(ptr); }

int64_t DeviceTensor::numel() const {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

void DeviceTensor::upload(const HostTensor& host) {
  REQUIRE(host.storage.size() >= size_t(numel()) * dt_bytes(dtype));
  CUDA_OK(cudaMemcpy(ptr, host.storage.data(), size_t(numel()) * dt_bytes(dtype),
                     cudaMemcpyHostToDevice));
}

void DeviceTensor::download(HostTensor& host) const {
  REQUIRE(host.dtype == dtype);
  REQUIRE(host.numel() == numel());
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaMemcpy(host.storage.data(), ptr, size_t(numel()) * dt_bytes(dtype),
                     cudaMemcpyDeviceToHost));
}

void DeviceTensor::poison() {
  if (dtype == DT::i32 || dtype == DT::u8 || dtype == DT::e4m3) {
    CUDA_OK(cudaMemset(ptr, 0x7f, bytes));
  } else {
    CUDA_OK(cudaMemset(ptr, 0xff, bytes));  // 0xff bytes are a NaN in f32, f16 and bf16
  }
  // Finished before work on any (non-blocking) stream may touch the tensor.
  CUDA_OK(cudaDeviceSynchronize());
}

void fill_uniform_fast(HostTensor& h, uint64_t seed, double a) {
  const int64_t n = h.numel();
  const int nth = int(std::max(1u, std::min(16u, std::thread::hardware_concurrency())));
  std::vector<std::thread> threads;
  for (int w = 0; w < nth; ++w) {
    threads.emplace_back([&, w] {
      uint64_t s = seed ^ (0x9e3779b97f4a7c15ull * uint64_t(w + 1));
      for (int64_t i = n * w / nth; i < n * (w + 1) / nth; ++i) {
        // splitmix64: cheap, good enough for test data.
        uint64_t z = (s += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        const double u = double(z >> 11) * (1.0 / 9007199254740992.0);
        h.set(i, (2.0 * u - 1.0) * a);
      }
    });
  }
  for (auto& t : threads) t.join();
}

std::vector<double> values(const HostTensor& h) {
  std::vector<double> v(size_t(h.numel()));
  for (int64_t i = 0; i < h.numel(); ++i) v[size_t(i)] = h.get(i);
  return v;
}

ScopedEnv::ScopedEnv(const char* name_) : name(name_), had(std::getenv(name_) != nullptr) {
  if (had) old = std::getenv(name_);
}

ScopedEnv::~ScopedEnv() {
  if (had)
    setenv(name.c_str(), old.c_str(), 1);
  else
    unsetenv(name.c_str());
}

void ScopedEnv::set(const char* value) const { setenv(name.c_str(), value, 1); }

}  // namespace moe_test
