#include "ref_block.h"

#include <cmath>

#include "ref_runner.h"

namespace moe_test {

void ref_mlp(const RefMlp& m, int e, const double* x, double* out) {
  const int rows = m.gated ? 2 * m.I : m.I;
  const double* w13 = m.w13 + size_t(e) * rows * m.H;
  const double* w2 = m.w2 + size_t(e) * m.H * m.I;
  const int gate_row = m.gated && m.swap_gate_up ? m.I : 0;
  const int up_row = m.gated && !m.swap_gate_up ? m.I : 0;
  std::vector<double> h(size_t(m.I));
  for (int i = 0; i < m.I; ++i) {
    double g = 0, u = 0;
    for (int c = 0; c < m.H; ++c) {
      g += w13[size_t(gate_row + i) * m.H + c] * x[c];
      if (m.gated) u += w13[size_t(up_row + i) * m.H + c] * x[c];
    }
    h[size_t(i)] = ref_activation(m.activation, g) * (m.gated ? u : 1.0);
  }
  for (int r = 0; r < m.H; ++r) {
    double acc = 0;
    for (int i = 0; i < m.I; ++i) acc += w2[size_t(r) * m.I + i] * h[size_t(i)];
    out[r] = acc;
  }
}

std::vector<double> ref_gate(const std::vector<double>& x, const double* w, int64_t T, int H,
                             int E) {
  std::vector<double> logits(size_t(T * E));
  for (int64_t t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e) {
      double acc = 0;
      for (int c = 0; c < H; ++c) acc += x[size_t(t * H + c)] * w[size_t(e) * H + c];
      logits[size_t(t * E + e)] = acc;
    }
  return logits;
}

std::vector<double> ref_shared(const RefBlock& b, const std::vector<double>& x, int64_t T) {
  const int H = b.shared.H;
  std::vector<double> out(static_cast<size_t>(T * H), 0.0), tmp(static_cast<size_t>(H));
  for (int64_t t = 0; t < T; ++t) {
    const double* xt = x.data() + t * H;
    double* o = out.data() + t * H;
    for (int s = 0; s < b.shared.n; ++s) {
      ref_mlp(b.shared, s, xt, tmp.data());
      for (int c = 0; c < H; ++c) o[c] += tmp[size_t(c)];
    }
    if (b.shared_gate) {
      double z = 0;
      for (int c = 0; c < H; ++c) z += xt[c] * b.shared_gate[c];
      const double g = 1.0 / (1.0 + std::exp(-z));
      for (int c = 0; c < H; ++c) o[c] *= g;
    }
  }
  return out;
}

void ref_block(const RefBlock& b, const std::vector<double>& x, int64_t T, int64_t valid,
               std::vector<double>& out, std::vector<double>& margin) {
  const int H = b.routed.H, E = b.router.E, C = b.router.columns();
  const std::vector<double> logits = ref_gate(x, b.gate_w, T, H, E);
  std::vector<int> ids;
  std::vector<double> w;
  ref_route(b.router, logits, T, b.bias, valid, ids, w, &margin);
  out.assign(size_t(T * H), 0.0);
  std::vector<double> tmp(static_cast<size_t>(H));
  for (int64_t t = 0; t < valid; ++t) {
    double* o = out.data() + t * H;
    for (int j = 0; j < C; ++j) {
      const int id = ids[size_t(t * C + j)];
      const int local = id - b.first_local;
      if (id < 0 || local < 0 || local >= b.E_loc) continue;
      ref_mlp(b.routed, local, x.data() + t * H, tmp.data());
      const double wt = w[size_t(t * C + j)] * b.output_scale;
      for (int c = 0; c < H; ++c) o[c] += wt * tmp[size_t(c)];
    }
  }
  if (!b.has_shared) return;
  const std::vector<double> s = ref_shared(b, x, valid);
  for (size_t i = 0; i < s.size(); ++i) out[i] += s[i];
}

}  // namespace moe_test

