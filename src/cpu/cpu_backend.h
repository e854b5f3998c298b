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

}  // namespace moe::cpu
