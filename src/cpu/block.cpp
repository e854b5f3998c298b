// CPU backend of the MoE block: the gate projection (f32 logits from any
// dtype) and the shared experts (dense MLPs over every token), multi-threaded.
//
// Both reduce to one dense kernel, linear(): Y[t, r] (+)= X[t] . W[r] with X
// in f32 and W in any float dtype, parallel over (chunk of W rows, block of
// tokens). The routed runner's micro-kernel lives in an anonymous namespace
// of src/cpu/runner.cpp, so this file has its own small one with the same
// property: every dot product uses a fixed lane split and summation order, so
// results do not depend on the thread count or on the other tokens.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "../block_plan.h"
#include "../common.h"
#include "cpu_backend.h"
#include "moe/moe.h"
#include "parallel.h"

namespace moe::cpu {
namespace {

constexpr int kLanes = 8;      // partial sums per dot product
constexpr int kRowChunk = 8;   // W rows per task (converted to f32 once per task)
constexpr int kTokenBlock = 64;  // tokens per task: their X rows stay in L2

size_t align_up(size_t n) { return (n + 255) / 256 * 256; }

typedef float f32x8 __attribute__((vector_size(kLanes * sizeof(float))));

// out[i] = x . w[i] for four rows, each over n columns in a fixed order.
void dot1x4(const float* __restrict x, const float* const* w, int64_t n, float* out) {
  f32x8 acc[4] = {};
  const int64_t nv = n / kLanes * kLanes;
  for (int64_t c = 0; c < nv; c += kLanes) {
    f32x8 vx;
    std::memcpy(&vx, x + c, sizeof(f32x8));
    for (int i = 0; i < 4; ++i) {
      f32x8 vw;
      std::memcpy(&vw, w[i] + c, sizeof(f32x8));
      acc[i] += vw * vx;
    }
  }
  for (int i = 0; i < 4; ++i) {
    float s[kLanes];
    std::memcpy(s, &acc[i], sizeof(f32x8));
    for (int64_t c = nv; c < n; ++c) s[c - nv] += w[i][c] * x[c];
    out[i] = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
  }
}

float load(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::bf16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::f16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

void store(void* p, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::bf16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); return;
    case DType::f16: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); return;
    default: static_cast<float*>(p)[i] = v; return;
  }
}

// n elements of src (dtype dt) as f32.
void row_to_f32(const void* src, DType dt, int64_t n, float* dst) {
  if (dt == DType::f32) {
    std::memcpy(dst, src, size_t(n) * 4);
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = load(src, dt, i);
}

// Per-worker scratch floats that linear() needs for rows of K columns.
size_t scratch_floats(int64_t K) { return size_t(num_threads()) * kRowChunk * size_t(K); }

// Y[t * ldy + r] (+)= X[t * ldx + :K] . W[r, :K] for t < T, r < N. W is
// row-major [N, K] of dtype wdt; scratch holds scratch_floats(K) floats.
void linear(const float* X, int64_t ldx, int64_t T, int64_t K, const void* W, DType wdt,
            int64_t N, float* Y, int64_t ldy, bool accumulate, float* scratch) {
  if (T <= 0 || N <= 0) return;
  const int64_t chunks = (N + kRowChunk - 1) / kRowChunk;
  const int64_t blocks = (T + kTokenBlock - 1) / kTokenBlock;
  const int64_t tasks = chunks * blocks;
  const size_t esize = dtype_bytes(wdt);
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(num_threads(), tasks);
  parallel_for(workers, 1, [&](int64_t worker, int64_t) {
    float* buf = scratch + size_t(worker) * kRowChunk * size_t(K);
    for (int64_t task = next.fetch_add(1); task < tasks; task = next.fetch_add(1)) {
      const int64_t r0 = task % chunks * kRowChunk;
      const int64_t nr = std::min<int64_t>(kRowChunk, N - r0);
      const int64_t t0 = task / chunks * kTokenBlock;
      const int64_t t1 = std::min(T, t0 + kTokenBlock);
      const float* rows[kRowChunk];
      for (int64_t i = 0; i < nr; ++i) {
        const void* src = static_cast<const char*>(W) + size_t(r0 + i) * size_t(K) * esize;
        if (wdt == DType::f32) {
          rows[i] = static_cast<const float*>(src);
        } else {
          row_to_f32(src, wdt, K, buf + i * K);
          rows[i] = buf + i * K;
        }
      }
      for (int64_t i = nr; i < kRowChunk; ++i) rows[i] = rows[nr - 1];  // tail: repeated, unused
      for (int64_t t = t0; t < t1; ++t) {
        float out[kRowChunk];
        for (int i = 0; i < kRowChunk; i += 4) dot1x4(X + t * ldx, rows + i, K, out + i);
        float* y = Y + t * ldy + r0;
        for (int64_t i = 0; i < nr; ++i) y[i] = accumulate ? y[i] + out[i] : out[i];
      }
    }
  });
}

// Hidden rows [0, T) in f32: a pointer into x for f32, else converted into buf.
const float* hidden_f32(const void* x, DType dt, int64_t T, int64_t H, float* buf) {
  if (dt == DType::f32) return static_cast<const float*>(x);
  parallel_for(T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      row_to_f32(static_cast<const char*>(x) + size_t(t) * size_t(H) * dtype_bytes(dt), dt, H,
                 buf + t * H);
  });
  return buf;
}

