#include "moe_runner.cuh"

#include <algorithm>
#include <climits>
#include <type_traits>

#include "common.cuh"
#include "moe/moe.h"

namespace moe::kernels {
namespace {

// Tile shape shared by both paths, so one tile map serves GEMM1 and GEMM2.
constexpr int BM = 64;
constexpr int BN = 64;

enum Mode : int { kGemm1Gated = 0, kGemm1Plain = 1, kGemm2 = 2 };

size_t align256(size_t b) { return (b + 255) / 256 * 256; }

struct Layout {
  size_t tile_start, bad, h, out2, total;
};

Layout layout(DType dtype, int E_loc, int H, int I, int64_t n) {
  Layout l{};
  size_t off = 0;
  l.tile_start = off;
  off += align256(size_t(E_loc + 1) * sizeof(int32_t));
  l.bad = off;
  off += 256;
  l.h = off;
  off += align256(size_t(n) * size_t(I) * (dtype == DType::f32 ? 4 : 2));
  l.out2 = off;
  off += align256(size_t(n) * size_t(H) * sizeof(float));
  l.total = off;
  return l;
}

struct Work {
  const int32_t* tile_start;
  void* h;
  float* out2;
  int64_t n;  // T * K
};

// --- activation -------------------------------------------------------------

__device__ __forceinline__ float activate(int act, float v) {
  switch (act) {
    case MOE_ACTIVATION_SILU: return v / (1.0f + expf(-v));
    case MOE_ACTIVATION_GELU: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case MOE_ACTIVATION_GELU_TANH: {
      const float c = 0.79788456080286536f;  // sqrt(2 / pi)
      return 0.5f * v * (1.0f + tanhf(c * (v + 0.044715f * v * v * v)));
    }
    case MOE_ACTIVATION_RELU2: {
      const float r = fmaxf(v, 0.0f);
      return r * r;
    }
    default: return v;
  }
}

// --- tile map ------------------------------------------------------------------

__device__ __forceinline__ int32_t clamped_offset(const MoeRunParams& p, int64_t n, int e) {
  // Offsets come from the dispatcher; clamping keeps a bad one from reading out of bounds.
  const int32_t o = p.offsets[e];
  return o < 0 ? 0 : (o > n ? int32_t(n) : o);
}

// tile_start[e] = sum over e' < e of ceil(count[e'] / BM), e in [0, E_loc].
__global__ void tile_map_kernel(MoeRunParams p, int64_t n, int32_t* tile_start) {
  const int lane = threadIdx.x;
  int32_t carry = 0;
  for (int base = 0; base <= p.E_loc; base += 32) {
    const int e = base + lane;
    int32_t tiles = 0;
    if (e < p.E_loc) {
      const int32_t cnt = clamped_offset(p, n, e + 1) - clamped_offset(p, n, e);
      tiles = cnt > 0 ? (cnt + BM - 1) / BM : 0;
    }
    int32_t incl = tiles;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t v = __shfl_up_sync(kFullMask, incl, o);
      if (lane >= o) incl += v;
    }
    if (e <= p.E_loc) tile_start[e] = carry + incl - tiles;
    carry += __shfl_sync(kFullMask, incl, 31);
  }
}

// Which expert and rows a GEMM block owns; false when the block has no work.
struct TileInfo {
  int e;
  int32_t row_begin;  // first sorted position
  int rows;           // valid rows, 1..BM
};

__device__ __forceinline__ bool find_tile(const MoeRunParams& p, const Work& w, int tile,
                                          TileInfo& ti) {
  const int32_t* ts = w.tile_start;
  if (tile >= ts[p.E_loc]) return false;
  int lo = 0, hi = p.E_loc;  // largest e with ts[e] <= tile: ts[lo] <= tile < ts[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (ts[mid] <= tile) lo = mid; else hi = mid;
  }
  ti.e = lo;
  const int32_t begin = clamped_offset(p, w.n, lo), end = clamped_offset(p, w.n, lo + 1);
  ti.row_begin = begin + (tile - ts[lo]) * BM;
  ti.rows = min(BM, end - ti.row_begin);
  return ti.rows > 0;
}

