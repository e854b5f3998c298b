// CPU fused MoE (SEMANTICS.md section 4): usable speed and the reference the
// CUDA backend is checked against.
//
// One call runs in phases separated by joins, each parallel over independent
// tasks taken from an atomic counter:
//   0. token rows -> f32 (times the router weight with weight-on-input),
//      fake-quantized to E4M3 for FP8;
//   A. per (expert, block of its tokens, chunk of I): h = act(W13 . x), f32,
//      stored at the token's sorted position;
//   Q. FP8 only: every h row fake-quantized in place;
//   B. per (expert, block of its tokens, chunk of H): W2 . h into the row of
//      the token's slot (t * K + j);
//   C. per token: y = output_scale * sum over valid slots j = 0..K-1 in order
//      of w[t, j] * slot row.
// Every dot product goes through one micro-kernel with a fixed lane split and
// a fixed summation order, and each slot row is written by exactly one task,
// so a token's output does not depend on the batch or the thread count.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "../common.h"
#include "cpu_backend.h"
#include "parallel.h"

namespace moe::cpu {
namespace {

constexpr int kLanes = 8;        // partial sums per dot product (two SSE or one AVX register)
constexpr int kTokenBlock = 32;  // tokens of one expert per task: their x rows stay in L2
constexpr int kChunkI = 32;      // intermediate columns per phase-A task (64 W13 rows when gated)
constexpr int kChunkH = 64;      // output columns per phase-B task
constexpr int kQuantGroup = 128; // FP8_BLOCK_128: weight block edge and activation group
constexpr int kColBlock = 256;   // phase C accumulates this many columns on the stack
constexpr size_t kAlign = 256;

// The hot loops are compiled twice (see "ISA dispatch" below); helpers they
// call are forced inline so that they take the caller's instruction set.
#define MOE_HOT inline __attribute__((always_inline))

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

MOE_HOT float hsum(const float* a) {
  return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

// GCC/Clang generic vector: one AVX register, or two SSE/NEON registers
// without -march; written out because GCC vectorizes a plain lane loop
// across c with shuffles instead.
typedef float f32x8 __attribute__((vector_size(kLanes * sizeof(float))));

// out = {w0.x0, w0.x1, w1.x0, w1.x1} over n columns. The only dot product of
// the runner: every (row, token) pair gets the same operation sequence
// whichever position it takes here, which makes results batch-independent.
MOE_HOT void dot2x2(const float* __restrict w0, const float* __restrict w1,
                    const float* __restrict x0, const float* __restrict x1, int64_t n,
                    float* __restrict out) {
  f32x8 a00 = {}, a01 = {}, a10 = {}, a11 = {};
  const int64_t nv = n / kLanes * kLanes;
  for (int64_t c = 0; c < nv; c += kLanes) {
    f32x8 vw0, vw1, vx0, vx1;
    std::memcpy(&vw0, w0 + c, sizeof(f32x8));
    std::memcpy(&vw1, w1 + c, sizeof(f32x8));
    std::memcpy(&vx0, x0 + c, sizeof(f32x8));
    std::memcpy(&vx1, x1 + c, sizeof(f32x8));
    a00 += vw0 * vx0;
    a01 += vw0 * vx1;
    a10 += vw1 * vx0;
    a11 += vw1 * vx1;
  }
  float s[4][kLanes];
  std::memcpy(s[0], &a00, sizeof(f32x8));
  std::memcpy(s[1], &a01, sizeof(f32x8));
  std::memcpy(s[2], &a10, sizeof(f32x8));
  std::memcpy(s[3], &a11, sizeof(f32x8));
  for (int64_t c = nv; c < n; ++c) {
    const int l = int(c - nv);
    s[0][l] += w0[c] * x0[c];
    s[1][l] += w0[c] * x1[c];
    s[2][l] += w1[c] * x0[c];
    s[3][l] += w1[c] * x1[c];
  }
  for (int k = 0; k < 4; ++k) out[k] = hsum(s[k]);
}

// E4M3 byte -> f32, as a table so that weight rows dequantize in a simple loop.
const float* e4m3_table() {
  static const struct Table {
    float v[256];
    Table() {
      for (int i = 0; i < 256; ++i) v[i] = e4m3_to_f32(uint8_t(i));
    }
  } table;
  return table.v;
}

// Branch-free f16 -> f32 (vectorizes): scaling the shifted bits by 2^112
// rebiases normals and normalizes subnormals exactly; inf/NaN are patched.
MOE_HOT float f16_bits_to_f32(uint16_t h) {
  const uint32_t em = h & 0x7fffu;
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const float scaled = bits_to_f32(em << 13) * 0x1p112f;
  const uint32_t special = 0u - uint32_t(em >= 0x7c00u);  // all ones for inf/NaN
  const uint32_t mag = (f32_to_bits(scaled) & ~special) | ((0x7f800000u | (em << 13)) & special);
  return bits_to_f32(mag | sign);
}

MOE_HOT void to_f32(const void* src, DType dt, int64_t n, float* dst) {
  switch (dt) {
    case DType::f32:
      std::memcpy(dst, src, size_t(n) * 4);
      return;
    case DType::bf16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::f16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_bits_to_f32(s[i]);
      return;
    }
    case DType::e4m3: {
      const uint8_t* s = static_cast<const uint8_t*>(src);
      const float* lut = e4m3_table();
      for (int64_t i = 0; i < n; ++i) dst[i] = lut[s[i]];
      return;
    }
    case DType::i32:
      break;
  }
}

// One weight tensor [E_loc, rows, cols] with its FP8 scales, read row by row.
struct Weights {
  const uint8_t* data;
  DType dt;
  int64_t rows, cols;
  int quant;
  const float* scale;  // per tensor: [E_loc]; block: [E_loc, ceil(rows/128), ceil(cols/128)]

