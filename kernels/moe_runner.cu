#include "moe_runner.cuh"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common.cuh"
#include "stream.cuh"
#include "tma.cuh"
#include "wgmma.cuh"
#include "moe/moe.h"

namespace moe::kernels {
namespace {

// Row tile of the f32 path (the tensor-core path picks its own per batch).
// GEMM1 and GEMM2 of one run share the row tile, so one tile map serves both.
constexpr int BM = 64;
constexpr int BN = 64;

enum Mode : int { kGemm1Gated = 0, kGemm1Plain = 1, kGemm2 = 2 };

// Expert matrices of at most this many elements are "small" for the decode
// kernels (Qwen3-30B-A3B's 1536 x 2048 and 2048 x 768): gemm_tc_kernel with
// 4 stages rather than 12 (decode_stages), and not the streaming kernels
// (launch_stream_stage).
constexpr int64_t kShallowElems = int64_t(1) << 22;

size_t align256(size_t b) { return (b + 255) / 256 * 256; }

struct Layout {
  size_t tile_start, bad, h, out2, xs, total;
};

// The TMA variant of the wgmma path reads the token rows in sorted order
// from a copy (a box of rows must be contiguous): room for it in every
// 16-bit workspace of a build that has the wgmma kernels.
bool needs_sorted_rows(DType dtype) {
#if defined(MOE_CUDA_WGMMA)
  return dtype != DType::f32;
#else
  (void)dtype;
  return false;
#endif
}

Layout layout(DType dtype, int E_loc, int H, int I, int64_t n) {
  Layout l{};
  size_t off = 0;
  l.tile_start = off;
  off += align256(size_t(E_loc + 1) * sizeof(int32_t));
  l.bad = off;  // the id check's first bad slot; the chosen row tile at +128, item counters at +192
  off += 256;
  l.h = off;
  off += align256(size_t(n) * size_t(I) * (dtype == DType::f32 ? 4 : 2));
  l.out2 = off;
  off += align256(size_t(n) * size_t(H) * sizeof(float));
  l.xs = off;  // after out2: the FP8 runner's reserved front ends before it
  if (needs_sorted_rows(dtype)) off += align256(size_t(n) * size_t(H) * 2);
  l.total = off;
  return l;
}

struct Work {
  const int32_t* tile_start;
  const int32_t* rows;  // the row tile the tile map chose; GEMM blocks of other tiles exit
  unsigned long long* counters;  // [2]: items claimed in GEMM1 and GEMM2 (ItemQueue), zeroed by the tile map
  void* h;
  float* out2;
  int64_t n;  // T * K
  void* xs;   // [n, H] token rows in sorted order (TMA variant), or unused
  bool direct;  // the decode tiles are found from the offsets (decode_tile): no tile map kernel ran
};

// --- activation -------------------------------------------------------------

// The CPU backend's activations (NaN propagates through RELU2 too), and the
// fast SiLU for epilogues whose h is rounded to 16 bits next (epilogue_slot).
using gemm::activate;
using gemm::activate_fast;

// --- tile map ------------------------------------------------------------------

// Row tile: bm_small when the local slots per expert (known only here, not
// on the host: under expert parallelism most slots may be -1) are at most
// small_max_avg, else bm_large; then the tile map (gemm::row_tile_map_warp) of
// that tile. Also zeroes the GEMMs' item counters.
__global__ void tile_map_kernel(MoeRunParams p, int64_t n, int bm_small, int bm_large,
                                int small_max_avg, int32_t* tile_start, int32_t* rows,
                                unsigned long long* counters) {
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  if (threadIdx.x < 2) counters[threadIdx.x] = 0;
  // The choice counts the rows the tiles will cover (sum of the per-expert
  // counts, so that the small candidate's grid bound in launch_gemms_typed
  // holds for any offsets).
  gemm::row_tile_map_warp(p.offsets, p.E_loc, n, bm_large, bm_small, small_max_avg, tile_start, rows);
}

// Which expert and rows a GEMM block owns (find_tile: false when the block has no work).
using TileInfo = gemm::Tile;

// The tile of the row tile TM (per thread: gemm::find_tile), false when the
// tile map chose another row tile or the tile has no rows.
template <int TM>
__device__ __forceinline__ bool find_tile(const MoeRunParams& p, const Work& w, int tile, TileInfo& ti) {
  if (*w.rows != TM) return false;
  return gemm::find_tile<TM>(w.tile_start, p.offsets, p.E_loc, w.n, tile, ti);
}

// find_tile by one warp (gemm::warp_find_tile: two round trips to L2 where
// the binary search takes nine at 128 experts): every lane of the warp calls
// it with the same tile. The row tile's check loads with the first round.
template <int TM>
__device__ __forceinline__ bool warp_tile(const MoeRunParams& p, const Work& w, int tile, TileInfo& ti) {
  const int32_t rows = *w.rows;
  return gemm::warp_find_tile<TM>(w.tile_start, p.offsets, p.E_loc, w.n, tile, ti) && rows == TM;
}

// The tile of a non-persistent decode kernel (16 or 32 rows), and the tile
// count: for 16 rows from the offsets when w.direct (gemm::direct_find_tile:
// one round trip to L2 per 128 experts, no tile map kernel before the
// GEMMs), else from the tile map (warp_tile).
template <int TM>
__device__ __forceinline__ bool decode_tile(const MoeRunParams& p, const Work& w, int tile, TileInfo& ti) {
  if constexpr (TM == 16)
    if (w.direct) return gemm::direct_find_tile<TM>(p.offsets, p.E_loc, w.n, tile, ti);
  return warp_tile<TM>(p, w, tile, ti);
}
template <int TM>
__device__ __forceinline__ int decode_tile_count(const MoeRunParams& p, const Work& w) {
  if constexpr (TM == 16)
    if (w.direct) return gemm::direct_tile_count<TM>(p.offsets, p.E_loc, w.n);
  if (*w.rows != TM) return 0;  // the tile map chose another candidate
  const int tiles = w.tile_start[p.E_loc];
  return tiles > 0 ? tiles : 0;
}

// The items of a persistent GEMM kernel, handed out in order as the hardware
// hands out the blocks of a grid: block b starts with item b, then takes
// gridDim.x plus the next count of the GEMM's counter (zeroed by the tile
// map), so the items running at one time stay a window of the grouped order
// and share weight tiles in L2, as with a block per item (run 83: the two
// within 2-4% of each other, either way). Thread 0 claims the next item as an item starts, into one of two shared
// slots; next() (every thread, after the item) passes a barrier and reads it.
// Items: tiles x cols, tiles those of the tile map when it chose this
// kernel's row tile, else none (item_queue).
struct ItemQueue {
  unsigned long long* counter;
  long long* slot;  // shared [2]
  int parity;
  int tiles;
  int64_t items;
  __device__ __forceinline__ void claim() const {
    if (threadIdx.x == 0) slot[parity] = (long long)gridDim.x + (long long)atomicAdd(counter, 1ull);
  }
  // The claimed item, before next(): only after a barrier that follows claim().
  __device__ __forceinline__ int64_t peek() const { return slot[parity]; }
  __device__ __forceinline__ int64_t next() {
    __syncthreads();  // the claim is visible; the item's shared memory is free again
    const int64_t u = slot[parity];
    parity ^= 1;
    return u;
  }
};
template <int BM, int MODE>
__device__ __forceinline__ ItemQueue item_queue(const MoeRunParams& p, const Work& w, int cols, long long* slot) {
  int tiles = *w.rows == BM ? w.tile_start[p.E_loc] : 0;
  tiles = tiles > 0 ? tiles : 0;
  return ItemQueue{w.counters + (MODE == kGemm2 ? 1 : 0), slot, 0, tiles, int64_t(tiles) * cols};
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

// What the epilogue needs of one sorted row, loaded once per row ahead of
// its columns: the slot (-1: nothing is stored) and the factor on the
// pre-activation (the routing weight when it is applied on the input, else
// 1). The stores of a row's columns could alias these loads as far as the
// compiler knows, so it cannot hoist them out of the column loop itself:
// loaded per column pair, each pair waited on a load after the previous
// pair's store. Since 5c7c8b6 changed how the compiler unrolled the
// epilogue this cost 2-8% of a prefill layer (run 131; most of the 23-37%
// that the gated wgmma GEMM1 lost then was the activation's branch per
// element: gemm::with_activation).
struct EpiRow {
  int32_t slot;
  float scale;
};

template <int MODE>
__device__ __forceinline__ EpiRow epi_row_of_slot(const MoeRunParams& p, int32_t slot) {
  // W13 is linear in x, so scaling the pre-activation equals scaling x's row.
  const float s = (MODE != kGemm2 && slot >= 0 && p.weight_on_input) ? p.weights[slot] : 1.0f;
  return EpiRow{slot, s};
}

template <int MODE>
__device__ __forceinline__ EpiRow epi_row(const MoeRunParams& p, const Work& w, int64_t pos) {
  return epi_row_of_slot<MODE>(p, slot_at(p, w, pos));
}

using gemm::kActRuntime;

// gemm::with_activation for GEMM1; GEMM2 has no activation.
template <int MODE, class F>
__device__ __forceinline__ void with_activation(const MoeRunParams& p, F&& f) {
  gemm::with_activation(MODE == kGemm2 ? kActRuntime : p.activation, f);
}

// GEMM1's two h values of accumulator pairs (a0, a1) and, gated, their up
// partners (u0, u1) on a row with pre-activation factor s (EpiRow::scale):
// act(a s) u s, or act(a s). h rounded to 16 bits next takes the fast
// SiLU (activate_fast); f32 runs exact. Both bf16 epilogues (epilogue_slot,
// wg_epilogue_staged) compute h with it.
template <class T, int MODE, int ACT>
__device__ __forceinline__ void h_pair(const MoeRunParams& p, float s, float a0, float a1, float u0, float u1,
                                       float& h0, float& h1) {
  auto act = [&](float v) {
    return std::is_same_v<T, float> ? gemm::activate_as<ACT>(p.activation, v)
                                    : gemm::activate_fast_as<ACT>(p.activation, v);
  };
  if (MODE == kGemm1Gated) {
    h0 = act(a0 * s) * (u0 * s);
    h1 = act(a1 * s) * (u1 * s);
  } else {
    h0 = act(a0 * s);
    h1 = act(a1 * s);
  }
}

// Two adjacent output columns (col, col + 1) of sorted row `pos` (its
// EpiRow: `row`); ACT: see gemm::with_activation.
template <class T, int MODE, int ACT = kActRuntime>
__device__ __forceinline__ void epilogue_slot(const MoeRunParams& p, const Work& w, const EpiRow& row, int64_t pos,
                                              int col, float a0, float a1, float u0, float u1) {
  if (row.slot < 0) return;
  if (MODE == kGemm2) {
    if (col >= p.H) return;
    // f32 rows for f32 runs, else rows of the activation dtype.
    store_pair<T>(reinterpret_cast<T*>(w.out2), int64_t(row.slot) * p.H + col, a0, a1);
    return;
  }
  if (col >= p.I) return;
  float h0, h1;
  h_pair<T, MODE, ACT>(p, row.scale, a0, a1, u0, u1, h0, h1);
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

// Row of weight matrix row `c` of set `set` (0: gate or the only one, 1: up)
// of expert e in w2 viewed as [E_loc * H, I] or w13 as [E_loc * rows13, H].
template <int MODE>
__device__ __forceinline__ int64_t b_row_index(const MoeRunParams& p, int e, int set, int c) {
  if (MODE == kGemm2) return int64_t(e) * p.H + c;
  const int rows13 = MODE == kGemm1Gated ? 2 * p.I : p.I;
  int r = c;
  if (MODE == kGemm1Gated) {
    const bool up_first = p.swap_gate_up;
    const bool is_up = set == 1;
    r = c + ((is_up != up_first) ? p.I : 0);
  }
  return int64_t(e) * rows13 + r;
}

// B row `c` of set `set` of expert e, or null past N.
template <class T, int MODE>
__device__ __forceinline__ const T* b_row(const MoeRunParams& p, int e, int set, int c) {
  if (c >= (MODE == kGemm2 ? p.H : p.I)) return nullptr;
  const T* base = static_cast<const T*>(MODE == kGemm2 ? p.w2 : p.w13);
  return base + b_row_index<MODE>(p, e, set, c) * (MODE == kGemm2 ? p.I : p.H);
}

// --- tensor-core path (bf16 / f16) ------------------------------------------------

using gemm::cp_async16;
using gemm::cp_async_commit;
using gemm::cp_async_wait;
using gemm::ldmatrix_x2;
using gemm::ldmatrix_x4;

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

// Tile configuration of the tensor-core GEMMs: BM rows (sorted slots) x BN
// columns per weight set, WM x WN warps, BK-deep k steps, STAGES cp.async
// stages. Every configuration walks k in the same order with the same
// m16n8k16 fragments, so an output element gets bitwise the same value
// whichever configuration (and so whichever batch size) computed it.
template <int BM_, int BN_, int WM_, int WN_, int BK_, int STAGES_>
struct TcCfg {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, BK = BK_, STAGES = STAGES_;
  static constexpr int THREADS = WM * WN * 32;
  static constexpr int LD = BK + 8;  // padded row: conflict-free ldmatrix
};

template <class Cfg, int NSETS>
constexpr size_t tc_smem_bytes() {
  return size_t(Cfg::STAGES) * (Cfg::BM + NSETS * Cfg::BN) * Cfg::LD * 2;
}

// One tile of a tensor-core GEMM: `ti`'s rows against output columns n0 ..
// n0 + BN of every weight set, staged through the whole dynamic shared memory.
template <class T, int MODE, class Cfg>
__device__ __forceinline__ void tc_tile(const MoeRunParams& p, const Work& w, const TileInfo& ti, int n0) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, STAGES = Cfg::STAGES, LD = Cfg::LD;
  constexpr int THREADS = Cfg::THREADS;
  constexpr int NSETS = MODE == kGemm1Gated ? 2 : 1;
  constexpr int WTM = BM / Cfg::WM, WTN = BN / Cfg::WN;  // warp tile
  constexpr int MI = WTM / 16, NI = WTN / 8;
  static_assert(WTM % 16 == 0 && WTN % 8 == 0 && (NI == 1 || NI % 2 == 0), "warp tile");
  static_assert(BK % 16 == 0, "k step");
  constexpr int KC = BK / 8;  // 16-byte chunks per row and stage
  constexpr int A_TOTAL = BM * KC, B_TOTAL = NSETS * BN * KC;
  constexpr int A_CHUNKS = (A_TOTAL + THREADS - 1) / THREADS;
  constexpr int B_CHUNKS = (B_TOTAL + THREADS - 1) / THREADS;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T (*As)[BM][LD] = reinterpret_cast<T (*)[BM][LD]>(smem_raw);
  T (*Bs)[NSETS * BN][LD] =
      reinterpret_cast<T (*)[NSETS * BN][LD]>(smem_raw + size_t(STAGES) * BM * LD * sizeof(T));

  const int Kdim = MODE == kGemm2 ? p.I : p.H;
  const int KT = (Kdim + BK - 1) / BK;
  const int tid = threadIdx.x;

  // Per-thread source rows, resolved once (the gather through sorted_slots).
  const T* a_src[A_CHUNKS];
  int a_row_idx[A_CHUNKS], a_kc[A_CHUNKS];
#pragma unroll
  for (int i = 0; i < A_CHUNKS; ++i) {
    const int c = tid + i * THREADS;
    a_row_idx[i] = (c / KC) % BM;
    a_kc[i] = (c % KC) * 8;
    a_src[i] = (c < A_TOTAL && a_row_idx[i] < ti.rows)
                   ? a_row<T, MODE>(p, w, ti.row_begin + a_row_idx[i]) : nullptr;
  }
  const T* b_src[B_CHUNKS];
  int b_row_idx[B_CHUNKS], b_kc[B_CHUNKS];
#pragma unroll
  for (int i = 0; i < B_CHUNKS; ++i) {
    const int c = tid + i * THREADS;
    b_row_idx[i] = (c / KC) % (NSETS * BN);
    b_kc[i] = (c % KC) * 8;
    const int set = b_row_idx[i] / BN;
    b_src[i] = c < B_TOTAL ? b_row<T, MODE>(p, ti.e, set, n0 + b_row_idx[i] % BN) : nullptr;
  }
  const bool a_owner = A_TOTAL % THREADS == 0 || tid + (A_CHUNKS - 1) * THREADS < A_TOTAL;
  const bool b_owner = B_TOTAL % THREADS == 0 || tid + (B_CHUNKS - 1) * THREADS < B_TOTAL;

  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * BK;
#pragma unroll
    for (int i = 0; i < A_CHUNKS; ++i) {
      if (i == A_CHUNKS - 1 && !a_owner) break;  // chunk past the tile: nobody's
      const int k = k0 + a_kc[i];
      const bool ok = a_src[i] != nullptr && k < Kdim;
      cp_async16(&As[stage][a_row_idx[i]][a_kc[i]], ok ? a_src[i] + k : p.x, ok);
    }
#pragma unroll
    for (int i = 0; i < B_CHUNKS; ++i) {
      if (i == B_CHUNKS - 1 && !b_owner) break;
      const int k = k0 + b_kc[i];
      const bool ok = b_src[i] != nullptr && k < Kdim;
      cp_async16(&Bs[stage][b_row_idx[i]][b_kc[i]], ok ? b_src[i] + k : p.x, ok);
    }
  };

  const int lane = tid & 31, warp = tid >> 5;
  const int wm = warp / Cfg::WN, wn = warp % Cfg::WN;
  float acc[NSETS][MI][NI][4];
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
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int next = kt + STAGES - 1;
    if (next < KT) load_stage(next % STAGES, next);
    cp_async_commit();
    const int st = kt % STAGES;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        ldmatrix_x4(a[mi], &As[st][wm * WTM + mi * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
      for (int s = 0; s < NSETS; ++s) {
        if constexpr (NI == 1) {
          uint32_t b[2];
          ldmatrix_x2(b, &Bs[st][s * BN + wn * WTN + (lane & 7)][kk + ((lane >> 3) & 1) * 8]);
#pragma unroll
          for (int mi = 0; mi < MI; ++mi) mma16816<T>(acc[s][mi][0], a[mi], b[0], b[1]);
        } else {
#pragma unroll
          for (int nj = 0; nj < NI / 2; ++nj) {
            uint32_t b[4];
            const int nrow = s * BN + wn * WTN + nj * 16 + (lane & 7) + (lane >> 4) * 8;
            ldmatrix_x4(b, &Bs[st][nrow][kk + ((lane >> 3) & 1) * 8]);
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
              mma16816<T>(acc[s][mi][nj * 2], a[mi], b[0], b[1]);
              mma16816<T>(acc[s][mi][nj * 2 + 1], a[mi], b[2], b[3]);
            }
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  const int g = lane >> 2, c2 = (lane & 3) * 2;
  with_activation<MODE>(p, [&](auto act) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = wm * WTM + mi * 16 + g + half * 8;
        if (r >= ti.rows) continue;
        const int64_t pos = ti.row_begin + r;
        const EpiRow row = epi_row<MODE>(p, w, pos);
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          const int col = n0 + wn * WTN + ni * 8 + c2;
          const float* a0 = &acc[0][mi][ni][half * 2];
          const float* u0 = &acc[NSETS - 1][mi][ni][half * 2];
          epilogue_slot<T, MODE, decltype(act)::value>(p, w, row, pos, col, a0[0], a0[1], u0[0], u0[1]);
        }
      }
  });
}

// Non-persistent (PERSISTENT false): block (x, y) computes row tile x, column
// tile y of a grid sized for the bound on the tiles; blocks past the tiles the
// tile map made leave at once. Persistent: as many blocks as fit on the
// device take the items of the tiles the tile map made (row tile fastest, as
// the grid runs) from an ItemQueue, so a row-tile candidate that the tile
// map did not choose costs one wave of blocks that leave at once, not one
// block per possible item (run 74: 7.6 + 17.9 us at Qwen3 T=4096; run 81:
// 1.4-1.5 us). The decode tiles, never a candidate, stay non-persistent (the
// loop costs them registers).
template <class T, int MODE, class Cfg, bool PERSISTENT>
__global__ void __launch_bounds__(Cfg::THREADS) gemm_tc_kernel(MoeRunParams p, Work w, int cols) {
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  constexpr int BM = Cfg::BM;
  if constexpr (!PERSISTENT) {
    (void)cols;
    TileInfo ti;
    if (decode_tile<BM>(p, w, blockIdx.x, ti)) tc_tile<T, MODE, Cfg>(p, w, ti, blockIdx.y * Cfg::BN);
  } else {
    __shared__ long long claimed[2];
    ItemQueue q = item_queue<BM, MODE>(p, w, cols, claimed);
    for (int64_t u = blockIdx.x; u < q.items; u = q.next()) {
      q.claim();
      TileInfo ti;
      if (warp_tile<BM>(p, w, int(u % q.tiles), ti))
        tc_tile<T, MODE, Cfg>(p, w, ti, int(u / q.tiles) * Cfg::BN);
    }
  }
}

// --- wgmma path (sm_90a, the 128-row prefill tiles of bf16 / f16) -----------------
//
// A block computes 128 sorted rows x 256 weight rows (gated GEMM1: 128 gate
// and the matching 128 up rows; otherwise 256 output columns) in 64-deep k
// steps: two warpgroups, each the MMA of its 64 rows against all 256 weight
// rows (wgmma m64n256k16, both operands K-major in 128B-swizzled shared
// memory); all 256 threads stage the next token rows with cp.async (the
// gather through sorted_slots stays fused into the A loads) and thread 0
// the weight tile by two bulk tensor copies (since v22; cp.async where the
// driver cannot map the weights, or with MOE_RUNNER_WGMMA_WEIGHTS=cpasync).
// Loads run two k steps ahead of the MMAs; a step's buffer is refilled only
// after every warpgroup's MMAs on it are done.
namespace wg = moe::kernels::wgmma;

constexpr int WG_BM = 128, WG_BN = 256, WG_BK = 64, WG_STAGES = 4, WG_THREADS = 256;
using WgStaging = wg::Staging<WG_THREADS, WG_BM, WG_BN, WG_STAGES>;
static_assert(WG_BK * 2 == wg::kRowBytes, "a k step is one swizzle row of 16-bit values");

// The epilogue of a warpgroup's 64 x 256 accumulator (variant 2's; variant 1
// stages its rows in shared memory: wg_epilogue_staged): the
// j-th 8-column block holds columns 8 j + 2 (lane % 4) + {0, 1} of rows
// 16 w + lane / 4 (+ 8); gated, blocks [0, BN / 8) are gate columns and the
// next BN / 8 their up partners.
template <class T, int MODE>
__device__ __forceinline__ void wg_epilogue(const MoeRunParams& p, const Work& w, const TileInfo& ti, int n0,
                                            int group, const float (&acc)[128]) {
  constexpr int NSETS = MODE == kGemm1Gated ? 2 : 1;
  constexpr int BN = WG_BN / NSETS;
  const int lane = threadIdx.x & 31, warp_in_group = (threadIdx.x >> 5) & 3;
  with_activation<MODE>(p, [&](auto act) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = group * 64 + warp_in_group * 16 + (lane >> 2) + 8 * h;
      if (r >= ti.rows) continue;
      const int64_t pos = ti.row_begin + r;
      const EpiRow row = epi_row<MODE>(p, w, pos);
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        const int col = n0 + 8 * j + 2 * (lane & 3);
        const int ju = NSETS == 2 ? j + BN / 8 : j;
        epilogue_slot<T, MODE, decltype(act)::value>(p, w, row, pos, col, acc[4 * j + 2 * h],
                                                     acc[4 * j + 2 * h + 1], acc[4 * ju + 2 * h],
                                                     acc[4 * ju + 2 * h + 1]);
      }
    }
  });
}