// Slot of sorted position pos, or -1 when it is not a valid slot index.
__device__ __forceinline__ int32_t slot_at(const MoeRunParams& p, const Work& w, int64_t pos) {
  const int32_t s = p.sorted_slots[pos];
  return (s >= 0 && s < w.n) ? s : -1;
}

// --- epilogues -----------------------------------------------------------------

template <class T>
__device__ __forceinline__ void store_pair(T* base, int64_t idx, float v0, float v1) {
  *reinterpret_cast<uint32_t*>(base + idx) = pack2<T>(v0, v1);
}
template <>
__device__ __forceinline__ void store_pair<float>(float* base, int64_t idx, float v0, float v1) {
  *reinterpret_cast<float2*>(base + idx) = make_float2(v0, v1);
}

// Two adjacent output columns (col, col + 1) of sorted row `pos`.
template <class T, int MODE>
__device__ __forceinline__ void epilogue_pair(const MoeRunParams& p, const Work& w, int64_t pos,
                                              int col, float a0, float a1, float u0, float u1) {
  const int32_t slot = slot_at(p, w, pos);
  if (slot < 0) return;
  if (MODE == kGemm2) {
    if (col >= p.H) return;
    *reinterpret_cast<float2*>(w.out2 + int64_t(slot) * p.H + col) = make_float2(a0, a1);
    return;
  }
  if (col >= p.I) return;
  // W13 is linear in x, so scaling the pre-activation equals scaling x's row.
  const float s = p.weight_on_input ? p.weights[slot] : 1.0f;
  float h0, h1;
  if (MODE == kGemm1Gated) {
    h0 = activate(p.activation, a0 * s) * (u0 * s);
    h1 = activate(p.activation, a1 * s) * (u1 * s);
  } else {
    h0 = activate(p.activation, a0 * s);
    h1 = activate(p.activation, a1 * s);
  }
  store_pair<T>(static_cast<T*>(w.h), pos * p.I + col, h0, h1);
}

// Row pointer of A row `pos` (GEMM1: the token's hidden row; GEMM2: h's row), or null.
template <class T, int MODE>
__device__ __forceinline__ const T* a_row(const MoeRunParams& p, const Work& w, int64_t pos) {
  if (MODE == kGemm2) return static_cast<const T*>(w.h) + pos * p.I;
  const int32_t slot = slot_at(p, w, pos);
  if (slot < 0) return nullptr;
  return static_cast<const T*>(p.x) + int64_t(slot / p.K) * p.H;
}

// B row `c` of set `set` (0: gate or the only one, 1: up) of expert e, or null past N.
template <class T, int MODE>
__device__ __forceinline__ const T* b_row(const MoeRunParams& p, int e, int set, int c) {
  if (MODE == kGemm2) {
    if (c >= p.H) return nullptr;
    return static_cast<const T*>(p.w2) + (int64_t(e) * p.H + c) * p.I;
  }
  if (c >= p.I) return nullptr;
  const int rows13 = MODE == kGemm1Gated ? 2 * p.I : p.I;
  int r = c;
  if (MODE == kGemm1Gated) {
    const bool up_first = p.swap_gate_up;
    const bool is_up = set == 1;
    r = c + ((is_up != up_first) ? p.I : 0);
  }
  return static_cast<const T*>(p.w13) + (int64_t(e) * rows13 + r) * p.H;
}

// --- tensor-core path (bf16 / f16) ------------------------------------------------

