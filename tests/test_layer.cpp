// The one-call layer: it must equal the three objects chained by hand, use
// the workspace it asks for, and refuse handles that do not fit together.
#include <memory>

#include "support.h"

using namespace moe_test;

namespace {

struct Layer {
  moe_router_t router = nullptr;
  moe_dispatcher_t dispatcher = nullptr;
  moe_runner_t runner = nullptr;
  std::unique_ptr<HostTensor> w13, w2;
  ~Layer() {
    moe_runner_destroy(runner);
    moe_dispatcher_destroy(dispatcher);
    moe_router_destroy(router);
  }
};

struct LayerSpec {
  int method = MOE_ROUTING_DEEPSEEK_V3;
  int E = 16, k = 4, n_group = 4, topk_group = 2;
  int ep_rank = 1, ep_size = 2;
  int H = 24, I = 20;
  float scale = 2.5f;
  int scaling_on_output = 0;
  int n_shared = 0;
  int weight_on_input = 0;
  DT w_dtype = DT::f32;
};

void build(Layer& l, const LayerSpec& s, std::mt19937_64& rng) {
  moe_router_config_t rc;
  rc.struct_size = uint32_t(sizeof(rc));
  MOE_CHECK_OK(moe_router_config_default(&rc, s.method));
  rc.num_experts = s.E;
  rc.top_k = s.k;
  if (s.method == MOE_ROUTING_DEEPSEEK_V3 || s.method == MOE_ROUTING_GROUPED_SOFTMAX) {
    rc.n_group = s.n_group;
    rc.topk_group = s.topk_group;
  }
  rc.routed_scaling_factor = s.scale;
  rc.scaling_on_output = s.scaling_on_output;
  rc.num_fused_shared_experts = s.n_shared;
  MOE_CHECK_OK(moe_router_create(&rc, &l.router));
  moe_dispatcher_config_t dc;
  dc.struct_size = uint32_t(sizeof(dc));
  MOE_CHECK_OK(moe_dispatcher_config_default(&dc));
  dc.num_experts = s.E + s.n_shared;
  dc.ep_rank = s.ep_rank;
  dc.ep_size = s.ep_size;
  MOE_CHECK_OK(moe_dispatcher_create(&dc, &l.dispatcher));
  int32_t E_loc = 0;
  MOE_CHECK_OK(moe_dispatcher_num_local_experts(l.dispatcher, &E_loc));
  moe_runner_config_t uc;
  uc.struct_size = uint32_t(sizeof(uc));
  MOE_CHECK_OK(moe_runner_config_default(&uc));
  uc.num_experts = E_loc;
  uc.hidden_size = s.H;
  uc.intermediate_size = s.I;
  uc.apply_router_weight_on_input = s.weight_on_input;
  MOE_CHECK_OK(moe_runner_create(&uc, &l.runner));
  l.w13 = std::make_unique<HostTensor>(s.w_dtype, std::vector<int64_t>{E_loc, 2 * s.I, s.H});
  l.w2 = std::make_unique<HostTensor>(s.w_dtype, std::vector<int64_t>{E_loc, s.H, s.I});
  l.w13->fill_normal(rng, 0.2);
  l.w2->fill_normal(rng, 0.2);
  MOE_CHECK_OK(moe_runner_set_weights(l.runner, l.w13->dl(), l.w2->dl(), nullptr, nullptr, nullptr,
                                      nullptr));
}

// The layer by hand: router -> dispatcher -> runner through the public API.
void chained(Layer& l, const LayerSpec& s, HostTensor& x, HostTensor& logits, HostTensor* bias,
             HostTensor* valid, HostTensor& y) {
  const int64_t T = x.shape[0];
  int32_t C = 0, E_loc = 0;
  MOE_CHECK_OK(moe_router_output_columns(l.router, &C));
  MOE_CHECK_OK(moe_dispatcher_num_local_experts(l.dispatcher, &E_loc));
  HostTensor ids(DT::i32, {T, C}), w(DT::f32, {T, C}), local(DT::i32, {T, C}),
      counts(DT::i32, {E_loc}), offsets(DT::i32, {E_loc + 1}), sorted(DT::i32, {T * C});
  MOE_CHECK_OK(moe_router_run(l.router, logits.dl(), bias ? bias->dl() : nullptr,
                              valid ? valid->dl() : nullptr, ids.dl(), w.dl(), nullptr));
  MOE_CHECK_OK(moe_dispatcher_dispatch(l.dispatcher, ids.dl(), local.dl(), counts.dl(),
                                       offsets.dl(), sorted.dl(), nullptr, 0, nullptr));
  MOE_CHECK_OK(moe_runner_run(l.runner, x.dl(), local.dl(), w.dl(), offsets.dl(), sorted.dl(),
                              y.dl(), nullptr, 0, nullptr));
  if (s.scaling_on_output)
    for (int64_t i = 0; i < y.numel(); ++i) y.set(i, y.get(i) * s.scale);
}

}  // namespace

