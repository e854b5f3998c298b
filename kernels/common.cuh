// Helpers shared by the libmoe CUDA kernels: dtype loads/stores with f32
// math, warp reductions, and the launch-result convention (every launcher
// returns the cudaError_t of cudaGetLastError() after its launches).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "moe/moe.h"
#include "plan.h"

namespace moe::kernels {

constexpr unsigned kFullMask = 0xffffffffu;

// Inclusive prefix sum of v over the lanes of a full warp (lane = threadIdx.x % 32).
__device__ __forceinline__ int32_t warp_inclusive_sum(int32_t v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t x = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += x;
  }
  return v;
}

inline int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }

// Element loads in f32 whatever the storage type.
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <class T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}

// Two adjacent values packed in one 32-bit word (16-bit types).
template <class T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Reads a logits-like element of a runtime dtype as f32.
__device__ __forceinline__ float load_as_f32(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::bf16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::f16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// --- grouped-GEMM helpers (shared by the runners' kernels) ------------------
namespace gemm {

// 16-byte async copy to shared memory; valid = false zero-fills (reads nothing).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned addr = unsigned(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem),
               "r"(src_size));
}
// 4-byte async copy (through L1); valid = false zero-fills.
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  const unsigned addr = unsigned(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(addr), "l"(gmem), "r"(src_size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 matrices of 16-bit elements (or 8 x 16 bytes of 8-bit ones).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned addr = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Two 8x8 matrices of 16-bit elements.
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem) {
  const unsigned addr = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

// moe_activation_t in f32 (GELU in the erf form), as the CPU backend computes
// it (src/cpu/cpu_backend.h: forms accurate in the tails).
__device__ __forceinline__ float activate(int act, float v) {
  switch (act) {
    case MOE_ACTIVATION_SILU: return v / (1.0f + expf(-v));
    case MOE_ACTIVATION_GELU: return 0.5f * v * erfcf(v * -0.70710678118654752f);
    case MOE_ACTIVATION_GELU_TANH: {
      const float c2 = 1.5957691216057307f;  // 2 sqrt(2 / pi): 0.5 (1 + tanh z) = 1 / (1 + exp(-2 z))
      return v / (1.0f + expf(-c2 * (v + 0.044715f * v * v * v)));
    }
    case MOE_ACTIVATION_RELU2: return v < 0.0f ? 0.0f : v * v;  // NaN propagates
    default: return v;
  }
}

// activate() with SiLU by the fast exponential and divide (ex2.approx and an
// approximate reciprocal: relative error about 1e-6 where the exact form's
// is 1 ulp; NaN and the infinities as the exact form; SiLU(v) for v < -87
// gives a zero instead of a value below 1e-36). For epilogues whose h is rounded
// to 16 bits or to E4M3 next (bf16/f16 runs, the FP8 runner), where the exact
// expf and IEEE divide cost up to 14% of the FP8 gated GEMM1 (run 69); f32
// runs keep activate() (their contract is 1e-5). Other activations: exact.
__device__ __forceinline__ float activate_fast(int act, float v) {
  if (act == MOE_ACTIVATION_SILU) return __fdividef(v, 1.0f + __expf(-v));
  return activate(act, v);
}

// The activation of an epilogue as a template argument: a moe_activation_t,
// or kActRuntime for the run's value read at run time.
constexpr int kActRuntime = -1;

// Calls f(std::integral_constant<int, ACT>) with ACT = SiLU where `act` is
// SiLU, else kActRuntime, so that an epilogue templated on ACT is
// straight-line code for SiLU. With the activation switched per element the
// compiler keeps a branch around every element (no overlap of one
// element's exponential with the next one's): since 5c7c8b6 made the switch
// larger it no longer unswitched the column loops itself, and the bf16
// gated wgmma GEMM1 lost 23-37% (runs 130-131).
template <class F>
__device__ __forceinline__ void with_activation(int act, F&& f) {
  if (act == MOE_ACTIVATION_SILU)
    f(std::integral_constant<int, MOE_ACTIVATION_SILU>{});
  else
    f(std::integral_constant<int, kActRuntime>{});
}

// activate() / activate_fast() of ACT, or of `act` when ACT is kActRuntime.
template <int ACT>
__device__ __forceinline__ float activate_as(int act, float v) {
  return activate(ACT == kActRuntime ? act : ACT, v);
}
template <int ACT>
__device__ __forceinline__ float activate_fast_as(int act, float v) {
  return activate_fast(ACT == kActRuntime ? act : ACT, v);
}

// Dispatcher offset e clamped to [0, n]: a bad one never reads out of bounds.
__device__ __forceinline__ int32_t clamped_offset(const int32_t* offsets, int64_t n, int e) {
  const int32_t o = offsets[e];
  return o < 0 ? 0 : (o > n ? int32_t(n) : o);
}

// The clamped slot counts of experts base + 32 j + lane, j < 4 (0 past E),
// for one lane of a warp: eight independent loads, so one round trip to L2
// for 128 experts. A loop of one expert per lane and iteration waited on
// each iteration's loads before the next (its sum needs them): the tile map
// took 2.3-2.7 us at 128 experts (runs 77-78), nine round trips.
// expert_ranges128 also gives each expert's first sorted position (0 past E).
__device__ __forceinline__ void expert_ranges128(const int32_t* offsets, int E, int64_t n, int base,
                                                 int32_t (&begin)[4], int32_t (&cnt)[4]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int e = base + 32 * j + lane;
    begin[j] = e < E ? clamped_offset(offsets, n, e) : 0;
    cnt[j] = e < E ? max(0, clamped_offset(offsets, n, e + 1) - begin[j]) : 0;
  }
}
__device__ __forceinline__ void expert_counts128(const int32_t* offsets, int E, int64_t n, int base,
                                                 int32_t (&cnt)[4]) {
  int32_t begin[4];
  expert_ranges128(offsets, E, n, base, begin, cnt);
}

// One warp (lane = threadIdx.x % 32): the row tile and its tile map.
// bm = bm_small when bm_small > 0 and the slots the E experts hold (sum of
// their clamped counts) are at most small_max_avg per expert, else bm_large;
// *rows_out = bm (lane 0) and tile_start[e] = sum over e' < e of
// ceil(count[e'] / bm), e in [0, E]. One round of loads for E <= 128 (the
// counts stay in registers for the map); above, one per 128 experts and pass.
__device__ __forceinline__ void row_tile_map_warp(const int32_t* offsets, int E, int64_t n, int bm_large,
                                                  int bm_small, int small_max_avg, int32_t* tile_start,
                                                  int32_t* rows_out) {
  const int lane = threadIdx.x & 31;
  int32_t cnt[4];
  expert_counts128(offsets, E, n, 0, cnt);
  int bm = bm_large;
  if (bm_small > 0) {
    int64_t valid = 0;
    for (int base = 0;;) {
#pragma unroll
      for (int j = 0; j < 4; ++j) valid += cnt[j];
      base += 128;
      if (base >= E) break;
      expert_counts128(offsets, E, n, base, cnt);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) valid += __shfl_xor_sync(kFullMask, valid, o);
    if (valid <= int64_t(small_max_avg) * E) bm = bm_small;
    if (E > 128) expert_counts128(offsets, E, n, 0, cnt);  // the map's pass starts over
  }
  if (lane == 0) *rows_out = bm;
  int32_t carry = 0;
  for (int base = 0; base <= E; base += 128) {
    if (base > 0) expert_counts128(offsets, E, n, base, cnt);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int e = base + 32 * j + lane;
      const int32_t tiles = (cnt[j] + bm - 1) / bm;
      const int32_t incl = warp_inclusive_sum(tiles);
      if (e <= E) tile_start[e] = carry + incl - tiles;
      carry += __shfl_sync(kFullMask, incl, 31);
    }
  }
}