// The epilogue of gemm_wgmma_kernel (variant 1) through shared memory: each
// warpgroup writes its 64 rows of 16-bit outputs (the activation applied, as
// in wg_epilogue) to shared address `stage_s` (its own region, WgEpi::ROW
// bytes a row: BN values and 16 bytes of padding, so that the 8 rows of a
// warp's 4-byte stores fall in different banks), then 64 of its threads hand
// one row each to the copy engine (wg::bulk_store: h rows by sorted
// position, out2 rows by slot; the workspace is 256-byte aligned and H, I
// multiples of 8, so every row and length is a multiple of 16 bytes). The
// stores of wg_epilogue (4 bytes a lane, 8 rows of 16 bytes per warp
// instruction) kept the block's load-store path busy for an estimated ~4000
// cycles an item (not measured alone); here the block goes on to the next
// item's MMAs while the copies drain (run 165: 3-6% of the layer at Qwen3
// T=4096-16384, docs/perf-notes.md v22).
// The issuing threads wait for the copies' reads (wg::bulk_wait_read) before
// the next item's first barrier, after which the buffers are refilled.
template <int MODE>
struct WgEpi {
  static constexpr int BN = WG_BN / (MODE == kGemm1Gated ? 2 : 1);
  static constexpr uint32_t ROW = uint32_t(BN) * 2 + 16;
  static constexpr uint32_t BYTES = 64 * ROW;  // one warpgroup's rows
};

