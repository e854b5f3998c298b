// The MoE block on the CPU: gate projection, shared experts and the one-call
// block against the float64 reference of the whole block (tests/ref_block.h),
// for DeepSeek-V3-, Qwen2-MoE- and Mixtral-like configurations.
#include <cstring>
#include <cstdlib>

#include "ref_block.h"
#include "support.h"

using namespace moe_test;

namespace {

void set_weights(BlockHandles& h, BlockData& d) {
  MOE_CHECK_OK(moe_runner_set_weights(h.runner, d.w13->dl(), d.w2->dl(), nullptr, nullptr,
                                      nullptr, nullptr));
  if (h.shared)
    MOE_CHECK_OK(moe_shared_experts_set_weights(h.shared, d.sw13->dl(), d.sw2->dl(),
                                                d.sgate ? d.sgate->dl() : nullptr));
}

struct HostBuffer {
  void* p = nullptr;
  size_t bytes = 0;
  explicit HostBuffer(size_t b) : bytes(std::max<size_t>(b, 256)) {
    p = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
    REQUIRE(p != nullptr);
  }
  ~HostBuffer() { std::free(p); }
};

// Runs the block with a workspace of the queried size and checks it against
// the float64 reference.
void check_block(const BlockSpec& spec, DT dt, int64_t T, int64_t valid) {
  auto rng = fresh_rng();
  BlockData d;
  make_block_data(spec, dt, T, rng, d);
  BlockHandles h;
  make_block_handles(spec, kDLCPU, h);
  set_weights(h, d);
  size_t bytes = 0;
  MOE_CHECK_OK(moe_block_workspace_size(h.router, h.dispatcher, h.runner, h.shared, T, kDLCPU,
                                        &bytes));
  HostBuffer ws(bytes);
  HostTensor y(dt, {T, spec.H}), nv(DT::i32, {1});
  nv.as<int32_t>()[0] = int32_t(valid);
  y.poison();
  MOE_CHECK_OK(moe_block_forward(h.router, h.dispatcher, h.runner, h.shared, d.x->dl(),
                                 d.gate_w->dl(), spec.bias ? d.bias->dl() : nullptr,
                                 valid < T ? nv.dl() : nullptr, y.dl(), ws.p, bytes, nullptr));
  std::vector<double> ref, margin;
  ref_block(d.ref, d.xd, T, valid, ref, margin);
  int64_t compared = 0;
  const double err = block_rel_error(y, ref, margin, compared);
  INFO("rel error ", err, " over ", compared, " of ", T, " rows");
  CHECK(compared >= T * 3 / 4);
  CHECK(err < tolerance(dt));
  for (int64_t i = valid * spec.H; i < T * spec.H; ++i) REQUIRE(y.get(i) == 0.0);
}

}  // namespace

TEST_CASE("block.forward.deepseek_v3") {
  for (DT dt : {DT::f32, DT::bf16, DT::f16}) {
    SUBCASE(dt_name(dt)) { check_block(deepseek_v3_like(), dt, 53, 53); }
  }
}

TEST_CASE("block.forward.qwen2_moe") {
  for (DT dt : {DT::f32, DT::bf16, DT::f16}) {
    SUBCASE(dt_name(dt)) { check_block(qwen2_moe_like(), dt, 47, 47); }
  }
}

TEST_CASE("block.forward.mixtral") {
  for (DT dt : {DT::f32, DT::bf16, DT::f16}) {
    SUBCASE(dt_name(dt)) { check_block(mixtral_like(), dt, 40, 40); }
  }
}

TEST_CASE("block.forward.padded_scaling_on_output") {
  // The factor moved to the output still scales the routed part only; rows
  // past num_valid_tokens are zero.
  BlockSpec s = deepseek_v3_like();
  s.scaling_on_output = 1;
  for (DT dt : {DT::f32, DT::bf16}) {
    SUBCASE(dt_name(dt)) { check_block(s, dt, 64, 57); }
  }
}

TEST_CASE("block.forward.single_token") {
  for (DT dt : {DT::f32, DT::bf16}) {
    SUBCASE(dt_name(dt)) {
      check_block(deepseek_v3_like(), dt, 1, 1);
      check_block(qwen2_moe_like(), dt, 1, 1);
    }
  }
}

