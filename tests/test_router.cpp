// Router (CPU backend) through the public C API: hand-worked cases, the
// float64 reference on random data, and the edge cases of semantics.md 1.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

#include "ref_router.h"
#include "support.h"

using namespace moe_test;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
const DT kLogitTypes[] = {DT::f32, DT::bf16, DT::f16};
const int kMethods[] = {MOE_ROUTING_SOFTMAX_TOPK,    MOE_ROUTING_TOPK_SOFTMAX,
                        MOE_ROUTING_SIGMOID_TOPK,    MOE_ROUTING_DEEPSEEK_V3,
                        MOE_ROUTING_GROUPED_SOFTMAX, MOE_ROUTING_LLAMA4};

const char* method_name(int m) {
  switch (m) {
    case MOE_ROUTING_SOFTMAX_TOPK: return "softmax_topk";
    case MOE_ROUTING_TOPK_SOFTMAX: return "topk_softmax";
    case MOE_ROUTING_SIGMOID_TOPK: return "sigmoid_topk";
    case MOE_ROUTING_DEEPSEEK_V3: return "deepseek_v3";
    case MOE_ROUTING_GROUPED_SOFTMAX: return "grouped_softmax";
    case MOE_ROUTING_LLAMA4: return "llama4";
  }
  return "?";
}

moe_router_config_t make_cfg(int method, int E, int k, int n_group = 1, int topk_group = 1) {
  moe_router_config_t c;
  c.struct_size = uint32_t(sizeof(c));
  REQUIRE(moe_router_config_default(&c, method) == MOE_STATUS_SUCCESS);
  c.num_experts = E;
  c.top_k = k;
  c.n_group = n_group;
  c.topk_group = topk_group;
  return c;
}

// Largest config of a method that the tests use on random data.
moe_router_config_t random_cfg(int method, int E) {
  switch (method) {
    case MOE_ROUTING_DEEPSEEK_V3: return make_cfg(method, E, 8, 8, 4);
    case MOE_ROUTING_GROUPED_SOFTMAX: return make_cfg(method, E, 6, 8, 3);
    case MOE_ROUTING_LLAMA4: return make_cfg(method, E, 1);
    default: return make_cfg(method, E, 8);
  }
}

struct Router {
  moe_router_t h = nullptr;
  explicit Router(const moe_router_config_t& c) { MOE_CHECK_OK(moe_router_create(&c, &h)); }
  ~Router() { moe_router_destroy(h); }
  Router(const Router&) = delete;
  Router& operator=(const Router&) = delete;
};

struct Routed {
  HostTensor ids, w;
  Routed(int64_t T, int cols) : ids(DT::i32, {T, cols}), w(DT::f32, {T, cols}) {}
  int id(int64_t t, int j) const { return ids.as<int32_t>()[t * ids.shape[1] + j]; }
  double weight(int64_t t, int j) const { return w.as<float>()[t * w.shape[1] + j]; }
};

int columns(const moe_router_config_t& c) { return c.top_k + c.num_fused_shared_experts; }

// Routes through the public API into freshly poisoned outputs.
void route(const moe_router_config_t& cfg, HostTensor& logits, HostTensor* bias,
           HostTensor* valid, Routed& out) {
  Router r(cfg);
  out.ids.poison();
  out.w.poison();
  MOE_CHECK_OK(moe_router_run(r.h, logits.dl(), bias ? bias->dl() : nullptr,
                              valid ? valid->dl() : nullptr, out.ids.dl(), out.w.dl(), nullptr));
}

// Sets every element (rounded to the tensor's dtype); v holds numel values.
void set_all(HostTensor& t, const std::vector<double>& v) {
  REQUIRE(int64_t(v.size()) == t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, v[size_t(i)]);
}

