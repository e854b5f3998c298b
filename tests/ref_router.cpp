#include "ref_router.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace moe_test {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

bool usable(double x) { return !std::isnan(x) && x != -kInf; }

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// Softmax over the entries with use[i]; NaN-free by construction; the +inf
// limit splits the mass over the +inf entries.
std::vector<double> softmax(const std::vector<double>& v, const std::vector<bool>& use) {
  std::vector<double> p(v.size(), 0.0);
  double m = -kInf;
  for (size_t i = 0; i < v.size(); ++i)
    if (use[i]) m = std::max(m, v[i]);
  if (m == -kInf) return p;
  if (m == kInf) {
    double n_inf = 0;
    for (size_t i = 0; i < v.size(); ++i) n_inf += (use[i] && v[i] == kInf) ? 1 : 0;
    for (size_t i = 0; i < v.size(); ++i) p[i] = (use[i] && v[i] == kInf) ? 1.0 / n_inf : 0.0;
    return p;
  }
  double den = 0;
  for (size_t i = 0; i < v.size(); ++i)
    if (use[i]) den += std::exp(v[i] - m);
  for (size_t i = 0; i < v.size(); ++i) p[i] = use[i] ? std::exp(v[i] - m) / den : 0.0;
  return p;
}

double rel_gap(double a, double b) {
  return std::abs(a - b) / std::max(1.0, std::max(std::abs(a), std::abs(b)));
}

}  // namespace

RefRouterCfg ref_router_cfg(const moe_router_config_t& c) {
  RefRouterCfg r;
  r.method = c.method;
  r.E = c.num_experts;
  r.k = c.top_k;
  r.n_group = c.n_group;
  r.topk_group = c.topk_group;
  r.renormalize = c.renormalize != 0;
  r.weight_scale = c.scaling_on_output ? 1.0 : double(c.routed_scaling_factor);
  r.n_shared = c.num_fused_shared_experts;
  r.shared_weight = c.scaling_on_output ? 1.0 / double(c.routed_scaling_factor) : 1.0;
  return r;
}

void ref_route(const RefRouterCfg& cfg, const std::vector<double>& logits, int64_t T,
               const double* bias, int64_t valid, std::vector<int>& ids,
               std::vector<double>& w, std::vector<double>* margin) {
  const int E = cfg.E, k = cfg.k, C = cfg.columns();
  ids.assign(size_t(T * C), -1);
  w.assign(size_t(T * C), 0.0);
  if (margin) margin->assign(size_t(T), kInf);
  const bool dsv3 = cfg.method == MOE_ROUTING_DEEPSEEK_V3;
  const bool sig_key = dsv3 || (cfg.method == MOE_ROUTING_SIGMOID_TOPK && bias != nullptr);
  const bool grouped = (dsv3 || cfg.method == MOE_ROUTING_GROUPED_SOFTMAX) && cfg.n_group > 1;
  const int gsize = E / cfg.n_group;

  for (int64_t t = 0; t < std::min(T, valid); ++t) {
    std::vector<double> z(logits.begin() + t * E, logits.begin() + (t + 1) * E);
    std::vector<double> key(static_cast<size_t>(E));
    std::vector<bool> ok(static_cast<size_t>(E));
    for (int e = 0; e < E; ++e) {
      key[e] = sig_key ? sigmoid(z[e]) + (bias ? bias[e] : 0.0) : z[e];
      ok[e] = usable(z[e]) && usable(key[e]);
    }
    double row_margin = kInf;

    std::vector<bool> kept(size_t(cfg.n_group), true);
    if (grouped) {
      struct G { int g, count; double score; };
      std::vector<G> groups;
      for (int g = 0; g < cfg.n_group; ++g) {
        std::vector<double> keys;
        for (int e = g * gsize; e < (g + 1) * gsize; ++e)
          if (ok[e]) keys.push_back(key[e]);
        if (keys.empty()) continue;
        std::sort(keys.begin(), keys.end(), std::greater<double>());
        int count = dsv3 ? std::min<int>(2, int(keys.size())) : 1;
        groups.push_back({g, count, std::accumulate(keys.begin(), keys.begin() + count, 0.0)});
      }
      std::sort(groups.begin(), groups.end(), [](const G& a, const G& b) {
        if (a.count != b.count) return a.count > b.count;
        if (a.score != b.score) return a.score > b.score;
        return a.g < b.g;
      });
      std::fill(kept.begin(), kept.end(), false);
      for (size_t i = 0; i < groups.size() && int(i) < cfg.topk_group; ++i) kept[groups[i].g] = true;
      for (size_t i = 1; i < groups.size() && int(i) <= cfg.topk_group; ++i) {
        double gap = rel_gap(groups[i - 1].score, groups[i].score);
        if (groups[i - 1].count == groups[i].count && gap > 0 && dsv3)
          row_margin = std::min(row_margin, gap);
      }
    }

    std::vector<int> cand;
    for (int e = 0; e < E; ++e)
      if (ok[e] && kept[e / gsize]) cand.push_back(e);
    std::sort(cand.begin(), cand.end(), [&](int a, int b) {
      return key[a] != key[b] ? key[a] > key[b] : a < b;
    });
    const int n = std::min<int>(k, int(cand.size()));
    if (sig_key)
      for (int i = 1; i < int(cand.size()) && i <= k; ++i) {
        double gap = rel_gap(key[cand[i - 1]], key[cand[i]]);
        if (gap > 0) row_margin = std::min(row_margin, gap);
      }

    std::vector<double> ws(static_cast<size_t>(n));
    switch (cfg.method) {
      case MOE_ROUTING_SOFTMAX_TOPK:
      case MOE_ROUTING_GROUPED_SOFTMAX: {
        std::vector<double> p = softmax(z, ok);
        double sum = 0;
        for (int i = 0; i < n; ++i) sum += p[cand[i]];
        for (int i = 0; i < n; ++i) ws[i] = cfg.renormalize ? p[cand[i]] / sum : p[cand[i]];
        break;
      }
      case MOE_ROUTING_TOPK_SOFTMAX: {
        std::vector<double> zs(static_cast<size_t>(n));
        for (int i = 0; i < n; ++i) zs[i] = z[cand[i]];
        ws = softmax(zs, std::vector<bool>(size_t(n), true));
        break;
      }
      case MOE_ROUTING_SIGMOID_TOPK:
      case MOE_ROUTING_DEEPSEEK_V3: {
        double sum = 0;
        for (int i = 0; i < n; ++i) sum += sigmoid(z[cand[i]]);
        for (int i = 0; i < n; ++i)
          ws[i] = cfg.renormalize ? sigmoid(z[cand[i]]) / (sum + 1e-20) : sigmoid(z[cand[i]]);
        break;
      }
      case MOE_ROUTING_LLAMA4:
        for (int i = 0; i < n; ++i) ws[i] = sigmoid(z[cand[i]]);
        break;
    }
    for (int i = 0; i < n; ++i) {
      ids[size_t(t * C + i)] = cand[i];
      w[size_t(t * C + i)] = ws[i] * cfg.weight_scale;
    }
    for (int j = 0; j < cfg.n_shared; ++j) {
      ids[size_t(t * C + k + j)] = E + j;
      w[size_t(t * C + k + j)] = cfg.shared_weight;
    }
    if (margin) (*margin)[size_t(t)] = row_margin;
  }
}

}  // namespace moe_test
