// Kernels of the all-to-all dispatcher (src/nccl/a2a.cpp moves the slabs
// with NCCL between them): pack tokens into one fixed-size slab per
// destination rank, sanitize what was received, and sum the returned expert
// outputs per token in a fixed rank order. No host synchronisation and no
// allocation: every launch has a geometry fixed at creation.
//
// Slabs. Per destination rank d, the sender keeps
//   a hidden slab: max_tokens_per_rank (M) rows of H values (row_bytes each);
//     the slab of d == rank is written straight into the caller's receive
//     rows [rank*M, rank*M + M) instead;
//   a meta slab (meta_bytes): int32 count, 3 int32 of padding, then
//     ids [M, K] int32 (d's local ids, -1 elsewhere) and weights [M, K] f32.
// Peer hidden slabs sit at index peer_slot(d) (rank's own slab is skipped).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "plan.h"

namespace moe::kernels {

// Upper bound on ep_size (the combine kernel keeps one source pointer per rank in shared memory).
constexpr int kA2aMaxRanks = 256;

// Bytes of the count header in front of a meta slab.
constexpr size_t kA2aMetaHeader = 16;

inline size_t a2a_align256(size_t n) { return (n + 255) & ~size_t(255); }

inline size_t a2a_meta_bytes(int64_t M, int K) {
  return a2a_align256(kA2aMetaHeader + size_t(M) * size_t(K) * 8);
}

// Index of destination rank d's hidden slab among the peer slabs.
__host__ __device__ inline int a2a_peer_slot(int d, int rank) { return d < rank ? d : d - 1; }

struct A2aPackParams {
  const void* hidden;            // [T, H]
  int64_t T;
  const int32_t* topk_ids;       // [T, K] global ids
  const float* topk_weights;     // [T, K]
  const int32_t* expert_rank;    // [E] device: rank holding each expert
  const int32_t* expert_local;   // [E] device: its local id there
  int E;
  int ep_size, rank, M, K;
  size_t row_bytes;              // H * element size
  char* send_hidden;             // (ep_size - 1) peer slabs of M * row_bytes
  char* send_meta;               // ep_size meta slabs of meta_bytes
  size_t meta_bytes;
  char* self_hidden;             // the caller's receive rows [rank*M, rank*M + M)
  int32_t* pos_map;              // [ep_size, M] out: row of token t in d's slab, or -1
  int32_t* src_token;            // [ep_size, M] out: token of row i of d's slab
};

// Fills the meta slabs and pos_map/src_token (one block per destination,
// rows in ascending token order), then copies the hidden rows.
cudaError_t launch_a2a_pack(const A2aPackParams& p, cudaStream_t stream);

struct A2aSanitizeParams {
  const char* send_meta;         // this rank's own meta slab is read from here
  const char* recv_meta;         // ep_size meta slabs (the rank's own is unused)
  size_t meta_bytes;
  int ep_size, rank, M, K, E_loc;
  int32_t* local_ids;            // [ep_size * M, K] out: ids, -1 on padding rows
  float* weights;                // [ep_size * M, K] out: weights, 0 wherever the id is -1
  int32_t* counts;               // [ep_size] out: rows received from each rank
};

// Writes every receive row's ids and weights: received values below the
// source's count (ids outside [0, E_loc) become -1), -1 and 0 past it.
cudaError_t launch_a2a_sanitize(const A2aSanitizeParams& p, cudaStream_t stream);

struct A2aCombineParams {
  DType dtype;                   // f32, f16 or bf16
  int H;
  int64_t T;
  const void* expert_output;     // [ep_size * M, H]: this rank's rows are read here
  const char* back_hidden;       // (ep_size - 1) peer slabs returned by combine's exchange
  const int32_t* pos_map;        // [ep_size, M] from the dispatch
  int ep_size, rank, M;
  void* output;                  // [T, H] out
};

// output[t] = sum over ranks d = 0, 1, ... (in that order) of the row that
// d returned for t, accumulated in f32 and rounded once; 0 if t went nowhere.
cudaError_t launch_a2a_combine(const A2aCombineParams& p, cudaStream_t stream);

}  // namespace moe::kernels
