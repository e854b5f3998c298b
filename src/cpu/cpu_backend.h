// CPU backend: the reference every other backend is checked against, and a
// usable multi-threaded implementation. Inputs are validated at the boundary.
#pragma once

#include "../plan.h"

namespace moe::cpu {

// Router: writes ids/weights for all T rows (rows >= *num_valid get -1 / 0).
void route(const RouterPlan& plan, const RouteArgs& args);

void pack_topk(const PackArgs& args);

void dispatch(const DispatchPlan& plan, const DispatchArgs& args);

size_t runner_workspace_bytes(const RunnerPlan& plan, int64_t max_tokens, int K);

// Fused MoE. Throws moe::Error(MOE_STATUS_INVALID_ARGUMENT) only for data
// errors the boundary cannot see cheaply (never: ids are checked there).
void run(const RunnerPlan& plan, const RunArgs& args);

// moe_activation_t in f32 (the runner's and the MoE block's), in forms that
// keep their relative accuracy in the tails: GELU as 0.5 v erfc(-v / sqrt 2)
// (1 + erf cancels below v ~ -4: erff gave GELU(-8) = 0), the tanh form as
// v / (1 + exp(-2 z)), SiLU as v / (1 + exp(-v)).
float activate(int activation, float v);

}  // namespace moe::cpu
