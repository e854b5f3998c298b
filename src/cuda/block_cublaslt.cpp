// cuBLASLt backend of the MoE block's GEMMs (issue 11 item 4).
//
// Gate: one cuBLASLt GEMM with an f32 output (CUBLAS_COMPUTE_32F, no TF32);
// a mixed-dtype projection widens its 16-bit operand to f32 first. Shared
// experts: one GEMM for W13 of all of them ([n, rows, H] is [n*rows, H]); the
// activation in a cuBLASLt epilogue where one exists (non-gated GELU_TANH on
// 16-bit data; non-gated IDENTITY needs none), else f32 pre-activations and
// our kernel; then one W2 GEMM per shared expert summed into an f32 buffer
// (beta = 1 after the first). The output is written by one pass
// (launch_shared_combine): routed output (already in y) + gate * that sum.
#include <cuda_runtime.h>

#include <string>

#include "../block_plan.h"
#include "../common.h"
#include "block_kernels.cuh"
#include "block_lt.h"
#include "check.h"
#include "cuda_backend.h"

namespace moe::cuda::lt {
namespace {

size_t align_up(size_t n) { return (n + 255) & ~size_t(255); }

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }


// Shared-experts workspace regions for T tokens (h sized for f32, so the
// answer holds for any dtype).
struct SharedLayout {
  size_t g, h, s, lt, total;
  SharedLayout(const SharedPlan& p, int64_t T) {
    const size_t t = size_t(T);
    size_t at = 0;
    auto take = [&](size_t bytes) {
      size_t here = at;
      at += align_up(bytes);
      return here;
    };
    g = take(t * size_t(p.n) * size_t(p.rows()) * 4);
    h = take(t * size_t(p.n) * size_t(p.I) * 4);
    s = take(t * size_t(p.H) * 4);
    lt = take(kLtWorkspaceBytes);
    total = at;
  }
};

}  // namespace

size_t gate_workspace_bytes(int64_t T, int H, int E) {
  // f32 copies of the operands for a mixed-dtype projection, then cuBLASLt's.
  return align_up(size_t(T) * size_t(H) * 4) + align_up(size_t(E) * size_t(H) * 4) +
         kLtWorkspaceBytes;
}

void prepare_device(int device) { lt_prepare(device); }

void gate_logits(const GateArgs& a, void* stream) {
  DeviceGuard guard(a.device);
  cudaStream_t s = as_stream(stream);
  char* ws = static_cast<char*>(a.workspace);
  const size_t x_bytes = align_up(size_t(a.T) * size_t(a.H) * 4);
  float* xf = reinterpret_cast<float*>(ws);
  float* wf = reinterpret_cast<float*>(ws + x_bytes);
  LtGemm g;
  g.device = a.device;
  g.m = a.E;
  g.n = a.T;
  g.k = a.H;
  g.ab_dtype = a.x_dtype;
  g.a = a.w;
  g.b = a.x;
  if (a.x_dtype != a.w_dtype) {
    // cuBLASLt multiplies one input dtype: widen the 16-bit side to f32.
    if (a.x_dtype != DType::f32) {
      check(kernels::launch_to_f32(a.x, a.x_dtype, a.T * a.H, xf, s), "gate: hidden to f32");
      g.b = xf;
    }
    if (a.w_dtype != DType::f32) {
      check(kernels::launch_to_f32(a.w, a.w_dtype, int64_t(a.E) * a.H, wf, s),
            "gate: gate_weight to f32");
      g.a = wf;
    }
    g.ab_dtype = DType::f32;
  }
  g.lda = a.H;
  g.ldb = a.H;
  g.d_dtype = DType::f32;
  g.d = a.logits;
  g.ldd = a.E;
  g.workspace = ws + x_bytes + align_up(size_t(a.E) * size_t(a.H) * 4);
  lt_gemm(g, s);
}

size_t shared_workspace_bytes(const SharedPlan& plan, int64_t T) {
  return SharedLayout(plan, T).total;
}

