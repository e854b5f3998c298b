// Internal plans of the MoE block (moe/moe_block.h): the gate projection and
// the shared experts, as src/api_block.cpp hands them to the backends after
// validation, and the backend entry points (CPU: src/cpu/block.cpp, CUDA:
// src/cuda/block.cpp). Nothing below the boundary re-validates.
#pragma once

#include <cstddef>
#include <cstdint>

#include "plan.h"

namespace moe {

// logits [T, E] f32 = x [T, H] . w [E, H]^T, in f32 whatever the dtypes.
struct GateArgs {
  int device = 0;  // CUDA ordinal (ignored on the CPU)
  DType x_dtype;
  const void* x;   // [T, H]
  int64_t T;
  int H;
  DType w_dtype;
  const void* w;   // [E, H]
  int E;
  float* logits;   // [T, E]
  void* workspace; // >= gate_workspace_bytes(T, H, E), 256-aligned
};

struct SharedPlan {
  int n = 0, H = 0, I = 0;  // shared experts, hidden size, intermediate size of one
  int activation = 0;       // moe_activation_t
  bool gated = true;
  bool swap_gate_up = false;
  // Borrowed weights (set by moe_shared_experts_set_weights).
  DType w_dtype = DType::bf16;
  const void* w13 = nullptr;  // [n, rows(), H]
  const void* w2 = nullptr;   // [n, H, I]
  DType gate_dtype = DType::f32;
  const void* gate = nullptr; // [H] or nullptr (no sigmoid gate)
  int device = 0;             // CUDA ordinal of the weights
  int rows() const { return gated ? 2 * I : I; }
};

// y = (accumulate ? y : 0) + g(x) * sum_s W2_s . act(W13_s . x); rows at or
// past *num_valid are set to 0.
struct SharedArgs {
  DType x_dtype;              // hidden and y
  const void* x;              // [T, H]
  int64_t T;
  const int32_t* num_valid;   // [1] on the backend's device, or nullptr
  void* y;                    // [T, H]
  bool accumulate;
  void* workspace;            // >= shared_workspace_bytes(plan, T), 256-aligned
};

namespace cpu {
size_t gate_workspace_bytes(int64_t T, int H, int E);
void gate_logits(const GateArgs& args);
size_t shared_workspace_bytes(const SharedPlan& plan, int64_t T);
void shared_run(const SharedPlan& plan, const SharedArgs& args);
}  // namespace cpu

#ifdef MOE_WITH_CUDA
namespace cuda {
// Creates the device's context before a graph capture.
void prepare_device(int device);

// A second stream and two events for overlapping the shared experts with
// the routed ones; fork() returns the side stream, ordered after `stream`.
struct SideStream;
SideStream* side_stream_create(int device);
void side_stream_destroy(SideStream* side) noexcept;
void* side_stream_fork(SideStream* side, void* stream);
// Orders `stream` after everything enqueued on the side stream so far.
void side_stream_join(SideStream* side, void* stream);

// The block's GEMMs on cuBLASLt (src/cuda/block_cublaslt.cpp): the gate
// projection with an f32 output, the shared experts' f32 sum, and the one
// pass that writes y from it.
namespace lt {
size_t gate_workspace_bytes(int64_t T, int H, int E);
void prepare_device(int device);  // creates the device's cuBLASLt handle
void gate_logits(const GateArgs& args, void* stream);
size_t shared_workspace_bytes(const SharedPlan& plan, int64_t T);
void shared_compute(const SharedPlan& plan, const SharedArgs& args, void* stream);
void shared_combine(const SharedPlan& plan, const SharedArgs& args, void* stream);
}  // namespace lt
}  // namespace cuda
#endif

}  // namespace moe
