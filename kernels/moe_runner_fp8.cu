#include "moe_runner_fp8.cuh"

#include <cuda_fp8.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include "common.cuh"
#include "moe_runner.cuh"
#include "stream.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace moe::kernels {
namespace {

using gemm::Tile;
namespace wg = moe::kernels::wgmma;

constexpr int kGroup = 128;     // BLOCK_128: weight block edge and activation group
constexpr int BK = 128;         // K bytes per stage (mma.sync tiles): one scale block
constexpr int LD = BK + 16;     // padded smem row (144 bytes): conflict-free ldmatrix
constexpr int QUANT_THREADS = 256;

enum Mode : int { kGemm1Gated = 0, kGemm1Plain = 1, kGemm2 = 2 };

size_t align256(size_t b) { return (b + 255) / 256 * 256; }

// Workspace: the bf16 runner's layout first, sized for f32 so that it holds
// the layout of every activation dtype (the id check and the reduction use
// it; GEMM2 writes the per-slot rows where moe_run_slot_rows says), then the
// FP8 buffers.
struct Layout {
  size_t tile_start, xq, xs, h, hq, hs, xqs, total;
};

Layout layout(bool block, int E_loc, int H, int I, int64_t T, int K) {
  const int64_t n = T * K;
  const size_t gh = block ? size_t(H / kGroup) : 1, gi = block ? size_t(I / kGroup) : 1;
  Layout l{};
  size_t off = align256(moe_run_workspace_bytes(DType::f32, E_loc, H, I, n));
  l.tile_start = off;  // [E_loc + 1] tile starts, then the row tile taken
  off += align256(size_t(E_loc + 2) * sizeof(int32_t));
  l.xq = off;
  off += align256(size_t(T) * size_t(H));
  l.xs = off;
  off += align256(size_t(T) * gh * sizeof(float));
  l.h = off;
  off += align256(size_t(n) * size_t(I) * sizeof(float));
  l.hq = off;
  off += align256(size_t(n) * size_t(I));
  l.hs = off;
  off += align256(size_t(n) * gi * sizeof(float));
  l.xqs = off;  // token codes in sorted order (the TMA variant), in builds with the wgmma kernels
#if defined(MOE_CUDA_WGMMA)
  off += align256(size_t(n) * size_t(H));
#endif
  l.total = off;
  return l;
}

struct Work {
  const int32_t* tile_start;
  const int32_t* rows;  // [1] the row tile of this run (chosen on the device): the kernels of the others exit
  uint8_t* xq;  // [T, H] codes of the token rows
  float* xs;    // [T, GH] their scales
  float* h;     // [n, I] f32 h at each sorted position
  uint8_t* hq;  // [n, I] its codes
  float* hs;    // [n, GI] its scales
  float* out2;  // [n, H] per-slot outputs, activation dtype (inside the bf16 runner's layout)
  int64_t n;
  uint8_t* xqs;  // [n, H] token codes in sorted order (TMA variant)
};

// --- quantization -------------------------------------------------------------

// Rows of f32/f16/bf16 values (times an optional per-row factor) to E4M3
// codes and one f32 scale per group of `group` columns: the rules of
// src/cpu/runner.cpp (dynamic: amax / 448 with NaN ignored, 0 or underflow
// -> 1; static scale 0 gives zeros; v / scale with an IEEE divide, nearest
// even, saturated to 448).
struct QuantJob {
  const void* src;
  int64_t rows;
  const int32_t* rows_dev;  // [1] device count of valid rows (clamped to rows), or null
  int cols, group;
  const float* row_factor;  // x * w[row * factor_stride] (weight on input), or null
  int factor_stride;
  const float* static_scale;  // [1] or null (dynamic)
  uint8_t* q;                 // [rows, cols]
  float* scales;              // [rows, cols / group]
  // When tile_start is set, warp 0 of block 0 also writes the tile map of
  // map_bm-row tiles (gemm::row_tile_map_warp over the dispatcher's offsets):
  // the token rows' quantization is the runner's first kernel, and the map
  // on its own was one more launch of a single warp.
  // The row tile is map_bm, or map_bm_small (when set) if the local slots
  // are at most map_small_max_avg per expert; written to *rows_out.
  int32_t* tile_start;
  int32_t* rows_out;
  const int32_t* map_offsets;
  int map_E, map_bm, map_bm_small, map_small_max_avg;
  int64_t map_n;
};

// The FP8 runner kernels start with pdl_wait() (launch_pdl; the 128-row path is
// launched without it, see launch_gemm_tma, where both calls are no-ops).
__device__ __forceinline__ void quant_prologue(const QuantJob& j) {
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  if (j.tile_start && blockIdx.x == 0 && threadIdx.x < 32)
    gemm::row_tile_map_warp(j.map_offsets, j.map_E, j.map_n, j.map_bm, j.map_bm_small, j.map_small_max_avg,
                            j.tile_start, j.rows_out);
}

// Eight values from 16-byte aligned memory (one 16-byte load for 16-bit
// types, two for f32).
template <class T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_f32(h[i]);
  }
}

// Eight values / s as E4M3 codes (byte i = value i).
__device__ __forceinline__ uint2 quant8(const float (&v)[8], float s) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    w[i] = __nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(v[2 * i], s), __fdiv_rn(v[2 * i + 1], s)),
                                    __NV_SATFINITE, __NV_E4M3);
  return make_uint2(w[0] | (w[1] << 16), w[2] | (w[3] << 16));
}

__device__ __forceinline__ float amax8(const float (&v)[8]) {
  float m = 0.0f;  // fmaxf drops NaN: a NaN never sets the scale
#pragma unroll
  for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(v[i]));
  return m;
}

// Rows with values: all, or the device count (clamped). With a device count
// the kTmaPadRows rows after it are written too, as zero codes (the TMA
// variant's boxes read them; see gemm::kTmaPadRows).
__device__ __forceinline__ int64_t quant_rows(const QuantJob& j) {
  if (!j.rows_dev) return j.rows;
  const int64_t r = *j.rows_dev;
  return r < 0 ? 0 : (r < j.rows ? r : j.rows);
}
__device__ __forceinline__ int64_t quant_rows_written(const QuantJob& j, int64_t valid) {
  if (!j.rows_dev) return valid;
  return valid + gemm::kTmaPadRows < j.rows ? valid + gemm::kTmaPadRows : j.rows;
}

// The scale of a group from its amax (dynamic) or the static scale; `zero`:
// a static scale of 0 (the group quantizes to zeros).
__device__ __forceinline__ float group_scale(const QuantJob& j, float amax, bool& zero) {
  zero = false;
  if (j.static_scale) {
    const float s = *j.static_scale;
    zero = s == 0.0f;
    return s;
  }
  const float s = __fdiv_rn(amax, 448.0f);
  return s > 0.0f ? s : 1.0f;
}

// Groups of 128 columns (BLOCK_128): one half-warp per (row, group), eight
// values per lane held in registers between the amax and the codes.
template <class T>
__global__ void __launch_bounds__(QUANT_THREADS) quantize128_kernel(QuantJob j) {
  quant_prologue(j);
  const int l = threadIdx.x & 15, half = (threadIdx.x >> 4) & 1;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int per_row = j.cols / kGroup;
  const int64_t valid = quant_rows(j);
  const int64_t total = quant_rows_written(j, valid) * per_row;
  const T* src = static_cast<const T*>(j.src);
  // Both halves of a warp run the same iterations (full-warp shuffles).
  for (int64_t wi = warp; 2 * wi < total; wi += warps) {
    const int64_t gi = 2 * wi + half;
    const bool active = gi < total;
    const int64_t row = active ? gi / per_row : 0;
    const int64_t off = row * j.cols + (gi - row * per_row) * kGroup + l * 8;
    float v[8];
    if (active && row < valid) {
      load8(src + off, v);
      if (j.row_factor) {
        const float f = j.row_factor[row * j.factor_stride];
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] *= f;
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = 0.0f;
    }
    float amax = amax8(v);
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, o));
    bool zero;
    const float s = group_scale(j, amax, zero);
    if (!active) continue;
    if (l == 0) j.scales[gi] = zero ? 0.0f : s;
    *reinterpret_cast<uint2*>(j.q + off) = zero ? make_uint2(0, 0) : quant8(v, s);
  }
}

// Any group size (per tensor: a whole row): one block per (row, group),
// eight columns per thread per step, the amax reduced over the block; the
// amax pass and the code pass both read the group (the second from cache).
// A warp per group (before v17) left a decode batch, a handful of rows of
// 4096-14336 columns, to a handful of warps that walked their rows one
// dependent load after another.
template <class T>
__global__ void __launch_bounds__(QUANT_THREADS) quantize_kernel(QuantJob j) {
  __shared__ float warp_amax[QUANT_THREADS / 32];
  quant_prologue(j);
  const int tid = threadIdx.x, lane = tid & 31;
  const int per_row = j.cols / j.group;
  const int64_t valid = quant_rows(j);
  const int64_t rows = quant_rows_written(j, valid);
  const T* src = static_cast<const T*>(j.src);
  for (int64_t gi = blockIdx.x; gi < rows * per_row; gi += gridDim.x) {  // uniform over the block
    const int64_t row = gi / per_row;
    const int c0 = int(gi % per_row) * j.group;
    const bool pad = row >= valid;  // a zero row after the valid ones
    const T* in = src + row * j.cols + c0;
    const float f = j.row_factor && !pad ? j.row_factor[row * j.factor_stride] : 1.0f;
    auto values = [&](int c, float (&v)[8]) {
      if (pad) {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.0f;
        return;
      }
      load8(in + c, v);
      if (j.row_factor) {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] *= f;
      }
    };
    float amax = 0.0f;
    if (!j.static_scale) {
#pragma unroll 4
      for (int c = tid * 8; c < j.group; c += QUANT_THREADS * 8) {  // group % 16 == 0: whole chunks
        float v[8];
        values(c, v);
        amax = fmaxf(amax, amax8(v));
      }
      amax = warp_max(amax);
      if (lane == 0) warp_amax[tid >> 5] = amax;
      __syncthreads();
#pragma unroll
      for (int i = 0; i < QUANT_THREADS / 32; ++i) amax = fmaxf(amax, warp_amax[i]);
      __syncthreads();  // read by all before the next group writes it
    }
    bool zero;
    const float s = group_scale(j, amax, zero);
    if (tid == 0) j.scales[row * per_row + c0 / j.group] = zero ? 0.0f : s;
    uint8_t* out = j.q + row * j.cols + c0;
#pragma unroll 4
    for (int c = tid * 8; c < j.group; c += QUANT_THREADS * 8) {
      float v[8];
      values(c, v);
      *reinterpret_cast<uint2*>(out + c) = zero ? make_uint2(0, 0) : quant8(v, s);
    }
  }
}

