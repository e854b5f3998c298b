// Standard dispatcher entry points: the expert-parallel mapping and mask are
// owned here, and dispatch produces the routing metadata runners consume.
#include <cstddef>

#include "backend.h"
#include "checks.h"
#ifdef MOE_WITH_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace moe {

namespace {

// The fields every caller's struct has: the first version's required ones.
constexpr size_t kDispatcherMinSize =
    offsetof(moe_dispatcher_config_t, num_local_experts) + sizeof(int32_t);

moe_dispatcher_config_t dispatcher_defaults() {
  moe_dispatcher_config_t c{};
  c.struct_size = sizeof(c);
  c.num_experts = 0;
  c.ep_rank = 0;
  c.ep_size = 1;
  c.local_expert_mapping = nullptr;
  c.num_local_experts = 0;
  c.device_type = kDLCPU;
  c.device_id = 0;
  return c;
}

}  // namespace

void check_ids_in_range(const ArgChecker& c, const char* arg, const int32_t* ids, int64_t T, int K,
                        int64_t limit) {
  for (int64_t i = 0; i < T * K; ++i)
    if (ids[i] < -1 || ids[i] >= limit)
      c.bad(arg, "ids in [-1, " + std::to_string(limit) + ") (token " + std::to_string(i / K) +
                     ", slot " + std::to_string(i % K) + ")",
            std::to_string(ids[i]));
}

}  // namespace moe

moe_dispatcher_s::~moe_dispatcher_s() {
#ifdef MOE_WITH_CUDA
  if (plan.mapping_dev)
    moe::cuda::device_free(const_cast<int32_t*>(plan.mapping_dev), device.id);
#endif
}

using namespace moe;