  // Row r of expert e as f32: a pointer into the tensor for f32 weights,
  // else converted (and dequantized) into buf.
  MOE_HOT const float* row(int e, int64_t r, float* buf) const {
    const size_t esize = dtype_bytes(dt);
    const uint8_t* src = data + (size_t(e) * size_t(rows) + size_t(r)) * size_t(cols) * esize;
    if (dt == DType::f32) return reinterpret_cast<const float*>(src);
    to_f32(src, dt, cols, buf);
    if (quant == MOE_QUANT_FP8_PER_TENSOR) {
      const float s = scale[e];
      for (int64_t c = 0; c < cols; ++c) buf[c] *= s;
    } else if (quant == MOE_QUANT_FP8_BLOCK_128) {
      const int64_t rb = (rows + kQuantGroup - 1) / kQuantGroup;
      const int64_t cb = (cols + kQuantGroup - 1) / kQuantGroup;
      const float* srow = scale + (size_t(e) * size_t(rb) + size_t(r / kQuantGroup)) * size_t(cb);
      for (int64_t b = 0; b < cb; ++b) {
        const float s = srow[b];
        const int64_t end = std::min(cols, (b + 1) * kQuantGroup);
        for (int64_t c = b * kQuantGroup; c < end; ++c) buf[c] *= s;
      }
    }
    return buf;
  }
};

// v <- dequant(quant_e4m3(v / scale)) * scale; scale 0 gives zeros.
void fake_quant(float* v, int64_t n, float scale) {
  if (scale == 0.0f) {
    std::fill(v, v + n, 0.0f);
    return;
  }
  const float* lut = e4m3_table();
  for (int64_t i = 0; i < n; ++i) v[i] = lut[f32_to_e4m3(v[i] / scale)] * scale;
}

// Dynamic scale amax / 448 (NaN ignored by the max; it still quantizes to NaN
// and stays in its own row). A zero or underflowing scale becomes 1.
float dynamic_scale(const float* v, int64_t n) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(v[i]));
  const float s = amax / 448.0f;
  return s > 0.0f ? s : 1.0f;
}

