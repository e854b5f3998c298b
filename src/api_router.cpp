// Router entry points: config, create/destroy, run, pack.
#include <cmath>
#include <cstddef>

#include "backend.h"
#include "checks.h"

namespace moe {

namespace {

// The fields every caller's struct has: the first version's required ones.
constexpr size_t kRouterMinSize = offsetof(moe_router_config_t, top_k) + sizeof(int32_t);

bool grouped(int method) {
  return method == MOE_ROUTING_DEEPSEEK_V3 || method == MOE_ROUTING_GROUPED_SOFTMAX;
}
bool takes_bias(int method) {
  return method == MOE_ROUTING_SIGMOID_TOPK || method == MOE_ROUTING_DEEPSEEK_V3;
}

moe_router_config_t router_defaults(int32_t method) {
  moe_router_config_t c{};
  c.struct_size = sizeof(c);
  c.method = method;
  c.num_experts = 0;
  c.top_k = 0;
  c.n_group = 1;
  c.topk_group = 1;
  c.renormalize = method == MOE_ROUTING_DEEPSEEK_V3 ? 1 : 0;
  c.routed_scaling_factor = 1.0f;
  c.scaling_on_output = 0;
  c.num_fused_shared_experts = 0;
  return c;
}

}  // namespace

Device check_route_inputs(const ArgChecker& c, const moe_router_s& router, const DLTensor* logits,
                          const DLTensor* correction_bias, const DLTensor* num_valid_tokens,
                          RouteArgs& args) {
  const RouterPlan& p = router.plan;
  args.logits_dtype = c.tensor(logits, "logits", {DType::f32, DType::bf16, DType::f16});
  c.shape(logits, "logits", {-1, p.E}, {"T", "E"});
  Device dev = c.device(logits, "logits");
  require_backend(c, dev, "logits.device");
  args.logits = tensor_data(logits);
  args.T = logits->shape[0];
  args.bias = nullptr;
  if (correction_bias) {
    if (!takes_bias(p.method))
      c.bad("correction_bias", "NULL for this routing method (only SIGMOID_TOPK and DEEPSEEK_V3 "
                               "take a bias)", "a tensor");
    c.tensor(correction_bias, "correction_bias", {DType::f32});
    c.shape(correction_bias, "correction_bias", {p.E}, {"E"});
    c.same_device(dev, correction_bias, "correction_bias");
    args.bias = static_cast<const float*>(tensor_data(correction_bias));
  }
  args.num_valid = nullptr;
  if (num_valid_tokens) {
    c.tensor(num_valid_tokens, "num_valid_tokens", {DType::i32});
    c.shape(num_valid_tokens, "num_valid_tokens", {1}, {"1"});
    c.same_device(dev, num_valid_tokens, "num_valid_tokens");
    args.num_valid = static_cast<const int32_t*>(tensor_data(num_valid_tokens));
  }
  return dev;
}

}  // namespace moe

using namespace moe;

