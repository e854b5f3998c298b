#include "dispatch.cuh"

#include "common.cuh"

#include <cstdlib>

namespace moe::kernels {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kChunks = kDispatchTile / 32;
// Up to this many local experts, a warp keeps its tile's counters in shared
// memory (8 KB per warp); beyond, it updates the global histogram directly.
constexpr int kSmemExperts = 2048;

int num_tiles(int64_t n) { return ceil_div(n, kDispatchTile); }

__device__ __forceinline__ int32_t to_local(const int32_t* mapping, int E, int E_loc, int32_t id) {
  // Never index with an id outside [0, E): -1 and bad ids both mean "not here".
  if (id < 0 || id >= E) return -1;
  const int32_t l = mapping[id];
  return (l >= 0 && l < E_loc) ? l : -1;
}

// Lane's ids of a warp tile: src[base + 32 c] for c < kChunks (base = the
// tile's first slot + lane), -1 past n. Every load issued before any use.
__device__ __forceinline__ void load_tile(const int32_t* src, int64_t n, int64_t base,
                                          int32_t (&out)[kChunks]) {
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int64_t s = base + c * 32;
    out[c] = s < n ? src[s] : -1;
  }
}

// Global ids of a tile to local ids, also written to local_ids.
__device__ __forceinline__ void map_tile(const DispatchParams& p, int64_t base, int32_t (&local)[kChunks]) {
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    local[c] = to_local(p.mapping, p.E, p.E_loc, local[c]);
    const int64_t s = base + c * 32;
    if (s < p.n) p.local_ids[s] = local[c];
  }
}

// The tile's counters: shared memory, or the global column (then zeroed by a memset).
__device__ __forceinline__ int32_t* tile_counters(int32_t* smem, int32_t* hist, int E_loc, int nt,
                                                  int b, int warp, int64_t& stride) {
  if (E_loc <= kSmemExperts) {
    stride = 1;
    return smem + warp * E_loc;
  }
  stride = nt;
  return hist + b;
}

// Where dispatch_histogram_kernel puts the count of tile b and expert e:
// hist[e * e_stride + b * b_stride], columns [0, cols) written (those past
// E_loc as 0). The scan path keeps expert rows ({nt, 1, E_loc}); the prefix
// path keeps tile rows padded to a power of two ({1, cols, cols}).
struct HistLayout {
  int64_t e_stride, b_stride;
  int cols;
};

// The histogram of every tile; also writes local_ids.
__global__ void dispatch_histogram_kernel(DispatchParams p, int nt, int32_t* hist, HistLayout lay) {
  pdl_wait();
  pdl_trigger();
  extern __shared__ int32_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int b = blockIdx.x * kWarpsPerBlock + warp;
  if (b >= nt) return;
  int64_t stride;
  int32_t* cnt = tile_counters(smem, hist, lay.cols, nt, b, warp, stride);
  if (stride == 1)
    for (int e = lane; e < lay.cols; e += 32) cnt[e] = 0;
  const int64_t base = int64_t(b) * kDispatchTile + lane;
  int32_t local[kChunks];
  load_tile(p.topk_ids, p.n, base, local);
  map_tile(p, base, local);
  __syncwarp();
  if (stride == 1) {
    // Shared counters: one atomic per slot, all independent (run 75's ncu:
    // the match_any chain below kept this kernel waiting on MIO for 46% of
    // its cycles at Qwen3 T=4096).
#pragma unroll
    for (int c = 0; c < kChunks; ++c)
      if (local[c] >= 0) atomicAdd(&cnt[local[c]], 1);
    __syncwarp();
    for (int e = lane; e < lay.cols; e += 32) hist[e * lay.e_stride + b * lay.b_stride] = cnt[e];
    return;
  }
  // Global counters (more local experts than shared memory holds): one
  // update per expert and chunk, by the lowest lane of each id.
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const unsigned same = __match_any_sync(kFullMask, local[c]);
    if (local[c] >= 0 && lane == __ffs(same) - 1) cnt[local[c] * stride] += __popc(same);
    __syncwarp();  // orders this chunk's updates before the next chunk's
  }
}

