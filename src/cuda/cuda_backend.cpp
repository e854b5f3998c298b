// CUDA backend: turns validated plans into kernel launches (kernels/*.cu) on
// the caller's stream and CUDA errors into moe::Error.
#include "cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include "../common.h"
#include "check.h"
#include "dispatch.cuh"
#include "moe_runner.cuh"
#include "router.cuh"

namespace moe::cuda {
namespace {

[[noreturn]] void cuda_fail(const std::string& what, cudaError_t err) {
  fail(MOE_STATUS_CUDA_ERROR, what + ": " + cudaGetErrorString(err));
}


cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// The runner's device paths: FP8 (fp8_runner.cpp), or one dtype for activations and weights.
void check_runner_supported(const RunnerPlan& plan) {
  if (plan.quant_mode != MOE_QUANT_NONE) return check_fp8_runner_supported(plan);
  if (!kernels::moe_run_supported(plan.H, plan.I))
    fail(MOE_STATUS_UNSUPPORTED,
         "runner: the CUDA backend needs hidden_size and intermediate_size to be multiples of 8 "
         "(16-byte rows); got H=" + std::to_string(plan.H) + ", I=" + std::to_string(plan.I));
}

}  // namespace

void check(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) cuda_fail(what, err);
}

void check_rows_aligned(const char* who, std::initializer_list<std::pair<const char*, const void*>> ptrs) {
  for (const auto& [name, ptr] : ptrs)
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0)
      fail(MOE_STATUS_UNSUPPORTED,
           std::string(who) + ": the CUDA backend reads and writes 16-byte vectors, so " + name +
               " must start at a 16-byte-aligned address (got one with remainder " +
               std::to_string(reinterpret_cast<uintptr_t>(ptr) % 16) + ")");
}

void* device_alloc(size_t bytes, int device_id) {
  DeviceGuard guard(device_id);
  void* ptr = nullptr;
  const cudaError_t err = cudaMalloc(&ptr, bytes == 0 ? 1 : bytes);
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // clear the sticky-free allocation error
    fail(MOE_STATUS_OUT_OF_MEMORY, "cudaMalloc of " + std::to_string(bytes) + " bytes on device " +
                                       std::to_string(device_id) + " failed: out of memory");
  }
  check(err, "cudaMalloc");
  return ptr;
}

void device_free(void* ptr, int device_id) noexcept {
  if (!ptr) return;
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) return;
  if (previous != device_id) cudaSetDevice(device_id);
  cudaFree(ptr);
  if (previous != device_id) cudaSetDevice(previous);
}