TEST_CASE("block.forward.equals_its_parts") {
  // gate -> moe_layer_forward -> shared experts accumulated, by hand; the CPU
  // backend is deterministic, so the bits agree.
  auto rng = fresh_rng();
  for (const BlockSpec& spec : {deepseek_v3_like(), qwen2_moe_like()}) {
    CAPTURE(spec.name);
    const int64_t T = 33;
    BlockData d;
    make_block_data(spec, DT::bf16, T, rng, d);
    BlockHandles h;
    make_block_handles(spec, kDLCPU, h);
    set_weights(h, d);
    const DLTensor* bias = spec.bias ? d.bias->dl() : nullptr;
    HostTensor y(DT::bf16, {T, spec.H}), y_parts(DT::bf16, {T, spec.H}),
        logits(DT::f32, {T, spec.E}), ids(DT::i32, {T, spec.k}), w(DT::f32, {T, spec.k});
    y.poison();
    y_parts.poison();
    MOE_CHECK_OK(moe_block_forward(h.router, h.dispatcher, h.runner, h.shared, d.x->dl(),
                                   d.gate_w->dl(), bias, nullptr, y.dl(), nullptr, 0, nullptr));
    MOE_CHECK_OK(moe_router_run_hidden(h.router, d.x->dl(), d.gate_w->dl(), bias, nullptr,
                                       ids.dl(), w.dl(), logits.dl(), nullptr, 0, nullptr));
    MOE_CHECK_OK(moe_layer_forward(h.router, h.dispatcher, h.runner, d.x->dl(), logits.dl(), bias,
                                   nullptr, y_parts.dl(), nullptr, 0, nullptr));
    MOE_CHECK_OK(moe_shared_experts_run(h.shared, d.x->dl(), nullptr, y_parts.dl(), 1, nullptr, 0,
                                        nullptr));
    CHECK(std::memcmp(y.data(), y_parts.data(), y.storage.size()) == 0);
  }
}

TEST_CASE("block.router_run_hidden.logits_and_routing") {
  // Continuous data here: the f32 logits against float64, any dtype mix; the
  // routing equals moe_router_run on the returned logits.
  auto rng = fresh_rng();
  const int64_t T = 37;
  const int E = 24, H = 80, k = 3;
  moe_router_config_t rc;
  rc.struct_size = uint32_t(sizeof(rc));
  MOE_CHECK_OK(moe_router_config_default(&rc, MOE_ROUTING_SIGMOID_TOPK));
  rc.num_experts = E;
  rc.top_k = k;
  rc.renormalize = 1;
  moe_router_t router = nullptr;
  MOE_CHECK_OK(moe_router_create(&rc, &router));
  for (DT xt : {DT::f32, DT::bf16, DT::f16}) {
    for (DT wt : {DT::f32, DT::bf16}) {
      CAPTURE(dt_name(xt));
      CAPTURE(dt_name(wt));
      HostTensor x(xt, {T, H}), gw(wt, {E, H}), bias(DT::f32, {E}), logits(DT::f32, {T, E}),
          ids(DT::i32, {T, k}), w(DT::f32, {T, k}), ids2(DT::i32, {T, k}), w2(DT::f32, {T, k});
      x.fill_normal(rng);
      gw.fill_normal(rng, 0.1);
      bias.fill_normal(rng, 0.05);
      logits.poison();
      ids.poison();
      w.poison();
      size_t bytes = 0;
      MOE_CHECK_OK(moe_router_hidden_workspace_size(router, H, T, kDLCPU, &bytes));
      HostBuffer ws(bytes);
      MOE_CHECK_OK(moe_router_run_hidden(router, x.dl(), gw.dl(), bias.dl(), nullptr, ids.dl(),
                                         w.dl(), logits.dl(), ws.p, bytes, nullptr));
      std::vector<double> xd(size_t(T * H)), gd(size_t(E * H)), got(size_t(T * E));
      for (int64_t i = 0; i < T * H; ++i) xd[size_t(i)] = x.get(i);
      for (int64_t i = 0; i < E * H; ++i) gd[size_t(i)] = gw.get(i);
      for (int64_t i = 0; i < T * E; ++i) got[size_t(i)] = logits.get(i);
      CHECK(rel_error(got, ref_gate(xd, gd.data(), T, H, E)) < 1e-6);
      MOE_CHECK_OK(moe_router_run(router, logits.dl(), bias.dl(), nullptr, ids2.dl(), w2.dl(),
                                  nullptr));
      CHECK(std::memcmp(ids.data(), ids2.data(), ids.storage.size()) == 0);
      CHECK(std::memcmp(w.data(), w2.data(), w.storage.size()) == 0);
    }
  }
  moe_router_destroy(router);
}