// Histogram cells (32 tiles of one expert's row) a warp loads at once in
// scan_histogram, so that it waits for one L2 round trip per batch instead
// of one per cell (the row-by-row walk took 9.8 us at Qwen3 T=4096). A
// rolled loop over batches: the single block's code stays small (a fully
// unrolled version was slower, run 49).
constexpr int kScanBatch = 8;

// Exclusive scan of totals[0, E_loc) (shared or global memory) over the
// block: totals[e] becomes expert e's first sorted position. With `write`,
// also counts, offsets and offsets[E_loc]. Returns the slots of all local
// experts to every thread. Any block size that is a multiple of 32.
__device__ __forceinline__ int32_t scan_totals(const DispatchParams& p, int32_t* totals, bool write) {
  __shared__ int32_t warp_totals[32];
  __shared__ int32_t total_sh;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  // Contiguous chunks per thread.
  const int per = (p.E_loc + blockDim.x - 1) / blockDim.x;
  const int begin = min(p.E_loc, per * int(threadIdx.x)), end = min(p.E_loc, begin + per);
  int32_t sum = 0;
  for (int e = begin; e < end; ++e) sum += totals[e];
  const int32_t incl = warp_inclusive_sum(sum);
  if (lane == 31) warp_totals[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int32_t t = lane < warps ? warp_totals[lane] : 0;
    const int32_t ti = warp_inclusive_sum(t);
    warp_totals[lane] = ti - t;
    if (lane == 31) total_sh = ti;
  }
  __syncthreads();
  int32_t run = warp_totals[warp] + incl - sum;
  for (int e = begin; e < end; ++e) {
    const int32_t c = totals[e];
    if (write) {
      p.counts[e] = c;
      p.offsets[e] = run;
    }
    totals[e] = run;  // now the expert's first position
    run += c;
  }
  if (write && threadIdx.x == 0) p.offsets[p.E_loc] = total_sh;
  __syncthreads();  // every thread's totals[] written
  return total_sh;
}

// One block: expert totals, offsets and counts. Each expert's row of the
// histogram becomes exclusive positions within the row: hist[e * nt + b] =
// slots of expert e in tiles before b. The scatter adds the expert's offset
// (the first sorted position). hist and totals live in global or shared
// memory; on return totals[e] = offsets[e].
__device__ __forceinline__ void scan_histogram(const DispatchParams& p, int nt, int32_t* hist,
                                               int32_t* totals) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  // 1. Row scans and slots per expert. Warp w owns rows w, w + warps, ...;
  //    its cells in order: row index r, chunk k (tiles 32 k + lane).
  const int C = (nt + 31) / 32;
  const int rows = warp < p.E_loc ? (p.E_loc - 1 - warp) / warps + 1 : 0;
  const int cells = rows * C;
  int32_t carry = 0;
  for (int c0 = 0, r0 = 0, k0 = 0; c0 < cells; c0 += kScanBatch) {
    int32_t v[kScanBatch];
    int r = r0, k = k0;
#pragma unroll
    for (int u = 0; u < kScanBatch; ++u) {
      const int j = k * 32 + lane;
      v[u] = c0 + u < cells && j < nt ? hist[int64_t(warp + r * warps) * nt + j] : 0;
      if (++k == C) {
        k = 0;
        ++r;
      }
    }
    r = r0;
    k = k0;
#pragma unroll
    for (int u = 0; u < kScanBatch; ++u) {
      if (c0 + u < cells) {  // uniform over the warp
        const int e = warp + r * warps, j = k * 32 + lane;
        const int32_t in = warp_inclusive_sum(v[u]);
        if (j < nt) hist[int64_t(e) * nt + j] = carry + in - v[u];
        carry += __shfl_sync(kFullMask, in, 31);
        if (++k == C) {
          if (lane == 0) totals[e] = carry;
          carry = 0;
          k = 0;
          ++r;
        }
      }
    }
    r0 = r;
    k0 = k;
  }
  if (nt == 0)
    for (int e = threadIdx.x; e < p.E_loc; e += blockDim.x) totals[e] = 0;
  __syncthreads();
  scan_totals(p, totals, true);
}

