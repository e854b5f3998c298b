#include "linear.cuh"

#include "common.cuh"

namespace moe::kernels {
namespace {

constexpr int BT = 64, BR = 64, BK = 16, THREADS = 256;

template <class TX, class TW>
__global__ void __launch_bounds__(THREADS)
    linear_f32_kernel(const TX* X, int64_t T, int K, const TW* W, int N, float* Y) {
  __shared__ float Xs[BK][BT + 1];
  __shared__ float Ws[BK][BR + 1];
  const int64_t t0 = int64_t(blockIdx.x) * BT;
  const int r0 = blockIdx.y * BR;
  const int tid = threadIdx.x;
  const int ty = tid / 16, tx = tid % 16;  // outputs (t0 + ty + 16 i, r0 + tx + 16 j)
  float acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += BK) {
    // 64 x 16 tiles, 4 elements per thread each; k fastest for coalescing.
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int idx = tid + q * THREADS;
      const int row = idx / BK, kk = idx % BK;
      const int k = k0 + kk;
      const int64_t t = t0 + row;
      const int r = r0 + row;
      Xs[kk][row] = (t < T && k < K) ? to_f32(X[t * K + k]) : 0.0f;
      Ws[kk][row] = (r < N && k < K) ? to_f32(W[int64_t(r) * K + k]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = Xs[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Ws[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t t = t0 + ty + 16 * i;
    if (t >= T) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = r0 + tx + 16 * j;
      if (r < N) Y[t * N + r] = acc[i][j];
    }
  }
}

template <class TX, class TW>
void launch_typed(const void* X, int64_t T, int K, const void* W, int N, float* Y,
                  cudaStream_t stream) {
  const dim3 grid(unsigned(ceil_div(T, BT)), unsigned(ceil_div(N, BR)));
  linear_f32_kernel<TX, TW><<<grid, THREADS, 0, stream>>>(static_cast<const TX*>(X), T, K,
                                                          static_cast<const TW*>(W), N, Y);
}

template <class TX>
void launch_w(DType w_dtype, const void* X, int64_t T, int K, const void* W, int N, float* Y,
              cudaStream_t stream) {
  switch (w_dtype) {
    case DType::bf16: return launch_typed<TX, __nv_bfloat16>(X, T, K, W, N, Y, stream);
    case DType::f16: return launch_typed<TX, __half>(X, T, K, W, N, Y, stream);
    default: return launch_typed<TX, float>(X, T, K, W, N, Y, stream);
  }
}

}  // namespace

cudaError_t launch_linear_f32(DType x_dtype, const void* X, int64_t T, int K, DType w_dtype,
                              const void* W, int N, float* Y, cudaStream_t stream) {
  if (T == 0 || N == 0) return cudaSuccess;
  switch (x_dtype) {
    case DType::bf16: launch_w<__nv_bfloat16>(w_dtype, X, T, K, W, N, Y, stream); break;
    case DType::f16: launch_w<__half>(w_dtype, X, T, K, W, N, Y, stream); break;
    default: launch_w<float>(w_dtype, X, T, K, W, N, Y, stream); break;
  }
  return launch_status();
}

}  // namespace moe::kernels