bool f32_bits_equal(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

bool is_grouped(int m) { return m == MOE_ROUTING_DEEPSEEK_V3 || m == MOE_ROUTING_GROUPED_SOFTMAX; }
bool takes_bias(int m) { return m == MOE_ROUTING_SIGMOID_TOPK || m == MOE_ROUTING_DEEPSEEK_V3; }

std::vector<double> values(const HostTensor& t) {
  std::vector<double> v(size_t(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[size_t(i)] = t.get(i);
  return v;
}

// One row of hand-worked logits: the routed ids and weights must be these.
void check_row(const moe_router_config_t& cfg, DT dt, const std::vector<double>& z,
               const std::vector<double>* bias, const std::vector<int>& want_ids,
               const std::vector<double>& want_w) {
  HostTensor logits(dt, {1, cfg.num_experts});
  set_all(logits, z);
  HostTensor b(DT::f32, {cfg.num_experts});
  if (bias) set_all(b, *bias);
  Routed out(1, columns(cfg));
  route(cfg, logits, bias ? &b : nullptr, nullptr, out);
  for (size_t j = 0; j < want_ids.size(); ++j) {
    INFO("slot ", j);
    CHECK(out.id(0, int(j)) == want_ids[j]);
    CHECK(out.weight(0, int(j)) == doctest::Approx(want_w[j]).epsilon(1e-5));
  }
}

// Rows whose decisive keys are closer than this may flip in f32 (see ref_router.h).
constexpr double kNearTie = 4e-6;

// Routes random-ish logits and compares with the float64 reference: ids
// exactly, weights with rel error < 1e-5 for every dtype (the inputs are the
// same rounded values, so only the f32 arithmetic differs).
void check_against_ref(const moe_router_config_t& cfg, HostTensor& logits, HostTensor* bias,
                       int64_t valid = -1) {
  const int64_t T = logits.shape[0];
  const int C = columns(cfg);
  HostTensor valid_t(DT::i32, {1});
  if (valid >= 0) valid_t.as<int32_t>()[0] = int32_t(valid);
  Routed out(T, C);
  route(cfg, logits, bias, valid >= 0 ? &valid_t : nullptr, out);

  std::vector<double> bias_v = bias ? values(*bias) : std::vector<double>();
  std::vector<int> rid;
  std::vector<double> rw, margin;
  ref_route(ref_router_cfg(cfg), values(logits), T, bias ? bias_v.data() : nullptr,
            valid >= 0 ? valid : T, rid, rw, &margin);

  int64_t skipped = 0, mismatches = 0, first_bad = -1;
  std::vector<double> got, want;
  for (int64_t t = 0; t < T; ++t) {
    if (margin[size_t(t)] < kNearTie) {
      ++skipped;
      for (int j = 0; j < C; ++j) {
        CHECK(out.id(t, j) >= -1);
        CHECK(out.id(t, j) < cfg.num_experts + cfg.num_fused_shared_experts);
        CHECK(std::isfinite(out.weight(t, j)));
      }
      continue;
    }
    for (int j = 0; j < C; ++j) {
      if (out.id(t, j) != rid[size_t(t * C + j)]) {
        ++mismatches;
        if (first_bad < 0) first_bad = t;
      }
      got.push_back(out.weight(t, j));
      want.push_back(rw[size_t(t * C + j)]);
    }
  }
  INFO("method ", method_name(cfg.method), ", dtype ", dt_name(logits.dtype), ", T ", T,
       ", first mismatching row ", first_bad);
  CHECK(mismatches == 0);
  CHECK(rel_error(got, want) < 1e-5);
  CHECK(skipped <= T / 20 + 1);
}

void check_random(int method, bool renormalize, bool with_bias) {
  auto rng = fresh_rng();
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      moe_router_config_t cfg = random_cfg(method, 64);
      cfg.renormalize = renormalize;
      HostTensor logits(dt, {200, 64});
      logits.fill_normal(rng, 1.5);
      HostTensor bias(DT::f32, {64});
      bias.fill_normal(rng, 0.2);  // both signs, comparable to sigmoid gaps
      check_against_ref(cfg, logits, with_bias ? &bias : nullptr);
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Hand-worked cases
// ---------------------------------------------------------------------------

TEST_CASE("router.softmax_topk.hand") {
  // z = [1, 2, 3, 0]: p = e^z / 31.19287 -> p3 = 0.6439143, p2 = 0.2368828;
  // renormalized top-2 = sigmoid(+-1).
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      auto cfg = make_cfg(MOE_ROUTING_SOFTMAX_TOPK, 4, 2);
      check_row(cfg, dt, {1, 2, 3, 0}, nullptr, {2, 1}, {0.6439143, 0.2368828});
      cfg.renormalize = 1;
      check_row(cfg, dt, {1, 2, 3, 0}, nullptr, {2, 1}, {0.7310586, 0.2689414});
    }
  }
}

TEST_CASE("router.topk_softmax.hand") {
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      // topk(z) = {3, 2}; softmax([3, 2]) = sigmoid(+-1), whatever the other logits.
      auto cfg = make_cfg(MOE_ROUTING_TOPK_SOFTMAX, 4, 2);
      check_row(cfg, dt, {1, 2, 3, 0}, nullptr, {2, 1}, {0.7310586, 0.2689414});
      check_row(cfg, dt, {-8, 2, 3, 1.5}, nullptr, {2, 1}, {0.7310586, 0.2689414});
    }
  }
}