// Shared memory for a histogram kept there: [E_loc][nt] cells and E_loc totals.
size_t hist_smem_bytes(int nt, int E_loc) { return size_t(E_loc) * size_t(nt + 1) * sizeof(int32_t); }

__global__ void __launch_bounds__(1024)
    dispatch_scan_kernel(DispatchParams p, int nt, int32_t* hist, int32_t* totals) {
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  scan_histogram(p, nt, hist, totals);
}

// One warp's tile: slots in order, each to its expert's next position
// (pos[e * stride], advanced here); tile positions past the total get -1.
__device__ __forceinline__ void scatter_tile(const DispatchParams& p, const int32_t (&local)[kChunks],
                                             int64_t base, int32_t* pos, int64_t stride,
                                             int32_t total) {
  const int lane = threadIdx.x & 31;
  const unsigned lanes_below = (1u << lane) - 1u;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const unsigned same = __match_any_sync(kFullMask, local[c]);
    const int leader = __ffs(same) - 1;
    int32_t first = 0;
    if (local[c] >= 0 && lane == leader) first = pos[local[c] * stride];
    first = __shfl_sync(kFullMask, first, leader);
    if (local[c] >= 0) p.sorted_slots[first + __popc(same & lanes_below)] = int32_t(base + c * 32);
    __syncwarp();
    if (local[c] >= 0 && lane == leader) pos[local[c] * stride] = first + __popc(same);
    __syncwarp();
  }
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int64_t q = base + c * 32;
    if (q < p.n && q >= total) p.sorted_slots[q] = -1;
  }
}

// Stable scatter: each warp walks its tile in slot order, so slots of one
// expert land in (t, j) order. Positions past the total get -1.
__global__ void dispatch_scatter_kernel(DispatchParams p, int nt, int32_t* hist) {
  pdl_wait();
  pdl_trigger();
  extern __shared__ int32_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int b = blockIdx.x * kWarpsPerBlock + warp;
  if (b >= nt) return;
  int64_t stride;
  int32_t* pos = tile_counters(smem, hist, p.E_loc, nt, b, warp, stride);
  // The tile's first position per expert: its place within the row plus the
  // expert's offset.
  for (int e = lane; e < p.E_loc; e += 32) pos[e * stride] = hist[int64_t(e) * nt + b] + p.offsets[e];
  const int64_t base = int64_t(b) * kDispatchTile + lane;
  int32_t local[kChunks];
  load_tile(p.local_ids, p.n, base, local);
  __syncwarp();
  scatter_tile(p, local, base, pos, stride, p.offsets[p.E_loc]);
}

// --- prefix path (two launches) --------------------------------------------
//
// dispatch_histogram_kernel writes the tile histograms as tile rows
// [nt][cols] (cols: E_loc rounded up to a power of two >= 4); then each block
// of dispatch_prefix_scatter_kernel reads the whole histogram from L2 (16-byte
// loads, kPrefixBatch in flight per thread), sums each expert's slots in the
// tiles before its own and in all tiles, scans the totals into the expert
// offsets itself, and scatters its kPrefixWarps tiles. The one-block scan
// launch is gone: every block repeats the sums (nt * cols * 4 bytes of L2
// reads per block) instead of waiting for one block to do them.
constexpr int kPrefixWarps = 8;
constexpr int kPrefixThreads = 32 * kPrefixWarps;
constexpr int kPrefixBatch = 16;
// Shared memory (2 + kPrefixWarps) * cols * 4 bytes: 40 KB at 1024 columns.
constexpr int kPrefixMaxCols = 1024;
// Histogram bytes each block reads, at most (beyond: the scan path).
constexpr int64_t kPrefixMaxHistBytes = 512 * 1024;

