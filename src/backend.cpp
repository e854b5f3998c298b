#include "backend.h"

#include "cpu/cpu_backend.h"
#ifdef MOE_WITH_CUDA
#include "cuda/cuda_backend.h"
// CUDA work runs on the tensors' device, whatever the calling thread's
// current device; size queries touch no device.
#define MOE_ON_CUDA(call)         \
  cuda::DeviceGuard guard_(d.id); \
  return cuda::call
#define MOE_SIZE_ON_CUDA(call) return cuda::call
#else
#define MOE_ON_CUDA(call) \
  fail(MOE_STATUS_NOT_AVAILABLE, "libmoe was built without the CUDA backend")
#define MOE_SIZE_ON_CUDA(call) MOE_ON_CUDA(call)
#endif

namespace moe {

void backend_route(const Device& d, const RouterPlan& plan, const RouteArgs& args, [[maybe_unused]] void* stream) {
  if (d.backend == Backend::cpu) return cpu::route(plan, args);
  MOE_ON_CUDA(route(plan, args, stream));
}

void backend_pack(const Device& d, const PackArgs& args, [[maybe_unused]] void* stream) {
  if (d.backend == Backend::cpu) return cpu::pack_topk(args);
  MOE_ON_CUDA(pack_topk(args, stream));
}

size_t backend_dispatch_workspace([[maybe_unused]] const Device& d, [[maybe_unused]] const DispatchPlan& plan,
                                  [[maybe_unused]] int64_t max_tokens, [[maybe_unused]] int K) {
  if (d.backend == Backend::cpu) return 0;
  MOE_SIZE_ON_CUDA(dispatch_workspace_bytes(plan, max_tokens, K));
}

void backend_dispatch(const Device& d, const DispatchPlan& plan, const DispatchArgs& args,
                      [[maybe_unused]] void* stream) {
  if (d.backend == Backend::cpu) return cpu::dispatch(plan, args);
  MOE_ON_CUDA(dispatch(plan, args, stream));
}

size_t backend_runner_workspace(const Device& d, const RunnerPlan& plan, int64_t max_tokens,
                                int K) {
  if (d.backend == Backend::cpu) return cpu::runner_workspace_bytes(plan, max_tokens, K);
  MOE_SIZE_ON_CUDA(runner_workspace_bytes(plan, max_tokens, K));
}

void backend_run(const Device& d, const RunnerPlan& plan, const RunArgs& args, [[maybe_unused]] void* stream) {
  if (d.backend == Backend::cpu) return cpu::run(plan, args);
  MOE_ON_CUDA(run(plan, args, stream));
}

}  // namespace moe
