// NCCL, resolved at run time. libmoe does not link libnccl: a process that
// already holds another NCCL (PyTorch's, say) would otherwise get two
// libraries of one SONAME, and whichever loads first serves both. The first
// all-to-all dispatcher dlopens libnccl.so.2 (or MOE_NCCL_LIBRARY), which
// reuses the process's NCCL when one is loaded.
#pragma once

#include <nccl.h>

namespace moe::nccl {

struct Api {
  decltype(&::ncclGetErrorString) GetErrorString;
  decltype(&::ncclGetLastError) GetLastError;
  decltype(&::ncclGroupStart) GroupStart;
  decltype(&::ncclGroupEnd) GroupEnd;
  decltype(&::ncclSend) Send;
  decltype(&::ncclRecv) Recv;
  decltype(&::ncclAllGather) AllGather;
  decltype(&::ncclCommCount) CommCount;
  decltype(&::ncclCommUserRank) CommUserRank;
  decltype(&::ncclCommCuDevice) CommCuDevice;
};

// The loaded API; throws moe::Error(MOE_STATUS_NOT_AVAILABLE) naming every
// library it tried when NCCL cannot be loaded.
const Api& api();

}  // namespace moe::nccl