template <class T>
cudaError_t launch_quantize(const QuantJob& j, cudaStream_t stream) {
  const int64_t groups = j.rows * (j.cols / j.group);
  // quantize128_kernel: a half-warp per group; quantize_kernel: a block.
  const int64_t blocks = j.group == kGroup
                             ? std::min<int64_t>(((groups + 1) / 2 + QUANT_THREADS / 32 - 1) / (QUANT_THREADS / 32), 16384)
                             : std::min<int64_t>(groups, 16384);
  const dim3 grid(unsigned(std::max<int64_t>(blocks, 1)));
  return launch_pdl(j.group == kGroup ? quantize128_kernel<T> : quantize_kernel<T>, grid, dim3(QUANT_THREADS), 0,
                    stream, j);
}

cudaError_t launch_quantize_dtype(DType dt, const QuantJob& j, cudaStream_t stream) {
  switch (dt) {
    case DType::bf16: return launch_quantize<__nv_bfloat16>(j, stream);
    case DType::f16: return launch_quantize<__half>(j, stream);
    default: return launch_quantize<float>(j, stream);
  }
}

// --- FP8 grouped GEMM ------------------------------------------------------------

// d += a (16 x 32, row) * b (32 x 8, col), E4M3 inputs, f32 accumulators.
__device__ __forceinline__ void mma_e4m3(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();  // the host refuses FP8 below compute capability 8.9
#endif
}

// Slot of sorted position pos, or -1 when it is not a valid slot index.
__device__ __forceinline__ int32_t slot_at(const Fp8RunParams& p, int64_t n, int64_t pos) {
  const int32_t s = p.sorted_slots[pos];
  return (s >= 0 && s < n) ? s : -1;
}

// Columns (col, col + 1) of GEMM2's per-slot row: the activation dtype, as
// the bf16 runner's rows (the reduction reads that type).
__device__ __forceinline__ void store_slot_pair(const Fp8RunParams& p, const Work& w, int32_t slot, int col,
                                                float a0, float a1) {
  const int64_t idx = int64_t(slot) * p.H + col;
  if (p.dtype == DType::bf16)
    *reinterpret_cast<uint32_t*>(reinterpret_cast<__nv_bfloat16*>(w.out2) + idx) = pack2<__nv_bfloat16>(a0, a1);
  else if (p.dtype == DType::f16)
    *reinterpret_cast<uint32_t*>(reinterpret_cast<__half*>(w.out2) + idx) = pack2<__half>(a0, a1);
  else
    *reinterpret_cast<float2*>(w.out2 + idx) = make_float2(a0, a1);
}

// Columns (col, col + 1) of an epilogue, already scaled: GEMM2 writes the
// slot's row (store_slot_pair), GEMM1 h's row `pos`, activation ACT
// (gemm::with_activation) of the gate pair g, times the up pair u if gated.
// Every FP8 tile kernel's epilogue ends here.
template <int MODE, int ACT>
__device__ __forceinline__ void epilogue_pair(const Fp8RunParams& p, const Work& w, int32_t slot, int64_t pos,
                                              int col, float g0, float g1, float u0, float u1) {
  if (MODE == kGemm2) {
    store_slot_pair(p, w, slot, col, g0, g1);
    return;
  }
  float h0 = gemm::activate_fast_as<ACT>(p.activation, g0), h1 = gemm::activate_fast_as<ACT>(p.activation, g1);
  if (MODE == kGemm1Gated) {
    h0 *= u0;
    h1 *= u1;
  }
  *reinterpret_cast<float2*>(w.h + pos * p.I + col) = make_float2(h0, h1);
}

// A row `pos` of the tile (GEMM1: the token's codes; GEMM2: h's codes) and
// its scale row, or nulls for a slot index out of range.
template <int MODE>
__device__ __forceinline__ void a_row(const Fp8RunParams& p, const Work& w, int64_t pos,
                                      const uint8_t*& codes, const float*& scales) {
  const int Kdim = MODE == kGemm2 ? p.I : p.H;
  const int groups = p.block128 ? Kdim / kGroup : 1;
  int64_t r = pos;
  if (MODE != kGemm2) {
    const int32_t slot = slot_at(p, w.n, pos);
    if (slot < 0) {
      codes = nullptr;
      scales = nullptr;
      return;
    }
    r = slot / p.K;
  }
  codes = (MODE == kGemm2 ? w.hq : w.xq) + r * Kdim;
  scales = (MODE == kGemm2 ? w.hs : w.xs) + r * groups;
}

// First weight row of column c of set `set` (0: gate or the only one, 1: up).
template <int MODE>
__device__ __forceinline__ int weight_row(const Fp8RunParams& p, int set, int c) {
  if (MODE != kGemm1Gated) return c;
  const bool is_up = set == 1;
  return c + ((is_up != p.swap_gate_up) ? p.I : 0);
}

// Tile configuration of the mma.sync kernel: BM sorted rows x BN columns per
// weight set, WM x WN warps, STAGES cp.async stages of one K block (BK bytes)
// each. Every configuration walks K in the same order with the same m16n8k32
// fragments and promotes every 128 columns, so an output element gets
// bitwise the same value whichever configuration (batch size) computed it.
template <int BM_, int BN_, int WM_, int WN_, int STAGES_>
struct Fp8Cfg {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, STAGES = STAGES_;
  static constexpr int THREADS = WM * WN * 32;
};
// 64-row tiles (2 x 2 warps of 32 x 32); 16- and 32-row decode tiles with
// narrow column slices and deep pipelines, so that a handful of rows per
// expert still keeps many weight bytes in flight on every SM (the bf16
// runner's decode tiles, kernels/moe_runner.cu).
using Fp8CfgMid = Fp8Cfg<64, 64, 2, 2, 3>;
// 32-row tiles: 6 stages (run 104, fp8_bench T=64, runner us, 8 / 6 stages:
// DeepSeek slice block 386-388 / 357, per-tensor 310-313 / 292-294, Mixtral
// block 627-631 / 581-582, per-tensor 638 / 616; 4 stages was 1.5% slower
// than 8 on Mixtral per-tensor).
using Fp8CfgDecode32 = Fp8Cfg<32, 32, 1, 4, 6>;
using Fp8CfgDecode16 = Fp8Cfg<16, 16, 1, 2, 12>;
using Fp8CfgDecode16s6 = Fp8Cfg<16, 16, 1, 2, 6>;
using Fp8CfgDecode16s4 = Fp8Cfg<16, 16, 1, 2, 4>;  // stages: decode_stages (moe_runner.cuh)

template <class Cfg, int NSETS>
constexpr int fp8_smem_bytes() {
  return Cfg::STAGES * (Cfg::BM + NSETS * Cfg::BN) * LD;
}

template <int MODE, bool BLOCK, class Cfg>
__global__ void __launch_bounds__(Cfg::THREADS) fp8_gemm_kernel(Fp8RunParams p, Work w) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, STAGES = Cfg::STAGES, THREADS = Cfg::THREADS;
  constexpr int NSETS = MODE == kGemm1Gated ? 2 : 1;
  constexpr int WTM = BM / Cfg::WM, WTN = BN / Cfg::WN;  // warp tile
  constexpr int MI = WTM / 16, NI = WTN / 8;
  static_assert(WTM % 16 == 0 && WTN % 8 == 0 && (NI == 1 || NI % 2 == 0), "warp tile");
  static_assert(kGroup % BN == 0, "a column tile lies inside one 128-row weight block");
  static_assert(THREADS % (BK / 16) == 0, "whole rows per pass");
  constexpr int A_CHUNKS = BM * BK / 16 / THREADS;  // 16-byte chunks per thread
  constexpr int B_CHUNKS = NSETS * BN * BK / 16 / THREADS;
  static_assert(A_CHUNKS * THREADS * 16 == BM * BK && B_CHUNKS * THREADS * 16 == NSETS * BN * BK,
                "whole chunks per thread");
  extern __shared__ __align__(128) uint8_t smem[];
  auto As = reinterpret_cast<uint8_t (*)[BM][LD]>(smem);
  auto Bs = reinterpret_cast<uint8_t (*)[NSETS * BN][LD]>(smem + STAGES * BM * LD);
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  if (*w.rows != BM) return;  // another row tile was taken

  Tile ti;
  if (!gemm::find_tile<BM>(w.tile_start, p.offsets, p.E_loc, w.n, blockIdx.x, ti)) return;
  const int n0 = blockIdx.y * BN;
  const int N = MODE == kGemm2 ? p.H : p.I;
  const int Kdim = MODE == kGemm2 ? p.I : p.H;
  const int rows_w = MODE == kGemm2 ? p.H : (NSETS * p.I);  // rows of one expert's weight
  const uint8_t* wmat = (MODE == kGemm2 ? p.w2 : p.w13) + int64_t(ti.e) * rows_w * Kdim;
  const float* wscale = MODE == kGemm2 ? p.w2_scale : p.w13_scale;
  const int KT = (Kdim + BK - 1) / BK;
  const int tid = threadIdx.x;

  // Per-thread copy sources, resolved once (the gather through sorted_slots).
  // Chunk i of a thread: row tid / 8 + ROW_STEP i, bytes kc..kc+15 of the stage.
  constexpr int ROW_STEP = THREADS / (BK / 16);
  const int r0 = tid / (BK / 16), kc = (tid % (BK / 16)) * 16;
  const uint8_t* a_src[A_CHUNKS];