TEST_CASE("router.sigmoid_topk.hand") {
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      auto cfg = make_cfg(MOE_ROUTING_SIGMOID_TOPK, 4, 2);
      const std::vector<double> z = {0, 1, -1, 2};
      check_row(cfg, dt, z, nullptr, {3, 1}, {0.8807971, 0.7310586});
      cfg.renormalize = 1;
      check_row(cfg, dt, z, nullptr, {3, 1}, {0.5464491, 0.4535509});
      // sigmoid(20) and sigmoid(25) are both 1.0f: without a bias the key is z,
      // so the larger logit wins (exact top-k of the exact s); renormalized.
      check_row(cfg, dt, {20, 25, 0, 0}, nullptr, {1, 0}, {0.5, 0.5});
      // c = s + b = [0.5, 0.731, 0.769, 0.381]: the bias selects, s weights.
      cfg.renormalize = 0;
      const std::vector<double> b = {0, 0, 0.5, -0.5};
      check_row(cfg, dt, z, &b, {2, 1}, {0.2689414, 0.7310586});
    }
  }
}

TEST_CASE("router.deepseek_v3.hand") {
  // s = sigmoid(z), c = s + b = [.822 .378 | .431 .600 | .481 .369 | .574 .218]
  // group scores (top-2 sums) = [1.200, 1.031, 0.850, 0.792]: keep groups 0, 1;
  // top-3 c there = experts 0, 3, 2 (expert 6, c = .574, is in a dropped group).
  // weights = s / sum(s) * 2.5 with s = [0.622459, 0.5, 0.731059].
  const std::vector<double> z = {0.5, -0.5, 1.0, 0.0, 2.0, -1.0, 0.3, 1.5};
  const std::vector<double> b = {0.2, 0.0, -0.3, 0.1, -0.4, 0.1, 0.0, -0.6};
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      auto cfg = make_cfg(MOE_ROUTING_DEEPSEEK_V3, 8, 3, 4, 2);
      cfg.routed_scaling_factor = 2.5f;
      check_row(cfg, dt, z, &b, {0, 3, 2}, {0.8395648, 0.6743933, 0.9860420});
      cfg.renormalize = 0;
      check_row(cfg, dt, z, &b, {0, 3, 2}, {0.6224593 * 2.5, 0.5 * 2.5, 0.7310586 * 2.5});
    }
  }
}

TEST_CASE("router.grouped_softmax.hand") {
  // p = softmax([3, -5, 2.5, 2.375, 0, 0]) = [.44609 .00015 .27057 .23877 .02221 .02221];
  // group maxima = [3, 2.5, 0].
  const std::vector<double> z = {3, -5, 2.5, 2.375, 0, 0};
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      auto cfg = make_cfg(MOE_ROUTING_GROUPED_SOFTMAX, 6, 2, 3, 1);
      check_row(cfg, dt, z, nullptr, {0, 1}, {0.4460897, 0.0001496});
      cfg = make_cfg(MOE_ROUTING_GROUPED_SOFTMAX, 6, 2, 3, 2);
      check_row(cfg, dt, z, nullptr, {0, 2}, {0.4460897, 0.2705671});
      cfg.renormalize = 1;
      cfg.routed_scaling_factor = 2.0f;
      check_row(cfg, dt, z, nullptr, {0, 2}, {2 * 0.6224593, 2 * 0.3775407});
    }
  }
}

TEST_CASE("router.llama4.hand") {
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      // argmax ties between experts 1 and 3: the lower index wins.
      auto cfg = make_cfg(MOE_ROUTING_LLAMA4, 4, 1);
      check_row(cfg, dt, {0.25, 1.5, -3, 1.5}, nullptr, {1}, {0.8175745});
    }
  }
}

// ---------------------------------------------------------------------------
// Random data against the float64 reference
// ---------------------------------------------------------------------------

TEST_CASE("router.softmax_topk.random") {
  SUBCASE("plain") { check_random(MOE_ROUTING_SOFTMAX_TOPK, false, false); }
  SUBCASE("renormalize") { check_random(MOE_ROUTING_SOFTMAX_TOPK, true, false); }
}

TEST_CASE("router.topk_softmax.random") { check_random(MOE_ROUTING_TOPK_SOFTMAX, false, false); }

TEST_CASE("router.sigmoid_topk.random") {
  SUBCASE("plain") { check_random(MOE_ROUTING_SIGMOID_TOPK, false, false); }
  SUBCASE("renormalize") { check_random(MOE_ROUTING_SIGMOID_TOPK, true, false); }
  SUBCASE("bias") { check_random(MOE_ROUTING_SIGMOID_TOPK, false, true); }
  SUBCASE("bias_renormalize") { check_random(MOE_ROUTING_SIGMOID_TOPK, true, true); }
}

