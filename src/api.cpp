// Status strings, the thread-local last error, version queries, and the
// handle-owned workspaces.
#include <cstdlib>
#include <new>

#include "handles.h"
#ifdef MOE_WITH_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace moe {

namespace {
thread_local std::string t_last_error;
}

void set_last_error(const std::string& message) { t_last_error = message; }
void clear_last_error() { t_last_error.clear(); }

[[noreturn]] void fail(moe_status_t status, std::string message) {
  throw Error{status, std::move(message)};
}

OwnedWorkspace::~OwnedWorkspace() { release(); }

void OwnedWorkspace::release() noexcept {
#ifdef MOE_WITH_CUDA
  if (last_use) {
    cuda::event_destroy(last_use, device.id);
    last_use = nullptr;
  }
#endif
  if (!ptr) return;
  if (device.backend == Backend::cpu) {
    std::free(ptr);
  } else {
#ifdef MOE_WITH_CUDA
    cuda::device_free(ptr, device.id);
#endif
  }
  ptr = nullptr;
  bytes = 0;
}

void* OwnedWorkspace::get(size_t need, const Device& dev) {
  if (ptr && bytes >= need && device == dev) return ptr;
  size_t want = align256(need == 0 ? 256 : need);
  void* fresh = nullptr;
  if (dev.backend == Backend::cpu) {
    fresh = std::aligned_alloc(256, want);
    if (!fresh) fail(MOE_STATUS_OUT_OF_MEMORY, "could not allocate a " + std::to_string(want) +
                                                   "-byte host workspace");
  } else {
#ifdef MOE_WITH_CUDA
    fresh = cuda::device_alloc(want, dev.id);
#else
    fail(MOE_STATUS_NOT_AVAILABLE, "libmoe was built without the CUDA backend");
#endif
  }
  release();
  ptr = fresh;
  bytes = want;
  device = dev;
  return ptr;
}

WorkspaceLease::WorkspaceLease(WorkspaceLease&& o) noexcept
    : ptr(o.ptr), lock(std::move(o.lock)), owned(o.owned), stream(o.stream) {
  o.owned = nullptr;
}

WorkspaceLease& WorkspaceLease::operator=(WorkspaceLease&& o) noexcept {
  if (this != &o) {
    this->~WorkspaceLease();
    new (this) WorkspaceLease(std::move(o));
  }
  return *this;
}

WorkspaceLease::~WorkspaceLease() {
#ifdef MOE_WITH_CUDA
  if (owned && owned->last_use) {
    cuda::DeviceGuard guard(owned->device.id);
    cuda::event_record(owned->last_use, stream);
  }
#endif
}

WorkspaceLease lease_workspace(const ArgChecker& c, OwnedWorkspace& own, void* workspace,
                               size_t workspace_bytes, size_t need, const Device& dev,
                               void* stream) {
  WorkspaceLease lease;
  if (!workspace) {
    if (workspace_bytes != 0)
      c.bad("workspace", "a non-NULL pointer when workspace_bytes is " +
                             std::to_string(workspace_bytes) + " (or NULL with 0 for an internal one)",
            "NULL");
    if (need == 0) return lease;
    lease.lock = std::unique_lock<std::mutex>(own.mutex);
    lease.ptr = own.get(need, dev);
#ifdef MOE_WITH_CUDA
    if (dev.backend == Backend::cuda) {
      cuda::DeviceGuard guard(dev.id);
      if (!own.last_use) own.last_use = cuda::event_create(dev.id);
      else cuda::stream_wait_event(stream, own.last_use);
      lease.owned = &own;
      lease.stream = stream;
    }
#else
    (void)stream;
#endif
    return lease;
  }
  if (workspace_bytes < need)
    c.bad("workspace_bytes", "at least " + std::to_string(need) + " (the *_workspace_size() answer)",
          std::to_string(workspace_bytes));
  if (reinterpret_cast<uintptr_t>(workspace) % 256 != 0)
    c.bad("workspace", "a 256-byte-aligned address",
          "an address with remainder " + std::to_string(reinterpret_cast<uintptr_t>(workspace) % 256));
  lease.ptr = workspace;
  return lease;
}

}  // namespace moe

extern "C" {

MOE_API const char* moe_status_string(moe_status_t status) {
  switch (status) {
    case MOE_STATUS_SUCCESS: return "success";
    case MOE_STATUS_INVALID_ARGUMENT: return "invalid argument";
    case MOE_STATUS_UNSUPPORTED: return "unsupported";
    case MOE_STATUS_OUT_OF_MEMORY: return "out of memory";
    case MOE_STATUS_CUDA_ERROR: return "CUDA error";
    case MOE_STATUS_NCCL_ERROR: return "NCCL error";
    case MOE_STATUS_INTERNAL_ERROR: return "internal error";
    case MOE_STATUS_NOT_AVAILABLE: return "backend not available";
    case MOE_STATUS_NUM_STATUSES: break;
  }
  return "unknown status";
}

MOE_API const char* moe_last_error(void) { return moe::t_last_error.c_str(); }

MOE_API uint32_t moe_version(void) { return MOE_VERSION_NUMBER; }

MOE_API const char* moe_version_string(void) { return MOE_VERSION_STRING; }

MOE_API int32_t moe_has_cuda(void) {
#ifdef MOE_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
