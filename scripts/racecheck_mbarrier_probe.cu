// Does compute-sanitizer racecheck model mbarrier arrive/wait as ordering
// between warps? Warp 0 writes shared memory with plain stores (or cp.async
// + wait_group), lane 0 arrives on an mbarrier (release); warp 1 waits on it
// (acquire) and reads. Correct by the PTX memory model; a hazard report here
// is racecheck's, not the program's. Mode 2 uses __syncthreads (control).
//   nvcc -std=c++17 -arch=sm_90a -Ikernels -o probe scripts/racecheck_mbarrier_probe.cu
//   compute-sanitizer --tool racecheck ./probe 0|1|2
#include <cstdio>
#include <cstdlib>

#include "wgmma.cuh"

namespace wg = moe::kernels::wgmma;

__global__ void probe(const int* src, int* out, int mode) {
  __shared__ __align__(16) int buf[32 * 4];
  __shared__ __align__(8) uint64_t bar;
  const uint32_t b = uint32_t(__cvta_generic_to_shared(&bar));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) {
    wg::mbar_init(b, 1);
    wg::mbar_init_fence();
  }
  __syncthreads();
  if (warp == 0) {
    if (mode == 1) {
      const unsigned dst = unsigned(__cvta_generic_to_shared(&buf[lane * 4]));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src + lane * 4));
      asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
    } else {
      for (int i = 0; i < 4; ++i) buf[lane * 4 + i] = src[lane * 4 + i];
    }
    __syncwarp();
    if (mode != 2 && lane == 0) wg::mbar_arrive(b);
  }
  if (mode == 2) __syncthreads();
  if (warp == 1) {
    if (mode != 2) wg::mbar_wait(b, 0);
    out[lane] = buf[lane * 4] + buf[lane * 4 + 3];
  }
}

int main(int argc, char** argv) {
  const int mode = argc > 1 ? std::atoi(argv[1]) : 0;
  int *src, *out;
  cudaMalloc(&src, 128 * sizeof(int));
  cudaMalloc(&out, 32 * sizeof(int));
  cudaMemset(src, 1, 128 * sizeof(int));
  probe<<<1, 64>>>(src, out, mode);
  const cudaError_t e = cudaDeviceSynchronize();
  int h[32];
  cudaMemcpy(h, out, sizeof(h), cudaMemcpyDeviceToHost);
  std::printf("mode %d: %s, out[0] = %d\n", mode, cudaGetErrorString(e), h[0]);
  return e == cudaSuccess ? 0 : 1;
}
