// Fused MoE runner on the device: a tile map over the dispatcher's offsets,
// grouped GEMM1 (gather of token rows through sorted_slots fused into the
// A loads, activation in the epilogue, h in the workspace), grouped GEMM2
// (per-slot outputs), and a deterministic per-token reduction. Every
// size the kernels read on the device (counts, offsets) stays there: the
// grids are sized from the host-known T * K, and blocks with no work exit,
// so a run can be captured in a CUDA graph.
//
// bf16/f16 use tensor cores (mma.sync m16n8k16, f32 accumulation); f32 uses
// a SIMT path with f32 FMA (exact f32 products, for the 1e-5 contract).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "plan.h"

namespace moe::kernels {

struct MoeRunParams {
  DType dtype;  // hidden, output and weights
  int E_loc, H, I;
  int activation;  // moe_activation_t
  bool gated, swap_gate_up, weight_on_input, validate_ids;
  const void* x;              // [T, H]
  int64_t T;
  int K;
  const int32_t* local_ids;   // [T, K]
  const float* weights;       // [T, K], or nullptr for weight 1 everywhere
  const int32_t* offsets;     // [E_loc + 1]
  const int32_t* sorted_slots;  // [T * K]
  const void* w13;            // [E_loc, (gated ? 2 : 1) * I, H]
  const void* w2;             // [E_loc, H, I]
  void* y;                    // [T, H]
  float output_scale;
  void* workspace;            // >= moe_run_workspace_bytes(...)
};

// Whether the kernels handle these sizes (rows of 16 bytes: H and I
// multiples of 8).
bool moe_run_supported(int H, int I);

// Which kernels the 128-row tiles of both runners use: 0 mma.sync, 1 wgmma
// (cp.async staging), 2 wgmma (TMA, warp-specialised), 3 (bf16: GEMM1 as 1,
// GEMM2 as 2). MOE_RUNNER_WGMMA chooses; `unset` when it is not set. See
// moe_runner.cu for when each applies.
int wgmma_mode(int unset = 1);

// Whether a 16- or 32-row decode GEMM of an expert matrix of matrix_elems
// elements takes the streaming kernels (both runners: gemm_stream_kernel,
// fp8_stream_kernel): an sm_90a build on a compute capability 9.0 device,
// matrices over 4M elements (the small ones keep the tile kernels; see
// launch_stream_stage in moe_runner.cu), MOE_RUNNER_STREAM=0 never,
// MOE_RUNNER_STREAM=1 for every size. Results are bitwise the same either way.
bool stream_kernels_for(int64_t matrix_elems);

// Stages of the 16-row decode tiles for a GEMM whose expert matrix has
// matrix_elems elements: small_stages for small matrices (<= 4M elements),
// large_stages otherwise (each runner picks them from its batch: see the
// callers); MOE_RUNNER_DECODE_STAGES=12|6|4 forces one (both runners),
// "S1,S2" one per GEMM (second: GEMM2; read at each launch).
int decode_stages(int64_t matrix_elems, int large_stages = 12, int small_stages = 4, bool second = false);

size_t moe_run_workspace_bytes(DType dtype, int E_loc, int H, int I, int64_t n_slots);

// Enqueues the id check (validate_ids only). *bad_slot_dev gets the first
// flat slot index whose id is outside [-1, E_loc), or INT_MAX.
cudaError_t launch_validate_ids(const MoeRunParams& p, int32_t** bad_slot_dev,
                                cudaStream_t stream);

// Tile map + GEMM1 + GEMM2 + reduction.
cudaError_t launch_moe_run(const MoeRunParams& p, cudaStream_t stream);
// The two halves (the FP8 runner has its own GEMMs and shares the reduction).
cudaError_t launch_moe_gemms(const MoeRunParams& p, cudaStream_t stream);
cudaError_t launch_moe_reduce(const MoeRunParams& p, cudaStream_t stream);
// The per-slot rows [T * K, H] inside p.workspace that GEMM2 writes and
// launch_moe_reduce reads (the FP8 runner's GEMM2 writes them too): rows of
// the activation dtype (bf16/f16: half the bytes of f32 rows, each slot's
// output rounded once before the f32 weighted sum). Room for f32 rows in
// every dtype.
float* moe_run_slot_rows(const MoeRunParams& p);

}  // namespace moe::kernels