TEST_CASE("router.deepseek_v3.random") {
  SUBCASE("bias") { check_random(MOE_ROUTING_DEEPSEEK_V3, true, true); }
  SUBCASE("no_bias") { check_random(MOE_ROUTING_DEEPSEEK_V3, true, false); }
  SUBCASE("no_renormalize") { check_random(MOE_ROUTING_DEEPSEEK_V3, false, true); }
}

TEST_CASE("router.grouped_softmax.random") {
  SUBCASE("plain") { check_random(MOE_ROUTING_GROUPED_SOFTMAX, false, false); }
  SUBCASE("renormalize") { check_random(MOE_ROUTING_GROUPED_SOFTMAX, true, false); }
}

TEST_CASE("router.llama4.random") { check_random(MOE_ROUTING_LLAMA4, false, false); }

TEST_CASE("router.deepseek_v3.group_size_one") {
  // E == n_group: each group scores its single c.
  auto rng = fresh_rng();
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      auto cfg = make_cfg(MOE_ROUTING_DEEPSEEK_V3, 32, 4, 32, 6);
      HostTensor logits(dt, {100, 32});
      logits.fill_normal(rng, 1.5);
      HostTensor bias(DT::f32, {32});
      bias.fill_normal(rng, 0.2);
      check_against_ref(cfg, logits, &bias);
    }
  }
}

TEST_CASE("router.deepseek_v3.production_shape") {
  // DeepSeek-V3: E = 256, 8 groups, 4 kept, k = 8, factor 2.5, with fused shared.
  auto rng = fresh_rng();
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      auto cfg = make_cfg(MOE_ROUTING_DEEPSEEK_V3, 256, 8, 8, 4);
      cfg.routed_scaling_factor = 2.5f;
      cfg.num_fused_shared_experts = 1;
      HostTensor logits(dt, {300, 256});
      logits.fill_normal(rng, 2.0);
      HostTensor bias(DT::f32, {256});
      bias.fill_normal(rng, 0.5);
      check_against_ref(cfg, logits, &bias);
    }
  }
}

// ---------------------------------------------------------------------------
// Ties, NaN, infinities
// ---------------------------------------------------------------------------

TEST_CASE("router.ties.lower_index") {
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      for (int m : kMethods) {
        CAPTURE(method_name(m));
        int k = m == MOE_ROUTING_LLAMA4 ? 1 : 3;
        bool grouped = is_grouped(m);
        auto cfg = make_cfg(m, 8, k, grouped ? 4 : 1, grouped ? 2 : 1);
        // Equal logits everywhere: experts 0, 1, 2 in order.
        HostTensor logits(dt, {1, 8});
        set_all(logits, std::vector<double>(8, 0.75));
        Routed out(1, k);
        route(cfg, logits, nullptr, nullptr, out);
        for (int j = 0; j < k; ++j) CHECK(out.id(0, j) == j);
        // Equal maxima at 2 and 5 above the rest: 2 first.
        HostTensor l2(dt, {1, 8});
        set_all(l2, {0, 0.5, 1, 0, 0, 1, 0.5, 0});
        route(cfg, l2, nullptr, nullptr, out);
        CHECK(out.id(0, 0) == 2);
        if (k > 1) CHECK(out.id(0, 1) == 5);
      }
    }
  }
}

TEST_CASE("router.ties.lower_group") {
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      // Groups 1 and 2 tie (sums 2 + 0 and 0 + 2 are equal in any order of
      // addition) above group 0 and 3: group 1 is kept, so ids are 2 then 3.
      auto cfg = make_cfg(MOE_ROUTING_DEEPSEEK_V3, 8, 2, 4, 1);
      HostTensor logits(dt, {1, 8});
        set_all(logits, {-1, -1, 2, 0, 0, 2, -1, -1});
      Routed out(1, 2);
      route(cfg, logits, nullptr, nullptr, out);
      CHECK(out.id(0, 0) == 2);
      CHECK(out.id(0, 1) == 3);
      // DeepSeek-V2: equal group maxima, group 1 wins.
      cfg = make_cfg(MOE_ROUTING_GROUPED_SOFTMAX, 8, 2, 4, 1);
      route(cfg, logits, nullptr, nullptr, out);
      CHECK(out.id(0, 0) == 2);
      CHECK(out.id(0, 1) == 3);
    }
  }
}

