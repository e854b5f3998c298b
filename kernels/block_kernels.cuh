// Element-wise kernels of the MoE block around the cuBLASLt GEMMs
// (src/cuda/block.cpp): operand conversion to f32 for mixed-dtype gate
// projections, the shared experts' activation (cuBLASLt has no gated
// epilogue), and the one pass that writes the block output:
// y = routed + sigmoid(x . w_sg) * shared, rounded once.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "plan.h"

namespace moe::kernels {

// dst[i] = f32(src[i]) for i < n.
cudaError_t launch_to_f32(const void* src, DType dtype, int64_t n, float* dst,
                          cudaStream_t stream);

struct SharedActParams {
  const float* g;   // [T, n * rows] pre-activations, rows = gated ? 2I : I
  void* h;          // [T, n * I] of h_dtype
  DType h_dtype;
  int64_t T;
  int n, I;
  int activation;   // moe_activation_t
  bool gated, swap_gate_up;
};

// h = act(gate) * up (gated) or act(g), per token and shared expert.
cudaError_t launch_shared_act(const SharedActParams& p, cudaStream_t stream);

struct SharedCombineParams {
  void* y;                  // [T, H] of dtype: the routed output when accumulating
  DType dtype;              // y and x
  bool accumulate;
  const float* s;           // [T, H] sum of the shared experts
  const void* x;            // [T, H] hidden (for the gate)
  const void* gate;         // [H] of gate_dtype, or nullptr (scale 1)
  DType gate_dtype;
  const int32_t* num_valid; // [1] or nullptr; rows at or past it get 0
  int64_t T;
  int H;
};

// y[t] = (accumulate ? y[t] : 0) + sigmoid(x[t] . gate) * s[t], one block
// per token, a fixed reduction order (no atomics).
cudaError_t launch_shared_combine(const SharedCombineParams& p, cudaStream_t stream);

}  // namespace moe::kernels