void shared_compute(const SharedPlan& p, const SharedArgs& a, void* stream) {
  if (a.x_dtype != p.w_dtype)
    fail(MOE_STATUS_UNSUPPORTED,
         std::string("shared experts: the CUDA backend needs hidden and weights of one dtype; got "
                     "hidden ") +
             dtype_name(a.x_dtype) + ", weights " + dtype_name(p.w_dtype));
  DeviceGuard guard(p.device);
  cudaStream_t s = as_stream(stream);
  const SharedLayout l(p, a.T);
  char* ws = static_cast<char*>(a.workspace);
  float* g13 = reinterpret_cast<float*>(ws + l.g);
  void* h = ws + l.h;
  float* sum = reinterpret_cast<float*>(ws + l.s);
  void* lt_ws = ws + l.lt;
  const DType dt = a.x_dtype;
  const int64_t n_rows = int64_t(p.n) * p.rows();

  LtGemm up;
  up.device = p.device;
  up.m = n_rows;
  up.n = a.T;
  up.k = p.H;
  up.ab_dtype = dt;
  up.a = p.w13;
  up.lda = p.H;
  up.b = a.x;
  up.ldb = p.H;
  up.workspace = lt_ws;
  // h straight from the GEMM where cuBLASLt has the activation: IDENTITY, or
  // GELU_TANH on 16-bit data (f32 keeps our kernel: its 1e-5 contract).
  bool direct = !p.gated && (p.activation == MOE_ACTIVATION_IDENTITY ||
                             (p.activation == MOE_ACTIVATION_GELU_TANH && dt != DType::f32));
  if (direct) {
    up.d_dtype = dt;
    up.d = h;
    up.ldd = n_rows;
    up.epilogue =
        p.activation == MOE_ACTIVATION_GELU_TANH ? LtEpilogue::gelu_tanh : LtEpilogue::none;
    direct = lt_supported(up);
  }
  if (direct) {
    lt_gemm(up, s);
  } else {
    up.d_dtype = DType::f32;
    up.d = g13;
    up.ldd = n_rows;
    up.epilogue = LtEpilogue::none;
    lt_gemm(up, s);
    kernels::SharedActParams ap{g13, h, dt, a.T, p.n, p.I, p.activation, p.gated, p.swap_gate_up};
    check(kernels::launch_shared_act(ap, s), "shared experts: activation kernel launch");
  }

  const size_t esize = dtype_bytes(dt);
  for (int e = 0; e < p.n; ++e) {
    LtGemm down;
    down.device = p.device;
    down.m = p.H;
    down.n = a.T;
    down.k = p.I;
    down.ab_dtype = dt;
    down.a = static_cast<const char*>(p.w2) + size_t(e) * size_t(p.H) * size_t(p.I) * esize;
    down.lda = p.I;
    down.b = static_cast<const char*>(h) + size_t(e) * size_t(p.I) * esize;
    down.ldb = int64_t(p.n) * p.I;
    down.d_dtype = DType::f32;
    down.d = sum;
    down.ldd = p.H;
    down.accumulate = e > 0;  // the shared experts summed in order, in f32
    down.workspace = lt_ws;
    lt_gemm(down, s);
  }
}

void shared_combine(const SharedPlan& p, const SharedArgs& a, void* stream) {
  DeviceGuard guard(p.device);
  const SharedLayout l(p, a.T);
  kernels::SharedCombineParams cp{};
  cp.y = a.y;
  cp.dtype = a.x_dtype;
  cp.accumulate = a.accumulate;
  cp.s = reinterpret_cast<const float*>(static_cast<const char*>(a.workspace) + l.s);
  cp.x = a.x;
  cp.gate = p.gate;
  cp.gate_dtype = p.gate_dtype;
  cp.num_valid = a.num_valid;
  cp.T = a.T;
  cp.H = p.H;
  check(kernels::launch_shared_combine(cp, as_stream(stream)),
        "shared experts: combine kernel launch");
}

}  // namespace moe::cuda::lt