TEST_CASE("router.nan_and_inf") {
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      for (int m : kMethods) {
        CAPTURE(method_name(m));
        bool grouped = is_grouped(m);
        int k = m == MOE_ROUTING_LLAMA4 ? 1 : 3;
        auto cfg = make_cfg(m, 8, k, grouped ? 2 : 1, grouped ? 2 : 1);
        // NaN and -inf are never selected, even where they sit first.
        HostTensor logits(dt, {1, 8});
        set_all(logits, {kNaN, -kInf, 1, kNaN, 0.5, -kInf, 2, 0});
        Routed out(1, k);
        route(cfg, logits, nullptr, nullptr, out);
        const int want[] = {6, 2, 4};
        for (int j = 0; j < k; ++j) {
          CHECK(out.id(0, j) == want[j]);
          CHECK(std::isfinite(out.weight(0, j)));
        }
        check_against_ref(cfg, logits, nullptr);
        // +inf is the largest value: selected, lower index first on ties.
        HostTensor inf(dt, {1, 8});
        set_all(inf, {0, kInf, 1, kInf, kNaN, 3, -kInf, 2});
        route(cfg, inf, nullptr, nullptr, out);
        CHECK(out.id(0, 0) == 1);
        if (k > 1) {
          CHECK(out.id(0, 1) == 3);
          CHECK(out.id(0, 2) == 5);
        }
        for (int j = 0; j < k; ++j) CHECK(std::isfinite(out.weight(0, j)));
        check_against_ref(cfg, inf, nullptr);
      }
    }
  }
}

TEST_CASE("router.inf_softmax_limit") {
  // Softmax with +inf logits takes the limit: the +inf entries share the mass.
  auto cfg = make_cfg(MOE_ROUTING_SOFTMAX_TOPK, 6, 3);
  check_row(cfg, DT::f32, {0, kInf, 1, kInf, 5, 2}, nullptr, {1, 3, 4}, {0.5, 0.5, 0.0});
  cfg = make_cfg(MOE_ROUTING_TOPK_SOFTMAX, 6, 3);
  check_row(cfg, DT::f32, {0, kInf, 1, kInf, 5, 2}, nullptr, {1, 3, 4}, {0.5, 0.5, 0.0});
  cfg = make_cfg(MOE_ROUTING_SIGMOID_TOPK, 6, 2);
  check_row(cfg, DT::f32, {0, kInf, 1, 3, 5, 2}, nullptr, {1, 4}, {1.0, 0.9933071});
}

TEST_CASE("router.all_nan_row") {
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      for (int m : kMethods) {
        CAPTURE(method_name(m));
        bool grouped = is_grouped(m);
        int k = m == MOE_ROUTING_LLAMA4 ? 1 : 4;
        auto cfg = make_cfg(m, 8, k, grouped ? 4 : 1, grouped ? 2 : 1);
        cfg.renormalize = 1;
        // Row 0 all NaN, row 1 all -inf, row 2 mixed NaN / -inf, row 3 normal.
        std::vector<double> z(32, kNaN);
        for (int e = 8; e < 16; ++e) z[size_t(e)] = -kInf;
        for (int e = 16; e < 24; ++e) z[size_t(e)] = (e % 2) ? kNaN : -kInf;
        for (int e = 24; e < 32; ++e) z[size_t(e)] = 0.1 * e;
        HostTensor logits(dt, {4, 8});
        set_all(logits, z);
        HostTensor bias(DT::f32, {8});
        set_all(bias, std::vector<double>(8, 0.25));
        Routed out(4, k);
        bool biased = takes_bias(m);
        route(cfg, logits, biased ? &bias : nullptr, nullptr, out);
        for (int t = 0; t < 3; ++t)
          for (int j = 0; j < k; ++j) {
            CHECK(out.id(t, j) == -1);
            CHECK(out.weight(t, j) == 0.0);
          }
        for (int j = 0; j < k; ++j) CHECK(out.id(3, j) >= 0);
      }
    }
  }
}

TEST_CASE("router.fewer_than_k_finite") {
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      for (int m : kMethods) {
        if (m == MOE_ROUTING_LLAMA4) continue;  // k = 1
        CAPTURE(method_name(m));
        bool grouped = is_grouped(m);
        auto cfg = make_cfg(m, 8, 4, grouped ? 2 : 1, grouped ? 2 : 1);
        cfg.renormalize = 1;
        cfg.num_fused_shared_experts = 1;
        HostTensor logits(dt, {1, 8});
        set_all(logits, {kNaN, -kInf, 0.5, kNaN, -kInf, -kInf, -1.0, kNaN});
        Routed out(1, 5);
        route(cfg, logits, nullptr, nullptr, out);
        CHECK(out.id(0, 0) == 2);
        CHECK(out.id(0, 1) == 6);
        CHECK(out.id(0, 2) == -1);
        CHECK(out.id(0, 3) == -1);
        CHECK(out.weight(0, 2) == 0.0);
        CHECK(out.weight(0, 3) == 0.0);
        CHECK(out.id(0, 4) == 8);  // the shared column stays
        CHECK(out.weight(0, 4) == 1.0);
        check_against_ref(cfg, logits, nullptr);
      }
    }
  }
}

