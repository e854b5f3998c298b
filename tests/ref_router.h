// Float64 reference router (tests only): an independent, straightforward
// implementation of docs/semantics.md section 1, shared by the CPU and GPU
// suites. Same decisions as the library: ties to the lower expert / group
// index; NaN and -inf (logit or key) are never selected, +inf is; softmax
// ignores non-selectable logits and gives +inf entries equal shares; keys are
// z for the softmax methods, LLAMA4 and unbiased SIGMOID_TOPK, and
// sigmoid(z) + bias for biased SIGMOID_TOPK and DEEPSEEK_V3; a DeepSeek-V3
// group scores the sum of its top-2 selectable keys and ranks below every
// two-expert group when it has only one; a group with none is never kept.
#pragma once

#include <cstdint>
#include <vector>

#include "moe/moe.h"

namespace moe_test {

struct RefRouterCfg {
  int method = 0;  // moe_routing_method_t
  int E = 0;
  int k = 0;
  int n_group = 1;
  int topk_group = 1;
  bool renormalize = false;
  double weight_scale = 1.0;  // multiplies the routed weights
  int n_shared = 0;           // fused shared columns after the k routed ones
  double shared_weight = 1.0;
  int columns() const { return k + n_shared; }
};

// The plan the public config implies: the factor scales the weights, or
// (scaling_on_output) moves to the output and the shared columns get 1/factor.
RefRouterCfg ref_router_cfg(const moe_router_config_t& config);

// Routes T rows of logits [T, E] (already the values the library reads, i.e.
// rounded to the input dtype) with bias [E] or nullptr; rows >= valid get
// -1 / 0. ids and w are resized to [T, columns].
// margin (optional, resized to [T]): per row, the smallest nonzero gap
// (relative to max(1, |key|)) between consecutive keys at a stage whose keys
// are computed (sigmoid + bias, group sums); +inf when every key is a logit.
// A row with a margin near f32 rounding (~1e-6) may legitimately select
// differently in f32, so comparisons skip its ids.
void ref_route(const RefRouterCfg& cfg, const std::vector<double>& logits, int64_t T,
               const double* bias, int64_t valid, std::vector<int>& ids,
               std::vector<double>& w, std::vector<double>* margin = nullptr);

}  // namespace moe_test