int prefix_cols(int E_loc) {
  int c = 4;
  while (c < E_loc) c <<= 1;
  return c;
}

size_t prefix_smem_bytes(int cols) { return size_t(2 + kPrefixWarps) * size_t(cols) * sizeof(int32_t); }

__device__ __forceinline__ void add4(int4& a, const int4& b) {
  a.x += b.x;
  a.y += b.y;
  a.z += b.z;
  a.w += b.w;
}

__global__ void __launch_bounds__(kPrefixThreads)
    dispatch_prefix_scatter_kernel(DispatchParams p, int nt, int cols, const int32_t* hist) {
  pdl_wait();
  pdl_trigger();
  extern __shared__ int32_t sm[];
  int32_t* before = sm;          // [cols] slots per expert in tiles before b0
  int32_t* totals = sm + cols;   // [cols] slots per expert, then its first position
  int32_t* own = sm + 2 * cols;  // [kPrefixWarps][cols] the block's tiles' counts, then positions
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b0 = blockIdx.x * kPrefixWarps;
  for (int i = tid; i < (2 + kPrefixWarps) * cols; i += kPrefixThreads) sm[i] = 0;
  __syncthreads();
  // Column sums. Thread tid owns 4-column group g = tid % gpp (and g + gpp,
  // ...) in rows tid / gpp, + rstep, ... (cols a power of two: exact). The
  // block's own rows also go to `own`.
  const int groups = cols / 4;
  const int gpp = min(groups, kPrefixThreads);
  const int rstep = kPrefixThreads / gpp;
  const int4* h4 = reinterpret_cast<const int4*>(hist);
  int4* own4 = reinterpret_cast<int4*>(own);
  for (int g = tid % gpp; g < groups; g += gpp) {
    int4 bs = make_int4(0, 0, 0, 0), ts = make_int4(0, 0, 0, 0);
    for (int r0 = tid / gpp; r0 < nt; r0 += rstep * kPrefixBatch) {
      int4 v[kPrefixBatch];
#pragma unroll
      for (int u = 0; u < kPrefixBatch; ++u) {
        const int r = r0 + u * rstep;
        v[u] = r < nt ? h4[int64_t(r) * groups + g] : make_int4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kPrefixBatch; ++u) {
        const int r = r0 + u * rstep;
        add4(ts, v[u]);
        if (r < b0) add4(bs, v[u]);
        if (r >= b0 && r < b0 + kPrefixWarps && r < nt) own4[(r - b0) * groups + g] = v[u];
      }
    }
    if (rstep > 1) {
      atomicAdd(&before[4 * g + 0], bs.x);
      atomicAdd(&before[4 * g + 1], bs.y);
      atomicAdd(&before[4 * g + 2], bs.z);
      atomicAdd(&before[4 * g + 3], bs.w);
      atomicAdd(&totals[4 * g + 0], ts.x);
      atomicAdd(&totals[4 * g + 1], ts.y);
      atomicAdd(&totals[4 * g + 2], ts.z);
      atomicAdd(&totals[4 * g + 3], ts.w);
    } else {  // the only thread of its group
      reinterpret_cast<int4*>(before)[g] = bs;
      reinterpret_cast<int4*>(totals)[g] = ts;
    }
  }
  __syncthreads();
  const int32_t total = scan_totals(p, totals, blockIdx.x == 0);  // ends with a barrier
  // Each tile's first position per expert: the expert's offset, its slots in
  // the tiles before the block's, and in the block's tiles before this one.
  for (int e = tid; e < p.E_loc; e += kPrefixThreads) {
    int32_t run = totals[e] + before[e];
#pragma unroll
    for (int w = 0; w < kPrefixWarps; ++w) {
      const int32_t c = own[w * cols + e];
      own[w * cols + e] = run;
      run += c;
    }
  }
  __syncthreads();
  const int b = b0 + warp;
  if (b >= nt) return;
  const int64_t base = int64_t(b) * kDispatchTile + lane;
  int32_t local[kChunks];
  load_tile(p.local_ids, p.n, base, local);
  scatter_tile(p, local, base, own + warp * cols, 1, total);
}

