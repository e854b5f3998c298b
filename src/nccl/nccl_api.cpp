#include "nccl_api.h"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <string>

#include "../common.h"

namespace moe::nccl {

namespace {

template <class F>
void resolve(void* lib, const char* name, F& fn, std::string& missing) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (!fn) missing += std::string(missing.empty() ? "" : ", ") + name;
}

Api load(std::string& error) {
  Api a{};
  std::string tried;
  void* lib = nullptr;
  const char* override_path = std::getenv("MOE_NCCL_LIBRARY");
  for (const char* name : {override_path, "libnccl.so.2", "libnccl.so"}) {
    if (!name || !*name) continue;
    lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (lib) break;
    const char* why = dlerror();
    tried += std::string("\n  ") + name + ": " + (why ? why : "not found");
  }
  if (!lib) {
    error = "NCCL could not be loaded (set MOE_NCCL_LIBRARY to libnccl.so.2); tried:" + tried;
    return a;
  }
  std::string missing;
  resolve(lib, "ncclGetErrorString", a.GetErrorString, missing);
  resolve(lib, "ncclGetLastError", a.GetLastError, missing);
  resolve(lib, "ncclGroupStart", a.GroupStart, missing);
  resolve(lib, "ncclGroupEnd", a.GroupEnd, missing);
  resolve(lib, "ncclSend", a.Send, missing);
  resolve(lib, "ncclRecv", a.Recv, missing);
  resolve(lib, "ncclAllGather", a.AllGather, missing);
  resolve(lib, "ncclCommCount", a.CommCount, missing);
  resolve(lib, "ncclCommUserRank", a.CommUserRank, missing);
  resolve(lib, "ncclCommCuDevice", a.CommCuDevice, missing);
  if (!missing.empty()) error = "the loaded NCCL lacks " + missing + " (NCCL >= 2.13 needed)";
  return a;
}

}  // namespace

const Api& api() {
  static std::string error;
  static const Api loaded = load(error);
  if (!error.empty()) fail(MOE_STATUS_NOT_AVAILABLE, error);
  return loaded;
}

}  // namespace moe::nccl
