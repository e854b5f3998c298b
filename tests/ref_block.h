// Float64 reference of the whole MoE block (tests only), shared by the CPU
// and GPU suites: gate logits, routing (ref_route), the routed experts of one
// expert-parallel rank, the shared experts with their optional sigmoid gate,
// and the sum, straight from docs/semantics.md and docs/block.md.
#pragma once

#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "moe/moe_block.h"
#include "ref_router.h"
#include "support.h"

namespace moe_test {

struct RefMlp {
  int n = 0;            // experts
  int H = 0, I = 0;
  int activation = 0;   // moe_activation_t
  bool gated = true;
  bool swap_gate_up = false;
  const double* w13 = nullptr;  // [n, gated ? 2I : I, H]
  const double* w2 = nullptr;   // [n, H, I]
};

struct RefBlock {
  RefRouterCfg router;
  const double* gate_w = nullptr;  // [E, H]
  const double* bias = nullptr;    // [E] or nullptr
  int E_loc = 0, first_local = 0;  // this rank holds [first_local, first_local + E_loc)
  double output_scale = 1.0;       // multiplies the routed part (scaling on output)
  RefMlp routed;                   // n = E_loc
  bool has_shared = false;
  RefMlp shared;
  const double* shared_gate = nullptr;  // [H] or nullptr
};

// out[r] = expert e's MLP of x: W2[e] . act(W13[e] . x), over H values.
void ref_mlp(const RefMlp& m, int e, const double* x, double* out);

// logits [T, E] = x [T, H] . W [E, H]^T.
std::vector<double> ref_gate(const std::vector<double>& x, const double* w, int64_t T, int H,
                             int E);

// The block's output [T, H]; rows at or past valid are 0. margin [T] as in
// ref_route (rows with a small one may route differently in f32).
void ref_block(const RefBlock& b, const std::vector<double>& x, int64_t T, int64_t valid,
               std::vector<double>& out, std::vector<double>& margin);

// The shared part alone (times its gate), [T, H].
std::vector<double> ref_shared(const RefBlock& b, const std::vector<double>& x, int64_t T);

// ---------------------------------------------------------------------------
// Model-like block configurations (scaled down) and their data, shared by the
// CPU and GPU suites.

struct BlockSpec {
  const char* name;
  int method;
  int E, k, n_group, topk_group;
  int renormalize;
  float scale;            // routed_scaling_factor
  int scaling_on_output;
  bool bias;              // correction bias (sigmoid methods)
  int ep_rank, ep_size;
  int H, I, activation, gated;
  int n_shared, I_shared, shared_activation, shared_gated, shared_swap;
  bool shared_gate;       // per-token sigmoid gate (Qwen2-MoE)
  bool gate_f32;          // gate weight in f32 whatever the activations' dtype
};

// DeepSeek-V3: sigmoid grouped routing with a bias, renormalize, factor 2.5,
// one shared expert, f32 gate weight.
BlockSpec deepseek_v3_like();
// Qwen2-MoE: softmax top-k without renormalize, one wider shared expert with
// a sigmoid gate.
BlockSpec qwen2_moe_like();
// Mixtral: top-k then softmax, no shared expert.
BlockSpec mixtral_like();

// Host data for one spec: the gate inputs are dyadic rationals that f32
// represents exactly, with dot products exact in f32 in any order, so the
// library's f32 logits equal the float64 ones and routing can only differ
// where ref_route's margin says so.
struct BlockData {
  BlockSpec spec;
  DT dtype;
  int64_t T;
  int E_loc;
  std::unique_ptr<HostTensor> x, gate_w, bias, w13, w2, sw13, sw2, sgate;
  std::vector<double> xd, gate_wd, biasd, w13d, w2d, sw13d, sw2d, sgated;
  RefBlock ref;
};

// dtype: hidden, routed and shared weights (and the gate weight unless
// spec.gate_f32).
void make_block_data(const BlockSpec& spec, DT dtype, int64_t T, std::mt19937_64& rng,
                     BlockData& d);

// The four handles of a spec (weights not set); shared is NULL without
// shared experts.
struct BlockHandles {
  moe_router_t router = nullptr;
  moe_dispatcher_t dispatcher = nullptr;
  moe_runner_t runner = nullptr;
  moe_shared_experts_t shared = nullptr;
  BlockHandles() = default;
  BlockHandles(const BlockHandles&) = delete;
  BlockHandles& operator=(const BlockHandles&) = delete;
  ~BlockHandles();
};
void make_block_handles(const BlockSpec& spec, int32_t device_type, BlockHandles& h);

// ||y - ref|| / ||ref|| over the rows whose routing margin is at least 1e-5
// (f32 may route the others differently); every value of y must be finite.
// compared gets the number of rows compared.
double block_rel_error(const HostTensor& y, const std::vector<double>& ref,
                       const std::vector<double>& margin, int64_t& compared);

double tolerance(DT dtype);

}  // namespace moe_test