extern "C" {

MOE_API moe_status_t moe_dispatcher_config_default(moe_dispatcher_config_t* config) {
  MOE_ENTRY
  ArgChecker c("moe_dispatcher_config_default");
  c.not_null(config, "config");
  c.write_defaults(config, "config", dispatcher_defaults(), kDispatcherMinSize);
  MOE_EXIT
}

MOE_API moe_status_t moe_dispatcher_create(const moe_dispatcher_config_t* config,
                                           moe_dispatcher_t* dispatcher) {
  MOE_ENTRY
  ArgChecker c("moe_dispatcher_create");
  c.not_null(dispatcher, "dispatcher");
  *dispatcher = nullptr;
  moe_dispatcher_config_t cfg =
      c.config(config, "config", dispatcher_defaults(), kDispatcherMinSize);
  if (cfg.num_experts < 1 || cfg.num_experts > 32767)
    c.bad("config->num_experts", "E in [1, 32767]", std::to_string(cfg.num_experts));
  if (cfg.ep_size < 1 || cfg.ep_size > cfg.num_experts)
    c.bad("config->ep_size", "a value in [1, E=" + std::to_string(cfg.num_experts) + "]",
          std::to_string(cfg.ep_size));
  if (cfg.ep_rank < 0 || cfg.ep_rank >= cfg.ep_size)
    c.bad("config->ep_rank", "a value in [0, ep_size=" + std::to_string(cfg.ep_size) + ")",
          std::to_string(cfg.ep_rank));
  Device dev;
  if (cfg.device_type == kDLCPU) {
    dev = Device{Backend::cpu, 0};
  } else if (cfg.device_type == kDLCUDA) {
    if (cfg.device_id < 0)
      c.bad("config->device_id", "a CUDA ordinal >= 0", std::to_string(cfg.device_id));
    dev = Device{Backend::cuda, cfg.device_id};
    require_backend(c, dev, "config->device_type");
  } else {
    c.bad("config->device_type", "kDLCPU (1) or kDLCUDA (2)", std::to_string(cfg.device_type),
          MOE_STATUS_UNSUPPORTED);
  }

  DispatchPlan plan;
  plan.E = cfg.num_experts;
  plan.mapping.assign(size_t(cfg.num_experts), -1);
  if (cfg.local_expert_mapping) {
    if (cfg.num_local_experts < 1 || cfg.num_local_experts > cfg.num_experts)
      c.bad("config->num_local_experts",
            "E_loc in [1, E=" + std::to_string(cfg.num_experts) + "] with an explicit mapping",
            std::to_string(cfg.num_local_experts));
    plan.E_loc = cfg.num_local_experts;
    for (int e = 0; e < cfg.num_experts; ++e) {
      int32_t l = cfg.local_expert_mapping[e];
      if (l < -1 || l >= plan.E_loc)
        c.bad("config->local_expert_mapping[" + std::to_string(e) + "]",
              "a local id in [-1, E_loc=" + std::to_string(plan.E_loc) + ")", std::to_string(l));
      plan.mapping[size_t(e)] = l;
    }
  } else {
    if (cfg.num_experts % cfg.ep_size != 0)
      c.bad("config->ep_size", "a divisor of E=" + std::to_string(cfg.num_experts) +
                                   " (or pass an explicit local_expert_mapping)",
            std::to_string(cfg.ep_size));
    int32_t per_rank = cfg.num_experts / cfg.ep_size;
    if (cfg.num_local_experts != 0 && cfg.num_local_experts != per_rank)
      c.bad("config->num_local_experts", "0 or E / ep_size = " + std::to_string(per_rank),
            std::to_string(cfg.num_local_experts));
    plan.E_loc = per_rank;
    for (int32_t l = 0; l < per_rank; ++l)
      plan.mapping[size_t(cfg.ep_rank * per_rank + l)] = l;
  }

  auto* d = new moe_dispatcher_s{};
  cfg.local_expert_mapping = nullptr;  // borrowed only during create
  cfg.num_local_experts = plan.E_loc;
  d->config = cfg;
  d->device = dev;
  d->plan = std::move(plan);
#ifdef MOE_WITH_CUDA
  if (dev.backend == Backend::cuda) {
    try {
      size_t bytes = d->plan.mapping.size() * sizeof(int32_t);
      void* p = cuda::device_alloc(bytes, dev.id);
      d->plan.mapping_dev = static_cast<const int32_t*>(p);
      cuda::copy_to_device(p, d->plan.mapping.data(), bytes, dev.id);
    } catch (...) {
      delete d;
      throw;
    }
  }
#endif
  *dispatcher = d;
  MOE_EXIT
}

MOE_API moe_status_t moe_dispatcher_destroy(moe_dispatcher_t dispatcher) {
  MOE_ENTRY
  delete dispatcher;
  MOE_EXIT
}

MOE_API moe_status_t moe_dispatcher_num_local_experts(moe_dispatcher_t dispatcher,
                                                      int32_t* num_local_experts) {
  MOE_ENTRY
  ArgChecker c("moe_dispatcher_num_local_experts");
  c.not_null(dispatcher, "dispatcher");
  c.not_null(num_local_experts, "num_local_experts");
  *num_local_experts = dispatcher->plan.E_loc;
  MOE_EXIT
}

MOE_API moe_status_t moe_dispatcher_get_mapping(moe_dispatcher_t dispatcher, int32_t* mapping,
                                                int32_t* mask, int64_t len) {
  MOE_ENTRY
  ArgChecker c("moe_dispatcher_get_mapping");
  c.not_null(dispatcher, "dispatcher");
  const DispatchPlan& p = dispatcher->plan;
  if (len != p.E) c.bad("len", "E = " + std::to_string(p.E), std::to_string(len));
  for (int e = 0; e < p.E; ++e) {
    int32_t l = p.mapping[size_t(e)];
    if (mapping) mapping[e] = l;
    if (mask) mask[e] = (l >= 0 && l < p.E_loc) ? 1 : 0;
  }
  MOE_EXIT
}

MOE_API moe_status_t moe_dispatcher_workspace_size(moe_dispatcher_t dispatcher, int64_t max_tokens,
                                                   int32_t columns, size_t* bytes) {
  MOE_ENTRY
  ArgChecker c("moe_dispatcher_workspace_size");
  c.not_null(dispatcher, "dispatcher");
  c.not_null(bytes, "bytes");
  if (columns < 1 || columns > 1024) c.bad("columns", "a value in [1, 1024]", std::to_string(columns));
  check_max_tokens(c, max_tokens, columns);
  *bytes = backend_dispatch_workspace(dispatcher->device, dispatcher->plan, max_tokens, columns);
  MOE_EXIT
}

MOE_API moe_status_t moe_dispatcher_dispatch(moe_dispatcher_t dispatcher, const DLTensor* topk_ids,
                                             DLTensor* local_ids, DLTensor* expert_counts,
                                             DLTensor* expert_offsets, DLTensor* sorted_slots,
                                             void* workspace, size_t workspace_bytes,
                                             void* stream) {
  MOE_ENTRY
  ArgChecker c("moe_dispatcher_dispatch");
  c.not_null(dispatcher, "dispatcher");
  const DispatchPlan& p = dispatcher->plan;
  const Device& dev = dispatcher->device;
  c.tensor(topk_ids, "topk_ids", {DType::i32});
  c.shape(topk_ids, "topk_ids", {-1, -1}, {"T", "K"});
  c.same_device(dev, topk_ids, "topk_ids");
  int64_t T = topk_ids->shape[0];
  int64_t K = topk_ids->shape[1];
  if (K < 1 || K > 1024) c.bad("topk_ids", "K (dim 1) in [1, 1024]", std::to_string(K));
  if (T * K > INT32_MAX) c.bad("topk_ids", "T * K < 2^31", std::to_string(T * K));
  c.tensor(local_ids, "local_ids", {DType::i32});
  c.shape(local_ids, "local_ids", {T, K}, {"T", "K"});
  c.same_device(dev, local_ids, "local_ids");
  c.tensor(expert_counts, "expert_counts", {DType::i32});
  c.shape(expert_counts, "expert_counts", {p.E_loc}, {"E_loc"});
  c.same_device(dev, expert_counts, "expert_counts");
  c.tensor(expert_offsets, "expert_offsets", {DType::i32});
  c.shape(expert_offsets, "expert_offsets", {p.E_loc + 1}, {"E_loc + 1"});
  c.same_device(dev, expert_offsets, "expert_offsets");
  c.tensor(sorted_slots, "sorted_slots", {DType::i32});
  c.shape(sorted_slots, "sorted_slots", {T * K}, {"T * K"});
  c.same_device(dev, sorted_slots, "sorted_slots");
  DispatchArgs a{};
  a.topk_ids = static_cast<const int32_t*>(tensor_data(topk_ids));
  a.T = T;
  a.K = int(K);
  a.local_ids = static_cast<int32_t*>(tensor_data(local_ids));
  a.counts = static_cast<int32_t*>(tensor_data(expert_counts));
  a.offsets = static_cast<int32_t*>(tensor_data(expert_offsets));
  a.sorted_slots = static_cast<int32_t*>(tensor_data(sorted_slots));
  // The CPU backend refuses bad ids; the CUDA backend treats them as -1.
  if (dev.backend == Backend::cpu) check_ids_in_range(c, "topk_ids", a.topk_ids, T, int(K), p.E);
  size_t need = backend_dispatch_workspace(dev, p, T, int(K));
  // Checked even when the backend needs none, so CPU and CUDA accept the same arguments.
  WorkspaceLease ws = lease_workspace(c, dispatcher->workspace, workspace, workspace_bytes, need, dev, stream);
  a.workspace = ws.ptr;
  a.workspace_bytes = need;
  backend_dispatch(dev, p, a, stream);
  MOE_EXIT
}

}  // extern "C"