// The expert and sorted rows of grouped tile `tile`; false when it has no work.
struct Tile {
  int e;
  int32_t row_begin;  // first sorted position
  int rows;           // valid rows, 1..BM
};

template <int BM>
__device__ __forceinline__ bool find_tile(const int32_t* tile_start, const int32_t* offsets, int E,
                                          int64_t n, int tile, Tile& t) {
  if (tile >= tile_start[E]) return false;
  int lo = 0, hi = E;  // largest e with tile_start[e] <= tile
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (tile_start[mid] <= tile) lo = mid; else hi = mid;
  }
  t.e = lo;
  const int32_t begin = clamped_offset(offsets, n, lo), end = clamped_offset(offsets, n, lo + 1);
  t.row_begin = begin + (tile - tile_start[lo]) * BM;
  t.rows = min(BM, end - t.row_begin);
  return t.rows > 0;
}

// find_tile by one warp (every lane calls it with the same tile, and every
// lane gets the tile): each lane loads tile_start of experts lane, lane + 32,
// ... 128 experts a round, and a ballot counts those <= tile; then the
// expert's tile_start and offsets. Two round trips to L2 for E <= 128, where
// find_tile's binary search waits on one load per halving (seven at 128
// experts) before the offsets: at decode sizes every block of the GEMMs
// starts with it.
template <int BM>
__device__ __forceinline__ bool warp_find_tile(const int32_t* tile_start, const int32_t* offsets, int E,
                                               int64_t n, int tile, Tile& t) {
  const int lane = threadIdx.x & 31;
  const int32_t total = tile_start[E];
  int e = -1;  // (experts with tile_start <= tile) - 1: tile_start is non-decreasing from 0
  for (int base = 0; base < E; base += 128) {
    int32_t v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int x = base + 32 * j + lane;
      v[j] = x < E ? tile_start[x] : tile + 1;
    }
    int below = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) below += __popc(__ballot_sync(kFullMask, v[j] <= tile));
    e += below;
    if (below < 128) break;
  }
  if (tile >= total || e < 0) return false;
  const int32_t begin = clamped_offset(offsets, n, e), end = clamped_offset(offsets, n, e + 1);
  t.e = e;
  t.row_begin = begin + (tile - tile_start[e]) * BM;
  t.rows = min(BM, end - t.row_begin);
  return t.rows > 0;
}

