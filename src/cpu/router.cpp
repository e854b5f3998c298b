// CPU router: logits -> top-k ids and weights for every routing method
// (docs/semantics.md section 1), plus the packed FlashInfer/TRT-LLM format.
//
// Decisions below the contract (the reference in tests/ref_router.cpp
// implements the same ones independently):
//  - An expert is selectable iff its logit is neither NaN nor -inf and its
//    selection key (below) is neither NaN nor -inf. +inf is a valid largest
//    value and is selected.
//  - Selection keys: softmax is strictly monotone, so SOFTMAX_TOPK,
//    GROUPED_SOFTMAX, TOPK_SOFTMAX and LLAMA4 select on the f32 logits z
//    (exactly topk of the exact p, with no ties made by exp rounding or
//    underflow); SIGMOID_TOPK selects on z without a bias and on
//    sigmoid(z) + bias with one; DEEPSEEK_V3 always on c = sigmoid(z) + bias.
//  - Softmax ignores non-selectable logits (NaN counts as -inf) and takes the
//    limit for +inf: the +inf entries share the mass equally, the rest get 0.
//  - Group score (DEEPSEEK_V3): sum of the top-2 selectable c of the group; a
//    group with a single selectable expert (or groups of size 1) scores that
//    one c and ranks below every group with two; a group with no selectable
//    expert is never kept. GROUPED_SOFTMAX: the max selectable z (= max p).
//  - Ties go to the lower expert index, and to the lower group index.
//  - Slots past the selectable experts get id -1 and weight 0.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "cpu_backend.h"
#include "parallel.h"

namespace moe::cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

inline bool selectable(float x) { return !std::isnan(x) && x != -kInf; }

inline float sigmoid(float z) { return 1.0f / (1.0f + std::exp(-z)); }

// Converts one row of logits to f32 before any arithmetic (never route on
// rounded values).
void load_row(DType dt, const void* logits, int64_t t, int E, float* z) {
  const int64_t base = t * int64_t(E);
  switch (dt) {
    case DType::f32: {
      const float* p = static_cast<const float*>(logits) + base;
      std::copy(p, p + E, z);
      break;
    }
    case DType::bf16: {
      const uint16_t* p = static_cast<const uint16_t*>(logits) + base;
      for (int e = 0; e < E; ++e) z[e] = bf16_to_f32(p[e]);
      break;
    }
    case DType::f16: {
      const uint16_t* p = static_cast<const uint16_t*>(logits) + base;
      for (int e = 0; e < E; ++e) z[e] = f16_to_f32(p[e]);
      break;
    }
    default:
      fail(MOE_STATUS_INTERNAL_ERROR, "router: logits dtype not f32/bf16/f16");
  }
}

// Group rank: groups with two selectable experts beat groups with one; then
// the score decides.
struct GroupKey {
  int count;
  float score;
  bool operator>(const GroupKey& o) const {
    return count != o.count ? count > o.count : score > o.score;
  }
};

