// Standard dispatch on the device: global -> local ids, per-expert counts and
// offsets, and the slot permutation grouped by local expert, stable in (t, j)
// order. Up to 256 slots (and 1024 local experts): one launch, one block.
// Up to 4096 slots: one launch, one block per local expert. Beyond, with up
// to 1024 local experts: two launches (tile
// histogram; per block, the expert offsets and its tiles' positions from the
// whole histogram, then the stable scatter). Otherwise three launches (tile
// histogram, one-block scan, stable scatter), or one block for up to 8 tiles
// of 256 slots. MOE_DISPATCH_ALGO (dispatch.cu) forces a choice for
// measurements and tests. No host synchronisation and no allocation.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace moe::kernels {

// Slots handled by one warp-tile (its histogram column).
constexpr int kDispatchTile = 256;

// Workspace bytes for n = T*K slots and E_loc local experts.
size_t dispatch_workspace_bytes(int64_t n, int E_loc);

struct DispatchParams {
  const int32_t* topk_ids;  // [n] global ids
  const int32_t* mapping;   // [E] global -> local or -1 (device)
  int E, E_loc;
  int64_t n;                // T * K
  int32_t* local_ids;       // [n]
  int32_t* counts;          // [E_loc]
  int32_t* offsets;         // [E_loc + 1]
  int32_t* sorted_slots;    // [n]
  void* workspace;          // >= dispatch_workspace_bytes(n, E_loc)
};

cudaError_t launch_dispatch(const DispatchParams& p, cudaStream_t stream);

}  // namespace moe::kernels