constexpr int TC_BK = 32;
constexpr int TC_STAGES = 3;
constexpr int TC_THREADS = 128;
constexpr int TC_LD = TC_BK + 8;  // padded row (80 bytes): conflict-free ldmatrix

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned addr = unsigned(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem),
               "r"(src_size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned addr = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <class T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <class T, int MODE>
__global__ void __launch_bounds__(TC_THREADS) gemm_tc_kernel(MoeRunParams p, Work w) {
  constexpr int NSETS = MODE == kGemm1Gated ? 2 : 1;
  constexpr int A_CHUNKS = BM * TC_BK / 8 / TC_THREADS;          // 16-byte chunks per thread
  constexpr int B_CHUNKS = NSETS * BN * TC_BK / 8 / TC_THREADS;
  __shared__ __align__(128) T As[TC_STAGES][BM][TC_LD];
  __shared__ __align__(128) T Bs[TC_STAGES][NSETS * BN][TC_LD];

  TileInfo ti;
  if (!find_tile(p, w, blockIdx.x, ti)) return;
  const int n0 = blockIdx.y * BN;
  const int Kdim = MODE == kGemm2 ? p.I : p.H;
  const int KT = (Kdim + TC_BK - 1) / TC_BK;
  const int tid = threadIdx.x;

  // Per-thread source rows, resolved once (the gather through sorted_slots).
  const T* a_src[A_CHUNKS];
  int a_row_idx[A_CHUNKS], a_kc[A_CHUNKS];
#pragma unroll
  for (int i = 0; i < A_CHUNKS; ++i) {
    const int c = tid + i * TC_THREADS;
    a_row_idx[i] = c / (TC_BK / 8);
    a_kc[i] = (c % (TC_BK / 8)) * 8;
    a_src[i] = a_row_idx[i] < ti.rows ? a_row<T, MODE>(p, w, ti.row_begin + a_row_idx[i]) : nullptr;
  }
  const T* b_src[B_CHUNKS];
  int b_row_idx[B_CHUNKS], b_kc[B_CHUNKS];
#pragma unroll
  for (int i = 0; i < B_CHUNKS; ++i) {
    const int c = tid + i * TC_THREADS;
    b_row_idx[i] = c / (TC_BK / 8);
    b_kc[i] = (c % (TC_BK / 8)) * 8;
    const int set = b_row_idx[i] / BN;
    b_src[i] = b_row<T, MODE>(p, ti.e, set, n0 + b_row_idx[i] % BN);
  }

  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * TC_BK;
#pragma unroll
    for (int i = 0; i < A_CHUNKS; ++i) {
      const int k = k0 + a_kc[i];
      const bool ok = a_src[i] != nullptr && k < Kdim;
      cp_async16(&As[stage][a_row_idx[i]][a_kc[i]], ok ? a_src[i] + k : p.x, ok);
    }
#pragma unroll
    for (int i = 0; i < B_CHUNKS; ++i) {
      const int k = k0 + b_kc[i];
      const bool ok = b_src[i] != nullptr && k < Kdim;
      cp_async16(&Bs[stage][b_row_idx[i]][b_kc[i]], ok ? b_src[i] + k : p.x, ok);
    }
  };

  const int lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1;  // 2 x 2 warps, 32 x 32 each
  float acc[NSETS][2][4][4];
#pragma unroll
  for (int s = 0; s < NSETS; ++s)
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[s][mi][ni][r] = 0.0f;

#pragma unroll
  for (int s = 0; s < TC_STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<TC_STAGES - 2>();
    __syncthreads();
    const int next = kt + TC_STAGES - 1;
    if (next < KT) load_stage(next % TC_STAGES, next);
    cp_async_commit();
    const int st = kt % TC_STAGES;
#pragma unroll
    for (int kk = 0; kk < TC_BK; kk += 16) {
      uint32_t a[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        ldmatrix_x4(a[mi], &As[st][wm * 32 + mi * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
      for (int s = 0; s < NSETS; ++s) {
#pragma unroll
        for (int nj = 0; nj < 2; ++nj) {
          uint32_t b[4];
          const int nrow = s * BN + wn * 32 + nj * 16 + (lane & 7) + (lane >> 4) * 8;
          ldmatrix_x4(b, &Bs[st][nrow][kk + ((lane >> 3) & 1) * 8]);
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            mma16816<T>(acc[s][mi][nj * 2], a[mi], b[0], b[1]);
            mma16816<T>(acc[s][mi][nj * 2 + 1], a[mi], b[2], b[3]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  const int g = lane >> 2, c2 = (lane & 3) * 2;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = wm * 32 + mi * 16 + g + half * 8;
      if (r >= ti.rows) continue;
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int col = n0 + wn * 32 + ni * 8 + c2;
        const float* a0 = &acc[0][mi][ni][half * 2];
        const float* u0 = &acc[NSETS - 1][mi][ni][half * 2];
        epilogue_pair<T, MODE>(p, w, ti.row_begin + r, col, a0[0], a0[1], u0[0], u0[1]);
      }
    }
}

// --- f32 SIMT path -----------------------------------------------------------------

constexpr int F_BK = 16;
constexpr int F_THREADS = 256;

template <int MODE>
__global__ void __launch_bounds__(F_THREADS) gemm_f32_kernel(MoeRunParams p, Work w) {
  constexpr int NSETS = MODE == kGemm1Gated ? 2 : 1;
  __shared__ float As[F_BK][BM + 4];
  __shared__ float Bs[F_BK][NSETS * BN + 4];

  TileInfo ti;
  if (!find_tile(p, w, blockIdx.x, ti)) return;
  const int n0 = blockIdx.y * BN;
  const int Kdim = MODE == kGemm2 ? p.I : p.H;
  const int tid = threadIdx.x;

  // Loader: one float4 of A and NSETS float4s of B per thread per k-step.
  const int l_row = tid / 4, l_k = (tid % 4) * 4;
  const float* a_src =
      l_row < ti.rows ? a_row<float, MODE>(p, w, ti.row_begin + l_row) : nullptr;
  const float* b_src[NSETS];
#pragma unroll
  for (int s = 0; s < NSETS; ++s) b_src[s] = b_row<float, MODE>(p, ti.e, s, n0 + l_row);

  const int ty = tid / 16, tx = tid % 16;  // rows ty + 16 i, column pairs 2 tx + 32 j
  float acc[NSETS][4][4] = {};
  for (int k0 = 0; k0 < Kdim; k0 += F_BK) {
    const int k = k0 + l_k;
    float4 av = make_float4(0.f, 0.f, 0.f, 0.f);
    if (a_src && k < Kdim) av = *reinterpret_cast<const float4*>(a_src + k);
    float4 bv[NSETS];
#pragma unroll
    for (int s = 0; s < NSETS; ++s) {
      bv[s] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (b_src[s] && k < Kdim) bv[s] = *reinterpret_cast<const float4*>(b_src[s] + k);
    }
    __syncthreads();  // the previous step's reads are done
    As[l_k + 0][l_row] = av.x;
    As[l_k + 1][l_row] = av.y;
    As[l_k + 2][l_row] = av.z;
    As[l_k + 3][l_row] = av.w;
#pragma unroll
    for (int s = 0; s < NSETS; ++s) {
      Bs[l_k + 0][s * BN + l_row] = bv[s].x;
      Bs[l_k + 1][s * BN + l_row] = bv[s].y;
      Bs[l_k + 2][s * BN + l_row] = bv[s].z;
      Bs[l_k + 3][s * BN + l_row] = bv[s].w;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < F_BK; ++kk) {
      float a[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int s = 0; s < NSETS; ++s) {
        float b[4];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          b[2 * j] = Bs[kk][s * BN + 2 * tx + 32 * j];
          b[2 * j + 1] = Bs[kk][s * BN + 2 * tx + 32 * j + 1];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[s][i][q] = fmaf(a[i], b[q], acc[s][i][q]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i;
    if (r >= ti.rows) continue;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int col = n0 + 2 * tx + 32 * j;
      epilogue_pair<float, MODE>(p, w, ti.row_begin + r, col, acc[0][i][2 * j],
                                 acc[0][i][2 * j + 1], acc[NSETS - 1][i][2 * j],
                                 acc[NSETS - 1][i][2 * j + 1]);
    }
  }
}

// --- reduction and id check ---------------------------------------------------------

// y[t, c..c+3] = output_scale * sum_{j valid, in order} w[t, j] * out2[t*K + j, c..c+3]
// (times sigmoid(token_gate[t]), plus the old y when accumulating; 0 past num_valid).
template <class T>
__global__ void reduce_kernel(MoeRunParams p, Work w) {
  const int quads = p.H / 4;
  const int64_t total = p.T * quads;
  int64_t valid = p.T;
  if (p.num_valid) {
    const int64_t nv = *p.num_valid;
    valid = nv < 0 ? 0 : (nv < p.T ? nv : p.T);
  }
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / quads;
    const int c = int(i % quads) * 4;
    T* y = static_cast<T*>(p.y) + t * p.H + c;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (t < valid) {
      for (int j = 0; j < p.K; ++j) {
        const int64_t s = t * p.K + j;
        const int32_t id = p.local_ids[s];
        if (id < 0 || id >= p.E_loc) continue;  // -1, and bad ids treated as -1
        const float wt = (p.weight_on_input || !p.weights) ? 1.0f : p.weights[s];
        const float4 o = *reinterpret_cast<const float4*>(w.out2 + s * p.H + c);
        acc.x += wt * o.x;
        acc.y += wt * o.y;
        acc.z += wt * o.z;
        acc.w += wt * o.w;
      }
      float sc = p.output_scale;
      if (p.token_gate) sc *= 1.0f / (1.0f + expf(-p.token_gate[t]));
      acc.x *= sc;
      acc.y *= sc;
      acc.z *= sc;
      acc.w *= sc;
      if (p.accumulate) {
        acc.x += to_f32(y[0]);
        acc.y += to_f32(y[1]);
        acc.z += to_f32(y[2]);
        acc.w += to_f32(y[3]);
      }
    }
    if constexpr (std::is_same_v<T, float>) {
      *reinterpret_cast<float4*>(y) = acc;
    } else {
      uint2 v;
      v.x = pack2<T>(acc.x, acc.y);
      v.y = pack2<T>(acc.z, acc.w);
      *reinterpret_cast<uint2*>(y) = v;
    }
  }
}

// Dense routing: slot t * n + e of a valid token goes to expert e; sorted
// position e * valid + t.
__global__ void dense_routing_kernel(int64_t T, int n, const int32_t* num_valid,
                                     int32_t* local_ids, int32_t* offsets, int32_t* sorted_slots) {
  int64_t valid = T;
  if (num_valid) {
    const int64_t nv = *num_valid;
    valid = nv < 0 ? 0 : (nv < T ? nv : T);
  }
  const int64_t total = T * n;
  const int64_t range = total > n + 1 ? total : n + 1;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < range;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (i <= n) offsets[i] = int32_t(i * valid);
    if (i >= total) continue;
    const int64_t t = i / n;
    const int e = int(i % n);
    local_ids[i] = t < valid ? e : -1;
    // i read as a sorted position p: expert p / valid, token p % valid.
    sorted_slots[i] = i < valid * n ? int32_t((i % valid) * n + i / valid) : -1;
  }
}

__global__ void validate_ids_kernel(const int32_t* ids, int64_t n, int E_loc, int32_t* bad) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int32_t id = ids[i];
    if (id < -1 || id >= E_loc) atomicMin(bad, int32_t(i));
  }
}

Work make_work(const MoeRunParams& p) {
  const int64_t n = p.T * p.K;
  const Layout l = layout(p.dtype, p.E_loc, p.H, p.I, n);
  char* ws = static_cast<char*>(p.workspace);
  return Work{reinterpret_cast<int32_t*>(ws + l.tile_start), ws + l.h,
              reinterpret_cast<float*>(ws + l.out2), n};
}

int grid_limit(int64_t work, int threads) {
  return int(std::min<int64_t>((work + threads - 1) / threads, 8192));
}

template <class T>
void launch_gemms_typed(const MoeRunParams& p, const Work& w, dim3 grid1, dim3 grid2,
                        cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    if (p.gated)
      gemm_f32_kernel<kGemm1Gated><<<grid1, F_THREADS, 0, stream>>>(p, w);
    else
      gemm_f32_kernel<kGemm1Plain><<<grid1, F_THREADS, 0, stream>>>(p, w);
    gemm_f32_kernel<kGemm2><<<grid2, F_THREADS, 0, stream>>>(p, w);
  } else {
    if (p.gated)
      gemm_tc_kernel<T, kGemm1Gated><<<grid1, TC_THREADS, 0, stream>>>(p, w);
    else
      gemm_tc_kernel<T, kGemm1Plain><<<grid1, TC_THREADS, 0, stream>>>(p, w);
    gemm_tc_kernel<T, kGemm2><<<grid2, TC_THREADS, 0, stream>>>(p, w);
  }
}

}  // namespace

bool moe_run_supported(int H, int I) { return H % 8 == 0 && I % 8 == 0; }

size_t moe_run_workspace_bytes(DType dtype, int E_loc, int H, int I, int64_t n_slots) {
  return layout(dtype, E_loc, H, I, n_slots).total;
}

cudaError_t launch_validate_ids(const MoeRunParams& p, int32_t** bad_slot_dev,
                                cudaStream_t stream) {
  const int64_t n = p.T * p.K;
  const Layout l = layout(p.dtype, p.E_loc, p.H, p.I, n);
  int32_t* bad = reinterpret_cast<int32_t*>(static_cast<char*>(p.workspace) + l.bad);
  *bad_slot_dev = bad;
  cudaError_t err = cudaMemsetAsync(bad, 0x7f, sizeof(int32_t), stream);  // 0x7f7f7f7f: none
  if (err != cudaSuccess) return err;
  if (n > 0) validate_ids_kernel<<<grid_limit(n, 256), 256, 0, stream>>>(p.local_ids, n, p.E_loc, bad);
  return launch_status();
}

cudaError_t launch_moe_gemms(const MoeRunParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  const Work w = make_work(p);
  tile_map_kernel<<<1, 32, 0, stream>>>(p, w.n, const_cast<int32_t*>(w.tile_start));
  // Upper bound on the tiles: each expert adds at most one partial tile.
  const int64_t max_tiles = ceil_div(w.n, BM) + std::min<int64_t>(p.E_loc, w.n);
  const dim3 grid1(unsigned(max_tiles), unsigned(ceil_div(p.I, BN)));
  const dim3 grid2(unsigned(max_tiles), unsigned(ceil_div(p.H, BN)));
  switch (p.dtype) {
    case DType::bf16: launch_gemms_typed<__nv_bfloat16>(p, w, grid1, grid2, stream); break;
    case DType::f16: launch_gemms_typed<__half>(p, w, grid1, grid2, stream); break;
    default: launch_gemms_typed<float>(p, w, grid1, grid2, stream); break;
  }
  return launch_status();
}

cudaError_t launch_moe_reduce(const MoeRunParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  const Work w = make_work(p);
  const int blocks = grid_limit(p.T * (p.H / 4), 256);
  switch (p.dtype) {
    case DType::bf16: reduce_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(p, w); break;
    case DType::f16: reduce_kernel<__half><<<blocks, 256, 0, stream>>>(p, w); break;
    default: reduce_kernel<float><<<blocks, 256, 0, stream>>>(p, w); break;
  }
  return launch_status();
}

cudaError_t launch_moe_run(const MoeRunParams& p, cudaStream_t stream) {
  cudaError_t err = launch_moe_gemms(p, stream);
  if (err != cudaSuccess) return err;
  return launch_moe_reduce(p, stream);
}

cudaError_t launch_dense_routing(int64_t T, int n, const int32_t* num_valid, int32_t* local_ids,
                                 int32_t* offsets, int32_t* sorted_slots, cudaStream_t stream) {
  // At least n + 1 threads so every offset is written, also when T * n is small.
  const int64_t work = std::max<int64_t>(T * n, n + 1);
  dense_routing_kernel<<<grid_limit(work, 256), 256, 0, stream>>>(T, n, num_valid, local_ids,
                                                                  offsets, sorted_slots);
  return launch_status();
}

}  // namespace moe::kernels