// Keeps the best `cap` candidates, best first. Candidates arrive in ascending
// index order and only a strictly better key moves ahead, so ties keep the
// lower index first.
template <class Key>
struct TopK {
  int cap = 0;
  int n = 0;
  int* idx = nullptr;
  Key* key = nullptr;
  void offer(int i, const Key& v) {
    int pos;
    if (n < cap) {
      pos = n++;
    } else if (v > key[cap - 1]) {
      pos = cap - 1;
    } else {
      return;
    }
    while (pos > 0 && v > key[pos - 1]) {
      key[pos] = key[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    key[pos] = v;
    idx[pos] = i;
  }
};

// Normalizer of a softmax over the entries v[i] with use[i] (all when use is
// null), all selectable: the max, the sum of exp(v - max), and the count of
// +inf entries (the +inf limit gives them equal shares, the rest 0).
struct SoftmaxNorm {
  float max = -kInf;
  float den = 0.0f;
  int n_inf = 0;
  float p(float v) const {
    if (n_inf > 0) return v == kInf ? 1.0f / float(n_inf) : 0.0f;
    return std::exp(v - max) / den;
  }
};

// Fixed summation order: the result is independent of T and of threads.
SoftmaxNorm softmax_norm(const float* v, const unsigned char* use, int n) {
  SoftmaxNorm s;
  for (int i = 0; i < n; ++i)
    if (!use || use[i]) s.max = std::max(s.max, v[i]);
  if (s.max == kInf) {
    for (int i = 0; i < n; ++i) s.n_inf += ((!use || use[i]) && v[i] == kInf) ? 1 : 0;
    return s;
  }
  for (int i = 0; i < n; ++i)
    if (!use || use[i]) s.den += std::exp(v[i] - s.max);
  return s;
}

struct RowScratch {
  std::vector<float> z, key;
  std::vector<unsigned char> ok, kept;
  std::vector<int> sel_idx, grp_idx;
  std::vector<float> sel_key, w;
  std::vector<GroupKey> grp_key;
  explicit RowScratch(const RouterPlan& plan)
      : z(size_t(plan.E)), key(size_t(plan.E)), ok(size_t(plan.E)),
        kept(size_t(plan.n_group)), sel_idx(size_t(plan.k)), grp_idx(size_t(plan.topk_group)),
        sel_key(size_t(plan.k)), w(size_t(plan.k)), grp_key(size_t(plan.topk_group)) {}
};

void write_empty_row(const RouterPlan& plan, int32_t* ids, float* w) {
  for (int j = 0; j < plan.columns(); ++j) {
    ids[j] = -1;
    w[j] = 0.0f;
  }
}

void route_row(const RouterPlan& plan, const RouteArgs& args, int64_t t, RowScratch& s,
               int32_t* ids, float* wout) {
  const int E = plan.E, k = plan.k;
  float* z = s.z.data();
  unsigned char* ok = s.ok.data();
  load_row(args.logits_dtype, args.logits, t, E, z);

  const int method = plan.method;
  const bool sigmoid_key = method == MOE_ROUTING_DEEPSEEK_V3 ||
                           (method == MOE_ROUTING_SIGMOID_TOPK && args.bias != nullptr);
  const float* key = z;
  if (sigmoid_key) {
    float* c = s.key.data();
    for (int e = 0; e < E; ++e) c[e] = sigmoid(z[e]) + (args.bias ? args.bias[e] : 0.0f);
    key = c;
  }
  for (int e = 0; e < E; ++e) ok[e] = selectable(z[e]) && selectable(key[e]);

  // Group stage: keep the topk_group best groups (one group keeps everything).
  const bool grouped = (method == MOE_ROUTING_DEEPSEEK_V3 ||
                        method == MOE_ROUTING_GROUPED_SOFTMAX) && plan.n_group > 1;
  const int n_group = grouped ? plan.n_group : 1;
  const int gsize = E / n_group;
  unsigned char* kept = s.kept.data();
  if (grouped) {
    TopK<GroupKey> groups{plan.topk_group, 0, s.grp_idx.data(), s.grp_key.data()};
    const int max_count = method == MOE_ROUTING_DEEPSEEK_V3 ? 2 : 1;
    for (int g = 0; g < n_group; ++g) {
      kept[g] = 0;
      float top1 = -kInf, top2 = -kInf;
      int count = 0;
      for (int e = g * gsize; e < (g + 1) * gsize; ++e) {
        if (!ok[e]) continue;
        ++count;
        if (key[e] > top1) {
          top2 = top1;
          top1 = key[e];
        } else if (key[e] > top2) {
          top2 = key[e];
        }
      }
      if (count == 0) continue;
      count = std::min(count, max_count);
      groups.offer(g, GroupKey{count, count == 2 ? top1 + top2 : top1});
    }
    for (int i = 0; i < groups.n; ++i) kept[groups.idx[i]] = 1;
  } else {
    kept[0] = 1;
  }

  // Expert stage, in ascending expert order (the tie rule relies on it).
  TopK<float> sel{k, 0, s.sel_idx.data(), s.sel_key.data()};
  for (int g = 0; g < n_group; ++g) {
    if (!kept[g]) continue;
    for (int e = g * gsize; e < (g + 1) * gsize; ++e)
      if (ok[e]) sel.offer(e, key[e]);
  }
  const int n = sel.n;
  const int* S = sel.idx;
  float* w = s.w.data();

  switch (method) {
    case MOE_ROUTING_SOFTMAX_TOPK:
    case MOE_ROUTING_GROUPED_SOFTMAX: {
      // p over every selectable expert of the row, not only the kept groups.
      const SoftmaxNorm norm = softmax_norm(z, ok, E);
      for (int i = 0; i < n; ++i) w[i] = norm.p(z[S[i]]);
      if (plan.renormalize && n > 0) {
        float sum = 0.0f;
        for (int i = 0; i < n; ++i) sum += w[i];
        for (int i = 0; i < n; ++i) w[i] /= sum;  // sum > 0: the row's max is selected
      }
      break;
    }
    case MOE_ROUTING_TOPK_SOFTMAX: {
      for (int i = 0; i < n; ++i) w[i] = z[S[i]];
      const SoftmaxNorm norm = softmax_norm(w, nullptr, n);
      for (int i = 0; i < n; ++i) w[i] = norm.p(w[i]);
      break;
    }
    case MOE_ROUTING_SIGMOID_TOPK:
    case MOE_ROUTING_DEEPSEEK_V3: {
      for (int i = 0; i < n; ++i) w[i] = sigmoid(z[S[i]]);
      if (plan.renormalize) {
        float sum = 0.0f;
        for (int i = 0; i < n; ++i) sum += w[i];
        for (int i = 0; i < n; ++i) w[i] /= (sum + 1e-20f);
      }
      break;
    }
    case MOE_ROUTING_LLAMA4:
      for (int i = 0; i < n; ++i) w[i] = sigmoid(z[S[i]]);
      break;
    default:
      fail(MOE_STATUS_INTERNAL_ERROR, "router: unknown routing method " + std::to_string(method));
  }

  for (int i = 0; i < n; ++i) {
    ids[i] = S[i];
    wout[i] = w[i] * plan.weight_scale;
  }
  for (int i = n; i < k; ++i) {
    ids[i] = -1;
    wout[i] = 0.0f;
  }
  for (int j = 0; j < plan.n_shared; ++j) {
    ids[k + j] = E + j;
    wout[k + j] = plan.shared_weight;
  }
}

}  // namespace

void route(const RouterPlan& plan, const RouteArgs& args) {
  const int64_t T = args.T;
  const int cols = plan.columns();
  int64_t valid = T;
  if (args.num_valid) valid = std::clamp<int64_t>(*args.num_valid, 0, T);
  // One row costs about E * 10 flops; 64-row chunks amortize the thread start.
  parallel_for(T, 64, [&](int64_t begin, int64_t end) {
    RowScratch scratch(plan);
    for (int64_t t = begin; t < end; ++t) {
      int32_t* ids = args.ids + t * cols;
      float* w = args.weights + t * cols;
      if (t >= valid)
        write_empty_row(plan, ids, w);
      else
        route_row(plan, args, t, scratch, ids, w);
    }
  });
}

void pack_topk(const PackArgs& args) {
  for (int64_t i = 0; i < args.n; ++i) {
    // uint32 arithmetic: -1 becomes 0xFFFF0000 (skipped by consumers), no UB.
    const uint32_t hi = uint32_t(args.ids[i]) << 16;
    const uint32_t lo = f32_to_bf16(args.weights[i]);
    args.packed[i] = static_cast<int32_t>(hi | lo);
  }
}

}  // namespace moe::cpu
