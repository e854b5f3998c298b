// The one-call layer: route -> dispatch -> run, with every intermediate in
// one workspace so that a CUDA layer is graph-capturable.
#include "backend.h"
#include "checks.h"

namespace moe {

namespace {

// Byte layout of the layer workspace for T tokens and C columns.
struct LayerLayout {
  size_t ids, weights, local_ids, counts, offsets, sorted, dispatch_ws, runner_ws, total;
  size_t dispatch_bytes, runner_bytes;
};

LayerLayout layer_layout(const moe_dispatcher_s& d, const moe_runner_s& r, const Device& dev,
                         int64_t T, int C) {
  LayerLayout l{};
  size_t slots = size_t(T) * size_t(C);
  size_t at = 0;
  auto take = [&](size_t bytes) {
    size_t here = at;
    at += align256(bytes);
    return here;
  };
  l.ids = take(slots * 4);
  l.weights = take(slots * 4);
  l.local_ids = take(slots * 4);
  l.counts = take(size_t(d.plan.E_loc) * 4);
  l.offsets = take(size_t(d.plan.E_loc + 1) * 4);
  l.sorted = take(slots * 4);
  l.dispatch_bytes = backend_dispatch_workspace(dev, d.plan, T, C);
  l.dispatch_ws = take(l.dispatch_bytes);
  l.runner_bytes = backend_runner_workspace(dev, r.plan, T, C);
  l.runner_ws = take(l.runner_bytes);
  l.total = at;
  return l;
}

// The three handles fit together; returns the output multiplier.
float check_layer_handles(const ArgChecker& c, const moe_router_s* router,
                          const moe_dispatcher_s* dispatcher, const moe_runner_s* runner) {
  c.not_null(router, "router");
  c.not_null(dispatcher, "dispatcher");
  c.not_null(runner, "runner");
  const RouterPlan& rp = router->plan;
  if (dispatcher->plan.E != rp.E + rp.n_shared)
    c.bad("dispatcher", "num_experts = router E + fused shared experts = " +
                            std::to_string(rp.E + rp.n_shared),
          std::to_string(dispatcher->plan.E));
  if (runner->plan.E_loc != dispatcher->plan.E_loc)
    c.bad("runner", "num_experts = the dispatcher's E_loc = " +
                        std::to_string(dispatcher->plan.E_loc),
          std::to_string(runner->plan.E_loc));
  bool llama4 = rp.method == MOE_ROUTING_LLAMA4;
  if (llama4 != runner->plan.weight_on_input)
    c.bad("runner", std::string("apply_router_weight_on_input = ") + (llama4 ? "1" : "0") +
                        " to match the router's method",
          std::to_string(int(runner->plan.weight_on_input)));
  if (runner->plan.weight_on_input && rp.columns() != 1)
    c.bad("router", "1 output column (apply_router_weight_on_input is top-1 only)",
          std::to_string(rp.columns()));
  float scale = runner->plan.output_scale;
  if (router->config.scaling_on_output) scale *= router->config.routed_scaling_factor;
  return scale;
}

}  // namespace

}  // namespace moe

using namespace moe;

extern "C" {

MOE_API moe_status_t moe_layer_workspace_size(moe_router_t router, moe_dispatcher_t dispatcher,
                                              moe_runner_t runner, int64_t max_tokens,
                                              int32_t device_type, size_t* bytes) {
  MOE_ENTRY
  ArgChecker c("moe_layer_workspace_size");
  check_layer_handles(c, router, dispatcher, runner);
  c.not_null(bytes, "bytes");
  check_max_tokens(c, max_tokens, std::max<int64_t>(runner->plan.H, router->plan.columns()));
  Device dev;
  if (device_type == kDLCPU) dev = Device{Backend::cpu, 0};
  else if (device_type == kDLCUDA) dev = Device{Backend::cuda, dispatcher->device.id};
  else c.bad("device_type", "kDLCPU (1) or kDLCUDA (2)", std::to_string(device_type),
             MOE_STATUS_UNSUPPORTED);
  if (dev != dispatcher->device)
    c.bad("device_type", "the dispatcher's device (" + device_string(dispatcher->device) + ")",
          device_string(dev));
  require_backend(c, dev, "device_type");
  *bytes = layer_layout(*dispatcher, *runner, dev, max_tokens, router->plan.columns()).total;
  MOE_EXIT
}

MOE_API moe_status_t moe_layer_forward(moe_router_t router, moe_dispatcher_t dispatcher,
                                       moe_runner_t runner, const DLTensor* hidden,
                                       const DLTensor* logits, const DLTensor* correction_bias,
                                       const DLTensor* num_valid_tokens, DLTensor* output,
                                       void* workspace, size_t workspace_bytes, void* stream) {
  MOE_ENTRY
  ArgChecker c("moe_layer_forward");
  float out_scale = check_layer_handles(c, router, dispatcher, runner);
  RouteArgs ra{};
  Device dev = check_route_inputs(c, *router, logits, correction_bias, num_valid_tokens, ra);
  RunArgs a{};
  check_run_io(c, *runner, hidden, output, a);
  c.same_device(dev, hidden, "hidden");
  if (dispatcher->device != dev)
    c.bad("dispatcher", "a dispatcher on the tensors' device (" + device_string(dev) + ")",
          "one on " + device_string(dispatcher->device));
  if (a.T != ra.T)
    c.bad("logits", "T = hidden's token count " + std::to_string(a.T),
          "shape " + shape_string(logits));
  const int C = router->plan.columns();
  LayerLayout l = layer_layout(*dispatcher, *runner, dev, a.T, C);
  WorkspaceLease ws =
      lease_workspace(c, runner->workspace, workspace, workspace_bytes, l.total, dev, stream);
  if (a.T == 0) return MOE_STATUS_SUCCESS;
  char* base = static_cast<char*>(ws.ptr);
  ra.ids = reinterpret_cast<int32_t*>(base + l.ids);
  ra.weights = reinterpret_cast<float*>(base + l.weights);
  backend_route(dev, router->plan, ra, stream);

  DispatchArgs da{};
  da.topk_ids = ra.ids;
  da.T = a.T;
  da.K = C;
  da.local_ids = reinterpret_cast<int32_t*>(base + l.local_ids);
  da.counts = reinterpret_cast<int32_t*>(base + l.counts);
  da.offsets = reinterpret_cast<int32_t*>(base + l.offsets);
  da.sorted_slots = reinterpret_cast<int32_t*>(base + l.sorted);
  da.workspace = base + l.dispatch_ws;
  da.workspace_bytes = l.dispatch_bytes;
  backend_dispatch(dev, dispatcher->plan, da, stream);

  a.K = C;
  a.local_ids = da.local_ids;
  a.weights = ra.weights;
  a.offsets = da.offsets;
  a.sorted_slots = da.sorted_slots;
  a.output_scale = out_scale;
  a.workspace = base + l.runner_ws;
  a.workspace_bytes = l.runner_bytes;
  backend_run(dev, runner->plan, a, stream);
  MOE_EXIT
}

}  // extern "C"