// Activation fake-quantization of one row before a matmul (FP8 modes only).
void quantize_activation_row(const RunnerPlan& plan, const float* static_scale,
                             float* v, int64_t n) {
  if (plan.quant_mode == MOE_QUANT_FP8_BLOCK_128) {
    for (int64_t c = 0; c < n; c += kQuantGroup) {
      const int64_t len = std::min<int64_t>(kQuantGroup, n - c);
      fake_quant(v + c, len, dynamic_scale(v + c, len));
    }
  } else if (plan.act_scale_mode == MOE_ACT_SCALE_STATIC) {
    fake_quant(v, n, static_scale[0]);
  } else {
    fake_quant(v, n, dynamic_scale(v, n));
  }
}

void store_row(const float* src, DType dt, int64_t n, void* dst) {
  switch (dt) {
    case DType::f32:
      std::memcpy(dst, src, size_t(n) * 4);
      return;
    case DType::bf16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
      return;
    }
    case DType::f16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
      return;
    }
    default:
      return;
  }
}

// Runs body(task, worker) for every task in [0, n_tasks) on all workers,
// which take tasks in order from a shared counter (uneven experts balance).
// worker < num_threads() indexes per-worker scratch.
template <class Body>
void run_tasks(int64_t n_tasks, const Body& body) {
  if (n_tasks <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(num_threads(), n_tasks);
  parallel_for(workers, 1, [&](int64_t w_begin, int64_t) {
    for (int64_t task = next.fetch_add(1); task < n_tasks; task = next.fetch_add(1))
      body(task, w_begin);
  });
}

// Workspace regions (each rounded up to 256 bytes), for T tokens, K slots:
//   xrows   f32 [R, H], R = T*K with weight-on-input (one row per slot), else T
//   hbuf    f32 [T*K, I]   h at each sorted position
//   yslot   f32 [T*K, H]   W2 . h of each slot
//   blocks  i64 [E_loc+1]  prefix sum of token blocks per expert
//   scratch f32 [num_threads, 4, max(H, I)]   dequantized weight rows
struct Layout {
  size_t xrows, hbuf, yslot, blocks, scratch, total;
  Layout(const RunnerPlan& p, int64_t T, int K) {
    const size_t TK = size_t(T) * size_t(K);
    xrows = 0;
    hbuf = align_up((p.weight_on_input ? TK : size_t(T)) * size_t(p.H) * 4);
    yslot = hbuf + align_up(TK * size_t(p.I) * 4);
    blocks = yslot + align_up(TK * size_t(p.H) * 4);
    scratch = blocks + align_up((size_t(p.E_loc) + 1) * 8);
    total = scratch + align_up(size_t(num_threads()) * 4 * size_t(std::max(p.H, p.I)) * 4);
  }
};

// Everything a phase-A or phase-B task reads; shared by the tasks of one call.
struct Job {
  const RunnerPlan* plan;
  int64_t H, I;
  int K, E;
  const int32_t* offsets;
  const int32_t* sorted;
  const int64_t* block_start;  // [E+1] prefix sum of token blocks per expert
  const float* xrows;          // f32 token rows: by slot (weight on input) or by token
  bool x_by_slot;
  Weights w13, w2;
  int64_t gate_base, up_base;  // first W13 row of the gate and up halves
  float* hbuf;
  float* yslot;
  float* scratch;
  size_t scratch_row;
  int64_t chunks_i, chunks_h;

  struct Block {
    int e;
    int64_t p0, m;  // first sorted position and token count
  };
  Block block(int64_t b) const {
    const int e = int(std::upper_bound(block_start, block_start + E + 1, b) - block_start) - 1;
    const int64_t p0 = offsets[e] + (b - block_start[e]) * kTokenBlock;
    return Block{e, p0, std::min<int64_t>(kTokenBlock, offsets[e + 1] - p0)};
  }
  const float* token_row(int64_t p) const {
    const int64_t s = sorted[p];
    return xrows + (x_by_slot ? s : s / K) * H;
  }
};

// Phase A task: h = act(gate) * up (gated) or act(a) for one token block and
// one chunk of intermediate columns. Odd tails recompute the last row or
// token (same value written twice) so every dot goes through dot2x2.
MOE_HOT void gate_up_task(const Job& job, int64_t task, int64_t worker) {
  const RunnerPlan& plan = *job.plan;
  const int64_t H = job.H, I = job.I;
  const Job::Block blk = job.block(task / job.chunks_i);
  const int64_t i_begin = task % job.chunks_i * kChunkI;
  const int64_t i_end = std::min(I, i_begin + kChunkI);
  float* buf = job.scratch + size_t(worker) * 4 * job.scratch_row;
  for (int64_t i0 = i_begin; i0 < i_end; i0 += 2) {
    const int64_t i1 = std::min(i0 + 1, i_end - 1);
    const float* g0 = job.w13.row(blk.e, job.gate_base + i0, buf);
    const float* g1 = job.w13.row(blk.e, job.gate_base + i1, buf + job.scratch_row);
    const float* u0 = nullptr;
    const float* u1 = nullptr;
    if (plan.gated) {
      u0 = job.w13.row(blk.e, job.up_base + i0, buf + 2 * job.scratch_row);
      u1 = job.w13.row(blk.e, job.up_base + i1, buf + 3 * job.scratch_row);
    }
    for (int64_t m0 = 0; m0 < blk.m; m0 += 2) {
      const int64_t m1 = std::min(m0 + 1, blk.m - 1);
      const float* xa = job.token_row(blk.p0 + m0);
      const float* xb = job.token_row(blk.p0 + m1);
      float g[4], u[4] = {1.0f, 1.0f, 1.0f, 1.0f};
      dot2x2(g0, g1, xa, xb, H, g);
      if (plan.gated) dot2x2(u0, u1, xa, xb, H, u);
      float* ha = job.hbuf + (blk.p0 + m0) * I;
      float* hb = job.hbuf + (blk.p0 + m1) * I;
      ha[i0] = activate(plan.activation, g[0]) * u[0];
      hb[i0] = activate(plan.activation, g[1]) * u[1];
      ha[i1] = activate(plan.activation, g[2]) * u[2];
      hb[i1] = activate(plan.activation, g[3]) * u[3];
    }
  }
}

// Phase B task: W2 . h for one token block and one chunk of output columns,
// into the rows of the blocks' slots.
MOE_HOT void down_task(const Job& job, int64_t task, int64_t worker) {
  const int64_t H = job.H, I = job.I;
  const Job::Block blk = job.block(task / job.chunks_h);
  const int64_t r_begin = task % job.chunks_h * kChunkH;
  const int64_t r_end = std::min(H, r_begin + kChunkH);
  float* buf = job.scratch + size_t(worker) * 4 * job.scratch_row;
  for (int64_t r0 = r_begin; r0 < r_end; r0 += 2) {
    const int64_t r1 = std::min(r0 + 1, r_end - 1);
    const float* v0 = job.w2.row(blk.e, r0, buf);
    const float* v1 = job.w2.row(blk.e, r1, buf + job.scratch_row);
    for (int64_t m0 = 0; m0 < blk.m; m0 += 2) {
      const int64_t m1 = std::min(m0 + 1, blk.m - 1);
      float o[4];
      dot2x2(v0, v1, job.hbuf + (blk.p0 + m0) * I, job.hbuf + (blk.p0 + m1) * I, I, o);
      float* ya = job.yslot + int64_t(job.sorted[blk.p0 + m0]) * H;
      float* yb = job.yslot + int64_t(job.sorted[blk.p0 + m1]) * H;
      ya[r0] = o[0];
      yb[r0] = o[1];
      ya[r1] = o[2];
      yb[r1] = o[3];
    }
  }
}

// ISA dispatch: without -march the compiler targets baseline x86-64 (SSE2,
// no FMA), about 4x slower here than AVX2+FMA. The task bodies are compiled
// once more for AVX2+FMA and picked at run time when the CPU has them;
// MOE_CPU_KERNELS=generic forces the baseline build (to test it). Results
// are deterministic per machine; FMA may change the last bits between
// machines.
using TaskFn = void (*)(const Job&, int64_t, int64_t);
struct Kernels {
  TaskFn gate_up, down;
};
void gate_up_generic(const Job& j, int64_t task, int64_t w) { gate_up_task(j, task, w); }
void down_generic(const Job& j, int64_t task, int64_t w) { down_task(j, task, w); }
#if defined(__x86_64__) && defined(__GNUC__)
#define MOE_CPU_AVX2_KERNELS 1
__attribute__((target("avx2,fma"))) void gate_up_avx2(const Job& j, int64_t task, int64_t w) {
  gate_up_task(j, task, w);
}
__attribute__((target("avx2,fma"))) void down_avx2(const Job& j, int64_t task, int64_t w) {
  down_task(j, task, w);
}
#endif

const Kernels& kernels() {
  static const Kernels k = [] {
    const char* forced = std::getenv("MOE_CPU_KERNELS");
    const bool generic = forced && std::strcmp(forced, "generic") == 0;
#ifdef MOE_CPU_AVX2_KERNELS
    if (!generic && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return Kernels{gate_up_avx2, down_avx2};
#endif
    (void)generic;
    return Kernels{gate_up_generic, down_generic};
  }();
  return k;
}

}  // namespace

float activate(int activation, float v) {
  switch (activation) {
    case MOE_ACTIVATION_SILU:
      return v / (1.0f + std::exp(-v));
    case MOE_ACTIVATION_GELU:
      return 0.5f * v * std::erfc(v * -0.70710678118654752f);
    case MOE_ACTIVATION_GELU_TANH:
      return v / (1.0f + std::exp(-1.5957691216057307f * (v + 0.044715f * v * v * v)));
    case MOE_ACTIVATION_RELU2:
      return v < 0.0f ? 0.0f : v * v;  // NaN propagates
    default:
      return v;  // IDENTITY
  }
}

size_t runner_workspace_bytes(const RunnerPlan& plan, int64_t max_tokens, int K) {
  return Layout(plan, max_tokens, K).total;
}

void run(const RunnerPlan& plan, const RunArgs& args) {
  const int64_t T = args.T, H = plan.H, I = plan.I;
  const int K = args.K, E = plan.E_loc;
  if (T <= 0) return;
  const Layout lay(plan, T, K);
  uint8_t* ws = static_cast<uint8_t*>(args.workspace);
  float* xrows = reinterpret_cast<float*>(ws + lay.xrows);
  int64_t* block_start = reinterpret_cast<int64_t*>(ws + lay.blocks);

  const bool fp8 = plan.quant_mode != MOE_QUANT_NONE;
  const bool won = plan.weight_on_input;
  const size_t xbytes = dtype_bytes(args.x_dtype);
  const uint8_t* x = static_cast<const uint8_t*>(args.x);

  // Phase 0: token rows in f32. Plain f32 input is read in place.
  const bool x_in_place = !won && !fp8 && args.x_dtype == DType::f32;
  if (won) {
    parallel_for(T * K, 64, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        if (args.local_ids[s] < 0) continue;
        float* row = xrows + s * H;
        to_f32(x + size_t(s / K) * size_t(H) * xbytes, args.x_dtype, H, row);
        const float w = args.weights[s];
        for (int64_t c = 0; c < H; ++c) row[c] *= w;
        if (fp8) quantize_activation_row(plan, plan.a13_scale, row, H);
      }
    });
  } else if (!x_in_place) {
    parallel_for(T, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        float* row = xrows + t * H;
        to_f32(x + size_t(t) * size_t(H) * xbytes, args.x_dtype, H, row);
        if (fp8) quantize_activation_row(plan, plan.a13_scale, row, H);
      }
    });
  }

  block_start[0] = 0;
  for (int e = 0; e < E; ++e) {
    const int64_t n = args.offsets[e + 1] - args.offsets[e];
    block_start[e + 1] = block_start[e] + (n + kTokenBlock - 1) / kTokenBlock;
  }
  const int64_t n_blocks = block_start[E];

  Job job;
  job.plan = &plan;
  job.H = H;
  job.I = I;
  job.K = K;
  job.E = E;
  job.offsets = args.offsets;
  job.sorted = args.sorted_slots;
  job.block_start = block_start;
  job.xrows = x_in_place ? static_cast<const float*>(args.x) : xrows;
  job.x_by_slot = won;
  job.w13 = Weights{static_cast<const uint8_t*>(plan.w13), plan.w_dtype, plan.rows13(), H,
                    plan.quant_mode, plan.w13_scale};
  job.w2 = Weights{static_cast<const uint8_t*>(plan.w2), plan.w_dtype, H, I, plan.quant_mode,
                   plan.w2_scale};
  job.gate_base = plan.gated && plan.swap_gate_up ? I : 0;
  job.up_base = plan.gated && !plan.swap_gate_up ? I : 0;
  job.hbuf = reinterpret_cast<float*>(ws + lay.hbuf);
  job.yslot = reinterpret_cast<float*>(ws + lay.yslot);
  job.scratch = reinterpret_cast<float*>(ws + lay.scratch);
  job.scratch_row = size_t(std::max(H, I));
  job.chunks_i = (I + kChunkI - 1) / kChunkI;
  job.chunks_h = (H + kChunkH - 1) / kChunkH;

  const Kernels& kern = kernels();
  run_tasks(n_blocks * job.chunks_i,
            [&](int64_t task, int64_t worker) { kern.gate_up(job, task, worker); });

  // Phase Q: FP8 quantizes h before W2 like x before W13.
  if (fp8) {
    parallel_for(args.offsets[E], 16, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        quantize_activation_row(plan, plan.a2_scale, job.hbuf + p * I, I);
    });
  }

  run_tasks(n_blocks * job.chunks_h,
            [&](int64_t task, int64_t worker) { kern.down(job, task, worker); });

  // Phase C: per token, the weighted slot rows in slot order j = 0..K-1.
  uint8_t* y = static_cast<uint8_t*>(args.y);
  const float out_scale = args.output_scale;
  parallel_for(T, 8, [&](int64_t t0, int64_t t1) {
    float acc[kColBlock];
    for (int64_t t = t0; t < t1; ++t) {
      uint8_t* yrow = y + size_t(t) * size_t(H) * xbytes;
      bool any = false;
      for (int j = 0; j < K; ++j) any = any || args.local_ids[t * K + j] >= 0;
      if (!any) {
        std::memset(yrow, 0, size_t(H) * xbytes);  // all-zero bits are +0 in every float dtype
        continue;
      }
      for (int64_t c0 = 0; c0 < H; c0 += kColBlock) {
        const int64_t n = std::min<int64_t>(kColBlock, H - c0);
        std::fill(acc, acc + n, 0.0f);
        for (int j = 0; j < K; ++j) {
          const int64_t s = t * K + j;
          if (args.local_ids[s] < 0) continue;
          const float w = won ? 1.0f : args.weights[s];
          const float* ys = job.yslot + s * H + c0;
          for (int64_t c = 0; c < n; ++c) acc[c] += w * ys[c];
        }
        for (int64_t c = 0; c < n; ++c) acc[c] *= out_scale;
        store_row(acc, args.x_dtype, n, yrow + size_t(c0) * xbytes);
      }
    }
  });
}

}  // namespace moe::cpu
