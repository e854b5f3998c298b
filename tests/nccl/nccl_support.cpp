#include "nccl_support.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <mutex>
#include <thread>

namespace moe_nccl_test {

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

void moe_ok(moe_status_t st, const char* what) {
  if (st != MOE_STATUS_SUCCESS)
    throw std::runtime_error(std::string(what) + ": " + moe_status_string(st) + ": " +
                             moe_last_error());
}

namespace {

// The rank count and, if it cannot be used, why (computed once).
struct RankChoice {
  int ranks = 0;
  std::string problem;
};

RankChoice choose_ranks() {
  RankChoice c;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
  const char* env = std::getenv("MOE_NCCL_RANKS");
  if (env && *env) {
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    if (*end != '\0' || v < 2 || v > devices) {
      c.problem = std::string("MOE_NCCL_RANKS=") + env +
                  ": need an integer from 2 to the visible CUDA devices (" +
                  std::to_string(devices) + ")";
      return c;
    }
    c.ranks = int(v);
  } else {
    c.ranks = devices < 8 ? devices : 8;
    if (c.ranks < 2) {
      c.problem = "these suites need at least 2 CUDA devices in one process, found " +
                  std::to_string(devices) + ": they cannot run here";
      return c;
    }
  }
  std::printf("moe_nccl_tests: %d ranks (%s; %d CUDA devices visible)\n", c.ranks,
              env && *env ? "MOE_NCCL_RANKS" : "all visible GPUs, at most 8", devices);
  std::fflush(stdout);
  return c;
}

}  // namespace

int num_ranks() {
  static const RankChoice choice = choose_ranks();
  INFO(choice.problem);
  REQUIRE(choice.problem.empty());
  return choice.ranks;
}

const std::vector<ncclComm_t>& comms() {
  static std::vector<ncclComm_t> all;
  static std::mutex mutex;
  const int n = num_ranks();
  std::lock_guard<std::mutex> lock(mutex);
  if (int(all.size()) == n) return all;
  REQUIRE(all.empty());
  all.resize(size_t(n));
  std::vector<int> list(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) list[size_t(i)] = i;
  const ncclResult_t r = ncclCommInitAll(all.data(), n, list.data());
  INFO("ncclCommInitAll over ", n, " GPUs: ", ncclGetErrorString(r));
  if (r != ncclSuccess) all.clear();
  REQUIRE(r == ncclSuccess);
  return all;
}

std::vector<std::string> run_ranks(int n, const std::function<void(int)>& fn, int timeout_s) {
  std::vector<std::string> errors(static_cast<size_t>(n));
  std::vector<std::future<void>> done;
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    std::packaged_task<void()> task([&, r] {
      try {
        fn(r);
      } catch (const std::exception& e) {
        errors[size_t(r)] = e.what();
      } catch (...) {  // a doctest REQUIRE failing on this thread: already reported
        errors[size_t(r)] = "a failed assertion or an unknown exception";
      }
    });
    done.push_back(task.get_future());
    threads.emplace_back(std::move(task));
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  for (int r = 0; r < n; ++r)
    if (done[size_t(r)].wait_until(deadline) != std::future_status::ready) {
      std::fprintf(stderr,
                   "moe_nccl_tests: rank %d did not finish in %d s (a peer failed before a "
                   "collective?); errors so far:\n",
                   r, timeout_s);
      for (int q = 0; q < n; ++q)
        std::fprintf(stderr, "  rank %d: %s\n", q, errors[size_t(q)].c_str());
      std::fflush(stderr);
      std::_Exit(3);
    }
  for (auto& t : threads) t.join();
  return errors;
}

DevTensor::DevTensor(DT dt, std::vector<int64_t> shape_, int device_) {
  reset(dt, std::move(shape_), device_);
}

DevTensor::~DevTensor() {
  if (ptr) {
    int prev = 0;
    cudaGetDevice(&prev);
    cudaSetDevice(device);
    cudaFree(ptr);
    cudaSetDevice(prev);
  }
}

void DevTensor::reset(DT dt, std::vector<int64_t> shape_, int device_) {
  if (ptr) {
    cuda_ok(cudaSetDevice(device), "cudaSetDevice");
    cuda_ok(cudaFree(ptr), "cudaFree");
    ptr = nullptr;
  }
  dtype = dt;
  device = device_;
  shape = std::move(shape_);
  bytes = size_t(numel()) * moe_test::dt_bytes(dt);
  cuda_ok(cudaSetDevice(device), "cudaSetDevice");
  cuda_ok(cudaMalloc(&ptr, bytes < 256 ? 256 : bytes), "cudaMalloc");
  t = DLTensor{};
  t.data = ptr;
  t.device = DLDevice{kDLCUDA, device};
  t.ndim = int(shape.size());
  t.dtype = moe_test::dl_dtype(dt);
  t.shape = shape.data();
  t.strides = nullptr;
  t.byte_offset = 0;
}

int64_t DevTensor::numel() const {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

DLTensor DevTensor::rows_view(int64_t row0, int64_t rows,
                              std::vector<int64_t>& shape_storage) const {
  shape_storage = shape;
  shape_storage[0] = rows;
  int64_t row_elems = 1;
  for (size_t i = 1; i < shape.size(); ++i) row_elems *= shape[i];
  DLTensor v = t;
  v.shape = shape_storage.data();
  v.byte_offset = uint64_t(row0 * row_elems) * moe_test::dt_bytes(dtype);
  return v;
}

void DevTensor::upload(const HostTensor& h, cudaStream_t s) {
  if (h.numel() != numel()) throw std::runtime_error("DevTensor::upload: size mismatch");
  cuda_ok(cudaSetDevice(device), "cudaSetDevice");
  if (bytes) cuda_ok(cudaMemcpyAsync(ptr, h.storage.data(), bytes, cudaMemcpyHostToDevice, s),
                     "cudaMemcpyAsync H2D");
  cuda_ok(cudaStreamSynchronize(s), "cudaStreamSynchronize");
}

void DevTensor::download(HostTensor& h, cudaStream_t s) const {
  if (h.numel() != numel()) throw std::runtime_error("DevTensor::download: size mismatch");
  cuda_ok(cudaSetDevice(device), "cudaSetDevice");
  if (bytes) cuda_ok(cudaMemcpyAsync(h.storage.data(), ptr, bytes, cudaMemcpyDeviceToHost, s),
                     "cudaMemcpyAsync D2H");
  cuda_ok(cudaStreamSynchronize(s), "cudaStreamSynchronize");
}

void DevTensor::poison(cudaStream_t s) {
  cuda_ok(cudaSetDevice(device), "cudaSetDevice");
  // All-ones bytes are NaN in f32, f16 and bf16; 0x7f bytes are a large bogus int32.
  const int byte = dtype == DT::i32 ? 0x7f : 0xff;
  if (bytes) cuda_ok(cudaMemsetAsync(ptr, byte, bytes, s), "cudaMemsetAsync");
}

}  // namespace moe_nccl_test
