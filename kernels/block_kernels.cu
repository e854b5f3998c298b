#include "block_kernels.cuh"

#include <algorithm>

#include "common.cuh"
#include "moe/moe.h"

namespace moe::kernels {
namespace {

constexpr int kThreads = 256;

int grid_for(int64_t work) {
  return int(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, 8192)));
}

// The CPU backend's activations, shared with the routed runners.
using gemm::activate;

__global__ void to_f32_kernel(const void* src, DType dtype, int64_t n, float* dst) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = load_as_f32(src, i, dtype);
}

template <class T>
__global__ void shared_act_kernel(SharedActParams p) {
  const int64_t per_token = int64_t(p.n) * p.I;
  const int64_t total = p.T * per_token;
  const int rows = p.gated ? 2 * p.I : p.I;
  const int gate_off = p.gated && p.swap_gate_up ? p.I : 0;
  const int up_off = p.gated && !p.swap_gate_up ? p.I : 0;
  T* h = static_cast<T*>(p.h);
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = idx / per_token;
    const int r = int(idx - t * per_token);
    const int e = r / p.I, i = r - e * p.I;
    const float* g = p.g + (t * p.n + e) * rows;
    float v = activate(p.activation, g[gate_off + i]);
    if (p.gated) v *= g[up_off + i];
    h[idx] = from_f32<T>(v);
  }
}

// Sum of v over the block (kThreads threads), in a fixed order; every thread
// gets the result.
__device__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < kThreads / 32 ? smem[lane] : 0.0f;
    w = warp_sum(w);
    if (lane == 0) smem[kThreads / 32] = w;
  }
  __syncthreads();
  const float total = smem[kThreads / 32];
  __syncthreads();  // smem is reused by the next token
  return total;
}

template <class T>
__global__ void __launch_bounds__(kThreads) shared_combine_kernel(SharedCombineParams p) {
  __shared__ float smem[kThreads / 32 + 1];
  int64_t valid = p.T;
  if (p.num_valid) valid = min(max(int64_t(*p.num_valid), int64_t(0)), p.T);
  T* y = static_cast<T*>(p.y);
  const T* x = static_cast<const T*>(p.x);
  for (int64_t t = blockIdx.x; t < p.T; t += gridDim.x) {
    T* yr = y + t * p.H;
    if (t >= valid) {
      for (int c = threadIdx.x; c < p.H; c += kThreads) yr[c] = from_f32<T>(0.0f);
      continue;
    }
    float scale = 1.0f;
    if (p.gate) {
      float part = 0.0f;
      for (int c = threadIdx.x; c < p.H; c += kThreads)
        part += to_f32(x[t * p.H + c]) * load_as_f32(p.gate, c, p.gate_dtype);
      scale = 1.0f / (1.0f + expf(-block_sum(part, smem)));
    }
    const float* sr = p.s + t * p.H;
    for (int c = threadIdx.x; c < p.H; c += kThreads) {
      const float routed = p.accumulate ? to_f32(yr[c]) : 0.0f;
      yr[c] = from_f32<T>(routed + scale * sr[c]);
    }
  }
}

}  // namespace

cudaError_t launch_to_f32(const void* src, DType dtype, int64_t n, float* dst,
                          cudaStream_t stream) {
  if (n > 0) to_f32_kernel<<<grid_for(n), kThreads, 0, stream>>>(src, dtype, n, dst);
  return launch_status();
}

cudaError_t launch_shared_act(const SharedActParams& p, cudaStream_t stream) {
  const int64_t total = p.T * int64_t(p.n) * p.I;
  if (total <= 0) return launch_status();
  const int grid = grid_for(total);
  switch (p.h_dtype) {
    case DType::bf16: shared_act_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p); break;
    case DType::f16: shared_act_kernel<__half><<<grid, kThreads, 0, stream>>>(p); break;
    default: shared_act_kernel<float><<<grid, kThreads, 0, stream>>>(p); break;
  }
  return launch_status();
}

cudaError_t launch_shared_combine(const SharedCombineParams& p, cudaStream_t stream) {
  if (p.T <= 0) return launch_status();
  const int grid = int(std::min<int64_t>(p.T, 65536));
  switch (p.dtype) {
    case DType::bf16: shared_combine_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p); break;
    case DType::f16: shared_combine_kernel<__half><<<grid, kThreads, 0, stream>>>(p); break;
    default: shared_combine_kernel<float><<<grid, kThreads, 0, stream>>>(p); break;
  }
  return launch_status();
}

}  // namespace moe::kernels
