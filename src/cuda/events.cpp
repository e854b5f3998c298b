// Stream ordering of a handle-owned workspace shared by calls on different
// streams: each call waits for the previous user's work on its stream, and
// records its own. Skipped while a stream is capturing (a capture cannot
// wait on work outside it; convenience workspaces are not for graphs).
#include <cuda_runtime.h>

#include <string>

#include "check.h"
#include "cuda_backend.h"

namespace moe::cuda {

namespace {

bool capturing(cudaStream_t s) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(s, &status) == cudaSuccess &&
         status != cudaStreamCaptureStatusNone;
}

}  // namespace

void* event_create(int device_id) {
  DeviceGuard guard(device_id);
  cudaEvent_t ev = nullptr;
  check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  return ev;
}

void event_destroy(void* event, int device_id) noexcept {
  if (!event) return;
  int previous = -1;
  bool switched = cudaGetDevice(&previous) == cudaSuccess && previous != device_id &&
                  cudaSetDevice(device_id) == cudaSuccess;
  cudaEventDestroy(static_cast<cudaEvent_t>(event));
  if (switched) cudaSetDevice(previous);
}

void stream_wait_event(void* stream, void* event) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (capturing(s)) return;
  check(cudaStreamWaitEvent(s, static_cast<cudaEvent_t>(event), 0), "cudaStreamWaitEvent");
}

void event_record(void* event, void* stream) noexcept {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (capturing(s)) return;
  cudaEventRecord(static_cast<cudaEvent_t>(event), s);
}

}  // namespace moe::cuda
