// FP8 (E4M3) fused MoE runner on the device, the same routing metadata and
// graph-capturable contract as the bf16/f16 runner (moe_runner.cuh): every
// size the kernels read on the device stays there, grids are sized from the
// host-known T * K and blocks without work exit.
//
//   1. quantize the token rows: E4M3 codes [T, H] and f32 scales per token
//      (per 128 columns for BLOCK_128), dynamic (amax / 448) or static;
//   2. GEMM1 on FP8 tensor cores (mma.sync m16n8k32 e4m3 on 16-, 32- or
//      64-row tiles, or on sm_90a wgmma m64n128k32 e4m3 on 128-row tiles;
//      f32 accumulation promoted to an f32 total every 128 columns of K with
//      its scales), the gather through sorted_slots fused into the A loads
//      (or a sorted copy of the token codes for the TMA variant), activation
//      in the epilogue, h in f32 at each sorted position;
//   3. quantize h the same way (rows past offsets[E_loc] skipped on the device);
//   4. GEMM2 the same way into per-slot rows of the activation dtype;
//   5. the bf16 runner's deterministic reduction (launch_moe_reduce).
// docs/fp8.md has the math and the rounding rules (those of src/cpu/runner.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "plan.h"

namespace moe::kernels {

struct Fp8RunParams {
  DType dtype;                 // hidden and output: f32, f16 or bf16
  int E_loc, H, I;
  int activation;              // moe_activation_t
  bool gated, swap_gate_up, weight_on_input;
  bool block128;               // MOE_QUANT_FP8_BLOCK_128, else per-tensor
  const void* x;               // [T, H]
  int64_t T;
  int K;
  const int32_t* local_ids;    // [T, K]
  const float* weights;        // [T, K]
  const int32_t* offsets;      // [E_loc + 1]
  const int32_t* sorted_slots; // [T * K]
  const uint8_t* w13;          // E4M3 [E_loc, (gated ? 2 : 1) * I, H]
  const uint8_t* w2;           // E4M3 [E_loc, H, I]
  const float* w13_scale;      // [E_loc] or [E_loc, rows13 / 128, H / 128]
  const float* w2_scale;       // [E_loc] or [E_loc, H / 128, I / 128]
  const float* a13_scale;      // [1] static activation scales, or null (dynamic)
  const float* a2_scale;
  void* y;                     // [T, H]
  float output_scale;
  void* workspace;             // >= fp8_run_workspace_bytes(...), 256-aligned
};

// Sizes the kernels handle: multiples of 128 for BLOCK_128, of 16 otherwise.
bool fp8_run_supported(bool block128, int H, int I);

size_t fp8_run_workspace_bytes(bool block128, int E_loc, int H, int I, int64_t T, int K);

// Quantization, GEMM1, quantization of h, GEMM2 and the reduction.
cudaError_t launch_fp8_run(const Fp8RunParams& p, cudaStream_t stream);

}  // namespace moe::kernels