template <class T, int MODE>
__device__ __forceinline__ void wg_epilogue_staged(const MoeRunParams& p, const Work& w, const TileInfo& ti, int n0,
                                                   int group, const float (&acc)[128], uint32_t stage_s) {
  static_assert(sizeof(T) == 2, "16-bit outputs (the wgmma path's types)");
  using E = WgEpi<MODE>;
  constexpr int NSETS = MODE == kGemm1Gated ? 2 : 1;
  constexpr int BN = E::BN;
  const int lane = threadIdx.x & 31, warp_in_group = (threadIdx.x >> 5) & 3;
  with_activation<MODE>(p, [&](auto act_tag) {
    constexpr int ACT = decltype(act_tag)::value;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int rl = warp_in_group * 16 + (lane >> 2) + 8 * h;  // row in the warpgroup's 64
      if (group * 64 + rl >= ti.rows) continue;
      // The pre-activation factor (GEMM1 with the weight on the input); the
      // slot itself is looked up by the row's issuing thread below.
      const float s = MODE == kGemm2 ? 1.0f : epi_row<MODE>(p, w, ti.row_begin + group * 64 + rl).scale;
      const uint32_t row = stage_s + uint32_t(rl) * E::ROW;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        const int cl = 8 * j + 2 * (lane & 3);
        const int ju = NSETS == 2 ? j + BN / 8 : j;
        float v0 = acc[4 * j + 2 * h], v1 = acc[4 * j + 2 * h + 1];
        if (MODE != kGemm2) h_pair<T, MODE, ACT>(p, s, v0, v1, acc[4 * ju + 2 * h], acc[4 * ju + 2 * h + 1], v0, v1);
        wg::st_shared32(row + uint32_t(cl) * 2, pack2<T>(v0, v1));
      }
    }
  });
  wg::fence_proxy_async();              // the rows, for the copy engine
  wg::named_sync(1 + group, 128);       // this warpgroup's rows are written
  const int t = threadIdx.x & 127;
  if (t < 64) {
    const int r = group * 64 + t;
    if (r < ti.rows) {
      const int64_t pos = ti.row_begin + r;
      const int32_t slot = slot_at(p, w, pos);
      const int N = MODE == kGemm2 ? p.H : p.I;
      if (slot >= 0 && n0 < N) {
        const uint32_t bytes = uint32_t(min(BN, N - n0)) * 2;  // N % 8 == 0: a multiple of 16
        T* dst = MODE == kGemm2 ? reinterpret_cast<T*>(w.out2) + int64_t(slot) * p.H + n0
                                : static_cast<T*>(w.h) + pos * p.I + n0;
        wg::bulk_store(dst, stage_s + uint32_t(t) * E::ROW, bytes);
      }
    }
    wg::bulk_commit();
  }
}

// The operand rows of one item of gemm_wgmma_kernel: its tile, first output
// column, and this thread's source row of each A and B chunk (null: zeros).
template <class T>
struct WgItem {
  TileInfo ti;
  int n0;
  const T* a_src[WgStaging::A_CHUNKS];
  const T* b_src[WgStaging::B_CHUNKS];  // cp.async weights (TMAB false)
  int b_row[2];                         // first weight row of each 128-row box (TMAB true)
};

// First row of each 128-row half of an item's weight tile, in w2 viewed as
// [E_loc * H, I] or w13 as [E_loc * rows13, H] (the tensor maps of both
// wgmma variants): the gate and up rows of its columns (gated), else the
// tile's two halves.
template <int MODE>
__device__ __forceinline__ void wg_weight_rows(const MoeRunParams& p, int e, int n0, int (&b_row)[2]) {
  constexpr int HALF = WG_BN / 2;
  if (MODE == kGemm2) {
    b_row[0] = e * p.H + n0;
    b_row[1] = b_row[0] + HALF;
  } else if (MODE == kGemm1Plain) {
    b_row[0] = e * p.I + n0;
    b_row[1] = b_row[0] + HALF;
  } else {
    const int gate = p.swap_gate_up ? p.I : 0;
    b_row[0] = e * 2 * p.I + gate + n0;
    b_row[1] = e * 2 * p.I + (p.I - gate) + n0;
  }
}