#pragma unroll
  for (int i = 0; i < A_CHUNKS; ++i) {
    const float* unused;
    a_src[i] = nullptr;
    if (r0 + i * ROW_STEP < ti.rows) a_row<MODE>(p, w, ti.row_begin + r0 + i * ROW_STEP, a_src[i], unused);
  }
  const uint8_t* b_src[B_CHUNKS];
#pragma unroll
  for (int i = 0; i < B_CHUNKS; ++i) {
    const int br = r0 + i * ROW_STEP;
    const int col = n0 + br % BN;
    b_src[i] = col < N ? wmat + int64_t(weight_row<MODE>(p, br / BN, col)) * Kdim : nullptr;
  }

  auto load_stage = [&](int stage, int kt) {
    const int k = kt * BK + kc;
    const bool k_ok = k < Kdim;  // Kdim % 16 == 0: whole chunks
#pragma unroll
    for (int i = 0; i < A_CHUNKS; ++i) {
      const bool ok = a_src[i] != nullptr && k_ok;
      gemm::cp_async16(&As[stage][r0 + i * ROW_STEP][kc], ok ? a_src[i] + k : wmat, ok);
    }
#pragma unroll
    for (int i = 0; i < B_CHUNKS; ++i) {
      const bool ok = b_src[i] != nullptr && k_ok;
      gemm::cp_async16(&Bs[stage][r0 + i * ROW_STEP][kc], ok ? b_src[i] + k : wmat, ok);
    }
  };

  const int lane = tid & 31, warp = tid >> 5;
  const int wm = warp / Cfg::WN, wn = warp % Cfg::WN;
  const int g = lane >> 2, c2 = (lane & 3) * 2;

  // Scale rows of this thread's accumulator rows (wm * WTM + mi * 16 + g + half * 8).
  const float* srow[MI][2];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = wm * WTM + mi * 16 + g + half * 8;
      const uint8_t* unused;
      srow[mi][half] = nullptr;
      if (r < ti.rows) a_row<MODE>(p, w, ti.row_begin + r, unused, srow[mi][half]);
    }
  // BLOCK: the weight scale row of each set (the tile lies in one 128-row block).
  const float* wsrow[NSETS];
#pragma unroll
  for (int s = 0; s < NSETS; ++s) {
    const int rb = weight_row<MODE>(p, s, n0) / kGroup;
    wsrow[s] = BLOCK ? wscale + (int64_t(ti.e) * (rows_w / kGroup) + rb) * (Kdim / kGroup) : wscale;
  }

  float acc[NSETS][MI][NI][4];
  float part[NSETS][MI][NI][4];
#pragma unroll
  for (int s = 0; s < NSETS; ++s)
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[s][mi][ni][r] = 0.0f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    gemm::cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    // Scales of this K block, loaded early: consumed after the MMAs.
    float sa[MI][2], sw[NSETS];
    if (BLOCK) {
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int half = 0; half < 2; ++half)
          sa[mi][half] = srow[mi][half] ? srow[mi][half][kt] : 0.0f;
#pragma unroll
      for (int s = 0; s < NSETS; ++s) sw[s] = wsrow[s][kt];
    }
    gemm::cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int next = kt + STAGES - 1;
    if (next < KT) load_stage(next % STAGES, next);
    gemm::cp_async_commit();
    const int st = kt % STAGES;
#pragma unroll
    for (int s = 0; s < NSETS; ++s)
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
          for (int r = 0; r < 4; ++r) part[s][mi][ni][r] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 32) {
      // 8-bit fragments of m16n8k32 have the byte layout of the 16-bit ones
      // of m16n8k16, so ldmatrix.b16 addresses them with byte offsets.
      uint32_t a[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        gemm::ldmatrix_x4(a[mi], &As[st][wm * WTM + mi * 16 + (lane & 15)][kk + (lane >> 4) * 16]);
#pragma unroll
      for (int s = 0; s < NSETS; ++s) {
        if constexpr (NI == 1) {
          uint32_t b[2];
          gemm::ldmatrix_x2(b, &Bs[st][s * BN + wn * WTN + (lane & 7)][kk + ((lane >> 3) & 1) * 16]);
#pragma unroll
          for (int mi = 0; mi < MI; ++mi) mma_e4m3(part[s][mi][0], a[mi], b[0], b[1]);
        } else {
#pragma unroll
          for (int nj = 0; nj < NI / 2; ++nj) {
            uint32_t b[4];
            const int nrow = s * BN + wn * WTN + nj * 16 + (lane & 7) + (lane >> 4) * 8;
            gemm::ldmatrix_x4(b, &Bs[st][nrow][kk + ((lane >> 3) & 1) * 16]);
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
              mma_e4m3(part[s][mi][nj * 2], a[mi], b[0], b[1]);
              mma_e4m3(part[s][mi][nj * 2 + 1], a[mi], b[2], b[3]);
            }
          }
        }
      }
    }
    // Promotion to the f32 total every 128 columns of K (with the block scales).
#pragma unroll
    for (int s = 0; s < NSETS; ++s)
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            if (BLOCK)
              acc[s][mi][ni][r] = fmaf(part[s][mi][ni][r], sa[mi][r >> 1] * sw[s], acc[s][mi][ni][r]);
            else
              acc[s][mi][ni][r] += part[s][mi][ni][r];
          }
  }
  gemm::cp_async_wait<0>();

  const float w_tensor = BLOCK ? 1.0f : wscale[ti.e];
  gemm::with_activation(MODE == kGemm2 ? gemm::kActRuntime : p.activation, [&](auto act) {
    constexpr int ACT = decltype(act)::value;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = wm * WTM + mi * 16 + g + half * 8;
        if (r >= ti.rows || !srow[mi][half]) continue;
        const int64_t pos = ti.row_begin + r;
        const float f = BLOCK ? 1.0f : srow[mi][half][0] * w_tensor;
        int32_t slot = -1;
        if (MODE == kGemm2) {
          slot = slot_at(p, w.n, pos);
          if (slot < 0) continue;
        }
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          const int col = n0 + wn * WTN + ni * 8 + c2;
          if (col >= N) continue;  // N % 16 == 0: col + 1 < N as well
          epilogue_pair<MODE, ACT>(p, w, slot, pos, col, acc[0][mi][ni][half * 2] * f,
                                   acc[0][mi][ni][half * 2 + 1] * f, acc[NSETS - 1][mi][ni][half * 2] * f,
                                   acc[NSETS - 1][mi][ni][half * 2 + 1] * f);
        }
      }
  });
}

// --- streaming decode tiles (sm_90a, 16-row tiles) -------------------------------
//
// moe_runner.cu's gemm_stream_kernel for E4M3 codes (kernels/stream.cuh):
// the tiles, fragments and K order of fp8_gemm_kernel's 16-row decode
// configurations (16 rows x BN columns per weight set, one warp per 8
// columns, m16n8k32 over each 128-column K block in order into a partial
// sum that is then promoted), so every output is bitwise what those give
// (gpu.fp8.stream_kernels compares them); what changes is how the weights
// arrive. fp8_gemm_kernel keeps STAGES - 1 K blocks of one tile in flight per
// block and starts every tile's pipeline from empty; here persistent blocks
// (4 per SM, launch_stream16) walk the (row tile, column tile) items, each
// with a producer warp that copies each K block's weight tile by one TMA copy
// per weight set and the tile's valid code rows by cp.async into a ring of
// 5-12 buffers that runs on across items. Block scales travel with the
// codes: the producer copies each row's K-block scale into the 16 padding
// bytes after the row's 128 code bytes (byte kScaleOff; zeros where the row
// has no slot, as fp8_gemm_kernel's 0 scale) and the weight sets' scales
// after row 0's, so the consumers read them from shared memory after the
// buffer's wait. Needs K % 128 == 0 (whole K blocks; otherwise the caller
// keeps fp8_gemm_kernel). racecheck does not model the mbarriers between the
// producer warp and the consumers (see gemm_stream_kernel); memcheck,
// synccheck and the GPU suite check this kernel.
constexpr int kScaleOff = BK;  // a K block's scales in an A row's padding (fp8_stream_kernel)

