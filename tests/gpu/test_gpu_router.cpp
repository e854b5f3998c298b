// CUDA router and pack vs the CPU backend, through the public API: ids
// identical (rows whose computed keys nearly tie are skipped, see
// ref_router.h), weights within 1e-6 relative, every method x logits dtype.
#include <cmath>
#include <limits>

#include "gpu_support.h"
#include "ref_router.h"

using namespace moe_test;

namespace {

struct Router {
  moe_router_t h = nullptr;
  explicit Router(const moe_router_config_t& c) { MOE_CHECK_OK(moe_router_create(&c, &h)); }
  ~Router() { moe_router_destroy(h); }
};

struct Case {
  const char* name;
  int method, E, k, n_group, topk_group;
  bool renormalize, bias;
  float scale;
  int n_shared;
  bool scaling_on_output;
};

const Case kCases[] = {
    {"softmax_topk", MOE_ROUTING_SOFTMAX_TOPK, 128, 8, 1, 1, false, false, 1.0f, 0, false},
    {"softmax_topk.renorm.shared", MOE_ROUTING_SOFTMAX_TOPK, 60, 4, 1, 1, true, false, 1.0f, 1, false},
    {"topk_softmax", MOE_ROUTING_TOPK_SOFTMAX, 64, 4, 1, 1, false, false, 1.0f, 0, false},
    {"sigmoid_topk.bias", MOE_ROUTING_SIGMOID_TOPK, 128, 8, 1, 1, true, true, 1.0f, 0, false},
    {"sigmoid_topk.nobias", MOE_ROUTING_SIGMOID_TOPK, 40, 3, 1, 1, false, false, 1.0f, 0, false},
    {"deepseek_v3", MOE_ROUTING_DEEPSEEK_V3, 256, 8, 8, 4, true, true, 2.5f, 1, false},
    {"deepseek_v3.e512", MOE_ROUTING_DEEPSEEK_V3, 512, 16, 16, 8, true, true, 1.5f, 0, true},
    // More shapes of the DEEPSEEK_V3 register path (E = 32 * V, 32 % n_group == 0).
    {"deepseek_v3.e384.ungrouped", MOE_ROUTING_DEEPSEEK_V3, 384, 8, 1, 1, true, true, 2.827f, 0, false},
    {"deepseek_v3.e160.ungrouped", MOE_ROUTING_DEEPSEEK_V3, 160, 8, 1, 1, true, true, 2.5f, 1, false},
    {"deepseek_v3.e128.g32", MOE_ROUTING_DEEPSEEK_V3, 128, 6, 32, 3, false, true, 1.0f, 0, false},
    {"deepseek_v3.e64.g2", MOE_ROUTING_DEEPSEEK_V3, 64, 4, 2, 1, true, true, 1.0f, 2, false},
    // Falls back to the shared-memory kernel (groups of 4 split a lane's 8 experts).
    {"deepseek_v3.e256.g64", MOE_ROUTING_DEEPSEEK_V3, 256, 8, 64, 8, true, true, 2.5f, 0, false},
    {"grouped_softmax", MOE_ROUTING_GROUPED_SOFTMAX, 160, 6, 8, 3, true, false, 16.0f, 2, false},
    {"llama4", MOE_ROUTING_LLAMA4, 16, 1, 1, 1, false, false, 1.0f, 0, false},
    // Scores of one token exceed 48 KB of shared memory: the opt-in path.
    {"softmax_topk.e20000", MOE_ROUTING_SOFTMAX_TOPK, 20000, 4, 1, 1, true, false, 1.0f, 0, false},
};

const DT kLogitTypes[] = {DT::f32, DT::bf16, DT::f16};

moe_router_config_t make_cfg(const Case& c) {
  moe_router_config_t cfg;
  cfg.struct_size = uint32_t(sizeof(cfg));
  REQUIRE(moe_router_config_default(&cfg, c.method) == MOE_STATUS_SUCCESS);
  cfg.num_experts = c.E;
  cfg.top_k = c.k;
  cfg.n_group = c.n_group;
  cfg.topk_group = c.topk_group;
  cfg.renormalize = c.renormalize;
  cfg.routed_scaling_factor = c.scale;
  cfg.num_fused_shared_experts = c.n_shared;
  cfg.scaling_on_output = c.scaling_on_output;
  return cfg;
}

// Random logits with NaN, -inf and +inf sprinkled in, and a few rows with
// fewer than k selectable experts.
void fill_logits(HostTensor& z, std::mt19937_64& rng, int k, bool ties) {
  const int64_t T = z.shape[0], E = z.shape[1];
  z.fill_normal(rng, 1.5);
  if (ties) {  // small integers: many exact ties, in experts and in groups
    std::uniform_int_distribution<int> small(-2, 2);
    for (int64_t i = 0; i < z.numel(); ++i) z.set(i, small(rng));
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  std::uniform_int_distribution<int64_t> col(0, E - 1);
  for (int64_t t = 0; t < T; ++t) {
    if (t % 5 == 1) z.set(t * E + col(rng), nan);
    if (t % 7 == 2) z.set(t * E + col(rng), -inf);
    if (t % 11 == 3) z.set(t * E + col(rng), inf);
    if (t % 13 == 4) {  // only k - 1 selectable experts (k >= 2), or none
      for (int64_t e = 0; e < E; ++e) z.set(t * E + e, (e % 2) ? nan : -inf);
      for (int j = 0; j + 1 < k; ++j) z.set(t * E + col(rng), double(j));
    }
  }
}

void check_gpu_vs_cpu(const Case& c, DT dt, int64_t T, bool with_valid, bool ties = false) {
  auto rng = fresh_rng();
  const moe_router_config_t cfg = make_cfg(c);
  const int C = c.k + c.n_shared;
  Router r(cfg);
  HostTensor logits(dt, {T, c.E});
  fill_logits(logits, rng, c.k, ties);
  HostTensor bias(DT::f32, {c.E});
  bias.fill_normal(rng, 0.2);
  HostTensor valid(DT::i32, {1});
  const int64_t nvalid = with_valid ? T / 2 : T;
  valid.as<int32_t>()[0] = int32_t(nvalid);

  HostTensor cpu_ids(DT::i32, {T, C}), cpu_w(DT::f32, {T, C});
  cpu_ids.poison();
  cpu_w.poison();
  const bool use_bias = c.bias && !ties;  // ties need equal keys: no bias
  MOE_CHECK_OK(moe_router_run(r.h, logits.dl(), use_bias ? bias.dl() : nullptr,
                              with_valid ? valid.dl() : nullptr, cpu_ids.dl(), cpu_w.dl(), nullptr));

  DeviceTensor d_logits(logits), d_bias(bias), d_valid(valid);
  DeviceTensor d_ids(DT::i32, {T, C}), d_w(DT::f32, {T, C});
  d_ids.poison();
  d_w.poison();
  MOE_CHECK_OK(moe_router_run(r.h, d_logits.dl(), use_bias ? d_bias.dl() : nullptr,
                              with_valid ? d_valid.dl() : nullptr, d_ids.dl(), d_w.dl(), nullptr));
  HostTensor gpu_ids(DT::i32, {T, C}), gpu_w(DT::f32, {T, C});
  d_ids.download(gpu_ids);
  d_w.download(gpu_w);

  // Rows whose computed keys (sigmoid + bias, group sums) nearly tie may
  // legitimately differ between CPU and GPU expf: skip their ids.
  std::vector<int> rid;
  std::vector<double> rw, margin;
  std::vector<double> bias_v = values(bias);
  ref_route(ref_router_cfg(cfg), values(logits), T, use_bias ? bias_v.data() : nullptr, nvalid,
            rid, rw, &margin);
  int64_t mismatched_ids = 0, bad_weights = 0, skipped = 0, first_bad = -1;
  for (int64_t t = 0; t < T; ++t) {
    if (margin[size_t(t)] < 4e-6) {
      ++skipped;
      continue;
    }
    for (int j = 0; j < C; ++j) {
      const int64_t i = t * C + j;
      const int32_t gi = gpu_ids.as<int32_t>()[i], ci = cpu_ids.as<int32_t>()[i];
      const float gw = gpu_w.as<float>()[i], cw = cpu_w.as<float>()[i];
      if (gi != ci) {
        ++mismatched_ids;
        if (first_bad < 0) first_bad = t;
      }
      if (!(std::fabs(double(gw) - double(cw)) <= 1e-6 * std::fabs(double(cw)))) {
        ++bad_weights;
        if (first_bad < 0) first_bad = t;
      }
    }
  }
  INFO("case ", std::string(c.name), ", dtype ", std::string(dt_name(dt)), ", T ", T, ", valid ", nvalid,
       ", first bad row ", first_bad);
  if (first_bad >= 0) {
    for (int j = 0; j < C; ++j) {
      const int64_t i = first_bad * C + j;
      INFO("slot ", j, ": gpu ", gpu_ids.as<int32_t>()[i], "/", gpu_w.as<float>()[i], " cpu ",
           cpu_ids.as<int32_t>()[i], "/", cpu_w.as<float>()[i]);
      CHECK(true);
    }
  }
  CHECK(mismatched_ids == 0);
  CHECK(bad_weights == 0);
  // Integer logits make exact ties of sums of sigmoids that f32 breaks either way.
  CHECK(skipped <= (ties ? T / 2 : T / 20 + 1));

  // Packed format: identical bits.
  HostTensor cpu_packed(DT::i32, {T, C}), gpu_packed(DT::i32, {T, C});
  cpu_packed.poison();
  MOE_CHECK_OK(moe_pack_topk(cpu_ids.dl(), cpu_w.dl(), cpu_packed.dl(), nullptr));
  DeviceTensor d_cids(cpu_ids), d_cw(cpu_w), d_packed(DT::i32, {T, C});
  d_packed.poison();
  MOE_CHECK_OK(moe_pack_topk(d_cids.dl(), d_cw.dl(), d_packed.dl(), nullptr));
  d_packed.download(gpu_packed);
  int64_t pack_diff = 0;
  for (int64_t i = 0; i < T * C; ++i)
    pack_diff += gpu_packed.as<int32_t>()[i] != cpu_packed.as<int32_t>()[i];
  CHECK(pack_diff == 0);
}

}  // namespace

TEST_CASE("gpu.router.every_method_vs_cpu") {
  for (const Case& c : kCases) {
    for (DT dt : kLogitTypes) {
      SUBCASE((std::string(c.name) + "." + dt_name(dt)).c_str()) {
        for (int64_t T : {int64_t(1), int64_t(7), int64_t(64), int64_t(1000)})
          check_gpu_vs_cpu(c, dt, T, false);
      }
    }
  }
}

// The benchmark's shape (DeepSeek-V3, T = 4096): the register path on f32 and bf16 logits.
TEST_CASE("gpu.router.deepseek_v3_t4096") {
  const Case& c = kCases[5];
  REQUIRE(std::string(c.name) == "deepseek_v3");
  for (DT dt : kLogitTypes) {
    SUBCASE(dt_name(dt)) {
      check_gpu_vs_cpu(c, dt, 4096, false);
      check_gpu_vs_cpu(c, dt, 4096, true);
    }
  }
}

TEST_CASE("gpu.router.num_valid_tokens") {
  for (const Case& c : kCases) {
    SUBCASE(c.name) { check_gpu_vs_cpu(c, DT::bf16, 300, true); }
  }
}

TEST_CASE("gpu.router.ties_lower_index_wins") {
  for (const Case& c : kCases) {
    SUBCASE(c.name) { check_gpu_vs_cpu(c, DT::bf16, 200, false, /*ties=*/true); }
  }
}

TEST_CASE("gpu.router.packed_minus_one_stays") {
  HostTensor ids(DT::i32, {1, 4}), w(DT::f32, {1, 4}), packed(DT::i32, {1, 4});
  const int32_t id_v[4] = {-1, 0, 32767, 5};
  const float w_v[4] = {0.0f, 0.5f, 1.0f, -2.0f};
  for (int i = 0; i < 4; ++i) {
    ids.as<int32_t>()[i] = id_v[i];
    w.as<float>()[i] = w_v[i];
  }
  DeviceTensor d_ids(ids), d_w(w), d_packed(DT::i32, {1, 4});
  d_packed.poison();
  MOE_CHECK_OK(moe_pack_topk(d_ids.dl(), d_w.dl(), d_packed.dl(), nullptr));
  d_packed.download(packed);
  const uint32_t* p = reinterpret_cast<const uint32_t*>(packed.as<int32_t>());
  CHECK(p[0] == 0xFFFF0000u);
  CHECK(p[1] == ((0u << 16) | 0x3F00u));
  CHECK(p[2] == ((32767u << 16) | 0x3F80u));
  CHECK(p[3] == ((5u << 16) | 0xC000u));
}
