// Picks the backend a validated call runs on: the CPU backend for kDLCPU
// tensors, the CUDA backend for kDLCUDA tensors.
#pragma once

#include "plan.h"
#include "validate.h"

namespace moe {

void backend_route(const Device& d, const RouterPlan& plan, const RouteArgs& args, void* stream);
void backend_pack(const Device& d, const PackArgs& args, void* stream);
size_t backend_dispatch_workspace(const Device& d, const DispatchPlan& plan, int64_t max_tokens,
                                  int K);
void backend_dispatch(const Device& d, const DispatchPlan& plan, const DispatchArgs& args,
                      void* stream);
size_t backend_runner_workspace(const Device& d, const RunnerPlan& plan, int64_t max_tokens,
                                int K);
void backend_run(const Device& d, const RunnerPlan& plan, const RunArgs& args, void* stream);

}  // namespace moe