// The tile map's tiles of BM rows without the tile map (one warp; every
// lane calls it with the same `tile` and gets the same answer): a pass over
// the experts, 128 a round (one round trip to L2 each: the clamped offsets
// of experts base + 32 j + lane and their ends), an exclusive scan of their
// tile counts ceil(count / BM) in the expert order of row_tile_map_warp, and
// a ballot for the expert whose tiles hold `tile`. The same tiles and rows
// as find_tile on the map row_tile_map_warp(..., bm_large = BM, bm_small =
// 0, ...) writes. *total_out (when given) gets the tile count only when no
// tile was found (the pass stops at the hit): ask with `tile` < 0.
template <int BM>
__device__ __forceinline__ bool direct_find_tile(const int32_t* offsets, int E, int64_t n, int tile, Tile& t,
                                                 int32_t* total_out = nullptr) {
  int32_t carry = 0;
  int hit_e = -1, hit_begin = 0, hit_rows = 0;
  for (int base = 0; base < E && hit_e < 0; base += 128) {
    int32_t begin[4], cnt[4];
    expert_ranges128(offsets, E, n, base, begin, cnt);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int32_t tiles = (cnt[j] + BM - 1) / BM;
      const int32_t incl = warp_inclusive_sum(tiles);
      const int32_t first = carry + incl - tiles;  // this expert's first tile
      const unsigned hit = __ballot_sync(kFullMask, hit_e < 0 && tile >= first && tile < first + tiles);
      if (hit) {
        const int src = __ffs(hit) - 1;
        hit_e = base + 32 * j + src;
        hit_begin = __shfl_sync(kFullMask, begin[j], src) + (tile - __shfl_sync(kFullMask, first, src)) * BM;
        hit_rows = min(BM, __shfl_sync(kFullMask, begin[j] + cnt[j], src) - hit_begin);
      }
      carry += __shfl_sync(kFullMask, incl, 31);
    }
  }
  if (total_out) *total_out = carry;
  t.e = hit_e;
  t.row_begin = hit_begin;
  t.rows = hit_rows;
  return hit_e >= 0;
}

// The tile count of direct_find_tile's tiling (one warp, every lane).
template <int BM>
__device__ __forceinline__ int32_t direct_tile_count(const int32_t* offsets, int E, int64_t n) {
  Tile unused;
  int32_t total = 0;
  direct_find_tile<BM>(offsets, E, n, -1, unused, &total);
  return total;
}

