// CUDA side of the MoE block that is not a GEMM (src/block_plan.h): device
// preparation before a graph capture, and the side stream with two events
// that lets the shared experts (cuBLASLt, src/cuda/block_cublaslt.cpp)
// overlap the routed experts, also inside a graph capture.
#include <cuda_runtime.h>

#include <string>

#include "../block_plan.h"
#include "../common.h"
#include "check.h"
#include "cuda_backend.h"

namespace moe::cuda {

struct SideStream {
  int device = 0;
  cudaStream_t stream = nullptr;
  cudaEvent_t forked = nullptr, joined = nullptr;
};

void prepare_device(int device) {
  DeviceGuard guard(device);
  // Creates the context now, so nothing lazy happens inside a later capture.
  check(cudaFree(nullptr), "cudaFree(nullptr) to initialise the device");
}

SideStream* side_stream_create(int device) {
  DeviceGuard guard(device);
  auto* side = new SideStream{};
  side->device = device;
  cudaError_t err = cudaStreamCreateWithFlags(&side->stream, cudaStreamNonBlocking);
  if (err == cudaSuccess) err = cudaEventCreateWithFlags(&side->forked, cudaEventDisableTiming);
  if (err == cudaSuccess) err = cudaEventCreateWithFlags(&side->joined, cudaEventDisableTiming);
  if (err != cudaSuccess) {
    side_stream_destroy(side);
    check(err, "side stream creation");
  }
  return side;
}

void side_stream_destroy(SideStream* side) noexcept {
  if (!side) return;
  int previous = -1;
  const bool switched = cudaGetDevice(&previous) == cudaSuccess && previous != side->device &&
                        cudaSetDevice(side->device) == cudaSuccess;
  if (side->forked) cudaEventDestroy(side->forked);
  if (side->joined) cudaEventDestroy(side->joined);
  if (side->stream) cudaStreamDestroy(side->stream);
  if (switched) cudaSetDevice(previous);
  delete side;
}

void* side_stream_fork(SideStream* side, void* stream) {
  check(cudaEventRecord(side->forked, static_cast<cudaStream_t>(stream)), "cudaEventRecord (fork)");
  check(cudaStreamWaitEvent(side->stream, side->forked, 0), "cudaStreamWaitEvent (fork)");
  return side->stream;
}

void side_stream_join(SideStream* side, void* stream) {
  check(cudaEventRecord(side->joined, side->stream), "cudaEventRecord (join)");
  check(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), side->joined, 0),
        "cudaStreamWaitEvent (join)");
}

}  // namespace moe::cuda
