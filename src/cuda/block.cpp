// CUDA backend of the MoE block (src/block_plan.h): the gate projection
// (f32 logits from any dtype, kernels/linear.cu) and the shared experts,
// which run through the routed runner's grouped GEMMs with dense routing
// metadata (every valid token uses each shared expert once) so they share
// its tensor-core path; their reduction applies the sigmoid gate and adds
// the routed output. A side stream with two events lets them overlap the
// routed experts, also inside a graph capture.
#include <cuda_runtime.h>

#include <string>

#include "../block_plan.h"
#include "../common.h"
#include "cuda_backend.h"
#include "linear.cuh"
#include "moe_runner.cuh"

namespace moe::cuda {
namespace {

void check(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) fail(MOE_STATUS_CUDA_ERROR, what + ": " + cudaGetErrorString(err));
}

size_t align256(size_t b) { return (b + 255) / 256 * 256; }

// Shared-experts workspace: dense routing metadata, the gate logits, then the
// runner's own workspace.
struct SharedLayout {
  size_t local_ids, offsets, sorted, gate, runner, total;
  SharedLayout(const SharedPlan& p, int64_t T) {
    const size_t slots = size_t(T) * size_t(p.n);
    size_t at = 0;
    auto take = [&](size_t bytes) {
      const size_t here = at;
      at += align256(bytes);
      return here;
    };
    local_ids = take(slots * 4);
    offsets = take(size_t(p.n + 1) * 4);
    sorted = take(slots * 4);
    gate = take(size_t(T) * 4);
    runner = take(kernels::moe_run_workspace_bytes(DType::f32, p.n, p.H, p.I, int64_t(slots)));
    total = at;
  }
};

void check_shared_supported(const SharedPlan& p, DType x_dtype) {
  if (!kernels::moe_run_supported(p.H, p.I))
    fail(MOE_STATUS_UNSUPPORTED,
         "shared experts: the CUDA backend needs hidden_size and intermediate_size to be "
         "multiples of 8 (16-byte rows); got H=" + std::to_string(p.H) + ", I=" + std::to_string(p.I));
  if (x_dtype != p.w_dtype)
    fail(MOE_STATUS_UNSUPPORTED,
         std::string("shared experts: the CUDA backend needs hidden and weights of one dtype; got "
                     "hidden ") + dtype_name(x_dtype) + ", weights " + dtype_name(p.w_dtype));
}

kernels::MoeRunParams shared_params(const SharedPlan& p, const SharedArgs& a) {
  const SharedLayout l(p, a.T);
  char* ws = static_cast<char*>(a.workspace);
  kernels::MoeRunParams r{};
  r.dtype = a.x_dtype;
  r.E_loc = p.n;
  r.H = p.H;
  r.I = p.I;
  r.activation = p.activation;
  r.gated = p.gated;
  r.swap_gate_up = p.swap_gate_up;
  r.x = a.x;
  r.T = a.T;
  r.K = p.n;
  r.local_ids = reinterpret_cast<int32_t*>(ws + l.local_ids);
  r.weights = nullptr;  // weight 1
  r.offsets = reinterpret_cast<int32_t*>(ws + l.offsets);
  r.sorted_slots = reinterpret_cast<int32_t*>(ws + l.sorted);
  r.w13 = p.w13;
  r.w2 = p.w2;
  r.y = a.y;
  r.output_scale = 1.0f;
  r.workspace = ws + l.runner;
  r.token_gate = p.gate ? reinterpret_cast<float*>(ws + l.gate) : nullptr;
  r.num_valid = a.num_valid;
  r.accumulate = a.accumulate;
  return r;
}

}  // namespace

struct SideStream {
  int device = 0;
  cudaStream_t stream = nullptr;
  cudaEvent_t forked = nullptr, joined = nullptr;
};

size_t gate_workspace_bytes(int64_t, int, int) { return 0; }

void prepare_device(int device) {
  DeviceGuard guard(device);
  // Creates the context now, so nothing lazy happens inside a later capture.
  check(cudaFree(nullptr), "cudaFree(nullptr) to initialise the device");
}

void gate_logits(const GateArgs& a, void* stream) {
  DeviceGuard guard(a.device);
  check(kernels::launch_linear_f32(a.x_dtype, a.x, a.T, a.H, a.w_dtype, a.w, a.E, a.logits,
                                   static_cast<cudaStream_t>(stream)),
        "gate projection kernel launch");
}

size_t shared_workspace_bytes(const SharedPlan& plan, int64_t T) {
  return SharedLayout(plan, T).total;
}

void shared_compute(const SharedPlan& p, const SharedArgs& a, void* stream) {
  check_shared_supported(p, a.x_dtype);
  check_rows_aligned("shared experts", {{"hidden", a.x}, {"output", a.y}, {"w13", p.w13},
                                        {"w2", p.w2}});
  DeviceGuard guard(p.device);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const kernels::MoeRunParams r = shared_params(p, a);
  check(kernels::launch_dense_routing(a.T, p.n, a.num_valid, const_cast<int32_t*>(r.local_ids),
                                      const_cast<int32_t*>(r.offsets),
                                      const_cast<int32_t*>(r.sorted_slots), s),
        "shared experts routing kernel launch");
  if (p.gate)
    check(kernels::launch_linear_f32(a.x_dtype, a.x, a.T, p.H, p.gate_dtype, p.gate, 1,
                                     const_cast<float*>(r.token_gate), s),
          "shared experts gate kernel launch");
  check(kernels::launch_moe_gemms(r, s), "shared experts GEMM launch");
}

void shared_combine(const SharedPlan& p, const SharedArgs& a, void* stream) {
  DeviceGuard guard(p.device);
  check(kernels::launch_moe_reduce(shared_params(p, a), static_cast<cudaStream_t>(stream)),
        "shared experts reduction launch");
}

SideStream* side_stream_create(int device) {
  DeviceGuard guard(device);
  auto* side = new SideStream{};
  side->device = device;
  cudaError_t err = cudaStreamCreateWithFlags(&side->stream, cudaStreamNonBlocking);
  if (err == cudaSuccess) err = cudaEventCreateWithFlags(&side->forked, cudaEventDisableTiming);
  if (err == cudaSuccess) err = cudaEventCreateWithFlags(&side->joined, cudaEventDisableTiming);
  if (err != cudaSuccess) {
    side_stream_destroy(side);
    check(err, "side stream creation");
  }
  return side;
}

void side_stream_destroy(SideStream* side) noexcept {
  if (!side) return;
  int previous = -1;
  const bool switched = cudaGetDevice(&previous) == cudaSuccess && previous != side->device &&
                        cudaSetDevice(side->device) == cudaSuccess;
  if (side->forked) cudaEventDestroy(side->forked);
  if (side->joined) cudaEventDestroy(side->joined);
  if (side->stream) cudaStreamDestroy(side->stream);
  if (switched) cudaSetDevice(previous);
  delete side;
}

void* side_stream_fork(SideStream* side, void* stream) {
  check(cudaEventRecord(side->forked, static_cast<cudaStream_t>(stream)), "cudaEventRecord (fork)");
  check(cudaStreamWaitEvent(side->stream, side->forked, 0), "cudaStreamWaitEvent (fork)");
  return side->stream;
}

void side_stream_join(SideStream* side, void* stream) {
  check(cudaEventRecord(side->joined, side->stream), "cudaEventRecord (join)");
  check(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), side->joined, 0),
        "cudaStreamWaitEvent (join)");
}

}  // namespace moe::cuda