TEST_CASE("layer.forward.equals_the_chained_objects") {
  auto rng = fresh_rng();
  for (DT dt : {DT::f32, DT::bf16}) {
    for (int on_output : {0, 1}) {
      CAPTURE(dt_name(dt));
      CAPTURE(on_output);
      LayerSpec s;
      s.scaling_on_output = on_output;
      s.w_dtype = dt;
      Layer l;
      build(l, s, rng);
      const int64_t T = 29;
      HostTensor x(dt, {T, s.H}), logits(DT::f32, {T, s.E}), bias(DT::f32, {s.E}),
          y(dt, {T, s.H}), y_ref(dt, {T, s.H});
      x.fill_normal(rng);
      logits.fill_normal(rng, 2.0);
      bias.fill_normal(rng, 0.1);
      y.poison();
      y_ref.poison();
      MOE_CHECK_OK(moe_layer_forward(l.router, l.dispatcher, l.runner, x.dl(), logits.dl(),
                                     bias.dl(), nullptr, y.dl(), nullptr, 0, nullptr));
      chained(l, s, x, logits, &bias, nullptr, y_ref);
      // Scaling the output afterwards rounds once more in bf16: allow that.
      const double tol = (on_output && dt == DT::bf16) ? 8e-3 : 1e-6;
      for (int64_t i = 0; i < y.numel(); ++i) {
        REQUIRE(std::isfinite(y.get(i)));
        REQUIRE(std::fabs(y.get(i) - y_ref.get(i)) <= tol * (1.0 + std::fabs(y_ref.get(i))));
      }
    }
  }
}

TEST_CASE("layer.forward.scaling_on_output_matches_scaled_weights") {
  auto rng = fresh_rng();
  LayerSpec a, b;
  b.scaling_on_output = 1;
  Layer la, lb;
  build(la, a, rng);
  build(lb, b, rng);
  std::memcpy(lb.w13->data(), la.w13->data(), la.w13->storage.size());
  std::memcpy(lb.w2->data(), la.w2->data(), la.w2->storage.size());
  const int64_t T = 17;
  HostTensor x(DT::f32, {T, a.H}), logits(DT::f32, {T, a.E}), ya(DT::f32, {T, a.H}),
      yb(DT::f32, {T, a.H});
  x.fill_normal(rng);
  logits.fill_normal(rng);
  MOE_CHECK_OK(moe_layer_forward(la.router, la.dispatcher, la.runner, x.dl(), logits.dl(), nullptr,
                                 nullptr, ya.dl(), nullptr, 0, nullptr));
  MOE_CHECK_OK(moe_layer_forward(lb.router, lb.dispatcher, lb.runner, x.dl(), logits.dl(), nullptr,
                                 nullptr, yb.dl(), nullptr, 0, nullptr));
  std::vector<double> va(size_t(ya.numel())), vb(va.size());
  for (int64_t i = 0; i < ya.numel(); ++i) {
    va[size_t(i)] = ya.get(i);
    vb[size_t(i)] = yb.get(i);
  }
  CHECK(rel_error(vb, va) < 1e-6);
}

TEST_CASE("layer.forward.padded_rows_are_exact_zeros") {
  auto rng = fresh_rng();
  LayerSpec s;
  s.ep_size = 1;
  s.ep_rank = 0;
  s.n_shared = 1;
  Layer l;
  build(l, s, rng);
  const int64_t T = 12;
  HostTensor x(DT::f32, {T, s.H}), logits(DT::f32, {T, s.E}), y(DT::f32, {T, s.H}),
      valid(DT::i32, {1});
  x.fill_normal(rng);
  logits.fill_normal(rng);
  valid.as<int32_t>()[0] = 5;
  y.poison();
  MOE_CHECK_OK(moe_layer_forward(l.router, l.dispatcher, l.runner, x.dl(), logits.dl(), nullptr,
                                 valid.dl(), y.dl(), nullptr, 0, nullptr));
  for (int64_t t = 0; t < T; ++t)
    for (int c = 0; c < s.H; ++c) {
      double v = y.get(t * s.H + c);
      REQUIRE(std::isfinite(v));
      if (t >= 5) REQUIRE(v == 0.0);
    }
}