TEST_CASE("block.shared_experts.variants") {
  // Several shared experts, non-gated and swapped layouts, with and without
  // the sigmoid gate, written or accumulated.
  auto rng = fresh_rng();
  struct Variant {
    int n, act, gated, swap;
    bool gate;
  };
  const Variant variants[] = {{2, MOE_ACTIVATION_GELU_TANH, 0, 0, false},
                              {3, MOE_ACTIVATION_RELU2, 1, 1, true},
                              {1, MOE_ACTIVATION_GELU, 1, 0, true},
                              {2, MOE_ACTIVATION_IDENTITY, 0, 0, false}};
  const int H = 40, I = 24;
  const int64_t T = 19;
  for (const Variant& v : variants) {
    for (DT dt : {DT::f32, DT::bf16}) {
      for (int acc : {0, 1}) {
        CAPTURE(v.n);
        CAPTURE(v.act);
        CAPTURE(dt_name(dt));
        CAPTURE(acc);
        moe_shared_experts_config_t sc;
        sc.struct_size = uint32_t(sizeof(sc));
        MOE_CHECK_OK(moe_shared_experts_config_default(&sc));
        sc.num_shared_experts = v.n;
        sc.hidden_size = H;
        sc.intermediate_size = I;
        sc.activation = v.act;
        sc.gated = v.gated;
        sc.swap_gate_up = v.swap;
        moe_shared_experts_t sh = nullptr;
        MOE_CHECK_OK(moe_shared_experts_create(&sc, &sh));
        const int rows = v.gated ? 2 * I : I;
        HostTensor x(dt, {T, H}), w13(dt, {v.n, rows, H}), w2(dt, {v.n, H, I}),
            gate(DT::f32, {1, H}), y(dt, {T, H});
        x.fill_normal(rng);
        w13.fill_normal(rng, 0.15);
        w2.fill_normal(rng, 0.2);
        gate.fill_normal(rng, 0.2);
        y.fill_normal(rng);
        std::vector<double> xd(size_t(T * H)), w13d(size_t(w13.numel())), w2d(size_t(w2.numel())),
            gd(static_cast<size_t>(H)), y0(static_cast<size_t>(T * H));
        for (int64_t i = 0; i < T * H; ++i) xd[size_t(i)] = x.get(i), y0[size_t(i)] = y.get(i);
        for (int64_t i = 0; i < w13.numel(); ++i) w13d[size_t(i)] = w13.get(i);
        for (int64_t i = 0; i < w2.numel(); ++i) w2d[size_t(i)] = w2.get(i);
        for (int64_t i = 0; i < H; ++i) gd[size_t(i)] = gate.get(i);
        MOE_CHECK_OK(moe_shared_experts_set_weights(sh, w13.dl(), w2.dl(),
                                                    v.gate ? gate.dl() : nullptr));
        if (!acc) y.poison();
        MOE_CHECK_OK(moe_shared_experts_run(sh, x.dl(), nullptr, y.dl(), acc, nullptr, 0, nullptr));
        RefBlock b;
        b.has_shared = true;
        b.shared = RefMlp{v.n, H, I, v.act, v.gated != 0, v.swap != 0, w13d.data(), w2d.data()};
        b.shared_gate = v.gate ? gd.data() : nullptr;
        std::vector<double> ref = ref_shared(b, xd, T), got(size_t(T * H));
        for (int64_t i = 0; i < T * H; ++i) {
          if (acc) ref[size_t(i)] += y0[size_t(i)];
          got[size_t(i)] = y.get(i);
        }
        CHECK(rel_error(got, ref) < tolerance(dt));
        moe_shared_experts_destroy(sh);
      }
    }
  }
}