template <int MODE, bool BLOCK, class Cfg>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::BLOCKS)
    fp8_stream_kernel(Fp8RunParams p, Work w, const __grid_constant__ CUtensorMap map_b, int cols) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, NSETS = Cfg::NSETS, STAGES = Cfg::STAGES;
  constexpr int MI = BM / 16;
  static_assert(NSETS == (MODE == kGemm1Gated ? 2 : 1), "weight sets of the mode");
  static_assert(kGroup % BN == 0, "a column tile lies inside one 128-row weight block");
  static_assert(Cfg::A_LD >= kScaleOff + 4 * (1 + NSETS), "room for the scales in an A row's padding");
  extern __shared__ unsigned char fp8_stream_smem_raw[];
  __shared__ __align__(8) uint64_t bars[2 * STAGES];
  __shared__ gemm::StreamItem<BM> desc[STAGES];
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  if (*w.rows != BM) return;  // another row tile was taken
  const int tiles = w.tile_start[p.E_loc];
  const int64_t items = int64_t(tiles > 0 ? tiles : 0) * cols;
  if (int64_t(blockIdx.x) >= items) return;

  const gemm::StreamRing<Cfg> ring(fp8_stream_smem_raw, bars);
  const wg::Pipeline<STAGES>& pipe = ring.pipe;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) ring.init();
  __syncthreads();
  const int Kdim = MODE == kGemm2 ? p.I : p.H;
  const int KT = Kdim / BK;
  const int rows_w = MODE == kGemm2 ? p.H : (NSETS * p.I);  // rows of one expert's weight

  if (warp == 0) {  // producer
    int g = 0;      // pipeline step over all items
    // Items in order: row tile fastest (blocks at work at the same time on
    // one expert's row tiles read the same weight tile).
    for (int64_t u = blockIdx.x; u < items; u += gridDim.x) {
      Tile ti;
      if (!gemm::warp_find_tile<BM>(w.tile_start, p.offsets, p.E_loc, w.n, int(u % tiles), ti)) continue;
      const int n0 = int(u / tiles) * BN;
      const int32_t slot = lane < ti.rows ? slot_at(p, w.n, ti.row_begin + lane) : -1;
      // This lane copies 16-byte chunk lane % 8 of code rows lane / 8 + 4 i
      // (BLOCK, chunk 0's lanes: those rows' scales too).
      const uint8_t* src[BM / 4];
      const float* ssrc[BM / 4];
#pragma unroll
      for (int i = 0; i < BM / 4; ++i) {
        const int r = lane / 8 + 4 * i;
        const int32_t rs = __shfl_sync(kFullMask, slot, r);
        src[i] = nullptr;
        ssrc[i] = nullptr;
        if (r < ti.rows) {
          if (MODE == kGemm2) {
            src[i] = w.hq + (ti.row_begin + r) * int64_t(p.I) + (lane % 8) * 16;
            ssrc[i] = w.hs + (ti.row_begin + r) * int64_t(KT);
          } else if (rs >= 0) {
            src[i] = w.xq + int64_t(rs / p.K) * p.H + (lane % 8) * 16;
            ssrc[i] = w.xs + int64_t(rs / p.K) * KT;
          }
        }
      }
      // BLOCK: lane s < NSETS copies weight set s's scale.
      const float* wsrc = nullptr;
      if (BLOCK && lane < NSETS)
        wsrc = (MODE == kGemm2 ? p.w2_scale : p.w13_scale) +
               (int64_t(ti.e) * (rows_w / kGroup) + weight_row<MODE>(p, lane, n0) / kGroup) * KT;
      unsigned char* a_dst = ring.a_rows(0) + (lane / 8) * Cfg::A_LD +
                             (lane % 8) * 16;
      int brow[NSETS];
#pragma unroll
      for (int s = 0; s < NSETS; ++s) brow[s] = ti.e * rows_w + weight_row<MODE>(p, s, n0);
      for (int kt = 0; kt < KT; ++kt, ++g) {
        const int st = ring.acquire(g);
        const uint32_t full = pipe.full0 + 8 * st;
        if (kt == 0) {
          if (lane < BM) desc[st].slot[lane] = slot;
          if (lane == 0) desc[st].row_begin = ti.row_begin, desc[st].rows = ti.rows, desc[st].n0 = n0, desc[st].e = ti.e;
          __syncwarp();
        }
        if (lane == 0) {
          wg::mbar_arrive_expect_tx(full, Cfg::B_BYTES);  // releases the descriptor too
#pragma unroll
          for (int s = 0; s < NSETS; ++s)
            wg::tma_load_2d(ring.b_base + st * Cfg::B_BYTES + uint32_t(s * BN) * wg::kRowBytes, &map_b, kt * BK,
                            brow[s], full);
        }
#pragma unroll
        for (int i = 0; i < BM / 4; ++i) {
          unsigned char* dst = a_dst + st * Cfg::A_BYTES + 4 * i * Cfg::A_LD;
          if (src[i]) gemm::cp_async16(dst, src[i] + kt * BK, true);
          if (BLOCK && lane % 8 == 0)
            gemm::cp_async4(dst + kScaleOff, ssrc[i] ? ssrc[i] + kt : w.xs, ssrc[i] != nullptr);
        }
        if (BLOCK && lane < NSETS)
          gemm::cp_async4(ring.a_rows(st) + kScaleOff + 4 * (1 + lane), wsrc + kt, true);
        wg::cp_async_arrive_noinc(full);
      }
    }
    ring.finish(g, desc);
    return;
  }

  const int wn = warp - 1;  // this warp's 8 columns of every set
  const int brow = wn * 8 + (lane & 7);
  const int N = MODE == kGemm2 ? p.H : p.I;
  const float* wscale = MODE == kGemm2 ? p.w2_scale : p.w13_scale;
  for (int g = 0;;) {
    pipe.consume(g);
    const gemm::StreamItem<BM>& it = desc[g % STAGES];
    const int rows = it.rows;
    if (rows == 0) break;
    const int64_t row_begin = it.row_begin;
    const int n0 = it.n0, e = it.e;
    // This thread's accumulator rows (mi * 16 + lane / 4 + 8 half): slot and scale row.
    int32_t slot[MI][2];
    const float* srow[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = mi * 16 + (lane >> 2) + half * 8;
        slot[mi][half] = r < rows ? it.slot[r] : -1;
        srow[mi][half] = nullptr;
        if (r < rows) {
          if (MODE == kGemm2)
            srow[mi][half] = w.hs + (row_begin + r) * (BLOCK ? p.I / kGroup : 1);
          else if (slot[mi][half] >= 0)
            srow[mi][half] = w.xs + int64_t(slot[mi][half] / p.K) * (BLOCK ? p.H / kGroup : 1);
        }
      }
    uint32_t a_off[MI];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      const int r = mi * 16 + (lane & 15);
      a_off[mi] = uint32_t(r < rows ? r : 0) * Cfg::A_LD + uint32_t(lane >> 4) * 16;
    }
    float acc[NSETS][MI][4];
#pragma unroll
    for (int s = 0; s < NSETS; ++s)
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[s][mi][r] = 0.0f;
    for (int kt = 0; kt < KT; ++kt, ++g) {
      const int st = g % STAGES;
      if (kt > 0) pipe.consume(g);
      const unsigned char* a_st = ring.a_rows(st);
      const unsigned char* b_st = ring.b_tile(st);
      // BLOCK: this K block's scales, from the A rows' padding.
      float sa[MI][2], sw[NSETS];
      if (BLOCK) {
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int r = mi * 16 + (lane >> 2) + half * 8;
            sa[mi][half] = r < rows ? *reinterpret_cast<const float*>(a_st + r * Cfg::A_LD + kScaleOff) : 0.0f;
          }
#pragma unroll
        for (int s = 0; s < NSETS; ++s) sw[s] = *reinterpret_cast<const float*>(a_st + kScaleOff + 4 * (1 + s));
      }
      float part[NSETS][MI][4];
#pragma unroll
      for (int s = 0; s < NSETS; ++s)
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int r = 0; r < 4; ++r) part[s][mi][r] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < BK / 32; ++kk) {
        uint32_t a[MI][4];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) gemm::ldmatrix_x4(a[mi], a_st + a_off[mi] + kk * 32);
#pragma unroll
        for (int s = 0; s < NSETS; ++s) {
          uint32_t b[2];
          gemm::ldmatrix_x2(b, b_st + wg::swizzled_offset(s * BN + brow, 2 * kk + ((lane >> 3) & 1)));
#pragma unroll
          for (int mi = 0; mi < MI; ++mi) mma_e4m3(part[s][mi], a[mi], b[0], b[1]);
        }
      }
      ring.release(g);
      // Promotion (fp8_gemm_kernel's, with the block scales).
#pragma unroll
      for (int s = 0; s < NSETS; ++s)
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            if (BLOCK)
              acc[s][mi][r] = fmaf(part[s][mi][r], sa[mi][r >> 1] * sw[s], acc[s][mi][r]);
            else
              acc[s][mi][r] += part[s][mi][r];
          }
    }
    // fp8_gemm_kernel's epilogue.
    const float w_tensor = BLOCK ? 1.0f : wscale[e];
    const int col = n0 + wn * 8 + (lane & 3) * 2;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = mi * 16 + (lane >> 2) + half * 8;
        if (r >= rows || !srow[mi][half] || col >= N) continue;  // N % 16 == 0: col + 1 < N as well
        const int64_t pos = row_begin + r;
        const float f = BLOCK ? 1.0f : srow[mi][half][0] * w_tensor;
        if (MODE == kGemm2 && slot[mi][half] < 0) continue;
        epilogue_pair<MODE, gemm::kActRuntime>(p, w, slot[mi][half], pos, col, acc[0][mi][2 * half] * f,
                                               acc[0][mi][2 * half + 1] * f, acc[NSETS - 1][mi][2 * half] * f,
                                               acc[NSETS - 1][mi][2 * half + 1] * f);
      }
  }
}

// --- wgmma path (sm_90a, 128-row tiles) -------------------------------------------
//
// 128 sorted rows x 128 weight rows (gated GEMM1: 64 gate and the matching 64
// up rows) per block, two warpgroups of 64 rows each on wgmma m64n128k32
// (E4M3 codes, K-major, 128B-swizzled shared memory: one 128-byte row is one
// 128-column scale block). The four MMAs of a K block accumulate into
// `part`, which is then promoted into the f32 total with the block's scales,
// as the mma.sync kernel above does. Variant 1 stages tiles with cp.async
// from all 256 threads; variant 2 (MOE_RUNNER_WGMMA=2) has a producer
// warpgroup stream them by TMA (A from the token codes copied in sorted
// order, or from h's codes) on mbarriers, as the bf16 runner's variant 2.
constexpr int WG_BM = 128, WG_BN = 128, WG_STAGES = 6, WG_THREADS = 256, WS_THREADS = 384;
// The TMA kernel's producer warpgroup keeps 40 registers, its consumers 232.
using WsRegs = wg::RegSplit<WS_THREADS, 128, 40, 232>;
using WgStaging = wg::Staging<WG_THREADS, WG_BM, WG_BN, WG_STAGES>;
static_assert(BK == wg::kRowBytes, "a K block is one swizzle row of E4M3 codes");

