// The opaque handles behind moe_router_t, moe_dispatcher_t, moe_runner_t.
#pragma once

#include <mutex>

#include "plan.h"
#include "validate.h"

namespace moe {

// A workspace the handle owns for calls that pass none (convenience mode).
// Grows on demand; callers hold `mutex` while they use it.
struct OwnedWorkspace {
  std::mutex mutex;
  void* ptr = nullptr;
  size_t bytes = 0;
  Device device;
  void* last_use = nullptr;  // CUDA event recorded after the last call's work
  ~OwnedWorkspace();
  // Returns a buffer of at least `need` bytes on `dev` (reallocating).
  void* get(size_t need, const Device& dev);
  void release() noexcept;
};

// The workspace of one call: the caller's (checked for size and alignment)
// or, when the caller passes NULL/0, the handle's own, locked for the call.
// On CUDA the handle's own is also ordered across streams: the call's stream
// waits for the previous user's work, and the lease records this call's work
// when it ends (after the call enqueued it).
struct WorkspaceLease {
  void* ptr = nullptr;
  std::unique_lock<std::mutex> lock;
  OwnedWorkspace* owned = nullptr;  // set when the handle's own is used on CUDA
  void* stream = nullptr;
  WorkspaceLease() = default;
  WorkspaceLease(WorkspaceLease&& o) noexcept;
  WorkspaceLease& operator=(WorkspaceLease&& o) noexcept;
  ~WorkspaceLease();
};
WorkspaceLease lease_workspace(const ArgChecker& c, OwnedWorkspace& own, void* workspace,
                               size_t workspace_bytes, size_t need, const Device& dev,
                               void* stream);

}  // namespace moe

struct moe_router_s {
  moe_router_config_t config;
  moe::RouterPlan plan;
};

struct moe_dispatcher_s {
  moe_dispatcher_config_t config;
  moe::DispatchPlan plan;
  moe::Device device;
  moe::OwnedWorkspace workspace;
  ~moe_dispatcher_s();
};

struct moe_runner_s {
  moe_runner_config_t config;
  moe::RunnerPlan plan;
  bool has_weights = false;
  moe::Device weights_device;
  moe::OwnedWorkspace workspace;
};