TEST_CASE("block.workspace") {
  auto rng = fresh_rng();
  const BlockSpec spec = qwen2_moe_like();
  const int64_t T = 29;
  BlockData d;
  make_block_data(spec, DT::f32, T, rng, d);
  BlockHandles h;
  make_block_handles(spec, kDLCPU, h);
  set_weights(h, d);
  size_t bytes = 0, small = 0, none = 0;
  MOE_CHECK_OK(moe_block_workspace_size(h.router, h.dispatcher, h.runner, h.shared, T, kDLCPU,
                                        &bytes));
  MOE_CHECK_OK(moe_block_workspace_size(h.router, h.dispatcher, h.runner, h.shared, 1, kDLCPU,
                                        &small));
  MOE_CHECK_OK(moe_block_workspace_size(h.router, h.dispatcher, h.runner, nullptr, T, kDLCPU,
                                        &none));
  CHECK(small < bytes);
  CHECK(none < bytes);
  HostBuffer ws(bytes + 256);
  HostTensor a(DT::f32, {T, spec.H}), b(DT::f32, {T, spec.H});
  a.poison();
  b.poison();
  MOE_CHECK_OK(moe_block_forward(h.router, h.dispatcher, h.runner, h.shared, d.x->dl(),
                                 d.gate_w->dl(), nullptr, nullptr, a.dl(), ws.p, bytes, nullptr));
  MOE_CHECK_OK(moe_block_forward(h.router, h.dispatcher, h.runner, h.shared, d.x->dl(),
                                 d.gate_w->dl(), nullptr, nullptr, b.dl(), nullptr, 0, nullptr));
  CHECK(std::memcmp(a.data(), b.data(), a.storage.size()) == 0);
  moe_status_t st = moe_block_forward(h.router, h.dispatcher, h.runner, h.shared, d.x->dl(),
                                      d.gate_w->dl(), nullptr, nullptr, a.dl(), ws.p, bytes - 1,
                                      nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"moe_block_forward", "workspace_bytes"});
  st = moe_block_forward(h.router, h.dispatcher, h.runner, h.shared, d.x->dl(), d.gate_w->dl(),
                         nullptr, nullptr, a.dl(), static_cast<char*>(ws.p) + 16, bytes, nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"workspace", "256"});
  st = moe_block_forward(h.router, h.dispatcher, h.runner, h.shared, d.x->dl(), d.gate_w->dl(),
                         nullptr, nullptr, a.dl(), nullptr, 64, nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"workspace", "NULL"});
}