template <class T, int MODE, bool TMAB>
__global__ void __launch_bounds__(WG_THREADS, 1)
    gemm_wgmma_kernel(MoeRunParams p, Work w, int cols, const __grid_constant__ CUtensorMap map_b) {
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  constexpr int NSETS = MODE == kGemm1Gated ? 2 : 1;
  constexpr int BN = WG_BN / NSETS;  // output columns per weight set
  extern __shared__ unsigned char wg_smem_raw[];
  const int tid = threadIdx.x;
  const WgStaging st(wg_smem_raw, tid);
  // TMAB: the weight tile of each k step comes by two bulk tensor copies
  // (thread 0) completing on the buffer's mbarrier, instead of 8 cp.async a
  // thread; the token rows stay cp.async (a gather). Run 172's timelines
  // with the loads of one operand left out (a diagnostic, not kept) had the
  // weights as the cost of the memory-bound cases (the DeepSeek slice at
  // T=4096: GEMM1 779 us, 759 without the token rows, 501 without the
  // weights) and a block's cp.async issue (12 a thread a k step) as a
  // candidate for it.
  __shared__ __align__(8) uint64_t wbar[WG_STAGES];
  const uint32_t wbar0 = uint32_t(__cvta_generic_to_shared(wbar));
  uint32_t wphase = 0;  // bit s: parity of buffer s's next completion
  if (TMAB) {
    if (tid == 0) {
      for (int s = 0; s < WG_STAGES; ++s) wg::mbar_init(wbar0 + 8 * s, 1);
      wg::mbar_init_fence();
    }
    __syncthreads();
  }
  const int Kdim = MODE == kGemm2 ? p.I : p.H;
  const int KT = (Kdim + WG_BK - 1) / WG_BK;
  const int group = tid / 128;  // warpgroup: sorted rows 64 group .. 64 group + 63

  // Persistent, as gemm_tc_kernel's candidates: items in the grouped order
  // over (row tile, column tile), handed out by an ItemQueue. The next
  // item's first WG_AHEAD k steps are staged before this item's epilogue,
  // so that their loads overlap its stores (and the tile lookup of the
  // next item its MMAs' drain).
  __shared__ long long claimed[2];
  ItemQueue q = item_queue<WG_BM, MODE>(p, w, cols, claimed);
  int64_t u = blockIdx.x;
  WgItem<T> it;
  // The item's source rows, once its tile is known.
  auto set_rows = [&](const TileInfo& ti, int n0) {
    it.ti = ti;
    it.n0 = n0;
#pragma unroll
    for (int i = 0; i < WgStaging::A_CHUNKS; ++i) {
      const int r = st.row0 + i * WgStaging::ROWS_PER_PASS;
      it.a_src[i] = r < ti.rows ? a_row<T, MODE>(p, w, ti.row_begin + r) : nullptr;
    }
    if (TMAB) {
      wg_weight_rows<MODE>(p, ti.e, n0, it.b_row);
    } else {
#pragma unroll
      for (int i = 0; i < WgStaging::B_CHUNKS; ++i) {
        const int r = st.row0 + i * WgStaging::ROWS_PER_PASS;
        it.b_src[i] = b_row<T, MODE>(p, ti.e, r / BN, n0 + r % BN);
      }
    }
  };
  // Item v's tile and first column: false when it has no rows.
  auto lookup = [&](int64_t v, TileInfo& ti, int& n0) {
    const gemm::BlockPos bp = gemm::grouped_pos(v, q.tiles, cols, gemm::kRasterGroup);
    n0 = bp.col * BN;
    return find_tile<WG_BM>(p, w, bp.tile, ti);
  };
  // From item u on, the first item with rows (claiming the next one as each
  // starts): false when none is left. Every thread takes the same path.
  auto open_next = [&]() {
    for (; u < q.items; u = q.next()) {
      q.claim();
      TileInfo ti;
      int n0;
      if (!lookup(u, ti, n0)) continue;
      set_rows(ti, n0);
      return true;
    }
    return false;
  };
  auto load_stage = [&](int stage, int kt) {
    const int k = kt * WG_BK + st.chunk * 8;
#pragma unroll
    for (int i = 0; i < WgStaging::A_CHUNKS; ++i) {
      const bool ok = it.a_src[i] != nullptr && k < Kdim;
      cp_async16(st.a_dst(stage, i), ok ? it.a_src[i] + k : p.x, ok);
    }
    if (TMAB) {
      // Rows a box reads past the expert's columns (the other set's, the next
      // expert's) reach only output columns the epilogue drops; past the
      // matrix, and past K, the copy engine writes zeros.
      if (tid == 0) {
        const uint32_t bar = wbar0 + 8 * stage;
        wg::mbar_arrive_expect_tx(bar, uint32_t(WG_BN) * wg::kRowBytes);
        wg::tma_load_2d(st.b_tile(stage), &map_b, kt * WG_BK, it.b_row[0], bar);
        wg::tma_load_2d(st.b_tile(stage) + uint32_t(WG_BN / 2) * wg::kRowBytes, &map_b, kt * WG_BK, it.b_row[1],
                        bar);
      }
    } else {
#pragma unroll
      for (int i = 0; i < WgStaging::B_CHUNKS; ++i) {
        const bool ok = it.b_src[i] != nullptr && k < Kdim;
        cp_async16(st.b_dst(stage, i), ok ? it.b_src[i] + k : p.x, ok);
      }
    }
  };
  // Loads run WG_AHEAD k steps ahead of the MMAs, and the MMAs of one step
  // overlap the next step's issue (wait<1>): the buffer refilled at step kt
  // held step kt - 2, whose MMAs every warpgroup finished before the barrier.
  constexpr int WG_AHEAD = WG_STAGES - 2;
  auto prologue = [&]() {
#pragma unroll
    for (int s = 0; s < WG_AHEAD; ++s) {
      if (s < KT) load_stage(s, s);
      cp_async_commit();
    }
  };

  // The epilogue's rows (wg_epilogue_staged) go to the buffers that the next
  // item's prologue leaves free (WG_AHEAD onwards).
  static_assert(2 * WgEpi<MODE>::BYTES <= (WG_STAGES - WG_AHEAD) * WgStaging::STAGE_BYTES,
                "the epilogue's rows fit in the buffers the prologue leaves free");
  const uint32_t epi_s = st.base + WG_AHEAD * WgStaging::STAGE_BYTES + group * WgEpi<MODE>::BYTES;

  if (!open_next()) return;
  prologue();
  for (;;) {
    wg::bulk_wait_read();  // the last item's rows are read out: the buffers may be refilled
    // A warpgroup whose 64 rows all lie past the tile's rows (an expert's last,
    // partial tile) skips its MMAs: nothing of them is stored, and the other
    // warpgroup's MMAs then have the tensor cores alone. It still stages its
    // share of the tiles and meets every barrier.
    const bool active = group * 64 < it.ti.rows;
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
    for (int kt = 0; kt < KT; ++kt) {
      cp_async_wait<WG_AHEAD - 1>();  // step kt's group is complete
      wg::fence_proxy_async();        // this thread's cp.async data, for the async proxy
      __syncthreads();                // everyone's; and the MMAs of step kt - 2 are done
      if (TMAB) {                     // step kt's weight tile has landed
        const int s = kt % WG_STAGES;
        wg::mbar_wait(wbar0 + 8 * s, (wphase >> s) & 1u, kt);
        wphase ^= 1u << s;
      }
      const int next = kt + WG_AHEAD;
      if (next < KT) load_stage(next % WG_STAGES, next);
      cp_async_commit();
      // One barrier for both warpgroups: a loop of its own for the inactive
      // one had compute-sanitizer synccheck report divergent barriers (run 85).
      if (!active) continue;
      const wg::DescSw128 da(st.a_tile(kt % WG_STAGES, group * 64)), db(st.b_tile(kt % WG_STAGES));
      wg::fence_operands(acc);
      wg::fence();
#pragma unroll
      for (int kk = 0; kk < WG_BK / 16; ++kk)  // 16 values = 32 bytes per k step
        wg::mma_m64n256k16<T>(acc, da.at(kk * 32), db.at(kk * 32), 1);
      wg::commit();
      wg::wait<1>();  // step kt - 1's MMAs are done; step kt's may still run
    }
    // The next item (claimed as this one started, visible since the loop's
    // first barrier): its tile is looked up while the last MMAs run.
    const int64_t u_next = q.peek();
    TileInfo ti_next;
    int n0_next = 0;
    const bool found = u_next < q.items && lookup(u_next, ti_next, n0_next);
    wg::wait<0>();
    wg::fence_operands(acc);
    cp_async_wait<0>();
    const TileInfo ti = it.ti;
    const int n0 = it.n0;
    // q.next()'s barrier: every warpgroup's MMAs are done, so every buffer
    // may be refilled with the next item's first steps.
    u = q.next();
    bool more = found;
    if (found) {
      q.claim();
      set_rows(ti_next, n0_next);
    } else {
      more = open_next();
    }
    if (more) prologue();
    wg_epilogue_staged<T, MODE>(p, w, ti, n0, group, acc, epi_s);
    if (!more) {
      wg::bulk_wait();  // the copies are complete before the block exits
      return;
    }
  }
}

// Variant 2 (MOE_RUNNER_WGMMA=2, and GEMM2 of variant 3): the same tiles,
// warp-specialised. A producer warpgroup (one thread) streams both operands
// with the bulk tensor copy (TMA) into WG_STAGES buffers: A from the token
// rows copied in sorted order (sort_rows_kernel) or from h, B from the
// weights; two consumer warpgroups run the MMAs and hand each buffer back
// through an mbarrier once their MMAs on it are done. Rows that a box reads
// past an expert's range (other experts' rows or weights) only reach
// accumulator rows and columns the epilogue discards; past the matrix, the
// copy engine reads zeros.
// Persistent 2-block clusters (one cluster per two SMs) walk the pairs of
// row tiles 2j, 2j + 1 with one column tile, in the grouped order. When both
// tiles belong to one expert they need the same weight tile: each block's
// producer loads half of it (128 weight rows) and the copy engine writes it
// into both blocks (multicast), halving the weight bytes each block pulls
// from L2 (run 23: the wgmma GEMMs are L2-bound). Otherwise each block loads
// its own. The two blocks keep one pipeline in step (a buffer is refilled
// once the consumers of both blocks are done with it), and a block whose
// tile is empty still runs the steps, storing nothing. Every consumer warp
// hands every buffer back: with one release per warpgroup, the warps of a
// warpgroup that ran no MMAs on an item could drift apart and one wait on a
// phase's parity two phases late, for ever (runs 133-140: Mixtral and the
// DeepSeek slice at T=1024 hung; wg::Pipeline states the rule). The producer runs
// ahead into the next tile while the consumers store the last one.
// Run 30 (Mixtral, T = 4096 and 16384): as fast as variant 1 at T = 4096
// and faster at T = 16384 (0.83 of the floor against 0.75-0.79), with or
// without the multicast: the gain is the persistent loop's overlap of one
// tile's stores with the next tile's loads. MOE_CLUSTER_EXP (diagnostic,
// read once): 0 as described, 1 no multicast (each block loads its whole
// weight tile), 2 also independent pipelines (no cross-block barriers).
constexpr int WS_THREADS = 384;
// Its producer warpgroup keeps 40 registers, the two consumer warpgroups 232.
using WsRegs = wg::RegSplit<WS_THREADS, 128, 40, 232>;
constexpr uint32_t WS_TX_BYTES = WgStaging::STAGE_BYTES;  // one k step of A and B

// Token rows in sorted order for the TMA variant's GEMM1 (only when the
// tile map chose the 128-row tiles): xs[pos] = x[slot / K], or zeros.
template <class T>
__global__ void sort_rows_kernel(MoeRunParams p, Work w) {
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  if (*w.rows != WG_BM) return;
  gemm::gather_rows_sorted(p.x, w.xs, p.H * int(sizeof(T)) / 16, p.sorted_slots, w.n, p.K, p.offsets, p.E_loc);
}

// One work item of the persistent cluster kernel: this block's tile and
// what both blocks of the pair know about it.
struct PairItem {
  TileInfo ti;
  bool mine, paired;
  int col;
};

template <int TM>
__device__ __forceinline__ bool pair_item(const MoeRunParams& p, const Work& w, int64_t u, int pairs, int cols,
                                          uint32_t rank, PairItem& it) {
  const gemm::BlockPos pos = gemm::grouped_pos(u, pairs, cols, gemm::kRasterGroup / 2);
  TileInfo other;
  it.mine = find_tile<TM>(p, w, 2 * pos.tile + int(rank), it.ti);
  const bool theirs = find_tile<TM>(p, w, 2 * pos.tile + int(rank ^ 1u), other);
  it.paired = it.mine && theirs && other.e == it.ti.e;
  it.col = pos.col;
  if (!it.mine && theirs) it.ti = other;  // a valid tile to read, nothing stored
  return it.mine || theirs;               // false: both blocks skip the item
}

template <class T, int MODE>
__global__ void __launch_bounds__(WS_THREADS, 1)
    gemm_wgmma_tma_kernel(MoeRunParams p, Work w, const __grid_constant__ CUtensorMap map_a,
                          const __grid_constant__ CUtensorMap map_b, int tiles, int cols, int exp) {
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  constexpr int NSETS = MODE == kGemm1Gated ? 2 : 1;
  constexpr int BN = WG_BN / NSETS;
  constexpr int HALF = WG_BN / 2;  // weight rows per box (map_b's box)
  extern __shared__ unsigned char wg_smem_raw[];
  __shared__ __align__(8) uint64_t bars[2 * WG_STAGES];
  const int tid = threadIdx.x;
  const WgStaging st(wg_smem_raw, tid);  // only its aligned buffers are used here
  const wg::Pipeline<WG_STAGES> pipe(bars);
  if (*w.rows != WG_BM) return;  // the other row tile was chosen: every block leaves

  const uint32_t rank = wg::cluster_rank();
  const int pairs = (tiles + 1) / 2;
  const int64_t items = int64_t(pairs) * cols;
  const int64_t first = blockIdx.x / 2, stride = gridDim.x / 2;
  const int Kdim = MODE == kGemm2 ? p.I : p.H;
  const int KT = (Kdim + WG_BK - 1) / WG_BK;
  const bool coupled = exp != 2;
  // Every consumer warp (of both blocks, coupled) releases every buffer: the
  // warps of a warpgroup that runs no MMAs on an item are not kept in step by
  // wgmma (see wg::Pipeline).
  constexpr uint32_t kConsumerWarps = (WS_THREADS - 128) / 32;
  if (tid == 0) pipe.init(coupled ? 2 * kConsumerWarps : kConsumerWarps);
  __syncthreads();
  wg::cluster_sync();  // both blocks' barriers initialised before any copy or arrival

  if (tid < 128) {  // producer warpgroup
    WsRegs::producer();
    if (tid == 0) {
      int g = 0;  // pipeline step, over all items
      for (int64_t u = first; u < items; u += stride) {
        PairItem it;
        if (!pair_item<WG_BM>(p, w, u, pairs, cols, rank, it)) continue;
        if (exp != 0) it.paired = false;
        int b_row[2];  // first weight row of each half of the weight tile
        wg_weight_rows<MODE>(p, it.ti.e, it.col * BN, b_row);
        for (int kt = 0; kt < KT; ++kt, ++g) {
          const int s = g % WG_STAGES;
          const int k0 = kt * WG_BK;
          const uint32_t bar = pipe.produce(g, WS_TX_BYTES, int(u));
          wg::tma_load_2d(st.a_tile(s), &map_a, k0, it.ti.row_begin, bar);
          if (it.paired) {
            const uint32_t half = st.b_tile(s) + rank * uint32_t(HALF) * wg::kRowBytes;
            wg::tma_load_2d_multicast(half, &map_b, k0, rank ? b_row[1] : b_row[0], bar, 0x3);
          } else {
            wg::tma_load_2d(st.b_tile(s), &map_b, k0, b_row[0], bar);
            wg::tma_load_2d(st.b_tile(s) + uint32_t(HALF) * wg::kRowBytes, &map_b, k0, b_row[1], bar);
          }
        }
      }
    }
    __syncwarp();
    wg::cluster_sync();  // the partner's copies and arrivals into this block are done
    return;
  }

  WsRegs::consumer();
  const int group = tid / 128 - 1;  // consumer warpgroup: sorted rows 64 group ..
  // Hands step `step`'s buffer back (every thread; lane 0 of each warp arrives).
  auto give_back = [&](int step) {
    __syncwarp();
    if (tid % 32 != 0) return;
    if (coupled)
      pipe.release_pair(step, rank);
    else
      pipe.release(step);
  };
  int g = 0;
  for (int64_t u = first; u < items; u += stride) {
    PairItem it;
    if (!pair_item<WG_BM>(p, w, u, pairs, cols, rank, it)) continue;
    // As variant 1, a warpgroup with no row of the tile (or a block whose tile
    // is empty: it only reads for its partner) runs no MMAs; it still waits
    // for every step's copies before it hands the buffer back.
    if (!it.mine || group * 64 >= it.ti.rows) {
      for (int kt = 0; kt < KT; ++kt, ++g) {
        pipe.consume(g, int(u));
        wg::skew_point();
        give_back(g);
      }
      continue;
    }
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
    for (int kt = 0; kt < KT; ++kt, ++g) {
      const int s = g % WG_STAGES;
      pipe.consume(g, int(u));
      const wg::DescSw128 da(st.a_tile(s, group * 64)), db(st.b_tile(s));
      wg::fence_operands(acc);
      wg::fence();
#pragma unroll
      for (int kk = 0; kk < WG_BK / 16; ++kk)
        wg::mma_m64n256k16<T>(acc, da.at(kk * 32), db.at(kk * 32), 1);
      wg::commit();
      wg::wait<1>();  // step g - 1's MMAs are done: hand its buffer back
      if (kt > 0) give_back(g - 1);
    }
    wg::wait<0>();
    wg::fence_operands(acc);
    give_back(g - 1);  // the item's last step
    wg_epilogue<T, MODE>(p, w, it.ti, it.col * BN, group, acc);
  }
  wg::cluster_sync();
}

