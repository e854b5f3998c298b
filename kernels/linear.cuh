// Dense linear layer with f32 accumulation for mixed dtypes:
// Y[t, r] = X[t, :K] . W[r, :K] (row-major X [T, K], W [N, K], Y [T, N] f32).
// Used by the MoE block's gate projection (router logits must be f32 from
// any input dtype) and the shared experts' sigmoid gate. SIMT f32 FMA: exact
// products, no alignment requirement.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "plan.h"

namespace moe::kernels {

cudaError_t launch_linear_f32(DType x_dtype, const void* X, int64_t T, int K, DType w_dtype,
                              const void* W, int N, float* Y, cudaStream_t stream);

}  // namespace moe::kernels
