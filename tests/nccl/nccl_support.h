// Support for the multi-GPU suites: one process drives every GPU, with the
// communicators from ncclCommInitAll and one host thread per rank (each
// moe_a2a_* call issues its own NCCL group, so a rank needs its own thread).
// The rank count comes from the environment at run time (num_ranks()).
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "moe/moe.h"
#include "moe/moe_nccl.h"
#include "support.h"

namespace moe_nccl_test {

using moe_test::DT;
using moe_test::HostTensor;

// Throwing checks for rank threads (doctest assertions stay on the main thread).
void cuda_ok(cudaError_t e, const char* what);
void moe_ok(moe_status_t st, const char* what);
#define CUDA_OK(x) ::moe_nccl_test::cuda_ok((x), #x)
#define MOE_OK(x) ::moe_nccl_test::moe_ok((x), #x)

// Ranks of these suites: MOE_NCCL_RANKS if set, else every visible GPU
// (at most 8). Fails the calling test, saying why, unless 2 <= ranks <= GPUs.
int num_ranks();

// The process-wide communicators over GPUs 0..num_ranks()-1 (created on first use).
const std::vector<ncclComm_t>& comms();

// Runs fn(rank) on one thread per rank and returns each rank's error ("" if
// none). A rank left waiting in a collective that a failed peer never joined
// would hang forever: after timeout_s the process exits with a message.
std::vector<std::string> run_ranks(int n, const std::function<void(int)>& fn,
                                   int timeout_s = 120);

// Device memory with the DLTensor that describes it.
struct DevTensor {
  DT dtype = DT::f32;
  int device = 0;
  std::vector<int64_t> shape;
  void* ptr = nullptr;
  size_t bytes = 0;
  DLTensor t{};

  DevTensor() = default;
  DevTensor(DT dt, std::vector<int64_t> shape_, int device_);
  ~DevTensor();
  DevTensor(const DevTensor&) = delete;
  DevTensor& operator=(const DevTensor&) = delete;

  void reset(DT dt, std::vector<int64_t> shape_, int device_);
  int64_t numel() const;
  DLTensor* dl() { return &t; }
  // A view of rows [row0, row0 + rows) of the leading dimension.
  DLTensor rows_view(int64_t row0, int64_t rows, std::vector<int64_t>& shape_storage) const;
  void upload(const HostTensor& h, cudaStream_t s);
  void download(HostTensor& h, cudaStream_t s) const;
  // NaN in every float element, 0x7f7f7f7f in every int32.
  void poison(cudaStream_t s);
};

// Routing of one rank's tokens: global ids [T, K] (distinct experts per token)
// and positive weights [T, K].
struct Routing {
  HostTensor ids, weights;
};

}  // namespace moe_nccl_test