// Small batches (nt <= kFusedTiles): histogram, scan and scatter in one block,
// one warp per tile, the histogram in shared memory. Same positions as the
// three launches; one launch instead of three.
constexpr int kFusedMaxTiles = 32;  // warps of the block
// Run 10: at 32 tiles one SM doing every tile's histogram and scatter took
// 30 us where three launches took 15 (Qwen3, T=1024): fused up to 8 tiles.
constexpr int kFusedTiles = 8;
constexpr size_t kFusedSmem = 48 * 1024;


__global__ void __launch_bounds__(32 * kFusedMaxTiles) dispatch_fused_kernel(DispatchParams p, int nt) {
  pdl_wait();
  pdl_trigger();
  extern __shared__ int32_t smem[];
  int32_t* hist = smem;                           // [E_loc][nt]
  int32_t* totals = smem + size_t(p.E_loc) * nt;  // [E_loc]
  // Warp b < nt owns tile b; all 32 warps share the scan (run 10: a block of
  // nt warps alone took 30-57 us for 128 experts, the scan walking rows serially).
  const int lane = threadIdx.x & 31, b = threadIdx.x >> 5;
  const bool owner = b < nt;
  const int64_t base = int64_t(b) * kDispatchTile + lane;
  int32_t local[kChunks];
  if (owner) {
    for (int e = lane; e < p.E_loc; e += 32) hist[e * nt + b] = 0;
    load_tile(p.topk_ids, p.n, base, local);
    map_tile(p, base, local);
    __syncwarp();
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const unsigned same = __match_any_sync(kFullMask, local[c]);
      if (local[c] >= 0 && lane == __ffs(same) - 1) hist[local[c] * nt + b] += __popc(same);
      __syncwarp();
    }
  }
  __syncthreads();
  scan_histogram(p, nt, hist, totals);
  __syncthreads();  // positions and offsets visible to every warp
  if (owner) {
    for (int e = lane; e < p.E_loc; e += 32) hist[e * nt + b] += totals[e];
    __syncwarp();
    scatter_tile(p, local, base, hist + b, nt, p.offsets[p.E_loc]);
  }
}

// --- small batches: one block, one slot per thread (one launch) -----------
//
// Up to kSmallSlots slots and kSmallMaxLocal local experts. Each warp counts
// its 32 slots per expert (one match_any; the lowest lane of each expert
// adds to the warp's row of the shared [warps][E_loc] counts) and ranks each
// slot among the earlier ones of its expert in the warp; the rows become
// prefixes over warps, their totals the expert offsets (scan_totals); each
// slot's position is offset + earlier warps + rank. Two global round trips
// (the ids, the mapping) and shared memory; the one-block-per-expert kernel
// reads every id twice per block with barriers between (3.8-6.4 us at
// T=1 in run 75).
constexpr int kSmallSlots = 256;
constexpr int kSmallWarps = kSmallSlots / 32;
constexpr int kSmallMaxLocal = 1024;

size_t small_smem_bytes(int E_loc) { return size_t(kSmallWarps + 1) * size_t(E_loc) * sizeof(int32_t); }