// A consumer warpgroup's share of a 128-row tile: its 64 rows' scales, the
// MMAs of one K block, the promotion and the epilogue. WN: weight rows of the
// tile (gated GEMM1: half gate, half the matching up rows). 128 (variant 1,
// and variant 2 with MOE_RUNNER_FP8_BN=128): one m64n128k32 chain per K
// block, two K blocks in flight (part[2]). 256 (variant 2): two 128-column
// halves per K block through one part buffer (acc takes 128 registers, so a
// second part does not fit), issued, waited for and promoted one after the
// other; the other consumer warpgroup's MMAs fill the tensor cores while one
// promotes. A half is one 128-row weight scale block either way (gated: the
// gate block, then the up block), and each column goes through the same
// MMAs and promotions as with WN = 128: bitwise the same outputs.
template <int MODE, bool BLOCK, int WN>
struct Fp8WgMath {
  static constexpr int NSETS = MODE == kGemm1Gated ? 2 : 1;
  static constexpr int NH = WN / 128;        // 128-column MMA halves
  static constexpr int BNS = WN / NSETS;     // output columns per weight set
  static constexpr int NSC = NH == 1 ? NSETS : NH;  // weight scale rows: per set (WN 128) or per half
  static_assert(WN == 128 || WN == 256, "tile width");
  int group;                                 // 0 or 1: rows 64 group ..
  int halves;                                // halves with columns below N (WN 256, plain: 1 at the edge)
  const float* srow[2];                      // scale rows of this thread's two rows
  const float* wsrow[NSC];                   // BLOCK: the weight scale row of each set / half
  float acc[WN / 2];
  float part[NH == 1 ? 2 : 1][64];  // WN 128: two K blocks in flight (issue / promote)

  __device__ __forceinline__ Fp8WgMath(const Fp8RunParams& p, const Work& w, const Tile& ti, int n0, int g)
      : group(g) {
    const int lane = threadIdx.x & 31, warp_in_group = (threadIdx.x >> 5) & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = group * 64 + warp_in_group * 16 + (lane >> 2) + 8 * h;
      const uint8_t* unused;
      srow[h] = nullptr;
      if (r < ti.rows) a_row<MODE>(p, w, ti.row_begin + r, unused, srow[h]);
    }
    const int N = MODE == kGemm2 ? p.H : p.I;
    const int Kdim = MODE == kGemm2 ? p.I : p.H;
    const int rows_w = MODE == kGemm2 ? p.H : (NSETS * p.I);
    const float* wscale = MODE == kGemm2 ? p.w2_scale : p.w13_scale;
    halves = NH == 2 && MODE != kGemm1Gated && n0 + 128 >= N ? 1 : NH;
#pragma unroll
    for (int s = 0; s < NSC; ++s) {
      const int row = NSETS == 2 ? weight_row<MODE>(p, s, n0) : n0 + 128 * s;
      wsrow[s] = !BLOCK ? wscale
                 : s < halves || NH == 1
                     ? wscale + (int64_t(ti.e) * (rows_w / kGroup) + row / kGroup) * (Kdim / kGroup)
                     : nullptr;
    }
#pragma unroll
    for (int i = 0; i < WN / 2; ++i) acc[i] = 0.0f;
  }

  // WN 128: issues this K block's MMAs into part[B] (a_tile: the A tile's
  // first row) without waiting: the caller waits (wg::wait<1>) once the next
  // block's MMAs are issued, so that the promotion of one K block overlaps the
  // MMAs of the next on the tensor cores.
  template <int B>
  __device__ __forceinline__ void issue(uint32_t a_tile, uint32_t b_tile) {
    wg::fence_operands(part[B]);
    wg::fence();
    const wg::DescSw128 da(a_tile + group * 64 * wg::kRowBytes), db(b_tile);
#pragma unroll
    for (int kk = 0; kk < BK / 32; ++kk)
      wg::mma_m64n128k32_e4m3(part[B], da.at(kk * 32), db.at(kk * 32), kk > 0 ? 1 : 0);
    wg::commit();
  }

  // acc[64 h ..] += part[B] (its MMAs waited for), times the K block's scales
  // (BLOCK; sw_h: the weight scale of those columns) for register i < 64 of
  // half h; WN 128 gated: the up columns from register 32 on (sw_up).
  template <int B>
  __device__ __forceinline__ void promote_half(int h, const float (&sa)[2], float sw_h, float sw_up) {
    wg::fence_operands(part[B]);
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      const float s = NH == 1 && NSETS == 2 && i >= 32 ? sw_up : sw_h;
      float& a = acc[(NH == 1 ? 0 : h) * 64 + i];
      if (BLOCK)
        a = fmaf(part[B][i], sa[(i & 3) >> 1] * s, a);
      else
        a += part[B][i];
    }
  }
  template <int B>
  __device__ __forceinline__ void promote(const float (&sa)[2], const float (&sw)[NSC]) {
    promote_half<B>(0, sa, sw[0], sw[NSC - 1]);
  }

  // WN 256: one K block, both halves through part[0]; release() once the
  // block's last MMAs are complete (its buffers may then be refilled).
  template <class Release>
  __device__ __forceinline__ void kblock_wide(uint32_t a_tile, uint32_t b_tile, const float (&sa)[2],
                                              const float (&sw)[NSC], Release&& release) {
#pragma unroll
    for (int h = 0; h < NH; ++h) {
      if (h >= halves) break;
      wg::fence_operands(part[0]);
      wg::fence();
      const wg::DescSw128 da(a_tile + group * 64 * wg::kRowBytes), db(b_tile + uint32_t(h) * 128 * wg::kRowBytes);
#pragma unroll
      for (int kk = 0; kk < BK / 32; ++kk)
        wg::mma_m64n128k32_e4m3(part[0], da.at(kk * 32), db.at(kk * 32), kk > 0 ? 1 : 0);
      wg::commit();
      wg::wait<0>();
      if (h + 1 == halves) release();
      promote_half<0>(h, sa, sw[h], sw[h]);
    }
  }

  // The K loop of WN 128: step(parity, kt) issues K block kt (its scales,
  // staging and MMAs into part[kt % 2]); then the MMAs of kt - 1 are waited
  // for, done(kt - 1) is called and they are promoted while those of kt run
  // (the last block: waited for, done, promoted). Peeled so that every path
  // has the same block in flight at each wait (ptxas serializes the MMAs
  // when it cannot tell).
  template <class Step, class Done>
  __device__ __forceinline__ void fp8_pipeline(int KT, float (&sa)[2][2], float (&sw)[2][NSC], Step&& step,
                                               Done&& done) {
    using Zero = std::integral_constant<int, 0>;
    using One = std::integral_constant<int, 1>;
    step(Zero{}, 0);
    for (int kt = 1;; kt += 2) {
      if (kt >= KT) {
        wg::wait<0>();
        done(kt - 1);
        promote<0>(sa[0], sw[0]);
        return;
      }
      step(One{}, kt);
      wg::wait<1>();
      done(kt - 1);
      promote<0>(sa[0], sw[0]);
      if (kt + 1 >= KT) {
        wg::wait<0>();
        done(kt);
        promote<1>(sa[1], sw[1]);
        return;
      }
      step(Zero{}, kt + 1);
      wg::wait<1>();
      done(kt);
      promote<1>(sa[1], sw[1]);
    }
  }

  __device__ __forceinline__ void scales(int kt, float (&sa)[2], float (&sw)[NSC]) const {
#pragma unroll
    for (int h = 0; h < 2; ++h) sa[h] = BLOCK && srow[h] ? srow[h][kt] : 0.0f;
#pragma unroll
    for (int s = 0; s < NSC; ++s) sw[s] = BLOCK && wsrow[s] ? wsrow[s][kt] : 0.0f;
  }

  __device__ __forceinline__ void store(const Fp8RunParams& p, const Work& w, const Tile& ti, int n0) const {
    const int N = MODE == kGemm2 ? p.H : p.I;
    const float w_tensor = BLOCK ? 1.0f : (MODE == kGemm2 ? p.w2_scale : p.w13_scale)[ti.e];
    const int lane = threadIdx.x & 31, warp_in_group = (threadIdx.x >> 5) & 3;
    gemm::with_activation(MODE == kGemm2 ? gemm::kActRuntime : p.activation, [&](auto act) {
      constexpr int ACT = decltype(act)::value;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = group * 64 + warp_in_group * 16 + (lane >> 2) + 8 * h;
        if (r >= ti.rows || !srow[h]) continue;
        const int64_t pos = ti.row_begin + r;
        const float f = BLOCK ? 1.0f : srow[h][0] * w_tensor;
        int32_t slot = -1;
        if (MODE == kGemm2) {
          slot = slot_at(p, w.n, pos);
          if (slot < 0) continue;
        }
#pragma unroll
        for (int j = 0; j < BNS / 8; ++j) {
          const int col = n0 + 8 * j + 2 * (lane & 3);
          if (col >= N) continue;  // N % 16 == 0: col + 1 < N as well
          const int ju = MODE == kGemm1Gated ? j + BNS / 8 : j;  // the up columns' block
          epilogue_pair<MODE, ACT>(p, w, slot, pos, col, acc[4 * j + 2 * h] * f, acc[4 * j + 2 * h + 1] * f,
                                   acc[4 * ju + 2 * h] * f, acc[4 * ju + 2 * h + 1] * f);
        }
      }
    });
  }
};