TEST_CASE("layer.workspace.caller_owned") {
  auto rng = fresh_rng();
  LayerSpec s;
  Layer l;
  build(l, s, rng);
  const int64_t T = 9;
  size_t bytes = 0;
  MOE_CHECK_OK(moe_layer_workspace_size(l.router, l.dispatcher, l.runner, T, kDLCPU, &bytes));
  REQUIRE(bytes > 0);
  HostTensor x(DT::f32, {T, s.H}), logits(DT::f32, {T, s.E}), y1(DT::f32, {T, s.H}),
      y2(DT::f32, {T, s.H});
  x.fill_normal(rng);
  logits.fill_normal(rng);
  void* ws = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
  MOE_CHECK_OK(moe_layer_forward(l.router, l.dispatcher, l.runner, x.dl(), logits.dl(), nullptr,
                                 nullptr, y1.dl(), ws, bytes, nullptr));
  MOE_CHECK_OK(moe_layer_forward(l.router, l.dispatcher, l.runner, x.dl(), logits.dl(), nullptr,
                                 nullptr, y2.dl(), nullptr, 0, nullptr));
  CHECK(std::memcmp(y1.data(), y2.data(), y1.storage.size()) == 0);
  check_error_mentions(moe_layer_forward(l.router, l.dispatcher, l.runner, x.dl(), logits.dl(),
                                         nullptr, nullptr, y1.dl(), ws, bytes - 1, nullptr),
                       MOE_STATUS_INVALID_ARGUMENT,
                       {"workspace_bytes", std::to_string(bytes).c_str()});
  check_error_mentions(moe_layer_forward(l.router, l.dispatcher, l.runner, x.dl(), logits.dl(),
                                         nullptr, nullptr, y1.dl(), static_cast<char*>(ws) + 4,
                                         bytes, nullptr),
                       MOE_STATUS_INVALID_ARGUMENT, {"workspace", "256"});
  std::free(ws);
}

TEST_CASE("layer.forward.refuses_handles_that_do_not_fit") {
  auto rng = fresh_rng();
  LayerSpec s;
  Layer l;
  build(l, s, rng);
  LayerSpec other = s;
  other.ep_size = 1;
  other.ep_rank = 0;
  Layer wide;
  build(wide, other, rng);
  const int64_t T = 3;
  HostTensor x(DT::f32, {T, s.H}), logits(DT::f32, {T, s.E}), y(DT::f32, {T, s.H});
  x.fill_normal(rng);
  logits.fill_normal(rng);
  // A runner with 16 local experts beside a dispatcher holding 8.
  check_error_mentions(moe_layer_forward(l.router, l.dispatcher, wide.runner, x.dl(), logits.dl(),
                                         nullptr, nullptr, y.dl(), nullptr, 0, nullptr),
                       MOE_STATUS_INVALID_ARGUMENT, {"runner", "E_loc = 8", "16"});
  LayerSpec shared = other;
  shared.n_shared = 2;
  Layer ls;
  build(ls, shared, rng);
  // Router with 2 fused shared columns beside a dispatcher that knows only E.
  check_error_mentions(moe_layer_forward(ls.router, wide.dispatcher, wide.runner, x.dl(),
                                         logits.dl(), nullptr, nullptr, y.dl(), nullptr, 0,
                                         nullptr),
                       MOE_STATUS_INVALID_ARGUMENT, {"dispatcher", "18", "16"});
  HostTensor short_logits(DT::f32, {T - 1, s.E});
  check_error_mentions(moe_layer_forward(l.router, l.dispatcher, l.runner, x.dl(),
                                         short_logits.dl(), nullptr, nullptr, y.dl(), nullptr, 0,
                                         nullptr),
                       MOE_STATUS_INVALID_ARGUMENT, {"logits", "T = hidden's token count 3"});
}

TEST_CASE("layer.forward.llama4_applies_the_weight_on_input") {
  auto rng = fresh_rng();
  LayerSpec s;
  s.method = MOE_ROUTING_LLAMA4;
  s.k = 1;
  s.ep_size = 1;
  s.ep_rank = 0;
  s.scale = 1.0f;
  Layer bad;
  build(bad, s, rng);
  const int64_t T = 6;
  HostTensor x(DT::f32, {T, s.H}), logits(DT::f32, {T, s.E}), y(DT::f32, {T, s.H}),
      y_ref(DT::f32, {T, s.H});
  x.fill_normal(rng);
  logits.fill_normal(rng);
  check_error_mentions(moe_layer_forward(bad.router, bad.dispatcher, bad.runner, x.dl(),
                                         logits.dl(), nullptr, nullptr, y.dl(), nullptr, 0,
                                         nullptr),
                       MOE_STATUS_INVALID_ARGUMENT, {"apply_router_weight_on_input"});
  s.weight_on_input = 1;
  Layer l;
  build(l, s, rng);
  MOE_CHECK_OK(moe_layer_forward(l.router, l.dispatcher, l.runner, x.dl(), logits.dl(), nullptr,
                                 nullptr, y.dl(), nullptr, 0, nullptr));
  chained(l, s, x, logits, nullptr, nullptr, y_ref);
  CHECK(std::memcmp(y.data(), y_ref.data(), y.storage.size()) == 0);
}