__global__ void __launch_bounds__(kSmallSlots) dispatch_small_kernel(DispatchParams p) {
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  extern __shared__ int32_t sm[];
  int32_t* wc = sm;                                    // [kSmallWarps][E_loc]
  int32_t* totals = sm + size_t(kSmallWarps) * p.E_loc;  // [E_loc]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int32_t id = tid < p.n ? p.topk_ids[tid] : -1;
  for (int i = tid; i < (kSmallWarps + 1) * p.E_loc; i += kSmallSlots) sm[i] = 0;
  const int32_t l = to_local(p.mapping, p.E, p.E_loc, id);
  if (tid < p.n) p.local_ids[tid] = l;
  __syncthreads();  // counts zeroed
  const unsigned same = __match_any_sync(kFullMask, l);
  const int rank = __popc(same & ((1u << lane) - 1u));
  if (l >= 0 && rank == 0) wc[warp * p.E_loc + l] = __popc(same);
  __syncthreads();
  for (int e = tid; e < p.E_loc; e += kSmallSlots) {
    int32_t run = 0;
#pragma unroll
    for (int w = 0; w < kSmallWarps; ++w) {
      const int32_t c = wc[w * p.E_loc + e];
      wc[w * p.E_loc + e] = run;
      run += c;
    }
    totals[e] = run;
  }
  __syncthreads();
  const int32_t total = scan_totals(p, totals, true);  // ends with a barrier
  if (l >= 0) p.sorted_slots[totals[l] + wc[warp * p.E_loc + l] + rank] = tid;
  if (tid >= total && tid < p.n) p.sorted_slots[tid] = -1;
}

// --- one block per local expert (one launch) -------------------------------
//
// Block e reads every slot's id twice from L2: pass A builds the whole
// per-expert histogram in shared memory (so that it knows its own offset,
// the count of every expert before it, and the total); pass B walks the
// slots in order in chunks, each warp a contiguous stretch, and writes the
// slots of expert e at their stable positions (ballot ranks within a warp,
// a block scan of the warp counts across warps). No global histogram, no
// grid-wide step: one launch instead of three. Each block's two passes are
// latency-bound and grow with n (run 33 on H100: 4-6 us up to n = 2048,
// 13.5 us at n = 8192 with 128 experts, 22-45 us at n = 32768 where the three
// kernels take 10-19 us), so the launcher takes it up to kExpertMaxSlots
// (run 72, graph replays: at n = 2048 5-7 us where the prefix path takes
// 7-10; at n = 8192 the prefix path is ahead, 10.6 against 13.3 us on Qwen3).
constexpr int kExpertThreads = 512;
constexpr int kExpertWarps = kExpertThreads / 32;
constexpr int kExpertV = 16;  // ids per lane and chunk in pass B (a chunk: 8192 slots)
constexpr int kExpertBatch = 8;  // loads in flight per thread in pass A
constexpr int kExpertMaxLocal = 1024;
constexpr int64_t kExpertMaxSlots = 4096;