// --- streaming decode tiles (sm_90a, bf16 / f16, 16- and 32-row tiles) ------------
//
// The same tiles, MMAs and k order as gemm_tc_kernel's decode configurations
// (BM rows x BN columns per weight set, m16n8k16 over 16-deep k in order,
// one warp per 8 columns), so every output element is bitwise what those
// give; what changes is how the weights arrive. gemm_tc_kernel keeps at most
// STAGES - 1 k steps of one tile in flight per block and starts each tile's
// pipeline from empty, so at T <= 64 an SM had ~36 KB of weights in flight
// and the GEMMs streamed 1.7-2.0 TB/s (run 32). Here BLOCKS (2, or 3 since
// v25 for the smaller experts: stream_blocks) persistent blocks per SM walk the items (row tile, column tile) b, b + gridDim.x,
// ..., each with one producer warp: the weight tile of each 64-deep k step
// comes by one bulk tensor copy per weight set (128B-swizzled), the valid A
// rows by cp.async from the producer's lanes (the gather needs no sorted
// copy; one bulk copy per row was up to 2x slower at 16 rows, runs 57-59),
// into as many buffers as shared memory holds (at 2 blocks 8-25 steps a
// block, 88-128 KB of weights in flight per SM). The producer also finds each item's
// tile and its rows' slots and passes them in a per-buffer descriptor; the
// pipeline runs on across items, so the next item's loads overlap this
// one's MMAs and stores. Consumer warps hand each buffer back (after a
// proxy fence since v25: gemm::StreamRing::release) through an
// mbarrier. Rows of A past the tile's valid rows are never copied: their
// ldmatrix lanes read row 0 instead, and the epilogue stores only valid
// rows. compute-sanitizer racecheck does not model mbarrier arrive/wait
// between warps (scripts/racecheck_mbarrier_probe.cu: a plain store, an
// arrive, a wait and a load draw a hazard report; run 63), so it reports
// every A read here; a variant that arrived after cp.async.wait_group was
// reported the same way (run 62) and was slower (run 63): not kept.
// One block per SM serialised too many m16n8k16 chains (run 57:
// 2.2x slower at T=64). Needs K % 64 == 0 (whole 128-byte rows per step; otherwise the
// caller keeps gemm_tc_kernel).
using gemm::StreamCfg;
using gemm::StreamItem;

template <class T, int MODE, class Cfg>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::BLOCKS)
    gemm_stream_kernel(MoeRunParams p, Work w, const __grid_constant__ CUtensorMap map_b, int cols) {
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  constexpr int BM = Cfg::BM, BN = Cfg::BN, NSETS = Cfg::NSETS, STAGES = Cfg::STAGES;
  constexpr int MI = BM / 16;
  extern __shared__ unsigned char stream_smem_raw[];
  __shared__ __align__(8) uint64_t bars[2 * STAGES];
  __shared__ StreamItem<BM> desc[STAGES];
  const int tiles = decode_tile_count<BM>(p, w);
  const int64_t items = int64_t(tiles) * cols;
  if (int64_t(blockIdx.x) >= items) return;

  const gemm::StreamRing<Cfg> ring(stream_smem_raw, bars);
  const wg::Pipeline<STAGES>& pipe = ring.pipe;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) ring.init();
  __syncthreads();
  const int KT = (MODE == kGemm2 ? p.I : p.H) / 64;

  if (warp == 0) {  // producer
    int g = 0;      // pipeline step over all items
    // Items in order: row tile fastest, so that the blocks working at the
    // same time on one expert's row tiles read the same weight tile.
    for (int64_t u = blockIdx.x; u < items; u += gridDim.x) {
      TileInfo ti;
      if (!decode_tile<BM>(p, w, int(u % tiles), ti)) continue;
      const int n0 = int(u / tiles) * BN;
      const int32_t slot = lane < ti.rows ? slot_at(p, w, ti.row_begin + lane) : -1;
      // This lane copies 16-byte chunk lane % 8 of A rows lane / 8 + 4 i.
      const T* src[BM / 4];
#pragma unroll
      for (int i = 0; i < BM / 4; ++i) {
        const int r = lane / 8 + 4 * i;
        const int32_t rs = __shfl_sync(kFullMask, slot, r);
        src[i] = nullptr;
        if (r < ti.rows) {
          if (MODE == kGemm2)
            src[i] = static_cast<const T*>(w.h) + (ti.row_begin + r) * int64_t(p.I) + (lane % 8) * 8;
          else if (rs >= 0)
            src[i] = static_cast<const T*>(p.x) + int64_t(rs / p.K) * p.H + (lane % 8) * 8;
        }
      }
      unsigned char* a_dst = ring.a_rows(0) + (lane / 8) * Cfg::A_LD +
                             (lane % 8) * 16;
      int brow[NSETS];
#pragma unroll
      for (int s = 0; s < NSETS; ++s) brow[s] = int(b_row_index<MODE>(p, ti.e, s, n0));
      for (int kt = 0; kt < KT; ++kt, ++g) {
        const int st = ring.acquire(g);
        const uint32_t full = pipe.full0 + 8 * st;
        if (kt == 0) {
          if (lane < BM) desc[st].slot[lane] = slot;
          if (lane == 0) desc[st].row_begin = ti.row_begin, desc[st].rows = ti.rows, desc[st].n0 = n0;
          __syncwarp();
        }
        if (lane == 0) {
          wg::mbar_arrive_expect_tx(full, Cfg::B_BYTES);  // releases the descriptor too
#pragma unroll
          for (int s = 0; s < NSETS; ++s)
            wg::tma_load_2d(ring.b_base + st * Cfg::B_BYTES + uint32_t(s * BN) * wg::kRowBytes, &map_b, kt * 64,
                            brow[s], full);
        }
#pragma unroll
        for (int i = 0; i < BM / 4; ++i)
          if (src[i]) cp_async16(a_dst + st * Cfg::A_BYTES + 4 * i * Cfg::A_LD, src[i] + kt * 64, true);
        wg::cp_async_arrive_noinc(full);
      }
    }
    ring.finish(g, desc);
    return;
  }

  const int wn = warp - 1;  // this warp's 8 columns of every set
  const int brow = wn * 8 + (lane & 7);
  for (int g = 0;;) {
    pipe.consume(g);
    const StreamItem<BM>& it = desc[g % STAGES];
    const int rows = it.rows;
    if (rows == 0) break;
    const int64_t row_begin = it.row_begin;
    const int n0 = it.n0;
    int32_t slot[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = mi * 16 + (lane >> 2) + half * 8;
        slot[mi][half] = r < rows ? it.slot[r] : -1;
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
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t a[MI][4];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) ldmatrix_x4(a[mi], a_st + a_off[mi] + kk * 32);
#pragma unroll
        for (int s = 0; s < NSETS; ++s) {
          uint32_t b[2];
          ldmatrix_x2(b, b_st + wg::swizzled_offset(s * BN + brow, 2 * kk + ((lane >> 3) & 1)));
#pragma unroll
          for (int mi = 0; mi < MI; ++mi) mma16816<T>(acc[s][mi], a[mi], b[0], b[1]);
        }
      }
      ring.release(g);
    }
    const int col = n0 + wn * 8 + (lane & 3) * 2;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = mi * 16 + (lane >> 2) + half * 8;
        if (r < rows)
          epilogue_slot<T, MODE>(p, w, epi_row_of_slot<MODE>(p, slot[mi][half]), row_begin + r, col,
                                 acc[0][mi][2 * half],
                                 acc[0][mi][2 * half + 1], acc[NSETS - 1][mi][2 * half],
                                 acc[NSETS - 1][mi][2 * half + 1]);
      }
  }
}

// --- f32 SIMT path -----------------------------------------------------------------

constexpr int F_BK = 16;
constexpr int F_THREADS = 256;

template <int MODE>
__global__ void __launch_bounds__(F_THREADS) gemm_f32_kernel(MoeRunParams p, Work w) {
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  constexpr int NSETS = MODE == kGemm1Gated ? 2 : 1;
  __shared__ float As[F_BK][BM + 4];
  __shared__ float Bs[F_BK][NSETS * BN + 4];

  TileInfo ti;
  if (!find_tile<BM>(p, w, blockIdx.x, ti)) return;
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
    const int64_t pos = ti.row_begin + r;
    const EpiRow row = epi_row<MODE>(p, w, pos);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int col = n0 + 2 * tx + 32 * j;
      epilogue_slot<float, MODE>(p, w, row, pos, col, acc[0][i][2 * j], acc[0][i][2 * j + 1],
                                 acc[NSETS - 1][i][2 * j], acc[NSETS - 1][i][2 * j + 1]);
    }
  }
}

// --- reduction and id check ---------------------------------------------------------