template <int MODE, bool BLOCK>
__global__ void __launch_bounds__(WG_THREADS, 1) fp8_wgmma_kernel(Fp8RunParams p, Work w) {
  using Math = Fp8WgMath<MODE, BLOCK, WG_BN>;
  constexpr int BNS = Math::BNS;
  extern __shared__ unsigned char fp8_wg_smem_raw[];
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  if (*w.rows != WG_BM) return;  // another row tile was taken
  const int tid = threadIdx.x;
  const WgStaging st(fp8_wg_smem_raw, tid);

  Tile ti;
  const gemm::BlockPos bp = gemm::grouped_block(gemm::kRasterGroup);
  if (!gemm::find_tile<WG_BM>(w.tile_start, p.offsets, p.E_loc, w.n, bp.tile, ti)) return;
  const int n0 = bp.col * BNS;
  const int N = MODE == kGemm2 ? p.H : p.I;
  const int Kdim = MODE == kGemm2 ? p.I : p.H;
  const int rows_w = MODE == kGemm2 ? p.H : (Math::NSETS * p.I);
  const uint8_t* wmat = (MODE == kGemm2 ? p.w2 : p.w13) + int64_t(ti.e) * rows_w * Kdim;
  const int KT = (Kdim + BK - 1) / BK;

  const uint8_t* a_src[WgStaging::A_CHUNKS];
#pragma unroll
  for (int i = 0; i < WgStaging::A_CHUNKS; ++i) {
    const int r = st.row0 + i * WgStaging::ROWS_PER_PASS;
    const float* unused;
    a_src[i] = nullptr;
    if (r < ti.rows) a_row<MODE>(p, w, ti.row_begin + r, a_src[i], unused);
  }
  const uint8_t* b_src[WgStaging::B_CHUNKS];
#pragma unroll
  for (int i = 0; i < WgStaging::B_CHUNKS; ++i) {
    const int br = st.row0 + i * WgStaging::ROWS_PER_PASS;
    const int col = n0 + br % BNS;
    b_src[i] = col < N ? wmat + int64_t(weight_row<MODE>(p, br / BNS, col)) * Kdim : nullptr;
  }
  auto load_stage = [&](int stage, int kt) {
    const int k = kt * BK + st.chunk * 16;
    const bool k_ok = k < Kdim;  // Kdim % 16 == 0: whole chunks
#pragma unroll
    for (int i = 0; i < WgStaging::A_CHUNKS; ++i) {
      const bool ok = a_src[i] != nullptr && k_ok;
      gemm::cp_async16(st.a_dst(stage, i), ok ? a_src[i] + k : wmat, ok);
    }
#pragma unroll
    for (int i = 0; i < WgStaging::B_CHUNKS; ++i) {
      const bool ok = b_src[i] != nullptr && k_ok;
      gemm::cp_async16(st.b_dst(stage, i), ok ? b_src[i] + k : wmat, ok);
    }
  };

  Math m(p, w, ti, n0, tid / 128);
  // Step kt issues K block kt's MMAs, then waits for those of kt - 1 and
  // promotes them. So the buffer refilled at step kt (after the barrier) is
  // the one step kt - 2 used: both warpgroups waited for its MMAs at step
  // kt - 1.
  constexpr int AHEAD = WG_STAGES - 2;
#pragma unroll
  for (int s = 0; s < AHEAD; ++s) {
    if (s < KT) load_stage(s, s);
    gemm::cp_async_commit();
  }
  float sa[2][2], sw[2][Math::NSETS];  // scales of the K blocks in part[0] / part[1]
  auto step = [&](auto parity, int kt) {
    constexpr int B = decltype(parity)::value;
    m.scales(kt, sa[B], sw[B]);
    gemm::cp_async_wait<AHEAD - 1>();
    wg::fence_proxy_async();
    __syncthreads();
    const int next = kt + AHEAD;
    if (next < KT) load_stage(next % WG_STAGES, next);
    gemm::cp_async_commit();
    m.template issue<B>(st.a_tile(kt % WG_STAGES), st.b_tile(kt % WG_STAGES));
  };
  m.fp8_pipeline(KT, sa, sw, step, [](int) {});
  gemm::cp_async_wait<0>();
  m.store(p, w, ti, n0);
}

// Token codes in sorted order for variant 2's GEMM1: xqs[pos] = xq[slot / K]
// for the positions before offsets[E_loc], or zeros (positions that hold no
// slot).
__global__ void sort_codes_kernel(Fp8RunParams p, Work w) {
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  if (*w.rows != WG_BM) return;  // another row tile was taken
  gemm::gather_rows_sorted(w.xq, w.xqs, p.H / 16, p.sorted_slots, w.n, p.K, p.offsets, p.E_loc);
}

// Variant 2's tiles: 128 rows x WN weight rows, STAGES buffers (the
// shared memory of one block per SM either way); the weight rows come in
// NBOX boxes of BOX_ROWS (gated: gate rows, then the matching up rows).
template <int MODE, int WN>
struct TmaTile {
  static constexpr int NSETS = MODE == kGemm1Gated ? 2 : 1;
  static constexpr int STAGES = WN == 128 ? WG_STAGES : 4;
  static constexpr int NBOX = NSETS > WN / 128 ? NSETS : WN / 128;
  static constexpr int BOX_ROWS = WN / NBOX;
  using Staging = wg::Staging<WG_THREADS, WG_BM, WN, STAGES>;
};

template <int MODE, bool BLOCK, int WN>
__global__ void __launch_bounds__(WS_THREADS, 1)
    fp8_wgmma_tma_kernel(Fp8RunParams p, Work w, const __grid_constant__ CUtensorMap map_a,
                         const __grid_constant__ CUtensorMap map_b, int tiles, int cols) {
  using Math = Fp8WgMath<MODE, BLOCK, WN>;
  using TT = TmaTile<MODE, WN>;
  using Staging = typename TT::Staging;
  constexpr int BNS = Math::BNS, STAGES = TT::STAGES;
  extern __shared__ unsigned char fp8_wg_smem_raw[];
  __shared__ __align__(8) uint64_t bars[2 * STAGES];
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  if (*w.rows != WG_BM) return;  // another row tile was taken
  const int tid = threadIdx.x;
  const Staging st(fp8_wg_smem_raw, tid);  // only its aligned buffers are used here
  const wg::Pipeline<STAGES> pipe(bars);
  const int Kdim = MODE == kGemm2 ? p.I : p.H;
  const int KT = (Kdim + BK - 1) / BK;
  // Persistent: block b takes items b, b + gridDim.x, ... of the grouped
  // order over (row tile, column tile); the pipeline runs on across items,
  // so the next item's loads overlap this one's last MMAs and epilogue.
  const int64_t items = int64_t(tiles) * cols;
  auto item = [&](int64_t u, Tile& ti, int& n0) {
    const gemm::BlockPos bp = gemm::grouped_pos(u, tiles, cols, gemm::kRasterGroup);
    n0 = bp.col * BNS;
    return gemm::find_tile<WG_BM>(w.tile_start, p.offsets, p.E_loc, w.n, bp.tile, ti);
  };
  if (tid == 0) pipe.init(2);
  __syncthreads();

  if (tid < 128) {  // producer warpgroup
    WsRegs::producer();
    if (tid == 0) {
      const int rows_w = MODE == kGemm2 ? p.H : (TT::NSETS * p.I);
      int g = 0;  // pipeline step over all items
      for (int64_t u = blockIdx.x; u < items; u += gridDim.x) {
        Tile ti;
        int n0;
        if (!item(u, ti, n0)) continue;
        int b_row[TT::NBOX];
#pragma unroll
        for (int b = 0; b < TT::NBOX; ++b)
          b_row[b] = ti.e * rows_w + (TT::NSETS == 2 ? weight_row<MODE>(p, b, n0) : n0 + b * TT::BOX_ROWS);
        for (int kt = 0; kt < KT; ++kt, ++g) {
          const int s = g % STAGES;
          const uint32_t bar = pipe.produce(g, Staging::STAGE_BYTES);
          const int k0 = kt * BK;
          wg::tma_load_2d(st.a_tile(s), &map_a, k0, ti.row_begin, bar);
#pragma unroll
          for (int b = 0; b < TT::NBOX; ++b)
            wg::tma_load_2d(st.b_tile(s) + uint32_t(b * TT::BOX_ROWS) * wg::kRowBytes, &map_b, k0, b_row[b], bar);
        }
      }
    }
    return;
  }

  WsRegs::consumer();
  int g0 = 0;  // pipeline step of the item's first K block
  for (int64_t u = blockIdx.x; u < items; u += gridDim.x) {
    Tile ti;
    int n0;
    if (!item(u, ti, n0)) continue;
    Math m(p, w, ti, n0, tid / 128 - 1);
    if constexpr (WN == 128) {
      // As variant 1: issue K block kt, wait for kt - 1, return its buffer to
      // the producer and promote it.
      float sa[2][2], sw[2][Math::NSC];
      auto step = [&](auto parity, int kt) {
        constexpr int B = decltype(parity)::value;
        m.scales(kt, sa[B], sw[B]);
        pipe.consume(g0 + kt);
        m.template issue<B>(st.a_tile((g0 + kt) % STAGES), st.b_tile((g0 + kt) % STAGES));
      };
      m.fp8_pipeline(KT, sa, sw, step, [&](int done) {
        if (tid % 128 == 0) pipe.release(g0 + done);  // K block done's MMAs are complete
      });
    } else {
      for (int kt = 0; kt < KT; ++kt) {
        float sa[2], sw[Math::NSC];
        m.scales(kt, sa, sw);
        const int g = g0 + kt;
        pipe.consume(g);
        m.kblock_wide(st.a_tile(g % STAGES), st.b_tile(g % STAGES), sa, sw, [&] {
          if (tid % 128 == 0) pipe.release(g);
        });
      }
    }
    m.store(p, w, ti, n0);
    g0 += KT;
  }
}