TEST_CASE("router.deepseek_v3.nan_groups") {
  // Groups 0 and 2 are all NaN; groups 1 and 3 have finite experts with very
  // negative c. The NaN groups are never kept, whatever the bias.
  // c: 2 -> -3.88, 3 -> -3.95, 6 -> -5.73; expert 7 is NaN.
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      auto cfg = make_cfg(MOE_ROUTING_DEEPSEEK_V3, 8, 3, 4, 2);
      HostTensor logits(dt, {1, 8});
      set_all(logits, {kNaN, kNaN, -2, -3, kNaN, kNaN, -1, kNaN});
      HostTensor bias(DT::f32, {8});
      set_all(bias, {5, 5, -4, -4, 5, 5, -6, -6});
      Routed out(1, 3);
      route(cfg, logits, &bias, nullptr, out);
      CHECK(out.id(0, 0) == 2);
      CHECK(out.id(0, 1) == 3);
      CHECK(out.id(0, 2) == 6);
      for (int j = 0; j < 3; ++j) CHECK(std::isfinite(out.weight(0, j)));
      check_against_ref(cfg, logits, &bias);
      // One group kept: group 3 has a single selectable expert, so its top-2
      // sum is -inf and group 1 (sum -7.83) wins over its lone -5.73.
      cfg = make_cfg(MOE_ROUTING_DEEPSEEK_V3, 8, 2, 4, 1);
      Routed one(1, 2);
      route(cfg, logits, &bias, nullptr, one);
      CHECK(one.id(0, 0) == 2);
      CHECK(one.id(0, 1) == 3);
      check_against_ref(cfg, logits, &bias);
      // Only group 3 has anything: its single expert is still selected.
      set_all(logits, {kNaN, kNaN, kNaN, kNaN, kNaN, kNaN, -1, kNaN});
      route(cfg, logits, &bias, nullptr, one);
      CHECK(one.id(0, 0) == 6);
      CHECK(one.id(0, 1) == -1);
      CHECK(one.weight(0, 1) == 0.0);
    }
  }
}

TEST_CASE("router.deepseek_v3.negative_bias") {
  // All c are negative. Masking the dropped groups to 0 (instead of -inf)
  // would let their experts beat every expert of the kept group.
  auto rng = fresh_rng();
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      auto cfg = make_cfg(MOE_ROUTING_DEEPSEEK_V3, 8, 2, 4, 1);
      HostTensor logits(dt, {1, 8});
        set_all(logits, {0, 0, 1, 1, 0, 0, 0, 0});
      HostTensor bias(DT::f32, {8});
        set_all(bias, {-3, -3, -2, -2.5, -3, -3, -3, -3});
      Routed out(1, 2);
      route(cfg, logits, &bias, nullptr, out);
      CHECK(out.id(0, 0) == 2);
      CHECK(out.id(0, 1) == 3);
      // And on random data with strongly negative biases.
      auto big = make_cfg(MOE_ROUTING_DEEPSEEK_V3, 64, 8, 8, 2);
      HostTensor l(dt, {128, 64});
      l.fill_normal(rng, 1.0);
      HostTensor b(DT::f32, {64});
      b.fill_uniform(rng, -4.0, -1.0);
      check_against_ref(big, l, &b);
      Routed o(128, 8);
      route(big, l, &b, nullptr, o);
      for (int64_t t = 0; t < 128; ++t) {
        // The 8 ids come from exactly 2 groups of 8.
        std::vector<int> groups;
        for (int j = 0; j < 8; ++j) groups.push_back(o.id(t, j) / 8);
        std::sort(groups.begin(), groups.end());
        CHECK(std::unique(groups.begin(), groups.end()) - groups.begin() <= 2);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Batching, padding, scaling, shared experts, precision
// ---------------------------------------------------------------------------

TEST_CASE("router.num_valid_tokens") {
  auto rng = fresh_rng();
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      for (int m : kMethods) {
        CAPTURE(method_name(m));
        auto cfg = random_cfg(m, 64);
        cfg.num_fused_shared_experts = 2;
        HostTensor logits(dt, {150, 64});
        logits.fill_normal(rng);
        for (int64_t valid : {int64_t(0), int64_t(1), int64_t(97), int64_t(150), int64_t(400)}) {
          CAPTURE(valid);
          check_against_ref(cfg, logits, nullptr, valid);
          HostTensor v(DT::i32, {1});
          v.as<int32_t>()[0] = int32_t(valid);
          Routed out(150, columns(cfg));
          route(cfg, logits, nullptr, &v, out);
          for (int64_t t = std::min<int64_t>(valid, 150); t < 150; ++t)
            for (int j = 0; j < columns(cfg); ++j) {
              CHECK(out.id(t, j) == -1);
              CHECK(out.weight(t, j) == 0.0);
            }
        }
      }
    }
  }
}

