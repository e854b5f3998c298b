#include "dispatch.cuh"

#include "common.cuh"

namespace moe::kernels {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kChunks = kDispatchTile / 32;

int num_tiles(int64_t n) { return ceil_div(n, kDispatchTile); }

__device__ __forceinline__ int32_t to_local(const int32_t* mapping, int E, int E_loc, int32_t id) {
  // Never index with an id outside [0, E): -1 and bad ids both mean "not here".
  if (id < 0 || id >= E) return -1;
  int32_t l = mapping[id];
  return (l >= 0 && l < E_loc) ? l : -1;
}

// hist[e * nt + b] = slots of tile b that go to local expert e; also writes local_ids.
__global__ void dispatch_histogram_kernel(DispatchParams p, int nt, int32_t* hist) {
  int lane = threadIdx.x & 31;
  int b = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (b >= nt) return;
  for (int c = 0; c < kChunks; ++c) {
    int64_t s = int64_t(b) * kDispatchTile + c * 32 + lane;
    int32_t local = -1;
    if (s < p.n) {
      local = to_local(p.mapping, p.E, p.E_loc, p.topk_ids[s]);
      p.local_ids[s] = local;
    }
    unsigned same = __match_any_sync(kFullMask, local);
    if (local >= 0 && lane == __ffs(same) - 1) hist[int64_t(local) * nt + b] += __popc(same);
    __syncwarp();  // orders this chunk's updates before the next chunk's reads
  }
}

// First sorted position of local expert e (e == E_loc: the total).
__device__ __forceinline__ int32_t expert_base(const int32_t* hist, int nt, int E_loc, int e,
                                               int32_t total) {
  if (e == E_loc) return total;
  return nt == 0 ? 0 : hist[int64_t(e) * nt];
}

// In-place exclusive scan of the expert-major histogram: hist[e * nt + b]
// becomes the first sorted position of tile b's slots of expert e.
__global__ void __launch_bounds__(1024) dispatch_scan_kernel(DispatchParams p, int nt, int32_t* hist) {
  __shared__ int32_t warp_totals[32];
  const int64_t L = int64_t(p.E_loc) * nt;
  const int64_t per = (L + blockDim.x - 1) / blockDim.x;
  const int64_t begin = min(L, per * threadIdx.x), end = min(L, begin + per);
  int32_t sum = 0;
  for (int64_t i = begin; i < end; ++i) sum += hist[i];
  // Block exclusive scan of the per-thread sums.
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int32_t incl = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    int32_t v = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) warp_totals[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int32_t t = lane < int(blockDim.x >> 5) ? warp_totals[lane] : 0;
    int32_t ti = t;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      int32_t v = __shfl_up_sync(kFullMask, ti, o);
      if (lane >= o) ti += v;
    }
    warp_totals[lane] = ti - t;  // exclusive
  }
  __syncthreads();
  int32_t run = warp_totals[warp] + incl - sum;
  for (int64_t i = begin; i < end; ++i) {
    int32_t c = hist[i];
    hist[i] = run;
    run += c;
  }
  __shared__ int32_t total_sh;
  if (threadIdx.x == blockDim.x - 1) total_sh = warp_totals[warp] + incl;
  __syncthreads();  // also makes the block's global writes visible to it
  for (int e = threadIdx.x; e <= p.E_loc; e += blockDim.x) {
    const int32_t off = expert_base(hist, nt, p.E_loc, e, total_sh);
    p.offsets[e] = off;
    if (e < p.E_loc) p.counts[e] = expert_base(hist, nt, p.E_loc, e + 1, total_sh) - off;
  }
}

// Stable scatter: each warp walks its tile in slot order, so slots of one
// expert land in (t, j) order. Positions past the total get -1.
__global__ void dispatch_scatter_kernel(DispatchParams p, int nt, int32_t* hist) {
  int lane = threadIdx.x & 31;
  int b = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (b >= nt) return;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int c = 0; c < kChunks; ++c) {
    int64_t s = int64_t(b) * kDispatchTile + c * 32 + lane;
    int32_t local = s < p.n ? p.local_ids[s] : -1;
    unsigned same = __match_any_sync(kFullMask, local);
    int leader = __ffs(same) - 1;
    int32_t base = 0;
    if (local >= 0 && lane == leader) base = hist[int64_t(local) * nt + b];
    base = __shfl_sync(kFullMask, base, leader);
    if (local >= 0) p.sorted_slots[base + __popc(same & lanes_below)] = int32_t(s);
    __syncwarp();
    if (local >= 0 && lane == leader) hist[int64_t(local) * nt + b] = base + __popc(same);
    __syncwarp();
  }
  const int32_t total = p.offsets[p.E_loc];
  for (int c = 0; c < kChunks; ++c) {
    int64_t pos = int64_t(b) * kDispatchTile + c * 32 + lane;
    if (pos < p.n && pos >= total) p.sorted_slots[pos] = -1;
  }
}

}  // namespace

size_t dispatch_workspace_bytes(int64_t n, int E_loc) {
  size_t bytes = size_t(num_tiles(n)) * size_t(E_loc) * sizeof(int32_t);
  return (bytes + 255) / 256 * 256;
}

cudaError_t launch_dispatch(const DispatchParams& p, cudaStream_t stream) {
  const int nt = num_tiles(p.n);
  int32_t* hist = static_cast<int32_t*>(p.workspace);
  const size_t hist_bytes = size_t(nt) * size_t(p.E_loc) * sizeof(int32_t);
  if (hist_bytes > 0) {
    cudaError_t err = cudaMemsetAsync(hist, 0, hist_bytes, stream);
    if (err != cudaSuccess) return err;
  }
  const int blocks = ceil_div(nt, kWarpsPerBlock);
  if (nt > 0) dispatch_histogram_kernel<<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(p, nt, hist);
  dispatch_scan_kernel<<<1, 1024, 0, stream>>>(p, nt, hist);
  if (nt > 0) dispatch_scatter_kernel<<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(p, nt, hist);
  return launch_status();
}

}  // namespace moe::kernels