TEST_CASE("block.errors") {
  auto rng = fresh_rng();
  const BlockSpec spec = qwen2_moe_like();
  const int64_t T = 5;
  BlockData d;
  make_block_data(spec, DT::f32, T, rng, d);
  BlockHandles h;
  make_block_handles(spec, kDLCPU, h);
  HostTensor y(DT::f32, {T, spec.H}), bad_gate(DT::f32, {spec.E + 1, spec.H}),
      y16(DT::bf16, {T, spec.H}), bias(DT::f32, {spec.E});

  // Shared experts without weights, then with them.
  moe_status_t st = moe_block_forward(h.router, h.dispatcher, h.runner, h.shared, d.x->dl(),
                                      d.gate_w->dl(), nullptr, nullptr, y.dl(), nullptr, 0, nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"runner"});
  set_weights(h, d);
  moe_shared_experts_config_t sc;
  sc.struct_size = uint32_t(sizeof(sc));
  MOE_CHECK_OK(moe_shared_experts_config_default(&sc));
  sc.hidden_size = spec.H;
  sc.intermediate_size = 8;
  moe_shared_experts_t unset = nullptr;
  MOE_CHECK_OK(moe_shared_experts_create(&sc, &unset));
  st = moe_block_forward(h.router, h.dispatcher, h.runner, unset, d.x->dl(), d.gate_w->dl(),
                         nullptr, nullptr, y.dl(), nullptr, 0, nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"shared", "moe_shared_experts_set_weights"});
  st = moe_shared_experts_run(unset, d.x->dl(), nullptr, y.dl(), 0, nullptr, 0, nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"moe_shared_experts_run", "shared"});
  moe_shared_experts_destroy(unset);

  // Shared experts of another hidden size.
  sc.hidden_size = spec.H + 8;
  moe_shared_experts_t wide = nullptr;
  MOE_CHECK_OK(moe_shared_experts_create(&sc, &wide));
  HostTensor ww13(DT::f32, {1, 16, spec.H + 8}), ww2(DT::f32, {1, spec.H + 8, 8});
  MOE_CHECK_OK(moe_shared_experts_set_weights(wide, ww13.dl(), ww2.dl(), nullptr));
  st = moe_block_forward(h.router, h.dispatcher, h.runner, wide, d.x->dl(), d.gate_w->dl(),
                         nullptr, nullptr, y.dl(), nullptr, 0, nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"shared", "hidden_size"});
  size_t bytes = 0;
  st = moe_block_workspace_size(h.router, h.dispatcher, h.runner, wide, T, kDLCPU, &bytes);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"shared", "hidden_size"});
  moe_shared_experts_destroy(wide);

  // Gate weight shape, output dtype, a bias for a softmax method.
  st = moe_block_forward(h.router, h.dispatcher, h.runner, h.shared, d.x->dl(), bad_gate.dl(),
                         nullptr, nullptr, y.dl(), nullptr, 0, nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"gate_weight", "E=16"});
  st = moe_block_forward(h.router, h.dispatcher, h.runner, h.shared, d.x->dl(), d.gate_w->dl(),
                         nullptr, nullptr, y16.dl(), nullptr, 0, nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"output.dtype"});
  st = moe_block_forward(h.router, h.dispatcher, h.runner, h.shared, d.x->dl(), d.gate_w->dl(),
                         bias.dl(), nullptr, y.dl(), nullptr, 0, nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"correction_bias"});
  st = moe_block_forward(nullptr, h.dispatcher, h.runner, h.shared, d.x->dl(), d.gate_w->dl(),
                         nullptr, nullptr, y.dl(), nullptr, 0, nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"router"});

  // Handles that do not fit together (a router with more experts).
  moe_router_config_t rc;
  rc.struct_size = uint32_t(sizeof(rc));
  MOE_CHECK_OK(moe_router_config_default(&rc, MOE_ROUTING_SOFTMAX_TOPK));
  rc.num_experts = spec.E * 2;
  rc.top_k = 2;
  moe_router_t other = nullptr;
  MOE_CHECK_OK(moe_router_create(&rc, &other));
  HostTensor gate2(DT::f32, {spec.E * 2, spec.H});
  st = moe_block_forward(other, h.dispatcher, h.runner, h.shared, d.x->dl(), gate2.dl(), nullptr,
                         nullptr, y.dl(), nullptr, 0, nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"moe_block_forward", "dispatcher"});
  moe_router_destroy(other);

  // moe_router_run_hidden: logits of the wrong shape, hidden of the wrong width.
  HostTensor ids(DT::i32, {T, spec.k}), w(DT::f32, {T, spec.k}), logits(DT::f32, {T, spec.E + 1}),
      x_wide(DT::f32, {T, spec.H + 1});
  st = moe_router_run_hidden(h.router, d.x->dl(), d.gate_w->dl(), nullptr, nullptr, ids.dl(),
                             w.dl(), logits.dl(), nullptr, 0, nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"moe_router_run_hidden", "logits"});
  st = moe_router_run_hidden(h.router, x_wide.dl(), d.gate_w->dl(), nullptr, nullptr, ids.dl(),
                             w.dl(), nullptr, nullptr, 0, nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"gate_weight"});

  // Shared-experts configs and weights.
  moe_shared_experts_t s = nullptr;
  sc.hidden_size = spec.H;
  sc.gated = 0;
  sc.swap_gate_up = 1;
  st = moe_shared_experts_create(&sc, &s);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"swap_gate_up"});
  CHECK(s == nullptr);
  sc.swap_gate_up = 0;
  sc.num_shared_experts = 0;
  st = moe_shared_experts_create(&sc, &s);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"num_shared_experts"});
  sc.num_shared_experts = 1;
  MOE_CHECK_OK(moe_shared_experts_create(&sc, &s));
  HostTensor g13(DT::f32, {1, 16, spec.H}), g2(DT::bf16, {1, spec.H, 8}),
      ok13(DT::f32, {1, 8, spec.H}), ok2(DT::f32, {1, spec.H, 8}), gate_bad(DT::f32, {spec.H});
  st = moe_shared_experts_set_weights(s, g13.dl(), ok2.dl(), nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"w13", "I_shared"});
  st = moe_shared_experts_set_weights(s, ok13.dl(), g2.dl(), nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"w2.dtype"});
  st = moe_shared_experts_set_weights(s, ok13.dl(), ok2.dl(), gate_bad.dl());
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"gate_weight"});
  MOE_CHECK_OK(moe_shared_experts_set_weights(s, ok13.dl(), ok2.dl(), nullptr));
  st = moe_shared_experts_run(s, d.x->dl(), nullptr, y.dl(), 2, nullptr, 0, nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"accumulate"});
  st = moe_shared_experts_run(s, d.x->dl(), nullptr, y16.dl(), 0, nullptr, 0, nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"output.dtype"});
  moe_shared_experts_destroy(s);
  CHECK(moe_shared_experts_destroy(nullptr) == MOE_STATUS_SUCCESS);
  moe_shared_experts_config_t small{};
  small.struct_size = 4;
  st = moe_shared_experts_create(&small, &s);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"struct_size"});
}