TEST_CASE("router.batch_independent") {
  // A row routes bit-identically alone and at any position of a batch large
  // enough to be split over threads.
  auto rng = fresh_rng();
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      for (int m : kMethods) {
        CAPTURE(method_name(m));
        auto cfg = random_cfg(m, 64);
        const int C = columns(cfg);
        HostTensor row(dt, {1, 64});
        row.fill_normal(rng);
        HostTensor bias(DT::f32, {64});
        bias.fill_normal(rng, 0.2);
        bool biased = takes_bias(m);
        Routed alone(1, C);
        route(cfg, row, biased ? &bias : nullptr, nullptr, alone);
        for (int64_t pos : {int64_t(0), int64_t(137), int64_t(299)}) {
          CAPTURE(pos);
          HostTensor batch(dt, {300, 64});
          batch.fill_normal(rng);
          const size_t rb = 64 * dt_bytes(dt);
          std::memcpy(batch.as<unsigned char>() + pos * rb, row.data(), rb);
          Routed out(300, C);
          route(cfg, batch, biased ? &bias : nullptr, nullptr, out);
          for (int j = 0; j < C; ++j) {
            CHECK(out.id(pos, j) == alone.id(0, j));
            CHECK(f32_bits_equal(out.w.as<float>()[pos * C + j], alone.w.as<float>()[j]));
          }
        }
      }
    }
  }
}

TEST_CASE("router.weight_scale") {
  // The factor multiplies the routed weights of every method, or moves to the
  // output (scaling_on_output) and then shared columns carry 1/factor.
  auto rng = fresh_rng();
  for (int m : kMethods) {
    CAPTURE(method_name(m));
    for (int on_output : {0, 1}) {
      CAPTURE(on_output);
      auto cfg = random_cfg(m, 64);
      cfg.routed_scaling_factor = 2.5f;
      cfg.scaling_on_output = on_output;
      cfg.num_fused_shared_experts = 1;
      HostTensor logits(DT::f32, {100, 64});
      logits.fill_normal(rng);
      check_against_ref(cfg, logits, nullptr);

      auto plain = random_cfg(m, 64);
      Routed a(100, columns(cfg)), b(100, columns(plain));
      route(cfg, logits, nullptr, nullptr, a);
      route(plain, logits, nullptr, nullptr, b);
      for (int64_t t = 0; t < 100; ++t) {
        for (int j = 0; j < plain.top_k; ++j) {
          CHECK(a.id(t, j) == b.id(t, j));
          double want = on_output ? b.weight(t, j) : 2.5 * b.weight(t, j);
          CHECK(a.weight(t, j) == doctest::Approx(want).epsilon(1e-6));
        }
        CHECK(a.id(t, plain.top_k) == 64);
        CHECK(a.weight(t, plain.top_k) == doctest::Approx(on_output ? 0.4 : 1.0).epsilon(1e-7));
      }
    }
  }
}

TEST_CASE("router.fused_shared_experts") {
  auto rng = fresh_rng();
  for (int m : kMethods) {
    CAPTURE(method_name(m));
    auto cfg = random_cfg(m, 64);
    cfg.num_fused_shared_experts = 3;
    int32_t cols = 0;
    {
      Router r(cfg);
      MOE_CHECK_OK(moe_router_output_columns(r.h, &cols));
    }
    CHECK(cols == cfg.top_k + 3);
    HostTensor logits(DT::bf16, {70, 64});
    logits.fill_normal(rng);
    check_against_ref(cfg, logits, nullptr);
    Routed out(70, cols);
    route(cfg, logits, nullptr, nullptr, out);
    for (int64_t t = 0; t < 70; ++t)
      for (int j = 0; j < 3; ++j) {
        CHECK(out.id(t, cfg.top_k + j) == 64 + j);
        CHECK(out.weight(t, cfg.top_k + j) == 1.0);
      }
  }
}

