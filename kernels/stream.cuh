// The streaming decode GEMMs' shared pieces (sm_90a): gemm_stream_kernel
// (kernels/moe_runner.cu, bf16 / f16) and fp8_stream_kernel
// (kernels/moe_runner_fp8.cu, E4M3). Both stream 16- and 32-row tiles
// through persistent blocks whose producer warp copies each 128-byte-deep K
// step's weight tile by TMA and the tile's A rows by cp.async into a deep
// ring of mbarrier-guarded buffers; one consumer warp per 8 columns of every
// weight set. See gemm_stream_kernel for the design and its measurements.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.cuh"
#include "wgmma.cuh"

namespace moe::kernels::gemm {

constexpr size_t kStreamSmemBytes = 216 * 1024;  // dynamic shared memory of the blocks of one SM

// BM rows x BN columns per weight set (NSETS), BLOCKS blocks per SM, and as
// many buffers of one 128-byte K step (the B tile of every set, 128B-swizzled
// by TMA; then the A rows, padded for conflict-free ldmatrix) as the SM's
// shared memory holds.
template <int BM_, int BN_, int NSETS_, int BLOCKS_>
struct StreamCfg {
  static constexpr int BM = BM_, BN = BN_, NSETS = NSETS_, BLOCKS = BLOCKS_;  // BLOCKS: per SM
  static constexpr int CONSUMERS = BN / 8;  // warps, 8 columns of every set each
  static constexpr int THREADS = 32 * (1 + CONSUMERS);
  static constexpr int A_LD = 144;  // bytes per A row: 128 + 16, conflict-free ldmatrix
  static constexpr uint32_t B_BYTES = uint32_t(NSETS) * BN * wgmma::kRowBytes;
  static constexpr uint32_t A_BYTES = uint32_t(BM) * A_LD;
  static constexpr int STAGES =
      int((kStreamSmemBytes / BLOCKS - wgmma::kSwizzleBytes) / (B_BYTES + A_BYTES));
  static constexpr size_t SMEM_BYTES = wgmma::kSwizzleBytes + size_t(STAGES) * (B_BYTES + A_BYTES);
  static_assert(BM % 16 == 0 && BM <= 32, "one producer lane per A row");
  static_assert(BN % 8 == 0 && B_BYTES % wgmma::kSwizzleBytes == 0, "whole swizzle periods per set");
};

// What the producer tells the consumers about the item whose first k step
// sits in a buffer (written before that step's full barrier is armed, read
// after it completes; rows == 0: no more items).
template <int BM>
struct StreamItem {
  int64_t row_begin;
  int rows, n0, e;
  int32_t slot[BM];  // slot of each valid row, -1 for none
};

// A streaming kernel's ring: STAGES buffers (B tiles first, 1024-aligned for
// the 128B swizzle, then the A rows) and their full/empty mbarriers. Full
// completes on the producer lane 0's arrival with the weight copies' bytes
// plus one arrival per producer lane once its cp.async of the A rows landed;
// empty on one arrival per consumer warp.
template <class Cfg>
struct StreamRing {
  static constexpr int STAGES = Cfg::STAGES;
  wgmma::Pipeline<STAGES> pipe;
  uint32_t b_base, a_base;     // shared addresses of buffer 0's B tile and A rows
  unsigned char* smem;         // generic address of b_base

  __device__ __forceinline__ StreamRing(unsigned char* raw_smem, uint64_t* bars) : pipe(bars) {
    const uint32_t raw = uint32_t(__cvta_generic_to_shared(raw_smem));
    b_base = (raw + wgmma::kSwizzleBytes - 1) & ~uint32_t(wgmma::kSwizzleBytes - 1);
    a_base = b_base + uint32_t(STAGES) * Cfg::B_BYTES;
    smem = raw_smem + (b_base - raw);
  }
  // By thread 0, before a barrier across the block.
  __device__ __forceinline__ void init() const {
    for (int s = 0; s < STAGES; ++s) {
      wgmma::mbar_init(pipe.full0 + 8 * s, 1 + 32);
      wgmma::mbar_init(pipe.empty0 + 8 * s, Cfg::CONSUMERS);
    }
    wgmma::mbar_init_fence();
  }
  __device__ __forceinline__ unsigned char* a_rows(int st) const {
    return smem + (a_base - b_base) + size_t(st) * Cfg::A_BYTES;
  }
  __device__ __forceinline__ const unsigned char* b_tile(int st) const { return smem + size_t(st) * Cfg::B_BYTES; }
  // Producer: the buffer of pipeline step `step`, once the consumers released its previous use.
  __device__ __forceinline__ int acquire(int step) const {
    const int st = step % STAGES;
    if (step >= STAGES) wgmma::mbar_wait(pipe.empty0 + 8 * st, uint32_t((step / STAGES - 1) & 1));
    return st;
  }
  // Consumer warp (every lane), after its last read of step `step`'s buffer:
  // hands it back. The weight tile came by TMA (async proxy) and was read by
  // ldmatrix (generic proxy), and the producer's next bulk copy into the
  // buffer is an async-proxy write: without a proxy fence between the reads
  // and the arrival, that copy may land before the reads (PTX memory model;
  // the same fix: DeepEP #642, Triton #7262). Seen as replays of one layer
  // that differed in single weight columns of a tile (bench/replay_check.py,
  // the DeepSeek slice at T=256 on 32-row tiles, 1 in 40 to 8 in 100 replays; the
  // ring of 8 stages the 32-row gated GEMM1 has: docs/perf-notes.md v25).
  __device__ __forceinline__ void release(int step) const {
    wgmma::fence_proxy_async();
    __syncwarp();
    if ((threadIdx.x & 31) == 0) pipe.release(step);
  }
  // Producer warp, after its last step g - 1: the end marker (rows == 0) in step g's buffer.
  __device__ __forceinline__ void finish(int g, StreamItem<Cfg::BM>* desc) const {
    const int lane = threadIdx.x & 31;
    const int st = acquire(g);
    if (lane == 0) desc[st].rows = 0;
    __syncwarp();
    if (lane == 0) wgmma::mbar_arrive(pipe.full0 + 8 * st);
    wgmma::cp_async_arrive_noinc(pipe.full0 + 8 * st);
  }
};

}  // namespace moe::kernels::gemm