// Block order of the wgmma GEMMs (grid: row tiles x column tiles). Blocks
// start in launch order (x fastest); this walks groups of `group` row tiles,
// all column tiles of a group before the next, row tiles fastest inside it,
// so that the blocks in flight share a few experts' token rows and weight
// slices in L2 instead of streaming every row tile once per column tile.
struct BlockPos {
  int tile, col;
};

// Position `linear` of that walk over a rows x cols grid.
__device__ __forceinline__ BlockPos grouped_pos(int64_t linear, int rows, int cols, int group) {
  const int64_t per_group = int64_t(group) * cols;
  const int g = int(linear / per_group);
  const int first = g * group;
  const int rows_here = min(group, rows - first);  // the last group may be short
  const int r = int(linear - g * per_group);
  return {first + r % rows_here, r / rows_here};
}
__device__ __forceinline__ BlockPos grouped_block(int group) {
  return grouped_pos(int64_t(blockIdx.y) * gridDim.x + blockIdx.x, int(gridDim.x), int(gridDim.y), group);
}
constexpr int kRasterGroup = 8;

// Rows a 128-row TMA box may read past the last valid sorted position
// (those of the last tile): written as zeros by the kernels that fill the
// TMA variants' A operands, so that no box reads stale or unwritten memory.
constexpr int kTmaPadRows = 128;

// Grid-stride copy of token rows into sorted order: dst row pos = src row
// (sorted_slots[pos] / K) for pos in [0, offsets[E]) (the dispatcher's end
// of the last local expert, clamped to [0, n]), in 16-byte chunks
// (row_chunks per row), zeros where the position holds no valid slot index
// and in the kTmaPadRows rows after offsets[E]. Later rows are not written:
// no tile reads them, and under expert parallelism they are most of the n rows.
__device__ __forceinline__ void gather_rows_sorted(const void* src, void* dst, int row_chunks,
                                                   const int32_t* sorted_slots, int64_t n, int K,
                                                   const int32_t* offsets, int E) {
  const int64_t rows = clamped_offset(offsets, n, E);
  const int64_t total = (rows + kTmaPadRows < n ? rows + kTmaPadRows : n) * row_chunks;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t pos = i / row_chunks;
    const int c = int(i % row_chunks);
    const int32_t slot = pos < rows ? sorted_slots[pos] : -1;
    uint4 v4 = make_uint4(0, 0, 0, 0);
    if (slot >= 0 && slot < n) v4 = static_cast<const uint4*>(src)[int64_t(slot / K) * row_chunks + c];
    static_cast<uint4*>(dst)[pos * row_chunks + c] = v4;
  }
}

// Upper bound on the tiles of n sorted rows over E experts (one partial tile each).
inline int64_t max_tiles(int64_t n, int E, int BM) {
  return (n + BM - 1) / BM + (E < n ? E : n);
}

}  // namespace gemm

// Launch status after the kernels a launcher enqueued.
inline cudaError_t launch_status() { return cudaGetLastError(); }

// --- programmatic dependent launch (Hopper) ---------------------------------
// The kernels of one layer step (dispatch, tile map, GEMMs, reduction) are
// launched with programmatic stream serialization: a kernel may be scheduled
// while the one before it in the stream still runs, and each of them starts
// with pdl_wait(), which returns once every kernel before it in the stream
// has completed and its writes are visible. Every block of such a kernel must
// reach pdl_wait() before it reads anything an earlier kernel wrote and
// before it exits (a block that exits first would let the next kernel's wait
// return while the kernel before this one may still be running): so it is the
// first statement of every kernel launched by launch_pdl. pdl_trigger() lets
// the next kernel be scheduled once every block of this one has issued it
// (its blocks then wait in their own pdl_wait); it never makes data visible
// early. On a launch without the attribute both are no-ops.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether launch_pdl asks for the overlap: compute capability >= 9.0 and
// MOE_PDL not "0" (the switch exists to measure it; results never differ).
bool pdl_enabled();

// True when the library has the sm_90a kernels (MOE_CUDA_WGMMA) and the
// current device is compute capability 9.0 (asked once per device).
bool sm90a_device();

// Streaming multiprocessors of the current device (asked once per device), 0 on error.
int sm_count();

// True when environment variable `name` is exactly "0" (the off switch of a
// default-on kernel choice).
bool env_is_zero(const char* name);

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream
// serialization when pdl_enabled(), a plain launch otherwise.
template <class... Params, class... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                       cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace moe::kernels
