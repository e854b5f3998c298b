// Router kernels: logits [T, E] -> top-k ids and weights, every routing
// method, one warp per token, f32 math whatever the logits dtype. Decisions
// match the CPU backend (src/cpu/router.cpp) exactly: selection keys,
// selectability (NaN and -inf never selected), group ranking, lower index
// wins ties, -1/0 past the selectable experts or the valid rows.
// DEEPSEEK_V3 with E = 32 * V (V in {2, 4, 5, 8, 12, 16}), k <= 32,
// 32 % n_group == 0 and 16-byte aligned logits and bias keeps each lane's V
// keys in registers (route_dsv3_kernel); every other case uses the
// shared-memory kernel. Both give the same bits.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "plan.h"

namespace moe::kernels {

struct RouteParams {
  int method;  // moe_routing_method_t
  int E, k, n_group, topk_group, n_shared;
  bool renormalize;
  float weight_scale, shared_weight;
  DType logits_dtype;
  const void* logits;        // [T, E]
  int64_t T;
  const float* bias;         // [E] or nullptr
  const int32_t* num_valid;  // [1] or nullptr
  int32_t* ids;              // [T, k + n_shared]
  float* weights;            // [T, k + n_shared]
};

// Whether one token's scores fit in the current device's shared memory (the
// caller reports UNSUPPORTED otherwise; E up to about 56000 fits on Hopper).
bool route_fits(int E, int n_group, int method);

cudaError_t launch_route(const RouteParams& p, cudaStream_t stream);

struct PackParams {
  const int32_t* ids;
  const float* weights;
  int32_t* packed;
  int64_t n;
};

cudaError_t launch_pack_topk(const PackParams& p, cudaStream_t stream);

}  // namespace moe::kernels
