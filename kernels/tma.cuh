// Host side of the bulk tensor copy: tensor maps of 2-D row-major matrices, encoded through the driver's cuTensorMapEncodeTiled
// (found at run time through the CUDA runtime, so libmoe does not link
// libcuda). Encoding is host-only work: legal during graph capture.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace moe::kernels::tma {

inline PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// Map of a [rows, cols] matrix (cols contiguous) of `elem_bytes`-byte
// values read in boxes of box_rows rows x 128 bytes (the 128B swizzle's
// span), written to shared memory in the 128B-swizzled layout of
// kernels/wgmma.cuh. Reads outside the matrix give zeros. False when the
// driver has no encoder or refuses.
inline bool map_rows_2d(CUtensorMap* map, const void* base, uint64_t rows, uint64_t cols, uint32_t box_rows,
                        CUtensorMapDataType type, uint32_t elem_bytes) {
  const PFN_cuTensorMapEncodeTiled_v12000 fn = encode_fn();
  if (!fn) return false;
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {cols * elem_bytes};  // bytes between rows
  const cuuint32_t box[2] = {128 / elem_bytes, box_rows};
  const cuuint32_t elem_strides[2] = {1, 1};
  return fn(map, type, 2, const_cast<void*>(base), dims, strides, box, elem_strides,
            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace moe::kernels::tma