// y[t, c..c+3] = output_scale * sum_{j valid, in order} w[t, j] * out2[t*K + j, c..c+3],
// out2 rows of the activation type T.
template <class T>
__device__ __forceinline__ float4 load_slot4(const void* rows, int64_t idx) {
  if constexpr (std::is_same_v<T, float>) {
    return *reinterpret_cast<const float4*>(static_cast<const float*>(rows) + idx);
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(static_cast<const T*>(rows) + idx);
    const T* h = reinterpret_cast<const T*>(&v);
    return make_float4(to_f32(h[0]), to_f32(h[1]), to_f32(h[2]), to_f32(h[3]));
  }
}

template <class T>
__global__ void reduce_kernel(MoeRunParams p, Work w) {
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  const int quads = p.H / 4;
  const int64_t total = p.T * quads;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / quads;
    const int c = int(i % quads) * 4;
    T* y = static_cast<T*>(p.y) + t * p.H + c;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int j = 0; j < p.K; ++j) {
      const int64_t s = t * p.K + j;
      const int32_t id = p.local_ids[s];
      if (id < 0 || id >= p.E_loc) continue;  // -1, and bad ids treated as -1
      const float wt = (p.weight_on_input || !p.weights) ? 1.0f : p.weights[s];
      const float4 o = load_slot4<T>(w.out2, s * p.H + c);
      acc.x += wt * o.x;
      acc.y += wt * o.y;
      acc.z += wt * o.z;
      acc.w += wt * o.w;
    }
    const float sc = p.output_scale;
    acc.x *= sc;
    acc.y *= sc;
    acc.z *= sc;
    acc.w *= sc;
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
  return Work{reinterpret_cast<int32_t*>(ws + l.tile_start), reinterpret_cast<int32_t*>(ws + l.bad + 128),
              reinterpret_cast<unsigned long long*>(ws + l.bad + 192), ws + l.h,
              reinterpret_cast<float*>(ws + l.out2), n, ws + l.xs, false};
}

int grid_limit(int64_t work, int threads) {
  return int(std::min<int64_t>((work + threads - 1) / threads, 8192));
}

// Tensor-core configurations, by expected rows per expert (see pick_rows).
// Decode: 16 rows, 16 columns per weight set and two warps, so that even
// one expert's weights spread over hundreds of blocks, 12 stages of 64-deep
// k in flight to keep HBM busy; 32 rows with 32 columns (half the re-reads
// of the gathered rows per weight byte), 4 stages of 128-deep k (below).
// Middle: 64 x 64, four warps
// (only when forced). Prefill: 128 rows, eight warps, 64-deep k, 3 stages
// (run 10: 13-29% faster than 32-deep k with 4 stages at T >= 1024).
using CfgDecode16 = TcCfg<16, 16, 1, 2, 64, 12>;
// The same tiles with fewer stages (more blocks resident per SM; bitwise the
// same results). Run 33 (H100, 16-row tiles, both GEMMs): 4 stages took the
// Qwen3 layer from 58.7 to 51.8 us at T=1 and 210.9 to 204.1 us at T=8, and
// made Mixtral slower (271 -> 291 us at T=1): short, small expert matrices
// gain from more blocks in flight, long ones from deep pipelines. So 4
// stages for a GEMM whose expert matrix has at most kShallowElems elements
// (Qwen3's 1536 x 2048 and 2048 x 768), 12 otherwise;
// MOE_RUNNER_DECODE_STAGES=12|6|4 forces one. The "6" choice (small
// matrices, a slot per two local experts or more) and the 32-row tiles take
// 128-deep k steps since v24: 3 stages of 128 instead of 6 of 64, 4 instead
// of 8 (the same shared memory, the same m16n8k16 MMAs in the same k order:
// bitwise the same outputs; where K is not a multiple of 128 the last step
// adds MMAs of zeros, which change no sum but the sign of an exact zero, as
// the 64-deep steps already did past a K not a multiple of 64). Run 190 (bench/env_ab.py, Qwen3 layer us, 64 / 128-deep, 7
// rounds, medians): T=8 198.53 / 193.25, T=64 442.99 / 434.02, T=128 466.24
// / 457.65, T=256 490.59 / 480.18, T=512 603.92 / 598.78; at T=1 and 2 (the
// 4-stage choice) 3 stages of 128 were 2.5% and 6.1% slower than 4 of 64
// (run 189), and 6 or 12 stages of 64 3.8-8.4% slower (run 188).
using CfgDecode16s6 = TcCfg<16, 16, 1, 2, 128, 3>;
using CfgDecode16s4 = TcCfg<16, 16, 1, 2, 64, 4>;
using CfgDecode32 = TcCfg<32, 32, 1, 4, 128, 4>;
using CfgMid = TcCfg<64, 64, 2, 2, 32, 4>;
using CfgWide1 = TcCfg<128, 64, 4, 2, 64, 3>;   // gated GEMM1: 2 x 64 weight rows
using CfgWide2 = TcCfg<128, 128, 4, 2, 64, 3>;  // plain GEMM1 and GEMM2

template <class T, int MODE, class Cfg, bool PERSISTENT>
void launch_tc(const MoeRunParams& p, const Work& w, unsigned tiles, int N, cudaStream_t stream) {
  constexpr size_t smem = tc_smem_bytes<Cfg, MODE == kGemm1Gated ? 2 : 1>();
  auto kernel = gemm_tc_kernel<T, MODE, Cfg, PERSISTENT>;
  // Above 48 KB a kernel needs the opt-in; cheap, and legal during graph capture.
  if (smem > 48 * 1024)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  const int cols = ceil_div(N, Cfg::BN);
  if constexpr (!PERSISTENT) {
    launch_pdl(kernel, dim3(tiles, unsigned(cols)), dim3(Cfg::THREADS), smem, stream, p, w, cols);
  } else {
    // As many blocks as fit on the device at once, at most one per item the
    // bound on the tiles allows.
    static const int per_sm = [&] {
      int n = 0;
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, Cfg::THREADS, smem) != cudaSuccess) {
        cudaGetLastError();  // clear it: one block per SM still works
        n = 1;
      }
      return n > 0 ? n : 1;
    }();
    const int64_t items = int64_t(tiles) * cols;
    const int64_t resident = int64_t(std::max(sm_count(), 1)) * per_sm;
    const unsigned blocks = unsigned(std::max<int64_t>(1, std::min(items, resident)));
    launch_pdl(kernel, dim3(blocks), dim3(Cfg::THREADS), smem, stream, p, w, cols);
  }
}

// GEMM1 (second = false) or GEMM2 of one configuration pair; PERSISTENT: see
// gemm_tc_kernel.
template <class T, class Cfg1, class Cfg2, bool PERSISTENT = false>
void launch_tc_stage(const MoeRunParams& p, const Work& w, unsigned tiles, bool second,
                     cudaStream_t stream) {
  static_assert(Cfg1::BM == Cfg2::BM, "one tile map serves both GEMMs");
  if (second)
    launch_tc<T, kGemm2, Cfg2, PERSISTENT>(p, w, tiles, p.H, stream);
  else if (p.gated)
    launch_tc<T, kGemm1Gated, Cfg1, PERSISTENT>(p, w, tiles, p.I, stream);
  else
    launch_tc<T, kGemm1Plain, Cfg2, PERSISTENT>(p, w, tiles, p.I, stream);
}

// Upper bound on the tiles of bm rows: each expert adds at most one partial tile.
unsigned max_tiles(const MoeRunParams& p, int64_t n, int bm) {
  return unsigned(ceil_div(n, bm) + std::min<int64_t>(p.E_loc, n));
}

// Row tiles of the tensor-core path, from the slots per local expert were
// every slot local (the host knows T * K, not the routing): {small, large}
// candidates, the tile map picks one on the device from the real local
// count. Only speed depends on it: every configuration gives bitwise the
// same result.
struct RowChoice {
  int small, large, small_max_avg;
};

RowChoice pick_rows(const MoeRunParams& p, int64_t n) {
  // MOE_RUNNER_TILE_ROWS=16|32|64|128 forces a row tile (benchmark sweeps).
  static const int forced = [] {
    const char* v = std::getenv("MOE_RUNNER_TILE_ROWS");
    const int r = v ? std::atoi(v) : 0;
    return (r == 16 || r == 32 || r == 64 || r == 128) ? r : 0;
  }();
  if (forced) return {forced, forced, 0};
  const double per_expert = double(n) / p.E_loc;
  if (per_expert <= 10) return {16, 16, 0};
  // The 32-row tiles up to `small_max` local slots per expert on average.
  // Run 10 at T = 256: 32-row tiles won with ~8-16 local rows per expert
  // (DeepSeek slice 0.89 vs 0.61), 128-row tiles with 64 (Mixtral 0.60 vs 0.44);
  // at T = 1024 the DeepSeek slice (~32 per expert) got 0.75 with 128-row tiles
  // against 0.52 when the switch sat at 40: it sat at 24 for every size until
  // run 130's sweep with the wgmma tiles (moe_bench at T=64-1024, each row
  // tile forced; layer timelines of run 132): for expert matrices over
  // kShallowElems elements (streamed 32-row tiles) the 128-row tiles won from
  // ~20 slots per expert (DeepSeek slice, 22 per expert: GEMM1 604 against
  // 776 us, GEMM2 298 against 363) and lost at 16 (Mixtral T=64: 1175
  // against 1047 us); for smaller ones (Qwen3, gemm_tc_kernel) the 32-row
  // tiles still won at 32 per expert (T=512: 623 against 666 us) and lost at
  // 64. So 16 and 32 with the wgmma tiles; 24 without them (mma.sync
  // 128-row tiles, slower).
  const bool wide = wgmma_mode() != 0;
  const int small_max = !wide ? 24 : int64_t(p.H) * p.I > kShallowElems ? 16 : 32;
  if (per_expert <= small_max) return {32, 32, 0};
  if (per_expert <= 512) return {32, 128, small_max};
  return {128, 128, 0};
}

// Tensor map element type of the 16-bit activation type T.
template <class T>
constexpr CUtensorMapDataType tensor_map_type() {
  return std::is_same_v<T, __nv_bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
}

// The tensor map of the weights of MODE's GEMM (w2 viewed as [E_loc * H, I],
// w13 as [E_loc * rows13, H]) in boxes of box_rows rows of 128 bytes,
// 128B-swizzled (the wgmma variants' and the streaming kernels' weight
// tiles): false when the driver cannot map them.
template <class T, int MODE>
bool map_weights(const MoeRunParams& p, int box_rows, CUtensorMap* map) {
  const uint64_t rows = uint64_t(p.E_loc) * (MODE == kGemm2 ? p.H : (MODE == kGemm1Gated ? 2 : 1) * p.I);
  return tma::map_rows_2d(map, MODE == kGemm2 ? p.w2 : p.w13, rows, uint64_t(MODE == kGemm2 ? p.I : p.H), box_rows,
                          tensor_map_type<T>(), 2);
}