extern "C" {

MOE_API moe_status_t moe_router_config_default(moe_router_config_t* config, int32_t method) {
  MOE_ENTRY
  ArgChecker c("moe_router_config_default");
  c.not_null(config, "config");
  if (method < 0 || method >= MOE_ROUTING_NUM_METHODS)
    c.bad("method", "a moe_routing_method_t in [0, " + std::to_string(MOE_ROUTING_NUM_METHODS) + ")",
          std::to_string(method));
  c.write_defaults(config, "config", router_defaults(method), kRouterMinSize);
  MOE_EXIT
}

MOE_API moe_status_t moe_router_create(const moe_router_config_t* config, moe_router_t* router) {
  MOE_ENTRY
  ArgChecker c("moe_router_create");
  c.not_null(router, "router");
  *router = nullptr;
  c.not_null(config, "config");
  moe_router_config_t cfg =
      c.config(config, "config", router_defaults(config->method), kRouterMinSize);
  if (cfg.method < 0 || cfg.method >= MOE_ROUTING_NUM_METHODS)
    c.bad("config->method", "a moe_routing_method_t in [0, " +
                                std::to_string(MOE_ROUTING_NUM_METHODS) + ")",
          std::to_string(cfg.method));
  if (cfg.num_experts < 1 || cfg.num_experts > 32767)
    c.bad("config->num_experts", "E in [1, 32767]", std::to_string(cfg.num_experts));
  if (cfg.top_k < 1 || cfg.top_k > cfg.num_experts)
    c.bad("config->top_k", "k in [1, E=" + std::to_string(cfg.num_experts) + "]",
          std::to_string(cfg.top_k));
  if (cfg.method == MOE_ROUTING_LLAMA4 && cfg.top_k != 1)
    c.bad("config->top_k", "1 for the LLAMA4 method", std::to_string(cfg.top_k));
  if (grouped(cfg.method)) {
    if (cfg.n_group < 1 || cfg.num_experts % cfg.n_group != 0)
      c.bad("config->n_group", "a divisor of E=" + std::to_string(cfg.num_experts),
            std::to_string(cfg.n_group));
    if (cfg.topk_group < 1 || cfg.topk_group > cfg.n_group)
      c.bad("config->topk_group", "a value in [1, n_group=" + std::to_string(cfg.n_group) + "]",
            std::to_string(cfg.topk_group));
    int64_t reachable = int64_t(cfg.topk_group) * (cfg.num_experts / cfg.n_group);
    if (cfg.top_k > reachable)
      c.bad("config->top_k", "k <= topk_group * E / n_group = " + std::to_string(reachable),
            std::to_string(cfg.top_k));
  } else {
    if (cfg.n_group != 1)
      c.bad("config->n_group", "1 for an ungrouped routing method", std::to_string(cfg.n_group));
    if (cfg.topk_group != 1)
      c.bad("config->topk_group", "1 for an ungrouped routing method",
            std::to_string(cfg.topk_group));
  }
  c.flag("config->renormalize", cfg.renormalize);
  c.flag("config->scaling_on_output", cfg.scaling_on_output);
  if (!(std::isfinite(cfg.routed_scaling_factor) && cfg.routed_scaling_factor > 0.0f))
    c.bad("config->routed_scaling_factor", "a finite value > 0",
          std::to_string(cfg.routed_scaling_factor));
  if (cfg.num_fused_shared_experts < 0 ||
      cfg.num_experts + int64_t(cfg.num_fused_shared_experts) > 32767)
    c.bad("config->num_fused_shared_experts",
          "a value >= 0 with E + n_shared <= 32767", std::to_string(cfg.num_fused_shared_experts));

  auto* r = new moe_router_s{};
  r->config = cfg;
  RouterPlan& p = r->plan;
  p.method = cfg.method;
  p.E = cfg.num_experts;
  p.k = cfg.top_k;
  p.n_group = grouped(cfg.method) ? cfg.n_group : 1;
  p.topk_group = grouped(cfg.method) ? cfg.topk_group : 1;
  p.renormalize = cfg.renormalize != 0;
  p.weight_scale = cfg.scaling_on_output ? 1.0f : cfg.routed_scaling_factor;
  p.n_shared = cfg.num_fused_shared_experts;
  p.shared_weight = cfg.scaling_on_output ? 1.0f / cfg.routed_scaling_factor : 1.0f;
  *router = r;
  MOE_EXIT
}

MOE_API moe_status_t moe_router_destroy(moe_router_t router) {
  MOE_ENTRY
  delete router;
  MOE_EXIT
}

MOE_API moe_status_t moe_router_output_columns(moe_router_t router, int32_t* columns) {
  MOE_ENTRY
  ArgChecker c("moe_router_output_columns");
  c.not_null(router, "router");
  c.not_null(columns, "columns");
  *columns = router->plan.columns();
  MOE_EXIT
}

MOE_API moe_status_t moe_router_run(moe_router_t router, const DLTensor* logits,
                                    const DLTensor* correction_bias,
                                    const DLTensor* num_valid_tokens, DLTensor* topk_ids,
                                    DLTensor* topk_weights, void* stream) {
  MOE_ENTRY
  ArgChecker c("moe_router_run");
  c.not_null(router, "router");
  RouteArgs args{};
  Device dev = check_route_inputs(c, *router, logits, correction_bias, num_valid_tokens, args);
  int64_t cols = router->plan.columns();
  c.tensor(topk_ids, "topk_ids", {DType::i32});
  c.shape(topk_ids, "topk_ids", {args.T, cols}, {"T", "k + n_shared"});
  c.same_device(dev, topk_ids, "topk_ids");
  c.tensor(topk_weights, "topk_weights", {DType::f32});
  c.shape(topk_weights, "topk_weights", {args.T, cols}, {"T", "k + n_shared"});
  c.same_device(dev, topk_weights, "topk_weights");
  args.ids = static_cast<int32_t*>(tensor_data(topk_ids));
  args.weights = static_cast<float*>(tensor_data(topk_weights));
  if (args.T > 0) backend_route(dev, router->plan, args, stream);
  MOE_EXIT
}

MOE_API moe_status_t moe_pack_topk(const DLTensor* topk_ids, const DLTensor* topk_weights,
                                   DLTensor* packed, void* stream) {
  MOE_ENTRY
  ArgChecker c("moe_pack_topk");
  c.tensor(topk_ids, "topk_ids", {DType::i32});
  if (topk_ids->ndim != 2) c.bad("topk_ids", "a 2-D tensor [T, k]", "shape " + shape_string(topk_ids));
  Device dev = c.device(topk_ids, "topk_ids");
  require_backend(c, dev, "topk_ids.device");
  int64_t T = topk_ids->shape[0], k = topk_ids->shape[1];
  c.tensor(topk_weights, "topk_weights", {DType::f32});
  c.shape(topk_weights, "topk_weights", {T, k}, {"T", "k"});
  c.same_device(dev, topk_weights, "topk_weights");
  c.tensor(packed, "packed", {DType::i32});
  c.shape(packed, "packed", {T, k}, {"T", "k"});
  c.same_device(dev, packed, "packed");
  PackArgs a{static_cast<const int32_t*>(tensor_data(topk_ids)),
             static_cast<const float*>(tensor_data(topk_weights)),
             static_cast<int32_t*>(tensor_data(packed)), T * k};
  // Packed ids live in 16 bits: on the CPU refuse ids that do not fit.
  if (dev.backend == Backend::cpu)
    for (int64_t i = 0; i < a.n; ++i)
      if (a.ids[i] < -1 || a.ids[i] > 32767)
        c.bad("topk_ids", "ids in [-1, 32767] (token " + std::to_string(i / std::max<int64_t>(k, 1)) +
                              ", slot " + std::to_string(i % std::max<int64_t>(k, 1)) + ")",
              std::to_string(a.ids[i]));
  if (a.n > 0) backend_pack(dev, a, stream);
  MOE_EXIT
}

}  // extern "C"
