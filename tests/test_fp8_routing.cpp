// DeepSeek-V3 routing in front of an FP8 runner routes in f32 (SEMANTICS.md
// section 1: never on bf16-rounded scores). Logits are built so that the
// experts of a token differ only below bf16 precision: in f32 the ranking is
// a random permutation, rounded to bf16 every expert ties (and the lower
// index wins). The router, and the one-call layer with an FP8 block-128
// runner on the CPU backend, must follow the f32 values when given f32 and
// the exact bf16 values when given bf16.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "ref_router.h"
#include "ref_runner.h"
#include "support.h"

using namespace moe_test;

namespace {

constexpr int E = 16, K = 4, N_GROUP = 4, TOPK_GROUP = 2;
constexpr int H = 256, I = 128;

moe_router_config_t router_config() {
  moe_router_config_t rc;
  rc.struct_size = uint32_t(sizeof(rc));
  REQUIRE(moe_router_config_default(&rc, MOE_ROUTING_DEEPSEEK_V3) == MOE_STATUS_SUCCESS);
  rc.num_experts = E;
  rc.top_k = K;
  rc.n_group = N_GROUP;
  rc.topk_group = TOPK_GROUP;
  rc.routed_scaling_factor = 2.5f;
  return rc;
}

// f32 logits [T, E]: z0 + u * mark[perm[e]], u = 2^-17, with the marks of a
// Sidon set (the Mian-Chowla sequence: all pairwise sums distinct, so expert
// keys and group scores differ by >= one unit, several f32 ulps) and z0 a
// bf16 value whose half-ulp exceeds the span 251 u: every row rounds to z0.
void make_logits(std::mt19937_64& rng, HostTensor& f32, HostTensor& bf16) {
  const int marks[E] = {0, 1, 3, 7, 12, 20, 30, 44, 65, 80, 96, 122, 147, 181, 203, 251};
  const float bases[] = {1.0f, 1.25f, 1.5f, -1.25f, -1.5f, -2.5f, -3.0f};
  const int64_t T = f32.shape[0];
  std::vector<int> perm(E);
  for (int64_t t = 0; t < T; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    const float z0 = bases[rng() % (sizeof(bases) / sizeof(bases[0]))];
    for (int e = 0; e < E; ++e) {
      const float z = z0 + float(marks[perm[size_t(e)]]) * 0x1p-17f;
      f32.as<float>()[t * E + e] = z;
      bf16.set(t * E + e, z);
      REQUIRE(bf16.get(t * E + e) == double(z0));  // the construction: differences below bf16
    }
  }
}

std::vector<double> values_of(const HostTensor& t) {
  std::vector<double> v(size_t(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[size_t(i)] = t.get(i);
  return v;
}

// Reference ids (as a tensor) and f32 weights of the given logit values.
void ref_ids(const std::vector<double>& logits, int64_t T, HostTensor& ids, HostTensor& w) {
  const RefRouterCfg cfg = ref_router_cfg(router_config());
  std::vector<int> rid;
  std::vector<double> rw, margin;
  ref_route(cfg, logits, T, nullptr, T, rid, rw, &margin);
  // Distinct keys and group scores are several f32 ulps apart (0: all tied).
  for (size_t t = 0; t < margin.size(); ++t) {
    INFO("token ", t, " z0 ", logits[t * E], " margin ", margin[t]);
    REQUIRE((margin[t] == 0 || margin[t] > 2e-7));
  }
  for (int64_t i = 0; i < T * K; ++i) {
    ids.as<int32_t>()[i] = rid[size_t(i)];
    w.set(i, rw[size_t(i)]);
  }
}

int64_t rows_differing(const HostTensor& a, const HostTensor& b, int64_t T) {
  int64_t n = 0;
  for (int64_t t = 0; t < T; ++t)
    n += std::memcmp(a.as<int32_t>() + t * K, b.as<int32_t>() + t * K, K * sizeof(int32_t)) != 0;
  return n;
}

}  // namespace

TEST_CASE("fp8_routing.deepseek_v3.router_in_f32") {
  auto rng = fresh_rng();
  const int64_t T = 64;
  HostTensor z32(DT::f32, {T, E}), z16(DT::bf16, {T, E});
  make_logits(rng, z32, z16);
  moe_router_t r = nullptr;
  const moe_router_config_t rc = router_config();
  MOE_CHECK_OK(moe_router_create(&rc, &r));
  HostTensor ids32(DT::i32, {T, K}), w32(DT::f32, {T, K}), ids16(DT::i32, {T, K}),
      w16(DT::f32, {T, K}), ref32(DT::i32, {T, K}), rw32(DT::f32, {T, K}), ref16(DT::i32, {T, K}),
      rw16(DT::f32, {T, K});
  for (HostTensor* t : {&ids32, &w32, &ids16, &w16}) t->poison();
  MOE_CHECK_OK(moe_router_run(r, z32.dl(), nullptr, nullptr, ids32.dl(), w32.dl(), nullptr));
  MOE_CHECK_OK(moe_router_run(r, z16.dl(), nullptr, nullptr, ids16.dl(), w16.dl(), nullptr));
  moe_router_destroy(r);
  ref_ids(values_of(z32), T, ref32, rw32);
  ref_ids(values_of(z16), T, ref16, rw16);
  // f32 logits: the f32 ranking (a random permutation per token).
  CHECK(std::memcmp(ids32.data(), ref32.data(), ids32.storage.size()) == 0);
  // bf16 logits: exactly the bf16 values, all tied: groups 0 and 1, experts 0..3.
  CHECK(std::memcmp(ids16.data(), ref16.data(), ids16.storage.size()) == 0);
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < K; ++j) REQUIRE(ids16.as<int32_t>()[t * K + j] == j);
  // The test can tell them apart: almost every token routes differently.
  CHECK(rows_differing(ids32, ids16, T) > T / 2);
  for (int64_t i = 0; i < T * K; ++i) {
    CHECK(std::fabs(w32.get(i) - rw32.get(i)) <= 1e-6 * (1 + std::fabs(rw32.get(i))));
    CHECK(std::fabs(w16.get(i) - rw16.get(i)) <= 1e-6 * (1 + std::fabs(rw16.get(i))));
  }
}

TEST_CASE("fp8_routing.deepseek_v3.layer_with_fp8_runner") {
  // moe_layer_forward: DeepSeek-V3 router -> dispatcher -> FP8 block-128
  // runner on the CPU backend, against the float64 reference run on the
  // reference router's ids for the same logits.
  auto rng = fresh_rng();
  const int64_t T = 40;
  moe_router_t router = nullptr;
  moe_dispatcher_t disp = nullptr;
  moe_runner_t runner = nullptr;
  const moe_router_config_t rc = router_config();
  MOE_CHECK_OK(moe_router_create(&rc, &router));
  moe_dispatcher_config_t dc;
  dc.struct_size = uint32_t(sizeof(dc));
  REQUIRE(moe_dispatcher_config_default(&dc) == MOE_STATUS_SUCCESS);
  dc.num_experts = E;
  MOE_CHECK_OK(moe_dispatcher_create(&dc, &disp));
  moe_runner_config_t uc;
  uc.struct_size = uint32_t(sizeof(uc));
  REQUIRE(moe_runner_config_default(&uc) == MOE_STATUS_SUCCESS);
  uc.num_experts = E;
  uc.hidden_size = H;
  uc.intermediate_size = I;
  uc.quant_mode = MOE_QUANT_FP8_BLOCK_128;
  MOE_CHECK_OK(moe_runner_create(&uc, &runner));

  // E4M3 codes over the range, block scales bringing them to variance ~1/fan_in.
  HostTensor w13(DT::e4m3, {E, 2 * I, H}), w2(DT::e4m3, {E, H, I}),
      s13(DT::f32, {E, 2 * I / 128, H / 128}), s2(DT::f32, {E, H / 128, I / 128});
  std::uniform_real_distribution<double> code(-400, 400), jitter(0.5, 2.0);
  for (int64_t i = 0; i < w13.numel(); ++i) w13.as<uint8_t>()[i] = ref_e4m3_code(code(rng));
  for (int64_t i = 0; i < w2.numel(); ++i) w2.as<uint8_t>()[i] = ref_e4m3_code(code(rng));
  for (int64_t i = 0; i < s13.numel(); ++i) s13.set(i, std::sqrt(3.0 / H) / 400 * jitter(rng));
  for (int64_t i = 0; i < s2.numel(); ++i) s2.set(i, std::sqrt(3.0 / I) / 400 * jitter(rng));
  MOE_CHECK_OK(moe_runner_set_weights(runner, w13.dl(), w2.dl(), s13.dl(), s2.dl(), nullptr, nullptr));

  HostTensor x(DT::bf16, {T, H}), z32(DT::f32, {T, E}), z16(DT::bf16, {T, E}), y(DT::bf16, {T, H});
  x.fill_normal(rng);
  make_logits(rng, z32, z16);
  HostTensor ids32(DT::i32, {T, K}), w32(DT::f32, {T, K}), ids16(DT::i32, {T, K}),
      w16(DT::f32, {T, K});
  ref_ids(values_of(z32), T, ids32, w32);
  ref_ids(values_of(z16), T, ids16, w16);
  REQUIRE(rows_differing(ids32, ids16, T) > T / 2);
  RefMoeCfg cfg;
  cfg.quant_mode = MOE_QUANT_FP8_BLOCK_128;
  const std::vector<double> ref32 = ref_moe(cfg, x, ids32, w32, w13, w2, &s13, &s2);
  const std::vector<double> ref16 = ref_moe(cfg, x, ids16, w16, w13, w2, &s13, &s2);
  // The two routings give clearly different layers (the check below can fail).
  REQUIRE(rel_error(ref16, ref32) > 0.1);

  SUBCASE("f32 logits follow the f32 values") {
    y.poison();
    MOE_CHECK_OK(moe_layer_forward(router, disp, runner, x.dl(), z32.dl(), nullptr, nullptr, y.dl(),
                                   nullptr, 0, nullptr));
    const std::vector<double> out = values_of(y);
    INFO("rel error vs f32-routed reference ", rel_error(out, ref32));
    CHECK(rel_error(out, ref32) < 5e-3);
  }
  SUBCASE("bf16 logits route on their exact values") {
    y.poison();
    MOE_CHECK_OK(moe_layer_forward(router, disp, runner, x.dl(), z16.dl(), nullptr, nullptr, y.dl(),
                                   nullptr, 0, nullptr));
    const std::vector<double> out = values_of(y);
    INFO("rel error vs bf16-routed reference ", rel_error(out, ref16));
    CHECK(rel_error(out, ref16) < 5e-3);
  }
  moe_runner_destroy(runner);
  moe_dispatcher_destroy(disp);
  moe_router_destroy(router);
}