namespace moe_test {

BlockSpec deepseek_v3_like() {
  BlockSpec s{};
  s.name = "deepseek_v3";
  s.method = MOE_ROUTING_DEEPSEEK_V3;
  s.E = 32, s.k = 4, s.n_group = 8, s.topk_group = 4;
  s.renormalize = 1;
  s.scale = 2.5f;
  s.bias = true;
  s.ep_rank = 1, s.ep_size = 2;
  s.H = 64, s.I = 32, s.activation = MOE_ACTIVATION_SILU, s.gated = 1;
  s.n_shared = 1, s.I_shared = 32, s.shared_activation = MOE_ACTIVATION_SILU;
  s.shared_gated = 1;
  s.gate_f32 = true;
  return s;
}

BlockSpec qwen2_moe_like() {
  BlockSpec s{};
  s.name = "qwen2_moe";
  s.method = MOE_ROUTING_SOFTMAX_TOPK;
  s.E = 16, s.k = 4, s.n_group = 1, s.topk_group = 1;
  s.renormalize = 0;
  s.scale = 1.0f;
  s.ep_rank = 0, s.ep_size = 1;
  s.H = 64, s.I = 24, s.activation = MOE_ACTIVATION_SILU, s.gated = 1;
  s.n_shared = 1, s.I_shared = 96, s.shared_activation = MOE_ACTIVATION_SILU;
  s.shared_gated = 1;
  s.shared_gate = true;
  return s;
}

BlockSpec mixtral_like() {
  BlockSpec s{};
  s.name = "mixtral";
  s.method = MOE_ROUTING_TOPK_SOFTMAX;
  s.E = 8, s.k = 2, s.n_group = 1, s.topk_group = 1;
  s.scale = 1.0f;
  s.ep_rank = 0, s.ep_size = 1;
  s.H = 64, s.I = 96, s.activation = MOE_ACTIVATION_SILU, s.gated = 1;
  return s;
}

namespace {

std::vector<double> doubles(const HostTensor& h) {
  std::vector<double> v(size_t(h.numel()));
  for (int64_t i = 0; i < h.numel(); ++i) v[size_t(i)] = h.get(i);
  return v;
}

// Values m / den with m uniform in [-lim, lim]: exact in f32, f16 and bf16.
void fill_dyadic(HostTensor& h, std::mt19937_64& rng, int lim, double den) {
  std::uniform_int_distribution<int> d(-lim, lim);
  for (int64_t i = 0; i < h.numel(); ++i) h.set(i, d(rng) / den);
}

std::unique_ptr<HostTensor> tensor(DT dt, std::vector<int64_t> shape) {
  return std::make_unique<HostTensor>(dt, std::move(shape));
}

}  // namespace

void make_block_data(const BlockSpec& s, DT dt, int64_t T, std::mt19937_64& rng, BlockData& d) {
  d.spec = s;
  d.dtype = dt;
  d.T = T;
  d.E_loc = s.E / s.ep_size;
  const int rows = s.gated ? 2 * s.I : s.I;
  d.x = tensor(dt, {T, s.H});
  fill_dyadic(*d.x, rng, 8, 8.0);
  d.gate_w = tensor(s.gate_f32 ? DT::f32 : dt, {s.E, s.H});
  fill_dyadic(*d.gate_w, rng, 64, 512.0);
  d.bias = tensor(DT::f32, {s.E});
  d.bias->fill_normal(rng, 0.05);
  d.w13 = tensor(dt, {d.E_loc, rows, s.H});
  d.w13->fill_normal(rng, 1.0 / std::sqrt(double(s.H)));
  d.w2 = tensor(dt, {d.E_loc, s.H, s.I});
  d.w2->fill_normal(rng, 1.0 / std::sqrt(double(s.I)));
  d.xd = doubles(*d.x);
  d.gate_wd = doubles(*d.gate_w);
  d.biasd = doubles(*d.bias);
  d.w13d = doubles(*d.w13);
  d.w2d = doubles(*d.w2);

  moe_router_config_t rc;
  rc.struct_size = uint32_t(sizeof(rc));
  REQUIRE(moe_router_config_default(&rc, s.method) == MOE_STATUS_SUCCESS);
  rc.num_experts = s.E;
  rc.top_k = s.k;
  rc.n_group = s.n_group;
  rc.topk_group = s.topk_group;
  rc.renormalize = s.renormalize;
  rc.routed_scaling_factor = s.scale;
  rc.scaling_on_output = s.scaling_on_output;
  RefBlock& r = d.ref;
  r = RefBlock{};
  r.router = ref_router_cfg(rc);
  r.gate_w = d.gate_wd.data();
  r.bias = s.bias ? d.biasd.data() : nullptr;
  r.E_loc = d.E_loc;
  r.first_local = s.ep_rank * d.E_loc;
  r.output_scale = s.scaling_on_output ? s.scale : 1.0;
  r.routed = RefMlp{d.E_loc, s.H, s.I, s.activation, s.gated != 0, false, d.w13d.data(),
                    d.w2d.data()};
  r.has_shared = s.n_shared > 0;
  if (r.has_shared) {
    const int srows = s.shared_gated ? 2 * s.I_shared : s.I_shared;
    d.sw13 = tensor(dt, {s.n_shared, srows, s.H});
    d.sw13->fill_normal(rng, 1.0 / std::sqrt(double(s.H)));
    d.sw2 = tensor(dt, {s.n_shared, s.H, s.I_shared});
    d.sw2->fill_normal(rng, 1.0 / std::sqrt(double(s.I_shared)));
    d.sw13d = doubles(*d.sw13);
    d.sw2d = doubles(*d.sw2);
    r.shared = RefMlp{s.n_shared, s.H, s.I_shared, s.shared_activation, s.shared_gated != 0,
                      s.shared_swap != 0, d.sw13d.data(), d.sw2d.data()};
    if (s.shared_gate) {
      d.sgate = tensor(dt, {1, s.H});
      d.sgate->fill_normal(rng, 1.0 / std::sqrt(double(s.H)));
      d.sgated = doubles(*d.sgate);
      r.shared_gate = d.sgated.data();
    }
  }
}

BlockHandles::~BlockHandles() {
  moe_shared_experts_destroy(shared);
  moe_runner_destroy(runner);
  moe_dispatcher_destroy(dispatcher);
  moe_router_destroy(router);
}

void make_block_handles(const BlockSpec& s, int32_t device_type, BlockHandles& h) {
  moe_router_config_t rc;
  rc.struct_size = uint32_t(sizeof(rc));
  MOE_CHECK_OK(moe_router_config_default(&rc, s.method));
  rc.num_experts = s.E;
  rc.top_k = s.k;
  rc.n_group = s.n_group;
  rc.topk_group = s.topk_group;
  rc.renormalize = s.renormalize;
  rc.routed_scaling_factor = s.scale;
  rc.scaling_on_output = s.scaling_on_output;
  MOE_CHECK_OK(moe_router_create(&rc, &h.router));
  moe_dispatcher_config_t dc;
  dc.struct_size = uint32_t(sizeof(dc));
  MOE_CHECK_OK(moe_dispatcher_config_default(&dc));
  dc.num_experts = s.E;
  dc.ep_rank = s.ep_rank;
  dc.ep_size = s.ep_size;
  dc.device_type = device_type;
  MOE_CHECK_OK(moe_dispatcher_create(&dc, &h.dispatcher));
  moe_runner_config_t uc;
  uc.struct_size = uint32_t(sizeof(uc));
  MOE_CHECK_OK(moe_runner_config_default(&uc));
  uc.num_experts = s.E / s.ep_size;
  uc.hidden_size = s.H;
  uc.intermediate_size = s.I;
  uc.activation = s.activation;
  uc.gated = s.gated;
  MOE_CHECK_OK(moe_runner_create(&uc, &h.runner));
  if (s.n_shared > 0) {
    moe_shared_experts_config_t sc;
    sc.struct_size = uint32_t(sizeof(sc));
    MOE_CHECK_OK(moe_shared_experts_config_default(&sc));
    sc.num_shared_experts = s.n_shared;
    sc.hidden_size = s.H;
    sc.intermediate_size = s.I_shared;
    sc.activation = s.shared_activation;
    sc.gated = s.shared_gated;
    sc.swap_gate_up = s.shared_swap;
    MOE_CHECK_OK(moe_shared_experts_create(&sc, &h.shared));
  }
}

double block_rel_error(const HostTensor& y, const std::vector<double>& ref,
                       const std::vector<double>& margin, int64_t& compared) {
  const int64_t T = y.shape[0], H = y.shape[1];
  std::vector<double> a, b;
  compared = 0;
  for (int64_t t = 0; t < T; ++t) {
    bool keep = margin[size_t(t)] >= 1e-5;
    compared += keep;
    for (int64_t c = 0; c < H; ++c) {
      const double v = y.get(t * H + c);
      if (!std::isfinite(v)) return std::numeric_limits<double>::infinity();
      if (keep) {
        a.push_back(v);
        b.push_back(ref[size_t(t * H + c)]);
      }
    }
  }
  return rel_error(a, b);
}

double tolerance(DT dtype) { return dtype == DT::f32 ? 1e-5 : 1e-2; }

}  // namespace moe_test
