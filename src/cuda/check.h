// The one CUDA status check of the CUDA backend's host code.
#pragma once

#include <cuda_runtime.h>

#include <string>

namespace moe::cuda {

// Throws moe::Error(MOE_STATUS_CUDA_ERROR) "<what>: <CUDA's error text>".
void check(cudaError_t err, const std::string& what);

}  // namespace moe::cuda