template <class T, int MODE>
void launch_wgmma(const MoeRunParams& p, const Work& w, unsigned tiles, int N, cudaStream_t stream) {
  constexpr int BN = WG_BN / (MODE == kGemm1Gated ? 2 : 1);
  // The weights by bulk tensor copies where the driver maps them (the CUDA
  // backend takes 16-byte aligned weights only, and H, I are multiples of
  // 8), else by cp.async; MOE_RUNNER_WGMMA_WEIGHTS=cpasync takes the latter
  // (read at each launch, so that gpu.runner.wgmma_variants_partial_tiles
  // runs both in one process). Run 173 (one build, layer us, two rounds,
  // cp.async / bulk copies): Qwen3 T=1024 519/520 -> 496/498, T=4096
  // 827/824 -> 815/818; the DeepSeek slice T=1024 851/846 -> 816/828,
  // T=4096 1188/1195 -> 1160/1165; T=16384 within the rounds' spread.
  const char* wv = std::getenv("MOE_RUNNER_WGMMA_WEIGHTS");
  const bool tma_off = wv && std::strcmp(wv, "cpasync") == 0;
  CUtensorMap map_b{};
  const bool tma = !tma_off && map_weights<T, MODE>(p, WG_BN / 2, &map_b);
  auto kernel = tma ? gemm_wgmma_kernel<T, MODE, true> : gemm_wgmma_kernel<T, MODE, false>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(WgStaging::SMEM_BYTES));
  // One persistent block per SM (see gemm_wgmma_kernel), at most one per item.
  const int cols = ceil_div(N, BN);
  const int64_t items = int64_t(tiles) * cols;
  const unsigned blocks = unsigned(std::max<int64_t>(1, std::min<int64_t>(items, std::max(sm_count(), 1))));
  launch_pdl(kernel, dim3(blocks), dim3(WG_THREADS), WgStaging::SMEM_BYTES, stream, p, w, cols, map_b);
}

// Variant 2: false when a tensor map cannot be made (the caller falls back).
template <class T, int MODE>
bool launch_wgmma_tma(const MoeRunParams& p, const Work& w, unsigned tiles, int N, cudaStream_t stream) {
  constexpr int BN = WG_BN / (MODE == kGemm1Gated ? 2 : 1);
  // A: h's rows (GEMM2) or the token rows in sorted order (GEMM1), boxes of
  // WG_BM rows; B: the weights.
  CUtensorMap map_a, map_b;
  const bool ok = tma::map_rows_2d(&map_a, MODE == kGemm2 ? w.h : w.xs, uint64_t(w.n),
                                   uint64_t(MODE == kGemm2 ? p.I : p.H), WG_BM, tensor_map_type<T>(), 2) &&
                  map_weights<T, MODE>(p, WG_BN / 2, &map_b);
  if (!ok) return false;
  auto kernel = gemm_wgmma_tma_kernel<T, MODE>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(WgStaging::SMEM_BYTES));
  cudaLaunchConfig_t cfg = {};
  cfg.blockDim = dim3(WS_THREADS);
  cfg.dynamicSmemBytes = WgStaging::SMEM_BYTES;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 2;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  // Persistent: as many clusters as can be resident at once (asked once per
  // device), never more than there are items.
  const int cols = ceil_div(N, BN);
  int dev = 0, clusters = 0;
  cudaGetDevice(&dev);
  constexpr int kMaxDevices = 64;
  static std::atomic<int> resident[kMaxDevices];
  if (dev >= 0 && dev < kMaxDevices) clusters = resident[dev].load(std::memory_order_relaxed);
  if (clusters <= 0) {
    cfg.gridDim = dim3(2 * 66);
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess || clusters <= 0) {
      cudaGetLastError();  // clear it; fall back to one cluster per two SMs
      int sms = 0;
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
      clusters = std::max(1, sms / 2);
    }
    if (dev >= 0 && dev < kMaxDevices) resident[dev].store(clusters, std::memory_order_relaxed);
  }
  const int64_t items = int64_t((tiles + 1) / 2) * cols;
  cfg.gridDim = dim3(unsigned(2 * std::min<int64_t>(clusters, items)));
  static const int exp = [] {
    const char* v = std::getenv("MOE_CLUSTER_EXP");
    return v ? std::atoi(v) : 0;
  }();
  cudaLaunchKernelEx(&cfg, kernel, p, w, map_a, map_b, int(tiles), cols, exp);
  return true;
}

template <class T, int MODE>
void launch_wgmma_mode(const MoeRunParams& p, const Work& w, unsigned tiles, int N, int mode,
                       cudaStream_t stream) {
  if (mode == 2 || (mode == 3 && MODE == kGemm2)) {
    if (MODE != kGemm2)  // GEMM1 reads the token rows in sorted order
      launch_pdl(sort_rows_kernel<T>, dim3(grid_limit(w.n * (p.H / 8), 256)), dim3(256), 0, stream, p, w);
    if (launch_wgmma_tma<T, MODE>(p, w, tiles, N, stream)) return;
  }
  launch_wgmma<T, MODE>(p, w, tiles, N, stream);
}

template <class T>
void launch_wgmma_stage(const MoeRunParams& p, const Work& w, unsigned tiles, bool second, int mode,
                        cudaStream_t stream) {
  if (second)
    launch_wgmma_mode<T, kGemm2>(p, w, tiles, p.H, mode, stream);
  else if (p.gated)
    launch_wgmma_mode<T, kGemm1Gated>(p, w, tiles, p.I, mode, stream);
  else
    launch_wgmma_mode<T, kGemm1Plain>(p, w, tiles, p.I, mode, stream);
}

// The bf16/f16 128-row kernel when MOE_RUNNER_WGMMA is unset: variant 2
// (TMA, persistent 2-block clusters) for expert matrices of at least
// kLargeExpertElems elements, variant 1 otherwise. Run 142 (H100, layer us,
// variant 1 / 2): Mixtral (58.7M elements) T=1024 1603 / 1573, T=4096
// 5097 / 4971, T=16384 19219 / 17998 (GEMM1 13360 / 11284 + 156 for the
// sorted rows, GEMM2 5755 / 5409 in run 143's timelines); the DeepSeek slice
// (14.7M) 1231 / 1312 at T=4096 and Qwen3 (1.6M) 2601 / 3089 at T=16384.
// (Variant 2 was the default for these experts at up to 128 slots per
// expert from run 42 until runs 133-134 found it hanging; run 140 found why:
// gemm_wgmma_tma_kernel.)
constexpr int64_t kLargeExpertElems = int64_t(1) << 25;
int bf16_wgmma_default(const MoeRunParams& p) { return int64_t(p.H) * p.I >= kLargeExpertElems ? 2 : 1; }

// One streaming GEMM (see gemm_stream_kernel): false when it does not apply
// (K % 64, a weight view the tensor map refuses), so the caller falls back.
template <class T, int MODE, class Cfg>
bool launch_stream(const MoeRunParams& p, const Work& w, int N, cudaStream_t stream) {
  const int Kdim = MODE == kGemm2 ? p.I : p.H;
  if (Kdim % 64 != 0) return false;
  CUtensorMap map_b;
  if (!map_weights<T, MODE>(p, Cfg::BN, &map_b)) return false;
  auto kernel = gemm_stream_kernel<T, MODE, Cfg>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Cfg::SMEM_BYTES)) !=
      cudaSuccess) {
    cudaGetLastError();  // clear it: the caller falls back
    return false;
  }
  const int sms = sm_count();
  if (sms <= 0) return false;
  launch_pdl(kernel, dim3(unsigned(sms * Cfg::BLOCKS)), dim3(Cfg::THREADS), Cfg::SMEM_BYTES, stream, p, w, map_b,
             ceil_div(N, Cfg::BN));
  return true;
}

// One streaming GEMM at kBlocks blocks per SM (launch_stream_stage below
// decides whether the streaming kernels apply and how many blocks).
// Run 60 (H100, moe_bench, against gemm_tc_kernel in run 59): Mixtral
// T=1/8/64 271 -> 257, 952 -> 921, 1077 -> 1043 us, the DeepSeek slice T=1
// 49.4 -> 43.8, T=64 555 -> 537 us, T=8 and 256 within 1%; Qwen3's small
// matrices (3.1M and 1.6M elements, 12-32 k steps an item, many items a
// block) slower at T=8 and 64 (208 -> 221, 456 -> 491 us), where the many
// small blocks of gemm_tc_kernel overlap more items per SM. Four blocks per
// SM (shallower buffers) were slower on every shape but Qwen3 T=64-256 (run
// 60); three won on the DeepSeek slice in v25 (stream_blocks).
// MOE_RUNNER_STREAM=1 takes them for every size (the GPU suite's small
// models then run them too): stream_kernels_for.
template <class T, int BM_, int BN_, int kBlocks>
bool launch_stream_blocks(const MoeRunParams& p, const Work& w, bool second, cudaStream_t stream) {
  // GEMM2 on 16-row tiles: 32 columns (4 consumer warps) instead of 16. Run
  // 155 (ncu, the DeepSeek slice at T=8): GEMM2 streamed 2.07 TB/s against
  // GEMM1's 2.83, with 0.26 eligible warps per scheduler, stalled on the
  // MMA chains: one set (GEMM1 has two, gate and up) and two consumer warps
  // per block leave an SM 4 chains. Run 156 (moe_bench --no-peers, layer us,
  // 16 / 32 columns): the DeepSeek slice T=8 223.2/222.6 -> 216.1/214.3,
  // Mixtral T=1 251.8/251.5 -> 246.8/247.0, T=8 909.2/911.5 -> 898.8/897.6;
  // on 32-row tiles 64 columns won at Mixtral T=64 (1047.7/1045.0 ->
  // 1025.1/1026.0) and lost at the DeepSeek slice T=256 (826.8/829.3 ->
  // 837.2/836.3), so 64 only for the largest experts (below); three blocks per SM were slower on
  // Mixtral (T=1 270.6-273.1). Every output is computed as before (the
  // columns of a warp, in the same k order), so bitwise the same.
  // GEMM2 on 32-row tiles: 64 columns for expert matrices of at least
  // kLargeExpertElems elements (Mixtral: run 156's gain), 32 for smaller
  // ones (the DeepSeek slice: run 156's loss). Since v22 (run 175).
  if (second && BM_ == 32 && int64_t(p.H) * p.I >= kLargeExpertElems)
    return launch_stream<T, kGemm2, StreamCfg<BM_, 2 * BN_, 1, kBlocks>>(p, w, p.H, stream);
  if (second)
    return launch_stream<T, kGemm2, StreamCfg<BM_, BM_ == 16 ? 2 * BN_ : BN_, 1, kBlocks>>(p, w, p.H, stream);
  if (p.gated) return launch_stream<T, kGemm1Gated, StreamCfg<BM_, BN_, 2, kBlocks>>(p, w, p.I, stream);
  return launch_stream<T, kGemm1Plain, StreamCfg<BM_, BN_, 1, kBlocks>>(p, w, p.I, stream);
}

// The streaming kernels for a GEMM whose expert matrix has more than
// kShallowElems elements (or every one under MOE_RUNNER_STREAM=1), else
// false (the caller keeps gemm_tc_kernel).
// Blocks per SM of the bf16/f16 streaming kernels: 3 (rings of 72 KB) for
// expert matrices under kLargeExpertElems elements, 2 (108 KB) for larger
// ones; MOE_RUNNER_STREAM_BLOCKS=2|3|4 (read at each launch) forces one.
// Runs 194-195 (bench/env_ab.py, layer us, 2 / 3 / 4 blocks, before v25's
// proxy fence): the DeepSeek slice T=8 180.1 / 165.3 / 173.7, T=32 474.8 /
// 455.9 / 456.2, T=64 716.9 / 694.5 / 741.3; Mixtral T=1 254.5 / 259.5 /
// 256.3, and moe_bench Mixtral T=64 1029 / 1087 us (2 / 3): a smaller
// expert's shorter items spread over more, shallower rings; a large one's
// long items want the deep rings.
int stream_blocks(const MoeRunParams& p) {
  const char* v = std::getenv("MOE_RUNNER_STREAM_BLOCKS");
  if (v && v[0] >= '2' && v[0] <= '4' && v[1] == 0) return v[0] - '0';
  return int64_t(p.H) * p.I >= kLargeExpertElems ? 2 : 3;
}