void copy_to_device(void* dst, const void* src, size_t bytes, int device_id) {
  DeviceGuard guard(device_id);
  check(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy host to device");
  // A pageable upload may still be in flight when cudaMemcpy returns, and a
  // caller's non-blocking stream does not wait for it: finish it here (create
  // time only, never on the run path).
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize after the upload");
}

DeviceGuard::DeviceGuard(int device_id) : previous(-1) {
  check(cudaGetDevice(&previous), "cudaGetDevice");
  if (previous != device_id) check(cudaSetDevice(device_id), "cudaSetDevice");
}

DeviceGuard::~DeviceGuard() {
  int current = -1;
  if (previous >= 0 && cudaGetDevice(&current) == cudaSuccess && current != previous)
    cudaSetDevice(previous);
}

void route(const RouterPlan& plan, const RouteArgs& args, void* stream) {
  if (!kernels::route_fits(plan.E, plan.n_group, plan.method))
    fail(MOE_STATUS_UNSUPPORTED, "router: num_experts " + std::to_string(plan.E) +
                                     " is too large for one token's scores in shared memory on "
                                     "this device (CUDA backend)");
  kernels::RouteParams p{};
  p.method = plan.method;
  p.E = plan.E;
  p.k = plan.k;
  p.n_group = plan.n_group;
  p.topk_group = plan.topk_group;
  p.n_shared = plan.n_shared;
  p.renormalize = plan.renormalize;
  p.weight_scale = plan.weight_scale;
  p.shared_weight = plan.shared_weight;
  p.logits_dtype = args.logits_dtype;
  p.logits = args.logits;
  p.T = args.T;
  p.bias = args.bias;
  p.num_valid = args.num_valid;
  p.ids = args.ids;
  p.weights = args.weights;
  check(kernels::launch_route(p, as_stream(stream)), "router kernel launch");
}

void pack_topk(const PackArgs& args, void* stream) {
  kernels::PackParams p{args.ids, args.weights, args.packed, args.n};
  check(kernels::launch_pack_topk(p, as_stream(stream)), "pack_topk kernel launch");
}

size_t dispatch_workspace_bytes(const DispatchPlan& plan, int64_t max_tokens, int K) {
  return kernels::dispatch_workspace_bytes(max_tokens * K, plan.E_loc);
}

void dispatch(const DispatchPlan& plan, const DispatchArgs& args, void* stream) {
  kernels::DispatchParams p{};
  p.topk_ids = args.topk_ids;
  p.mapping = plan.mapping_dev;
  p.E = plan.E;
  p.E_loc = plan.E_loc;
  p.n = args.T * args.K;
  p.local_ids = args.local_ids;
  p.counts = args.counts;
  p.offsets = args.offsets;
  p.sorted_slots = args.sorted_slots;
  p.workspace = args.workspace;
  check(kernels::launch_dispatch(p, as_stream(stream)), "dispatch kernel launch");
}

size_t runner_workspace_bytes(const RunnerPlan& plan, int64_t max_tokens, int K) {
  if (plan.quant_mode != MOE_QUANT_NONE) return fp8_runner_workspace_bytes(plan, max_tokens, K);
  check_runner_supported(plan);
  // The answer must hold for any activation dtype: f32 intermediates are the
  // widest h, and 16-bit activations may add the sorted copy of the token
  // rows (the TMA variant of the wgmma kernels), so take the larger.
  const int64_t n = max_tokens * K;
  return std::max(kernels::moe_run_workspace_bytes(DType::f32, plan.E_loc, plan.H, plan.I, n),
                  kernels::moe_run_workspace_bytes(DType::bf16, plan.E_loc, plan.H, plan.I, n));
}

void run(const RunnerPlan& plan, const RunArgs& args, void* stream) {
  check_runner_supported(plan);
  const bool fp8 = plan.quant_mode != MOE_QUANT_NONE;
  if (!fp8 && args.x_dtype != plan.w_dtype)
    fail(MOE_STATUS_UNSUPPORTED,
         std::string("runner: the CUDA backend needs hidden and weights of one dtype; got hidden ") +
             dtype_name(args.x_dtype) + ", weights " + dtype_name(plan.w_dtype));
  check_rows_aligned("runner", {{"hidden", args.x}, {"output", args.y}, {"w13", plan.w13},
                               {"w2", plan.w2}});
  kernels::MoeRunParams p{};
  p.dtype = args.x_dtype;
  p.E_loc = plan.E_loc;
  p.H = plan.H;
  p.I = plan.I;
  p.activation = plan.activation;
  p.gated = plan.gated;
  p.swap_gate_up = plan.swap_gate_up;
  p.weight_on_input = plan.weight_on_input;
  p.validate_ids = plan.validate_ids;
  p.x = args.x;
  p.T = args.T;
  p.K = args.K;
  p.local_ids = args.local_ids;
  p.weights = args.weights;
  p.offsets = args.offsets;
  p.sorted_slots = args.sorted_slots;
  p.w13 = plan.w13;
  p.w2 = plan.w2;
  p.y = args.y;
  p.output_scale = args.output_scale;
  p.workspace = args.workspace;
  cudaStream_t s = as_stream(stream);
  if (plan.validate_ids) {
    int32_t* bad_dev = nullptr;
    check(kernels::launch_validate_ids(p, &bad_dev, s), "id check kernel launch");
    int32_t bad = 0;
    check(cudaMemcpyAsync(&bad, bad_dev, sizeof(bad), cudaMemcpyDeviceToHost, s),
          "cudaMemcpyAsync of the id check");
    check(cudaStreamSynchronize(s), "cudaStreamSynchronize after the id check");
    if (bad != 0x7f7f7f7f) {
      int32_t id = 0;
      check(cudaMemcpy(&id, args.local_ids + bad, sizeof(id), cudaMemcpyDeviceToHost),
            "cudaMemcpy of a bad id");
      fail(MOE_STATUS_INVALID_ARGUMENT,
           "local_ids: token " + std::to_string(bad / args.K) + ", slot " +
               std::to_string(bad % args.K) + " holds id " + std::to_string(id) +
               ", expected -1 or a local expert in [0, " + std::to_string(plan.E_loc) + ")");
    }
  }
  if (fp8) return run_fp8(plan, args, stream);  // after the id check, which it shares
  check(kernels::launch_moe_run(p, s), "runner kernel launch");
}

}  // namespace moe::cuda
