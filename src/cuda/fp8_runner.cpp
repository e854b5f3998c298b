// CUDA backend glue of the FP8 runner (kernels/moe_runner_fp8.cu): what it
// supports, its workspace, and the launch. Called from cuda_backend.cpp for
// plans with quant_mode != MOE_QUANT_NONE; the alignment and id checks run
// there first.
#include <cuda_runtime.h>

#include <string>

#include "../common.h"
#include "check.h"
#include "cuda_backend.h"
#include "moe_runner_fp8.cuh"

namespace moe::cuda {
namespace {


bool block128(const RunnerPlan& plan) { return plan.quant_mode == MOE_QUANT_FP8_BLOCK_128; }

}  // namespace

void check_fp8_runner_supported(const RunnerPlan& plan) {
  if (!kernels::fp8_run_supported(block128(plan), plan.H, plan.I))
    fail(MOE_STATUS_UNSUPPORTED,
         std::string("runner: FP8 ") + (block128(plan) ? "block-128" : "per-tensor") +
             " weights on the CUDA backend need hidden_size and intermediate_size to be "
             "multiples of " + (block128(plan) ? "128" : "16") + "; got H=" +
             std::to_string(plan.H) + ", I=" + std::to_string(plan.I) + " (use the CPU backend)");
  // E4M3 tensor-core MMA exists from compute capability 8.9 (Ada, Hopper) on.
  int major = 0, minor = 0;
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, plan.w_device_id),
        "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, plan.w_device_id),
        "cudaDeviceGetAttribute");
  if (major * 10 + minor < 89)
    fail(MOE_STATUS_UNSUPPORTED, "runner: FP8 weights on the CUDA backend need a GPU of compute "
                                 "capability 8.9 or newer; device " +
                                     std::to_string(plan.w_device_id) + " is " +
                                     std::to_string(major) + "." + std::to_string(minor));
}

size_t fp8_runner_workspace_bytes(const RunnerPlan& plan, int64_t max_tokens, int K) {
  check_fp8_runner_supported(plan);
  return kernels::fp8_run_workspace_bytes(block128(plan), plan.E_loc, plan.H, plan.I, max_tokens, K);
}

void run_fp8(const RunnerPlan& plan, const RunArgs& args, void* stream) {
  kernels::Fp8RunParams p{};
  p.dtype = args.x_dtype;
  p.E_loc = plan.E_loc;
  p.H = plan.H;
  p.I = plan.I;
  p.activation = plan.activation;
  p.gated = plan.gated;
  p.swap_gate_up = plan.swap_gate_up;
  p.weight_on_input = plan.weight_on_input;
  p.block128 = block128(plan);
  p.x = args.x;
  p.T = args.T;
  p.K = args.K;
  p.local_ids = args.local_ids;
  p.weights = args.weights;
  p.offsets = args.offsets;
  p.sorted_slots = args.sorted_slots;
  p.w13 = static_cast<const uint8_t*>(plan.w13);
  p.w2 = static_cast<const uint8_t*>(plan.w2);
  p.w13_scale = plan.w13_scale;
  p.w2_scale = plan.w2_scale;
  p.a13_scale = plan.a13_scale;  // null unless MOE_ACT_SCALE_STATIC
  p.a2_scale = plan.a2_scale;
  p.y = args.y;
  p.output_scale = args.output_scale;
  p.workspace = args.workspace;
  check(kernels::launch_fp8_run(p, static_cast<cudaStream_t>(stream)), "FP8 runner kernel launch");
}

}  // namespace moe::cuda