template <class T, int BM_, int BN_>
bool launch_stream_stage(const MoeRunParams& p, const Work& w, bool second, cudaStream_t stream) {
  if (!stream_kernels_for(int64_t(p.H) * p.I * (!second && p.gated ? 2 : 1))) return false;
  const int blocks = stream_blocks(p);
  if (blocks == 3) return launch_stream_blocks<T, BM_, BN_, 3>(p, w, second, stream);
  if (blocks == 4) return launch_stream_blocks<T, BM_, BN_, 4>(p, w, second, stream);
  return launch_stream_blocks<T, BM_, BN_, 2>(p, w, second, stream);
}

// rows_bound: the most rows the tiles of this candidate can cover;
// candidate: the tile map chooses between two row tiles, so this launch may
// do nothing (the 32- and 128-row gemm_tc_kernel then run persistent).
template <class T>
void launch_tc_rows(const MoeRunParams& p, const Work& w, int bm, int64_t rows_bound, bool second,
                    bool candidate, cudaStream_t stream) {
  const unsigned tiles = max_tiles(p, rows_bound, bm);
  switch (bm) {
    case 16:
      if (launch_stream_stage<T, 16, 16>(p, w, second, stream)) break;
      // Small expert matrices: 6 stages once the batch has at least one slot
      // per two local experts (many tiles, so many blocks per SM), else 4
      // (since v24 the "6" is 3 stages of 128-deep k: CfgDecode16s6).
      // Run 106 (moe_bench Qwen3, layer us, 4 / 6 stages): T=8 206.3-206.6 /
      // 203.5-203.9, T=64 453.6-454.0 / 449.7-452.2; T=1 (n = 8, 128 local
      // experts: 4 kept) 45.2-45.4 / 48.2-48.5.
      switch (decode_stages(int64_t(p.H) * p.I * (!second && p.gated ? 2 : 1), 12, 2 * w.n >= p.E_loc ? 6 : 4,
                            second)) {
        case 6: launch_tc_stage<T, CfgDecode16s6, CfgDecode16s6>(p, w, tiles, second, stream); break;
        case 4: launch_tc_stage<T, CfgDecode16s4, CfgDecode16s4>(p, w, tiles, second, stream); break;
        default: launch_tc_stage<T, CfgDecode16, CfgDecode16>(p, w, tiles, second, stream); break;
      }
      break;
    case 32:
      if (launch_stream_stage<T, 32, 32>(p, w, second, stream)) break;
      if (candidate)
        launch_tc_stage<T, CfgDecode32, CfgDecode32, true>(p, w, tiles, second, stream);
      else
        launch_tc_stage<T, CfgDecode32, CfgDecode32>(p, w, tiles, second, stream);
      break;
    case 64: launch_tc_stage<T, CfgMid, CfgMid>(p, w, tiles, second, stream); break;
    default:
      static_assert(WG_BM == CfgWide1::BM, "the wgmma path replaces the 128-row tiles");
      if (const int mode = wgmma_mode(bf16_wgmma_default(p)))
        launch_wgmma_stage<T>(p, w, tiles, second, mode, stream);
      else if (candidate)
        launch_tc_stage<T, CfgWide1, CfgWide2, true>(p, w, tiles, second, stream);
      else
        launch_tc_stage<T, CfgWide1, CfgWide2>(p, w, tiles, second, stream);
      break;
  }
}

template <class T>
void launch_gemms_typed(const MoeRunParams& p, const Work& w, const RowChoice& rc,
                        cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    const unsigned tiles = max_tiles(p, w.n, BM);
    const dim3 grid1(tiles, unsigned(ceil_div(p.I, BN)));
    const dim3 grid2(tiles, unsigned(ceil_div(p.H, BN)));
    launch_pdl(p.gated ? gemm_f32_kernel<kGemm1Gated> : gemm_f32_kernel<kGemm1Plain>, grid1,
               dim3(F_THREADS), 0, stream, p, w);
    launch_pdl(gemm_f32_kernel<kGemm2>, grid2, dim3(F_THREADS), 0, stream, p, w);
  } else {
    // Both candidates are launched; blocks of the one not chosen exit at once
    // (persistent kernels: one wave of them). The tile map picks the small one
    // only for at most small_max_avg rows per expert on average, which bounds
    // its tiles (run 23's profile: at Qwen3 T=4096 the unbounded grids of
    // exiting blocks took ~70 us).
    const bool two = rc.large != rc.small;
    const int64_t small_rows = two ? std::min<int64_t>(w.n, int64_t(rc.small_max_avg) * p.E_loc) : w.n;
    for (const bool second : {false, true}) {
      launch_tc_rows<T>(p, w, rc.small, small_rows, second, two, stream);
      if (two) launch_tc_rows<T>(p, w, rc.large, w.n, second, true, stream);
    }
  }
}

}  // namespace

// Stages of the 16-row decode tiles (both runners; see CfgDecode16s4 above):
// `small_stages` for expert matrices of at most kShallowElems elements (the
// bf16 runner picks 4 or 6; the FP8 runner 4), else `large_stages` (the
// bf16 runner: 12; the FP8 runner picks 6 or 12).
bool stream_kernels_for(int64_t matrix_elems) {
  // Read at each launch (bench/env_ab.py), as the other runner switches.
  if (env_is_zero("MOE_RUNNER_STREAM") || !sm90a_device()) return false;
  const char* v = std::getenv("MOE_RUNNER_STREAM");
  return (v && v[0] == '1' && v[1] == 0) || matrix_elems > kShallowElems;
}

int decode_stages(int64_t matrix_elems, int large_stages, int small_stages, bool second) {
  // Read at each launch (bench/env_ab.py); "S1,S2": S1 for GEMM1, S2 for GEMM2.
  if (const char* e = std::getenv("MOE_RUNNER_DECODE_STAGES")) {
    const char* comma = std::strchr(e, ',');
    const int s = std::atoi(second && comma ? comma + 1 : e);
    if (s == 12 || s == 6 || s == 4) return s;
  }
  return matrix_elems <= kShallowElems ? small_stages : large_stages;
}

// Which kernels the 128-row tiles use (both runners): 0 mma.sync, 1 wgmma
// with the token rows by cp.async (bf16/f16: the weights by TMA since
// v22), 2 wgmma with TMA and warp specialisation (bf16:
// 2-block clusters sharing weight tiles), 3 the bf16 runner's GEMM1 as 1
// and its GEMM2 as 2 (GEMM2's rows need no sorted copy; the FP8 runner
// takes 3 as 1). Not 0 only when the library was built for sm_90a alone
// among the 9.x targets (MOE_CUDA_WGMMA, set by CMake) and the current
// device is compute capability 9.0; MOE_RUNNER_WGMMA=0|1|2|3 chooses
// (unset: `unset`; the bf16 runner passes bf16_wgmma_default, the FP8 runner 2).
// Read at each GEMM launch (one getenv), so that a test can run every variant
// in one process (gpu.runner.wgmma_variants_partial_tiles).
int wgmma_mode(int unset) {
#if defined(MOE_CUDA_WGMMA)
  const char* v = std::getenv("MOE_RUNNER_WGMMA");
  const int env_mode = (v && v[0] >= '0' && v[0] <= '3' && v[1] == 0) ? v[0] - '0' : -1;
  if (env_mode == 0 || !sm90a_device()) return 0;
  return env_mode > 0 ? env_mode : unset;
#else
  (void)unset;
  return 0;
#endif
}

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

namespace {

// Whether the GEMMs of a 16-bit run find their tiles from the offsets
// (decode_tile), with no tile map kernel: when the host's row choice is the
// 16-row decode tile alone (the tile map's other jobs, choosing between two
// candidates and zeroing the persistent kernels' item counters, are then
// void), unless MOE_RUNNER_DIRECT_TILES=0 (read at each launch, so that a
// test or bench/env_ab.py can run both ways in one process). Layer us, tile
// map / direct (bench/env_ab.py, 7 rounds, medians): run 183 Qwen3 T=1
// 45.68 / 44.37, T=2 74.69 / 73.63, T=4 125.17 / 124.18, the DeepSeek slice
// T=1 82.05 / 81.02, T=8 180.82 / 179.34, T=32 439.52 / 437.22, Mixtral T=1
// and 8 and Qwen3 T=8 within 1% either way; run 184 Qwen3 T=1 46.67 /
// 45.57, the slice T=1 81.18 / 80.03. The same for the lone 32-row tile was
// slower (run 184: the slice T=64 511.78 / 515.14, Qwen3 T=256 485.34 /
// 488.67): not taken there.
bool direct_tiles(const MoeRunParams& p, const RowChoice& rc) {
  if (p.dtype == DType::f32 || rc.small != 16 || rc.large != 16) return false;
  return !env_is_zero("MOE_RUNNER_DIRECT_TILES");
}

}  // namespace

cudaError_t launch_moe_gemms(const MoeRunParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  Work w = make_work(p);
  const RowChoice rc = p.dtype == DType::f32 ? RowChoice{BM, BM, 0} : pick_rows(p, w.n);
  w.direct = direct_tiles(p, rc);
  if (!w.direct)
    launch_pdl(tile_map_kernel, dim3(1), dim3(32), 0, stream, p, w.n, rc.small, rc.large, rc.small_max_avg,
               const_cast<int32_t*>(w.tile_start), const_cast<int32_t*>(w.rows), w.counters);
  switch (p.dtype) {
    case DType::bf16: launch_gemms_typed<__nv_bfloat16>(p, w, rc, stream); break;
    case DType::f16: launch_gemms_typed<__half>(p, w, rc, stream); break;
    default: launch_gemms_typed<float>(p, w, rc, stream); break;
  }
  return launch_status();
}

cudaError_t launch_moe_reduce(const MoeRunParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  const Work w = make_work(p);
  const int blocks = grid_limit(p.T * (p.H / 4), 256);
  const dim3 grid(blocks), block(256);
  switch (p.dtype) {
    case DType::bf16: launch_pdl(reduce_kernel<__nv_bfloat16>, grid, block, 0, stream, p, w); break;
    case DType::f16: launch_pdl(reduce_kernel<__half>, grid, block, 0, stream, p, w); break;
    default: launch_pdl(reduce_kernel<float>, grid, block, 0, stream, p, w); break;
  }
  return launch_status();
}

float* moe_run_slot_rows(const MoeRunParams& p) { return make_work(p).out2; }

cudaError_t launch_moe_run(const MoeRunParams& p, cudaStream_t stream) {
  cudaError_t err = launch_moe_gemms(p, stream);
  if (err != cudaSuccess) return err;
  return launch_moe_reduce(p, stream);
}

}  // namespace moe::kernels