__global__ void __launch_bounds__(kExpertThreads) dispatch_by_expert_kernel(DispatchParams p) {
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  extern __shared__ int32_t hist[];  // [E_loc]
  __shared__ int32_t warp_base[kExpertWarps];
  __shared__ int32_t offset_sh, total_sh;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int e = blockIdx.x;
  for (int i = tid; i < p.E_loc; i += kExpertThreads) hist[i] = 0;
  if (tid == 0) offset_sh = total_sh = 0;
  __syncthreads();
  // Pass A: histogram of every local expert; this block also writes local_ids
  // of its share of the batches.
  constexpr int64_t kBatch = int64_t(kExpertThreads) * kExpertBatch;
  for (int64_t b0 = 0, bi = 0; b0 < p.n; b0 += kBatch, ++bi) {
    int32_t id[kExpertBatch];
#pragma unroll
    for (int u = 0; u < kExpertBatch; ++u) {
      const int64_t s = b0 + int64_t(u) * kExpertThreads + tid;
      id[u] = s < p.n ? p.topk_ids[s] : -1;
    }
    const bool writer = bi % gridDim.x == blockIdx.x;
#pragma unroll
    for (int u = 0; u < kExpertBatch; ++u) {
      const int64_t s = b0 + int64_t(u) * kExpertThreads + tid;
      const int32_t l = to_local(p.mapping, p.E, p.E_loc, id[u]);
      if (writer && s < p.n) p.local_ids[s] = l;
      const unsigned same = __match_any_sync(kFullMask, l);  // one atomic per expert and warp
      if (l >= 0 && lane == __ffs(same) - 1) atomicAdd(&hist[l], __popc(same));
    }
  }
  __syncthreads();
  // This expert's offset and the total.
  int32_t before = 0, all = 0;
  for (int i = tid; i < p.E_loc; i += kExpertThreads) {
    const int32_t c = hist[i];
    all += c;
    if (i < e) before += c;
  }
  before = warp_sum_int(before);
  all = warp_sum_int(all);
  if (lane == 0) {
    atomicAdd(&offset_sh, before);
    atomicAdd(&total_sh, all);
  }
  __syncthreads();
  const int32_t offset = offset_sh, total = total_sh;
  if (tid == 0) {
    p.counts[e] = hist[e];
    p.offsets[e] = offset;
    if (e == p.E_loc - 1) p.offsets[p.E_loc] = total;
  }
  // Positions past the total: -1 (shared out over the blocks).
  for (int64_t q = total + int64_t(blockIdx.x) * kExpertThreads + tid; q < p.n;
       q += int64_t(gridDim.x) * kExpertThreads)
    p.sorted_slots[q] = -1;
  if (hist[e] == 0) return;  // uniform: nothing of this expert to place
  // Pass B: stable placement of this expert's slots, 8192 slots per chunk.
  constexpr int64_t kChunk = int64_t(kExpertThreads) * kExpertV;
  int32_t placed = offset;  // position of the chunk's first slot of expert e
  for (int64_t c0 = 0; c0 < p.n; c0 += kChunk) {
    const int64_t base = c0 + int64_t(warp) * (32 * kExpertV);  // this warp's stretch
    int32_t id[kExpertV];
#pragma unroll
    for (int v = 0; v < kExpertV; ++v) {
      const int64_t s = base + v * 32 + lane;
      id[v] = s < p.n ? p.topk_ids[s] : -1;
    }
    unsigned mask[kExpertV];
    int32_t count = 0;
#pragma unroll
    for (int v = 0; v < kExpertV; ++v) {
      mask[v] = __ballot_sync(kFullMask, to_local(p.mapping, p.E, p.E_loc, id[v]) == e);
      count += __popc(mask[v]);
    }
    if (lane == 0) warp_base[warp] = count;
    __syncthreads();
    int32_t mine = 0, chunk_total = 0;
#pragma unroll
    for (int w = 0; w < kExpertWarps; ++w) {
      const int32_t c = warp_base[w];
      if (w < warp) mine += c;
      chunk_total += c;
    }
    __syncthreads();  // warp_base is rewritten by the next chunk
    int32_t pos = placed + mine;
    const unsigned below = (1u << lane) - 1u;
#pragma unroll
    for (int v = 0; v < kExpertV; ++v) {
      if (mask[v] >> lane & 1u) p.sorted_slots[pos + __popc(mask[v] & below)] = int32_t(base + v * 32 + lane);
      pos += __popc(mask[v]);
    }
    placed += chunk_total;
  }
}

// Which algorithms launch_dispatch may use (MOE_DISPATCH_ALGO, read at each
// launch so that a test can compare them in one process; results never
// differ): unset or 1, the default choice below; 0, only the
// histogram/scan/scatter kernels (and the fused one-block kernel for small
// batches); 2, the prefix path wherever it applies.
int dispatch_algo() {
  const char* v = std::getenv("MOE_DISPATCH_ALGO");
  if (v && v[0] == '0' && v[1] == 0) return 0;
  if (v && v[0] == '2' && v[1] == 0) return 2;
  return 1;
}

bool prefix_applies(int nt, int E_loc) {
  const int cols = prefix_cols(E_loc);
  return nt > 0 && E_loc > 0 && cols <= kPrefixMaxCols &&
         int64_t(nt) * cols * int64_t(sizeof(int32_t)) <= kPrefixMaxHistBytes;
}