// Weight rows per variant-2 tile: 256, or 128 with MOE_RUNNER_FP8_BN=128
// (read at each launch, one getenv per GEMM, so that a test can run both in
// one process: gpu.fp8.tma_tile_widths). Run 70: 256 is 6-12% faster at
// T >= 8192 and within -1%..+4% at T=1024-2048 (run 67, with the exact SiLU,
// had 128 ahead by 2-5% at T=1024).
int fp8_tma_width() {
  const char* v = std::getenv("MOE_RUNNER_FP8_BN");
  return v && std::atoi(v) == 128 ? 128 : 256;
}

// Variant 2 on `tiles` row tiles: false when a tensor map cannot be made or
// the kernel not configured (the caller falls back to variant 1).
template <int MODE, bool BLOCK, int WN>
bool launch_gemm_tma(const Fp8RunParams& p, const Work& w, unsigned tiles, cudaStream_t stream) {
  using TT = TmaTile<MODE, WN>;
  constexpr CUtensorMapDataType type = CU_TENSOR_MAP_DATA_TYPE_UINT8;
  CUtensorMap map_a, map_b;
  bool ok;
  if (MODE == kGemm2) {
    ok = tma::map_rows_2d(&map_a, w.hq, uint64_t(w.n), uint64_t(p.I), WG_BM, type, 1) &&
         tma::map_rows_2d(&map_b, p.w2, uint64_t(p.E_loc) * p.H, uint64_t(p.I), TT::BOX_ROWS, type, 1);
  } else {
    ok = tma::map_rows_2d(&map_a, w.xqs, uint64_t(w.n), uint64_t(p.H), WG_BM, type, 1) &&
         tma::map_rows_2d(&map_b, p.w13, uint64_t(p.E_loc) * TT::NSETS * p.I, uint64_t(p.H), TT::BOX_ROWS,
                          type, 1);
  }
  if (!ok) return false;
  auto kernel = fp8_wgmma_tma_kernel<MODE, BLOCK, WN>;
  constexpr int smem = int(TT::Staging::SMEM_BYTES);
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
    return false;
  // One block per SM (the buffers take most of its shared memory).
  const int sms = sm_count();
  if (sms <= 0) return false;
  const int N = MODE == kGemm2 ? p.H : p.I;
  const int cols = ceil_div(N, WN / TT::NSETS);
  const int64_t items = int64_t(tiles) * cols;
  const unsigned blocks = unsigned(std::max<int64_t>(1, std::min<int64_t>(items, sms)));
  // Without PDL, as sort_codes_kernel and fp8_wgmma_kernel (the 128-row
  // path): launched with it, the FP8 runner was 2-3% slower at T=8192 (run
  // 127, same-machine A/B: Mixtral per-tensor 6804 -> 7037 us, without it
  // 6836; the DeepSeek slice block 1737 -> 1775, without it 1745).
  kernel<<<blocks, WS_THREADS, smem, stream>>>(p, w, map_a, map_b, int(tiles), cols);
  return cudaGetLastError() == cudaSuccess;
}

template <int MODE, bool BLOCK, class Cfg>
cudaError_t launch_mma(const Fp8RunParams& p, const Work& w, unsigned tiles, cudaStream_t stream) {
  constexpr int smem = fp8_smem_bytes<Cfg, MODE == kGemm1Gated ? 2 : 1>();
  auto kernel = fp8_gemm_kernel<MODE, BLOCK, Cfg>;
  // Over the 48 KB static limit: raise the dynamic limit (no stream work; capture-safe).
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const int N = MODE == kGemm2 ? p.H : p.I;
  return launch_pdl(kernel, dim3(tiles, unsigned(ceil_div(N, Cfg::BN))), dim3(Cfg::THREADS), smem, stream, p, w);
}

// One streaming GEMM (fp8_stream_kernel) of configuration Cfg; false where
// the weight view cannot be mapped or the kernel configured (the caller keeps
// fp8_gemm_kernel).
template <int MODE, bool BLOCK, class Cfg>
bool launch_stream(const Fp8RunParams& p, const Work& w, cudaStream_t stream) {
  constexpr int NSETS = Cfg::NSETS;
  const int Kdim = MODE == kGemm2 ? p.I : p.H;
  const int N = MODE == kGemm2 ? p.H : p.I;
  CUtensorMap map_b;
  const uint64_t rows = uint64_t(p.E_loc) * (MODE == kGemm2 ? p.H : NSETS * p.I);
  if (!tma::map_rows_2d(&map_b, MODE == kGemm2 ? p.w2 : p.w13, rows, uint64_t(Kdim), Cfg::BN,
                        CU_TENSOR_MAP_DATA_TYPE_UINT8, 1))
    return false;
  auto kernel = fp8_stream_kernel<MODE, BLOCK, Cfg>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Cfg::SMEM_BYTES)) !=
      cudaSuccess) {
    cudaGetLastError();  // clear it: the caller falls back
    return false;
  }
  const int sms = sm_count();
  if (sms <= 0) return false;
  return launch_pdl(kernel, dim3(unsigned(sms * Cfg::BLOCKS)), dim3(Cfg::THREADS), Cfg::SMEM_BYTES, stream, p, w,
                    map_b, ceil_div(N, Cfg::BN)) == cudaSuccess;
}

// The streaming kernel on 16-row tiles: 4 blocks per SM (each with a ring of
// 4-8 K blocks), 16 columns a tile while the batch has fewer slots than
// local experts (few tiles: narrow items spread them over the SMs), else 32.
// Runs 111-112 (fp8_bench runner us, two rounds; fp8_gemm_kernel / 2 blocks
// of 16 columns / 4 blocks of 16 / 4 blocks of 32): Mixtral block T=1
// 188.2 / 187.9 / 166.7 / 174.6, T=8 472.8 / 581.9 / 448.3 / 443.2, T=32
// 562.3 / 718 / 542.2 / 516.2; the DeepSeek slice block T=1 37.8 / 35.2 /
// 33.6 / 35.0, T=8 160.9 / 187.8 / 149.1 / 142.5, per-tensor T=8 95.4 /
// 91.8 / 80.9 / 79.1. Each consumer warp runs a K block's four dependent
// MMAs and the promotion after them, so an SM needs many consumer warps:
// 2 blocks of 2-4 warps were up to 23% slower than fp8_gemm_kernel at T=8
// (Mixtral block 581.9 us above). On 32-row tiles
// every configuration tried was slower than fp8_gemm_kernel (run 111: the
// DeepSeek slice block T=64 367 against 394-419 us), so those keep it.
template <int MODE, bool BLOCK>
bool launch_stream16(const Fp8RunParams& p, const Work& w, cudaStream_t stream) {
  constexpr int NSETS = MODE == kGemm1Gated ? 2 : 1;
  const int Kdim = MODE == kGemm2 ? p.I : p.H;
  const int N = MODE == kGemm2 ? p.H : p.I;
  if (!stream_kernels_for(int64_t(N) * Kdim * NSETS) || Kdim % BK != 0) return false;
  return w.n < p.E_loc ? launch_stream<MODE, BLOCK, gemm::StreamCfg<16, 16, NSETS, 4>>(p, w, stream)
                       : launch_stream<MODE, BLOCK, gemm::StreamCfg<16, 32, NSETS, 4>>(p, w, stream);
}

// One GEMM on row tiles of `rows`: the streaming kernel or the mma.sync
// kernel of that tile (16, 32), the mma.sync kernel (64), or for 128 the
// wgmma variant `mode` (1 or 2).
template <int MODE, bool BLOCK>
cudaError_t launch_gemm(const Fp8RunParams& p, const Work& w, int rows, int mode, unsigned tiles,
                        cudaStream_t stream) {
  constexpr int NSETS = MODE == kGemm1Gated ? 2 : 1;
  switch (rows) {
    case 16:
      if (launch_stream16<MODE, BLOCK>(p, w, stream)) return cudaGetLastError();
      // Large expert matrices: 6 stages once the batch has as many slots as
      // there are local experts (a 16-row tile per expert could then be
      // needed: enough blocks per SM that a shallower pipeline each wins),
      // else 12 (a few tiles: each block needs the deep pipeline). Run 101
      // (fp8_bench, runner us, stages 12 / 6): Mixtral block T=8 519-522 /
      // 473-476, per-tensor 579-583 / 548; the DeepSeek slice block T=8
      // 174-177 / 159-161, per-tensor 118 / 114-115; at T=1 the DeepSeek
      // slice 37.2-37.3 / 39.1-39.3 (n = 8 < 32 local experts: 12 kept).
      switch (decode_stages(int64_t(p.H) * p.I * NSETS, w.n >= p.E_loc ? 6 : 12, 4, MODE == kGemm2)) {
        case 4: return launch_mma<MODE, BLOCK, Fp8CfgDecode16s4>(p, w, tiles, stream);
        case 6: return launch_mma<MODE, BLOCK, Fp8CfgDecode16s6>(p, w, tiles, stream);
        default: return launch_mma<MODE, BLOCK, Fp8CfgDecode16>(p, w, tiles, stream);
      }
    case 32: return launch_mma<MODE, BLOCK, Fp8CfgDecode32>(p, w, tiles, stream);
    case 64: return launch_mma<MODE, BLOCK, Fp8CfgMid>(p, w, tiles, stream);
    default: break;
  }
  if (mode == 2) {
    const bool wide = fp8_tma_width() == 256;
    if (wide ? launch_gemm_tma<MODE, BLOCK, 256>(p, w, tiles, stream)
             : launch_gemm_tma<MODE, BLOCK, 128>(p, w, tiles, stream))
      return cudaGetLastError();
  }
  const int N = MODE == kGemm2 ? p.H : p.I;
  const dim3 grid(tiles, unsigned(ceil_div(N, WG_BN / NSETS)));
  cudaError_t err = cudaFuncSetAttribute(fp8_wgmma_kernel<MODE, BLOCK>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, int(WgStaging::SMEM_BYTES));
  if (err != cudaSuccess) return err;
  fp8_wgmma_kernel<MODE, BLOCK><<<grid, WG_THREADS, WgStaging::SMEM_BYTES, stream>>>(p, w);  // no PDL: launch_gemm_tma
  return cudaGetLastError();
}