// Shared-experts workspace regions, for T tokens.
struct SharedLayout {
  size_t xf, g, h, s, gl, scratch, total;
  SharedLayout(const SharedPlan& p, int64_t T) {
    const size_t t = size_t(T);
    size_t at = 0;
    auto take = [&](size_t bytes) {
      size_t here = at;
      at += align_up(bytes);
      return here;
    };
    xf = take(t * size_t(p.H) * 4);
    g = take(t * size_t(p.n) * size_t(p.rows()) * 4);
    h = take(t * size_t(p.n) * size_t(p.I) * 4);
    s = take(t * size_t(p.H) * 4);
    gl = take(t * 4);
    scratch = take(scratch_floats(std::max(p.H, p.I)) * 4);
    total = at;
  }
};

}  // namespace

size_t gate_workspace_bytes(int64_t T, int H, int /*E*/) {
  return align_up(size_t(T) * size_t(H) * 4) + align_up(scratch_floats(H) * 4);
}

void gate_logits(const GateArgs& a) {
  char* ws = static_cast<char*>(a.workspace);
  float* scratch = reinterpret_cast<float*>(ws + align_up(size_t(a.T) * size_t(a.H) * 4));
  const float* xf = hidden_f32(a.x, a.x_dtype, a.T, a.H, reinterpret_cast<float*>(ws));
  linear(xf, a.H, a.T, a.H, a.w, a.w_dtype, a.E, a.logits, a.E, false, scratch);
}

size_t shared_workspace_bytes(const SharedPlan& plan, int64_t T) {
  return SharedLayout(plan, T).total;
}

void shared_run(const SharedPlan& p, const SharedArgs& a) {
  const SharedLayout l(p, a.T);
  char* ws = static_cast<char*>(a.workspace);
  float* g = reinterpret_cast<float*>(ws + l.g);
  float* h = reinterpret_cast<float*>(ws + l.h);
  float* s = reinterpret_cast<float*>(ws + l.s);
  float* gl = reinterpret_cast<float*>(ws + l.gl);
  float* scratch = reinterpret_cast<float*>(ws + l.scratch);
  const int64_t T = a.T, H = p.H, I = p.I, rows = p.rows(), n = p.n;
  const int64_t valid = a.num_valid ? std::clamp<int64_t>(*a.num_valid, 0, T) : T;

  const float* xf = hidden_f32(a.x, a.x_dtype, valid, H, reinterpret_cast<float*>(ws + l.xf));
  // W13 of every shared expert at once: [n, rows, H] is [n * rows, H].
  linear(xf, H, valid, H, p.w13, p.w_dtype, n * rows, g, n * rows, false, scratch);
  const int64_t gate_base = p.gated && p.swap_gate_up ? I : 0;
  const int64_t up_base = p.gated && !p.swap_gate_up ? I : 0;
  parallel_for(valid, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t e = 0; e < n; ++e) {
        const float* gr = g + (t * n + e) * rows;
        float* hr = h + (t * n + e) * I;
        for (int64_t i = 0; i < I; ++i)
          hr[i] = activate(p.activation, gr[gate_base + i]) * (p.gated ? gr[up_base + i] : 1.0f);
      }
  });
  // W2: the shared experts summed in order e = 0..n-1.
  const size_t w2_expert = size_t(H) * size_t(I) * dtype_bytes(p.w_dtype);
  for (int64_t e = 0; e < n; ++e)
    linear(h + e * I, n * I, valid, I, static_cast<const char*>(p.w2) + size_t(e) * w2_expert,
           p.w_dtype, H, s, H, e > 0, scratch);
  if (p.gate) linear(xf, H, valid, H, p.gate, p.gate_dtype, 1, gl, 1, false, scratch);

  // The one pass that writes y: routed part (when accumulating) + gated sum.
  parallel_for(T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = t * H;
      if (t >= valid) {
        for (int64_t c = 0; c < H; ++c) store(a.y, a.x_dtype, row + c, 0.0f);
        continue;
      }
      const float scale = p.gate ? 1.0f / (1.0f + std::exp(-gl[t])) : 1.0f;
      for (int64_t c = 0; c < H; ++c) {
        const float routed = a.accumulate ? load(a.y, a.x_dtype, row + c) : 0.0f;
        store(a.y, a.x_dtype, row + c, routed + scale * s[row + c]);
      }
    }
  });
}

}  // namespace moe::cpu
