#include "a2a.cuh"

#include <cub/block/block_scan.cuh>

#include "common.cuh"

namespace moe::kernels {
namespace {

constexpr int kPlanThreads = 512;
constexpr int kCopyWarps = 8;
constexpr int kCombineThreads = 256;

__device__ __forceinline__ const int32_t* meta_ids(const char* meta) {
  return reinterpret_cast<const int32_t*>(meta + kA2aMetaHeader);
}

// Rank holding a global id, or -1 for -1 and for ids outside [0, E) (never used as an index).
__device__ __forceinline__ int owner_of(const A2aPackParams& p, int32_t id) {
  return (id >= 0 && id < p.E) ? p.expert_rank[id] : -1;
}

// One block per destination d: a block-wide scan over the tokens gives each
// token that has a slot on d its row in d's slab, in ascending token order.
__global__ void __launch_bounds__(kPlanThreads) a2a_plan_kernel(A2aPackParams p) {
  using Scan = cub::BlockScan<int, kPlanThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int base;
  const int d = blockIdx.x;
  const int K = p.K;
  char* meta = p.send_meta + size_t(d) * p.meta_bytes;
  int32_t* ids_out = reinterpret_cast<int32_t*>(meta + kA2aMetaHeader);
  float* w_out = reinterpret_cast<float*>(ids_out + int64_t(p.M) * K);
  int32_t* pos = p.pos_map + int64_t(d) * p.M;
  int32_t* src = p.src_token + int64_t(d) * p.M;
  if (threadIdx.x == 0) base = 0;
  __syncthreads();
  for (int64_t t0 = 0; t0 < p.T; t0 += kPlanThreads) {
    const int64_t t = t0 + threadIdx.x;
    int flag = 0;
    if (t < p.T)
      for (int j = 0; j < K; ++j) flag |= owner_of(p, p.topk_ids[t * K + j]) == d;
    int prefix = 0, total = 0;
    Scan(scan_tmp).ExclusiveSum(flag, prefix, total);
    const int row = base + prefix;
    if (t < p.T) pos[t] = flag ? row : -1;
    if (flag) {
      src[row] = int32_t(t);
      for (int j = 0; j < K; ++j) {
        const int32_t g = p.topk_ids[t * K + j];
        const bool here = owner_of(p, g) == d;
        ids_out[int64_t(row) * K + j] = here ? p.expert_local[g] : -1;
        w_out[int64_t(row) * K + j] = here ? p.topk_weights[t * K + j] : 0.0f;
      }
    }
    __syncthreads();  // every thread has read `base` and the scan storage is free again
    if (threadIdx.x == 0) base += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) reinterpret_cast<int32_t*>(meta)[0] = base;
}

// One warp per slab row; rows at or past the destination's count are skipped.
template <class V>
__global__ void __launch_bounds__(kCopyWarps * 32) a2a_copy_rows_kernel(A2aPackParams p) {
  const int d = blockIdx.y;
  const int row = blockIdx.x * kCopyWarps + int(threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  const int count = reinterpret_cast<const int32_t*>(p.send_meta + size_t(d) * p.meta_bytes)[0];
  if (row >= count) return;
  const int64_t t = p.src_token[int64_t(d) * p.M + row];
  const V* from = reinterpret_cast<const V*>(static_cast<const char*>(p.hidden) + t * p.row_bytes);
  char* slab = d == p.rank ? p.self_hidden
                           : p.send_hidden + size_t(a2a_peer_slot(d, p.rank)) * p.M * p.row_bytes;
  V* to = reinterpret_cast<V*>(slab + size_t(row) * p.row_bytes);
  const int64_t n = int64_t(p.row_bytes / sizeof(V));
  for (int64_t i = lane; i < n; i += 32) to[i] = from[i];
}

// One thread per (receive row, slot).
__global__ void a2a_sanitize_kernel(A2aSanitizeParams p) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_rank = int64_t(p.M) * p.K;
  if (idx >= per_rank * p.ep_size) return;
  const int s = int(idx / per_rank);
  const int64_t within = idx - s * per_rank;  // i * K + j of source s's slab
  const char* meta = s == p.rank ? p.send_meta + size_t(p.rank) * p.meta_bytes
                                 : p.recv_meta + size_t(s) * p.meta_bytes;
  // The count comes from another rank: clamp it, never trust it as a bound.
  const int count = min(max(reinterpret_cast<const int32_t*>(meta)[0], 0), p.M);
  if (within == 0) p.counts[s] = count;
  int32_t id = -1;
  float w = 0.0f;
  if (within < int64_t(count) * p.K) {
    const int32_t got = meta_ids(meta)[within];
    if (got >= 0 && got < p.E_loc) {
      id = got;
      w = reinterpret_cast<const float*>(meta_ids(meta) + per_rank)[within];
    }
  }
  p.local_ids[idx] = id;
  p.weights[idx] = w;
}

// V adjacent elements moved as one aligned access.
template <class T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// One block per token: the rows that the ranks returned for it, summed in
// ascending rank order (the pointer list keeps that order).
template <class T, int V>
__global__ void __launch_bounds__(kCombineThreads) a2a_combine_kernel(A2aCombineParams p) {
  __shared__ const T* rows[kA2aMaxRanks];
  __shared__ int n_rows;
  const int64_t t = blockIdx.x;
  const int64_t H = p.H;
  if (threadIdx.x == 0) {
    int n = 0;
    for (int d = 0; d < p.ep_size; ++d) {
      const int32_t r = p.pos_map[int64_t(d) * p.M + t];
      if (r < 0) continue;
      rows[n++] = d == p.rank
                      ? static_cast<const T*>(p.expert_output) + (int64_t(p.rank) * p.M + r) * H
                      : reinterpret_cast<const T*>(p.back_hidden) +
                            (int64_t(a2a_peer_slot(d, p.rank)) * p.M + r) * H;
    }
    n_rows = n;
  }
  __syncthreads();
  T* out = static_cast<T*>(p.output) + t * H;
  for (int64_t c = int64_t(threadIdx.x) * V; c < H; c += int64_t(blockDim.x) * V) {
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.0f;
    for (int s = 0; s < n_rows; ++s) {
      const Vec<T, V> x = *reinterpret_cast<const Vec<T, V>*>(rows[s] + c);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += to_f32(x.v[i]);
    }
    Vec<T, V> y;
#pragma unroll
    for (int i = 0; i < V; ++i) y.v[i] = from_f32<T>(acc[i]);
    *reinterpret_cast<Vec<T, V>*>(out + c) = y;
  }
}

bool aligned(const void* ptr, size_t a) { return reinterpret_cast<uintptr_t>(ptr) % a == 0; }

template <class T>
void launch_combine_typed(const A2aCombineParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const size_t row = size_t(p.H) * sizeof(T);
  const bool wide = row % 16 == 0 && aligned(p.expert_output, 16) &&
                    aligned(p.back_hidden, 16) && aligned(p.output, 16);
  const dim3 grid(unsigned(p.T));
  if (wide)
    a2a_combine_kernel<T, V><<<grid, kCombineThreads, 0, stream>>>(p);
  else
    a2a_combine_kernel<T, 1><<<grid, kCombineThreads, 0, stream>>>(p);
}

}  // namespace

cudaError_t launch_a2a_pack(const A2aPackParams& p, cudaStream_t stream) {
  a2a_plan_kernel<<<p.ep_size, kPlanThreads, 0, stream>>>(p);
  const dim3 grid(unsigned(ceil_div(p.M, kCopyWarps)), unsigned(p.ep_size));
  const dim3 block(kCopyWarps * 32);
  const bool all16 = aligned(p.hidden, 16) && aligned(p.self_hidden, 16) &&
                     aligned(p.send_hidden, 16);
  if (p.row_bytes % 16 == 0 && all16)
    a2a_copy_rows_kernel<uint4><<<grid, block, 0, stream>>>(p);
  else if (p.row_bytes % 4 == 0 && aligned(p.hidden, 4) && aligned(p.self_hidden, 4))
    a2a_copy_rows_kernel<uint32_t><<<grid, block, 0, stream>>>(p);
  else
    a2a_copy_rows_kernel<uint16_t><<<grid, block, 0, stream>>>(p);
  return launch_status();
}

cudaError_t launch_a2a_sanitize(const A2aSanitizeParams& p, cudaStream_t stream) {
  const int64_t n = int64_t(p.ep_size) * p.M * p.K;
  if (n > 0) a2a_sanitize_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(p);
  return launch_status();
}

cudaError_t launch_a2a_combine(const A2aCombineParams& p, cudaStream_t stream) {
  if (p.T == 0) return launch_status();
  switch (p.dtype) {
    case DType::bf16: launch_combine_typed<__nv_bfloat16>(p, stream); break;
    case DType::f16: launch_combine_typed<__half>(p, stream); break;
    default: launch_combine_typed<float>(p, stream); break;
  }
  return launch_status();
}

}  // namespace moe::kernels
