// cuBLASLt for the MoE block: one handle per device, the algorithm of each
// GEMM shape chosen once by the heuristic and cached (descriptors included),
// the workspace taken from the caller's, no host synchronisation, and every
// cuBLASLt status mapped to a libmoe status with cuBLASLt's name for it.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../plan.h"

namespace moe::cuda {

// cuBLASLt workspace of one GEMM stream (split-K partials, counters); the
// heuristic only considers algorithms that fit in it.
constexpr size_t kLtWorkspaceBytes = size_t(8) << 20;

enum class LtEpilogue { none, gelu_tanh };

// Row-major (torch Linear) view: D[n, m] (+)= B[n, k] . A[m, k]^T, f32
// accumulation (CUBLAS_COMPUTE_32F: exact f32 products for f32 inputs, no
// TF32), alpha 1, beta 0 or 1.
struct LtGemm {
  int device = 0;
  int64_t m = 0, n = 0, k = 0;
  DType ab_dtype = DType::bf16;  // A and B
  DType d_dtype = DType::f32;    // C and D
  const void* a = nullptr;       // [m, k], row stride lda (the weights)
  int64_t lda = 0;
  const void* b = nullptr;       // [n, k], row stride ldb (the tokens)
  int64_t ldb = 0;
  void* d = nullptr;             // [n, m], row stride ldd
  int64_t ldd = 0;
  bool accumulate = false;       // D += ... (C = D) instead of D = ...
  LtEpilogue epilogue = LtEpilogue::none;
  void* workspace = nullptr;     // kLtWorkspaceBytes, 256-byte aligned
};

// Creates the device's handle if needed (host only; call before a capture).
void lt_prepare(int device);

// Whether cuBLASLt has an algorithm for this GEMM (the query is cached).
bool lt_supported(const LtGemm& g);

// Enqueues the GEMM on stream; UNSUPPORTED when no algorithm exists.
void lt_gemm(const LtGemm& g, cudaStream_t stream);

}  // namespace moe::cuda