TEST_CASE("router.f32_logits_below_bf16_precision") {
  // Seed-003: experts 4 and 5 (same group) have f32 logits 1.0 and 1.0001,
  // which round to the same bf16 (1.0). Routing on rounded values (or on
  // bf16-rounded c = s + bias) would tie and pick 4; the f32 values pick 5,
  // in every method.
  const std::vector<double> z = {0, -1, 0.5, 0.25, 1.0, 1.0001, -2, -0.5};
  REQUIRE(f32_to_bf16(float(z[4])) == f32_to_bf16(float(z[5])));
  for (int m : kMethods) {
    CAPTURE(method_name(m));
    auto cfg = make_cfg(m, 8, 1, is_grouped(m) ? 2 : 1, 1);
    HostTensor bias(DT::f32, {8});
    set_all(bias, std::vector<double>(8, 0.125));
    HostTensor* b = takes_bias(m) ? &bias : nullptr;
    HostTensor logits(DT::f32, {1, 8});
    set_all(logits, z);
    Routed out(1, 1);
    route(cfg, logits, b, nullptr, out);
    CHECK(out.id(0, 0) == 5);
    // The same logits given as bf16 are a genuine tie: the lower index wins.
    HostTensor lb(DT::bf16, {1, 8});
    set_all(lb, z);
    route(cfg, lb, b, nullptr, out);
    CHECK(out.id(0, 0) == 4);
  }
}

// ---------------------------------------------------------------------------
// Packed format
// ---------------------------------------------------------------------------

TEST_CASE("router.pack.minus_one_and_round_trip") {
  auto rng = fresh_rng();
  const int64_t T = 37, k = 5;
  HostTensor ids(DT::i32, {T, k}), w(DT::f32, {T, k}), packed(DT::i32, {T, k});
  std::uniform_int_distribution<int> pick(-1, 32767);
  for (int64_t i = 0; i < T * k; ++i) ids.as<int32_t>()[i] = i % 4 == 0 ? -1 : pick(rng);
  ids.as<int32_t>()[1] = 0;
  ids.as<int32_t>()[2] = 32767;
  w.fill_uniform(rng, -3.0, 3.0);
  packed.poison();
  MOE_CHECK_OK(moe_pack_topk(ids.dl(), w.dl(), packed.dl(), nullptr));
  for (int64_t i = 0; i < T * k; ++i) {
    const uint32_t p = uint32_t(packed.as<int32_t>()[i]);
    const int32_t id = ids.as<int32_t>()[i];
    const float wi = w.as<float>()[i];
    CAPTURE(i);
    CHECK(int16_t(uint16_t(p >> 16)) == id);
    if (id == -1) CHECK((p >> 16) == 0xFFFFu);
    CHECK(uint16_t(p & 0xFFFFu) == f32_to_bf16(wi));
    CHECK(bf16_to_f32(uint16_t(p & 0xFFFFu)) == doctest::Approx(wi).epsilon(1.0 / 256));
  }
}

TEST_CASE("router.pack.from_router") {
  // Route with padding and fewer-than-k rows, then pack: -1 stays -1.
  auto cfg = make_cfg(MOE_ROUTING_SOFTMAX_TOPK, 8, 3);
  HostTensor logits(DT::f32, {3, 8});
        set_all(logits, {0, 1, 2, 3, 4, 5, 6, 7,
       kNaN, kNaN, 1, kNaN, kNaN, kNaN, kNaN, kNaN,
       7, 6, 5, 4, 3, 2, 1, 0});
  HostTensor valid(DT::i32, {1});
  valid.as<int32_t>()[0] = 2;
  Routed out(3, 3);
  route(cfg, logits, nullptr, &valid, out);
  HostTensor packed(DT::i32, {3, 3});
  packed.poison();
  MOE_CHECK_OK(moe_pack_topk(out.ids.dl(), out.w.dl(), packed.dl(), nullptr));
  const int32_t* p = packed.as<int32_t>();
  CHECK((uint32_t(p[0]) >> 16) == 7u);
  CHECK((uint32_t(p[3]) >> 16) == 2u);
  for (int i : {4, 5, 6, 7, 8}) {
    CAPTURE(i);
    CHECK(uint32_t(p[i]) == 0xFFFF0000u);  // id -1, weight +0
  }
}

TEST_CASE("router.pack.rejects_wide_ids") {
  HostTensor ids(DT::i32, {1, 2}), w(DT::f32, {1, 2}), packed(DT::i32, {1, 2});
  ids.as<int32_t>()[0] = 3;
  ids.as<int32_t>()[1] = 40000;
  moe_status_t st = moe_pack_topk(ids.dl(), w.dl(), packed.dl(), nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"topk_ids", "40000"});
}