// The row tiles of a run: `rows`, from the slots per local expert were every
// slot local (the host knows T * K, not the routing): 16 up to 10 per
// expert; above, on the wgmma kernels (sm_90a), 128 for expert matrices of
// more than kWideElems elements (H * I), else 32 up to 24, 64 below 128 and
// 128 from there (64 without the wgmma kernels). The 128-row tiles read the
// weights once per 128 rows and the mma.sync tiles of 32 or 64 rows are
// slower at every size tried, but the wgmma tiles keep fewer bits in their
// FP8 accumulation and so round some h values to the next E4M3 code: on
// small matrices (H = I = 256, 64 tokens) that reached 1.1e-2 against the
// CPU backend (run 121), on the model shapes 5.7e-3 (2.8e-3 on 16-row
// tiles; the contract is 3e-2). Where `rows` is 128, below 128 slots per
// expert, and both GEMMs' 16-row tiles stream (fp8_stream_kernel, whose
// persistent blocks exit at once when not taken), `small` = 16 is launched
// too, and the tile map takes it when the slots the local experts hold,
// counted on the device, are at most kSmallMaxAvg per expert: under expert
// parallelism most of a batch's slots may be -1 (the DeepSeek-V3 slice: 7
// in 8). From 128 slots per expert on it is not launched: it would need 10
// local slots in 128, and the two launches for nothing cost 11-21 us at the
// DeepSeek slice T=1024 (run 124). The kernels of the row tile not taken
// exit at once. Only speed depends on the choice among 16, 32 and 64
// rows (bitwise the same results); the 128-row wgmma tiles accumulate
// differently (docs/fp8.md), so a token's output is bitwise the same alone
// and in a batch while both take the 16-row tiles.
// Run 119-120 (fp8_bench runner us, tiles forced; rows 16 / 32 / 64 / 128):
// Mixtral block T=32 (8 slots per expert) 513 / 551 / 660 / 534, T=64
// (16) 648 / 569 / 671 / 543, T=256 (64) 1830 / 1341 / 1055 / 582; the
// DeepSeek slice (about 1 slot in 8 local) per-tensor T=64 276 / 299 / 361
// / 314, T=256 385 / 401 / 482 / 417, block T=256 528 / 512 / 597 / 450.
constexpr int kSmallMaxAvg = 10;
constexpr int64_t kWideElems = int64_t(1) << 22;
struct RowPlan {
  int rows;
  int small;  // 16 or 0
};

// Whether both GEMMs' 16-row tiles run fp8_stream_kernel (launch_stream16).
bool streams16(const Fp8RunParams& p) {
  const int nsets = p.gated ? 2 : 1;
  return p.H % BK == 0 && p.I % BK == 0 && stream_kernels_for(int64_t(p.H) * p.I * nsets) &&
         stream_kernels_for(int64_t(p.H) * p.I);
}

RowPlan pick_rows(const Fp8RunParams& p, int64_t n, int mode) {
  // MOE_RUNNER_TILE_ROWS=16|32|64|128 forces a row tile (benchmark sweeps;
  // 128 only where the wgmma kernels run).
  static const int forced = [] {
    const char* v = std::getenv("MOE_RUNNER_TILE_ROWS");
    const int r = v ? std::atoi(v) : 0;
    return (r == 16 || r == 32 || r == 64 || r == WG_BM) ? r : 0;
  }();
  if (forced && (forced != WG_BM || mode != 0)) return {forced, 0};
  const double per_expert = double(n) / p.E_loc;
  if (per_expert <= kSmallMaxAvg) return {16, 0};
  if (mode != 0 && (per_expert >= WG_BM || int64_t(p.H) * p.I > kWideElems))
    return {WG_BM, per_expert < WG_BM && streams16(p) ? 16 : 0};
  return {per_expert <= 24 ? 32 : 64, 0};
}

template <bool BLOCK>
cudaError_t launch_gemms(const Fp8RunParams& p, const Work& w, const RowPlan& plan, int mode, const QuantJob& hjob,
                         cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (plan.rows == WG_BM && mode == 2) {  // GEMM1 of the TMA variant reads the token codes in sorted order
    sort_codes_kernel<<<unsigned(std::max<int64_t>(1, std::min<int64_t>((w.n * (p.H / 16) + 255) / 256, 8192))),
                        256, 0, stream>>>(p, w);  // without PDL: see launch_gemm_tma
    err = cudaGetLastError();
  }
  if (err != cudaSuccess) return err;
  // One GEMM for each row tile of the plan (the one not taken exits).
  auto gemm = [&](auto launch) {
    cudaError_t e = cudaSuccess;
    for (int rows : {plan.small, plan.rows})
      if (rows && e == cudaSuccess) e = launch(rows, unsigned(gemm::max_tiles(w.n, p.E_loc, rows)));
    return e;
  };
  err = gemm([&](int rows, unsigned tiles) {
    return p.gated ? launch_gemm<kGemm1Gated, BLOCK>(p, w, rows, mode, tiles, stream)
                   : launch_gemm<kGemm1Plain, BLOCK>(p, w, rows, mode, tiles, stream);
  });
  if (err != cudaSuccess) return err;
  err = launch_quantize<float>(hjob, stream);
  if (err != cudaSuccess) return err;
  return gemm([&](int rows, unsigned tiles) { return launch_gemm<kGemm2, BLOCK>(p, w, rows, mode, tiles, stream); });
}

// The bf16 runner's parameters for its id check and reduction.
MoeRunParams reduce_params(const Fp8RunParams& p) {
  MoeRunParams r{};
  r.dtype = p.dtype;
  r.E_loc = p.E_loc;
  r.H = p.H;
  r.I = p.I;
  r.activation = p.activation;
  r.gated = p.gated;
  r.swap_gate_up = p.swap_gate_up;
  r.weight_on_input = p.weight_on_input;
  r.x = p.x;
  r.T = p.T;
  r.K = p.K;
  r.local_ids = p.local_ids;
  r.weights = p.weights;
  r.offsets = p.offsets;
  r.sorted_slots = p.sorted_slots;
  r.y = p.y;
  r.output_scale = p.output_scale;
  r.workspace = p.workspace;
  return r;
}

}  // namespace

bool fp8_run_supported(bool block128, int H, int I) {
  const int m = block128 ? kGroup : 16;
  return H % m == 0 && I % m == 0;
}

size_t fp8_run_workspace_bytes(bool block128, int E_loc, int H, int I, int64_t T, int K) {
  return layout(block128, E_loc, H, I, T, K).total;
}

cudaError_t launch_fp8_run(const Fp8RunParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  const int64_t n = p.T * p.K;
  const Layout l = layout(p.block128, p.E_loc, p.H, p.I, p.T, p.K);
  char* ws = static_cast<char*>(p.workspace);
  const MoeRunParams rp = reduce_params(p);
  Work w{};
  w.tile_start = reinterpret_cast<int32_t*>(ws + l.tile_start);
  w.rows = w.tile_start + p.E_loc + 1;
  w.xq = reinterpret_cast<uint8_t*>(ws + l.xq);
  w.xs = reinterpret_cast<float*>(ws + l.xs);
  w.h = reinterpret_cast<float*>(ws + l.h);
  w.hq = reinterpret_cast<uint8_t*>(ws + l.hq);
  w.hs = reinterpret_cast<float*>(ws + l.hs);
  w.xqs = reinterpret_cast<uint8_t*>(ws + l.xqs);
  w.out2 = moe_run_slot_rows(rp);  // inside the bf16 runner's layout at the front
  w.n = n;

  // Variant 2 (persistent, TMA producer) unless MOE_RUNNER_WGMMA says
  // otherwise (3: the bf16 runner's mix, here 1).
  const int asked = wgmma_mode(2);
  const int mode = asked == 3 ? 1 : asked;
  const RowPlan plan = pick_rows(p, n, mode);
  // Token rows (weight on input: x * w, one slot per token since K = 1).
  QuantJob xjob{};
  xjob.src = p.x;
  xjob.rows = p.T;
  xjob.cols = p.H;
  xjob.group = p.block128 ? kGroup : p.H;
  xjob.row_factor = p.weight_on_input ? p.weights : nullptr;
  xjob.factor_stride = p.K;
  xjob.static_scale = p.a13_scale;
  xjob.q = w.xq;
  xjob.scales = w.xs;
  xjob.tile_start = const_cast<int32_t*>(w.tile_start);  // and the tile map
  xjob.map_offsets = p.offsets;
  xjob.map_E = p.E_loc;
  xjob.rows_out = const_cast<int32_t*>(w.rows);
  xjob.map_bm = plan.rows;
  xjob.map_bm_small = plan.small;
  xjob.map_small_max_avg = kSmallMaxAvg;
  xjob.map_n = n;
  cudaError_t err = launch_quantize_dtype(p.dtype, xjob, stream);
  if (err != cudaSuccess) return err;
  // h rows at the sorted positions that hold a slot: [0, offsets[E_loc]).
  QuantJob hjob{};
  hjob.src = w.h;
  hjob.rows = n;
  hjob.rows_dev = p.offsets + p.E_loc;
  hjob.cols = p.I;
  hjob.group = p.block128 ? kGroup : p.I;
  hjob.static_scale = p.a2_scale;
  hjob.q = w.hq;
  hjob.scales = w.hs;

  err = p.block128 ? launch_gemms<true>(p, w, plan, mode, hjob, stream)
                   : launch_gemms<false>(p, w, plan, mode, hjob, stream);
  if (err != cudaSuccess) return err;
  return launch_moe_reduce(rp, stream);
}

}  // namespace moe::kernels
