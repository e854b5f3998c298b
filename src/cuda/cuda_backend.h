// CUDA backend entry points called by the API boundary (src/api*.cpp). All
// arguments were validated there; these enqueue work on `stream` (a
// cudaStream_t) and never synchronise the host, except where noted.
// Errors are thrown as moe::Error with MOE_STATUS_CUDA_ERROR and the CUDA
// error string in the message.
#pragma once

#include <initializer_list>
#include <utility>

#include "../plan.h"

namespace moe::cuda {

// Device memory owned by a handle (mapping tables, convenience workspaces).
void* device_alloc(size_t bytes, int device_id);
void device_free(void* ptr, int device_id) noexcept;
void copy_to_device(void* dst, const void* src, size_t bytes, int device_id);

// Current device of the calling thread, and a guard that switches to a
// device for a scope.
struct DeviceGuard {
  explicit DeviceGuard(int device_id);
  ~DeviceGuard();
  int previous;
};

// Orders the users of a handle-owned workspace across streams (events.cpp).
void* event_create(int device_id);
void event_destroy(void* event, int device_id) noexcept;
void stream_wait_event(void* stream, void* event);
void event_record(void* event, void* stream) noexcept;

void route(const RouterPlan& plan, const RouteArgs& args, void* stream);
void pack_topk(const PackArgs& args, void* stream);

size_t dispatch_workspace_bytes(const DispatchPlan& plan, int64_t max_tokens, int K);
void dispatch(const DispatchPlan& plan, const DispatchArgs& args, void* stream);

size_t runner_workspace_bytes(const RunnerPlan& plan, int64_t max_tokens, int K);
// With plan.validate_ids, synchronises the stream and throws
// MOE_STATUS_INVALID_ARGUMENT naming the first bad (token, slot).
void run(const RunnerPlan& plan, const RunArgs& args, void* stream);

// FP8 runner (src/cuda/fp8_runner.cpp): sizes and device it supports
// (throws MOE_STATUS_UNSUPPORTED), workspace, and the run after the id check.
void check_fp8_runner_supported(const RunnerPlan& plan);
size_t fp8_runner_workspace_bytes(const RunnerPlan& plan, int64_t max_tokens, int K);
void run_fp8(const RunnerPlan& plan, const RunArgs& args, void* stream);

// Throws MOE_STATUS_UNSUPPORTED naming the first pointer that is not 16-byte
// aligned (the runner kernels move 16-byte vectors).
void check_rows_aligned(const char* who,
                        std::initializer_list<std::pair<const char*, const void*>> ptrs);

}  // namespace moe::cuda