// Histogram cells: [E_loc][nt] for the scan path, [nt][cols] for the prefix
// path. Sized for the padded rows whenever cols allows the prefix path, not
// only where it is taken, so that the bytes never decrease as n grows (a
// workspace sized for max_tokens serves every smaller batch).
size_t hist_bytes(int64_t n, int E_loc) {
  const int nt = num_tiles(n);
  const int cols = prefix_cols(E_loc);
  const size_t cells = size_t(nt) * size_t(cols <= kPrefixMaxCols ? cols : E_loc);
  return (cells * sizeof(int32_t) + 255) / 256 * 256;
}

}  // namespace

size_t dispatch_workspace_bytes(int64_t n, int E_loc) {
  return hist_bytes(n, E_loc) + (size_t(E_loc) * sizeof(int32_t) + 255) / 256 * 256;
}

cudaError_t launch_dispatch(const DispatchParams& p, cudaStream_t stream) {
  const int nt = num_tiles(p.n);
  const int algo = dispatch_algo();
  int32_t* hist = static_cast<int32_t*>(p.workspace);
  int32_t* totals = reinterpret_cast<int32_t*>(static_cast<char*>(p.workspace) + hist_bytes(p.n, p.E_loc));
  if (algo == 1 && p.n > 0 && p.n <= kSmallSlots && p.E_loc > 0 && p.E_loc <= kSmallMaxLocal)
    return launch_pdl(dispatch_small_kernel, dim3(1), dim3(kSmallSlots), small_smem_bytes(p.E_loc),
                      stream, p);
  if (algo == 1 && p.n > 0 && p.n <= kExpertMaxSlots && p.E_loc > 0 && p.E_loc <= kExpertMaxLocal)
    return launch_pdl(dispatch_by_expert_kernel, dim3(p.E_loc), dim3(kExpertThreads),
                      size_t(p.E_loc) * sizeof(int32_t), stream, p);
  const int blocks = ceil_div(nt, kWarpsPerBlock);
  if (algo != 0 && prefix_applies(nt, p.E_loc)) {
    const int cols = prefix_cols(p.E_loc);
    cudaError_t err = launch_pdl(dispatch_histogram_kernel, dim3(blocks), dim3(32 * kWarpsPerBlock),
                                 size_t(kWarpsPerBlock) * cols * sizeof(int32_t), stream, p, nt, hist,
                                 HistLayout{1, cols, cols});
    if (err == cudaSuccess)
      err = launch_pdl(dispatch_prefix_scatter_kernel, dim3(ceil_div(nt, kPrefixWarps)),
                       dim3(kPrefixThreads), prefix_smem_bytes(cols), stream, p, nt, cols,
                       static_cast<const int32_t*>(hist));
    return err;
  }
  if (nt > 0 && nt <= kFusedTiles && hist_smem_bytes(nt, p.E_loc) <= kFusedSmem) {
    return launch_pdl(dispatch_fused_kernel, dim3(1), dim3(32 * kFusedMaxTiles),
                      hist_smem_bytes(nt, p.E_loc), stream, p, nt);
  }
  const bool smem = p.E_loc <= kSmemExperts;
  if (!smem && nt > 0) {
    const cudaError_t err =
        cudaMemsetAsync(hist, 0, size_t(nt) * size_t(p.E_loc) * sizeof(int32_t), stream);
    if (err != cudaSuccess) return err;
  }
  const size_t smem_bytes = smem ? size_t(kWarpsPerBlock) * p.E_loc * sizeof(int32_t) : 0;
  cudaError_t err = cudaSuccess;
  if (nt > 0)
    err = launch_pdl(dispatch_histogram_kernel, dim3(blocks), dim3(32 * kWarpsPerBlock), smem_bytes,
                     stream, p, nt, hist, HistLayout{nt, 1, p.E_loc});
  if (err == cudaSuccess)
    err = launch_pdl(dispatch_scan_kernel, dim3(1), dim3(1024), 0, stream, p, nt, hist, totals);
  if (err == cudaSuccess && nt > 0)
    err = launch_pdl(dispatch_scatter_kernel, dim3(blocks), dim3(32 * kWarpsPerBlock), smem_bytes,
                     stream, p, nt, hist);
  return err;
}

}  // namespace moe::kernels
