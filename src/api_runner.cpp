// Runner entry points: config, create/destroy, borrowed weights, workspace
// query and run.
#include <cmath>
#include <cstddef>
#include <vector>

#include "backend.h"
#include "checks.h"

namespace moe {

namespace {

// The fields every caller's struct has: the first version's required ones.
constexpr size_t kRunnerMinSize = offsetof(moe_runner_config_t, intermediate_size) + sizeof(int32_t);

moe_runner_config_t runner_defaults() {
  moe_runner_config_t c{};
  c.struct_size = sizeof(c);
  c.num_experts = 0;
  c.hidden_size = 0;
  c.intermediate_size = 0;
  c.activation = MOE_ACTIVATION_SILU;
  c.gated = 1;
  c.swap_gate_up = 0;
  c.apply_router_weight_on_input = 0;
  c.quant_mode = MOE_QUANT_NONE;
  c.act_scale_mode = MOE_ACT_SCALE_DYNAMIC;
  c.output_scale = 1.0f;
  c.deterministic = 1;
  c.validate_ids = 0;
  return c;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A scale tensor: f32, the given shape, on the weights' device.
const float* scale_tensor(const ArgChecker& c, const DLTensor* t, const char* arg,
                          std::initializer_list<int64_t> shape,
                          std::initializer_list<const char*> names, const Device& dev) {
  if (!t) c.bad(arg, "an f32 scale tensor for this quant mode", "NULL");
  c.tensor(t, arg, {DType::f32});
  c.shape(t, arg, shape, names);
  c.same_device(dev, t, arg);
  return static_cast<const float*>(tensor_data(t));
}

void must_be_null(const ArgChecker& c, const DLTensor* t, const char* arg, const char* why) {
  if (t) c.bad(arg, std::string("NULL (") + why + ")", "a tensor");
}

// Consistency of the routing metadata against local_ids (CPU only; the CUDA
// kernels skip out-of-range entries instead).
void check_metadata(const ArgChecker& c, const RunArgs& a, int E_loc) {
  check_ids_in_range(c, "local_ids", a.local_ids, a.T, a.K, E_loc);
  const int64_t n = a.T * a.K;
  if (a.offsets[0] != 0) c.bad("expert_offsets[0]", "0", std::to_string(a.offsets[0]));
  for (int e = 0; e < E_loc; ++e)
    if (a.offsets[e + 1] < a.offsets[e] || a.offsets[e + 1] > n)
      c.bad("expert_offsets[" + std::to_string(e + 1) + "]",
            "a value in [expert_offsets[" + std::to_string(e) + "]=" + std::to_string(a.offsets[e]) +
                ", T*K=" + std::to_string(n) + "]",
            std::to_string(a.offsets[e + 1]));
  int64_t valid = 0;
  for (int64_t i = 0; i < n; ++i) valid += a.local_ids[i] >= 0;
  if (a.offsets[E_loc] != valid)
    c.bad("expert_offsets[E_loc]", "the number of slots with a local id (" +
                                       std::to_string(valid) + "); pass the dispatcher's output",
          std::to_string(a.offsets[E_loc]));
  std::vector<char> seen(size_t(n), 0);
  for (int e = 0; e < E_loc; ++e)
    for (int64_t p = a.offsets[e]; p < a.offsets[e + 1]; ++p) {
      int32_t s = a.sorted_slots[p];
      if (s < 0 || s >= n || seen[size_t(s)] || a.local_ids[s] != e)
        c.bad("sorted_slots[" + std::to_string(p) + "]",
              "a slot index not listed before whose local id is expert " + std::to_string(e) +
                  " (pass the dispatcher's output)",
              std::to_string(s));
      seen[size_t(s)] = 1;
    }
}

}  // namespace

Device check_run_io(const ArgChecker& c, const moe_runner_s& runner, const DLTensor* hidden,
                    DLTensor* output, RunArgs& args) {
  if (!runner.has_weights)
    c.bad("runner", "a runner whose weights were set with moe_runner_set_weights",
          "a runner without weights");
  const RunnerPlan& p = runner.plan;
  args.x_dtype = c.tensor(hidden, "hidden", {DType::f32, DType::f16, DType::bf16});
  c.shape(hidden, "hidden", {-1, p.H}, {"T", "H"});
  c.same_device(runner.weights_device, hidden, "hidden");
  args.T = hidden->shape[0];
  args.x = tensor_data(hidden);
  DType out = c.tensor(output, "output", {DType::f32, DType::f16, DType::bf16});
  if (out != args.x_dtype)
    c.bad("output.dtype", std::string("the dtype of hidden (") + dtype_name(args.x_dtype) + ")",
          dtype_name(out));
  c.shape(output, "output", {args.T, p.H}, {"T", "H"});
  c.same_device(runner.weights_device, output, "output");
  args.y = tensor_data(output);
  return runner.weights_device;
}

}  // namespace moe

using namespace moe;

extern "C" {

MOE_API moe_status_t moe_runner_config_default(moe_runner_config_t* config) {
  MOE_ENTRY
  ArgChecker c("moe_runner_config_default");
  c.not_null(config, "config");
  c.write_defaults(config, "config", runner_defaults(), kRunnerMinSize);
  MOE_EXIT
}

MOE_API moe_status_t moe_runner_create(const moe_runner_config_t* config, moe_runner_t* runner) {
  MOE_ENTRY
  ArgChecker c("moe_runner_create");
  c.not_null(runner, "runner");
  *runner = nullptr;
  moe_runner_config_t cfg =
      c.config(config, "config", runner_defaults(), kRunnerMinSize);
  if (cfg.num_experts < 1 || cfg.num_experts > 32767)
    c.bad("config->num_experts", "E_loc in [1, 32767]", std::to_string(cfg.num_experts));
  if (cfg.hidden_size < 1 || cfg.hidden_size > (1 << 20))
    c.bad("config->hidden_size", "H in [1, 2^20]", std::to_string(cfg.hidden_size));
  if (cfg.intermediate_size < 1 || cfg.intermediate_size > (1 << 20))
    c.bad("config->intermediate_size", "I in [1, 2^20]", std::to_string(cfg.intermediate_size));
  if (cfg.activation < 0 || cfg.activation >= MOE_ACTIVATION_NUM_ACTIVATIONS)
    c.bad("config->activation", "a moe_activation_t in [0, " +
                                    std::to_string(MOE_ACTIVATION_NUM_ACTIVATIONS) + ")",
          std::to_string(cfg.activation));
  c.flag("config->gated", cfg.gated);
  c.flag("config->swap_gate_up", cfg.swap_gate_up);
  c.flag("config->apply_router_weight_on_input", cfg.apply_router_weight_on_input);
  c.flag("config->deterministic", cfg.deterministic);
  c.flag("config->validate_ids", cfg.validate_ids);
  if (cfg.swap_gate_up && !cfg.gated)
    c.bad("config->swap_gate_up", "0 when gated is 0 (there is no gate/up pair)",
          std::to_string(cfg.swap_gate_up));
  if (cfg.quant_mode < 0 || cfg.quant_mode >= MOE_QUANT_NUM_MODES)
    c.bad("config->quant_mode", "a moe_quant_mode_t in [0, " +
                                    std::to_string(MOE_QUANT_NUM_MODES) + ")",
          std::to_string(cfg.quant_mode));
  if (cfg.act_scale_mode < 0 || cfg.act_scale_mode >= MOE_ACT_SCALE_NUM_MODES)
    c.bad("config->act_scale_mode", "a moe_act_scale_mode_t in [0, " +
                                        std::to_string(MOE_ACT_SCALE_NUM_MODES) + ")",
          std::to_string(cfg.act_scale_mode));
  if (cfg.act_scale_mode == MOE_ACT_SCALE_STATIC && cfg.quant_mode != MOE_QUANT_FP8_PER_TENSOR)
    c.bad("config->act_scale_mode", "DYNAMIC unless quant_mode is FP8_PER_TENSOR",
          "STATIC with quant_mode " + std::to_string(cfg.quant_mode));
  if (!std::isfinite(cfg.output_scale))
    c.bad("config->output_scale", "a finite value", std::to_string(cfg.output_scale));
  if (cfg.deterministic == 0)
    c.bad("config->deterministic", "1 (every backend of this version reduces in a fixed order)",
          "0", MOE_STATUS_UNSUPPORTED);

  auto* r = new moe_runner_s{};
  r->config = cfg;
  RunnerPlan& p = r->plan;
  p.E_loc = cfg.num_experts;
  p.H = cfg.hidden_size;
  p.I = cfg.intermediate_size;
  p.activation = cfg.activation;
  p.gated = cfg.gated != 0;
  p.swap_gate_up = cfg.swap_gate_up != 0;
  p.weight_on_input = cfg.apply_router_weight_on_input != 0;
  p.quant_mode = cfg.quant_mode;
  p.act_scale_mode = cfg.act_scale_mode;
  p.output_scale = cfg.output_scale;
  p.deterministic = true;
  p.validate_ids = cfg.validate_ids != 0;
  *runner = r;
  MOE_EXIT
}

MOE_API moe_status_t moe_runner_destroy(moe_runner_t runner) {
  MOE_ENTRY
  delete runner;
  MOE_EXIT
}

MOE_API moe_status_t moe_runner_set_weights(moe_runner_t runner, const DLTensor* w13,
                                            const DLTensor* w2, const DLTensor* w13_scale,
                                            const DLTensor* w2_scale, const DLTensor* a13_scale,
                                            const DLTensor* a2_scale) {
  MOE_ENTRY
  ArgChecker c("moe_runner_set_weights");
  c.not_null(runner, "runner");
  RunnerPlan p = runner->plan;
  const bool fp8 = p.quant_mode != MOE_QUANT_NONE;
  std::initializer_list<DType> float_types = {DType::f32, DType::f16, DType::bf16};
  std::initializer_list<DType> fp8_types = {DType::e4m3};
  DType wt = c.tensor(w13, "w13", fp8 ? fp8_types : float_types);
  c.shape(w13, "w13", {p.E_loc, p.rows13(), p.H},
          {"E_loc", p.gated ? "2 * I" : "I", "H"});
  Device dev = c.device(w13, "w13");
  require_backend(c, dev, "w13.device");
  DType wt2 = c.tensor(w2, "w2", fp8 ? fp8_types : float_types);
  if (wt2 != wt)
    c.bad("w2.dtype", std::string("the dtype of w13 (") + dtype_name(wt) + ")", dtype_name(wt2));
  c.shape(w2, "w2", {p.E_loc, p.H, p.I}, {"E_loc", "H", "I"});
  c.same_device(dev, w2, "w2");
  p.w_dtype = wt;
  p.w13 = tensor_data(w13);
  p.w2 = tensor_data(w2);
  p.w13_scale = p.w2_scale = p.a13_scale = p.a2_scale = nullptr;
  if (p.quant_mode == MOE_QUANT_NONE) {
    const char* why = "quant_mode is NONE";
    must_be_null(c, w13_scale, "w13_scale", why);
    must_be_null(c, w2_scale, "w2_scale", why);
    must_be_null(c, a13_scale, "a13_scale", why);
    must_be_null(c, a2_scale, "a2_scale", why);
  } else if (p.quant_mode == MOE_QUANT_FP8_PER_TENSOR) {
    p.w13_scale = scale_tensor(c, w13_scale, "w13_scale", {p.E_loc}, {"E_loc"}, dev);
    p.w2_scale = scale_tensor(c, w2_scale, "w2_scale", {p.E_loc}, {"E_loc"}, dev);
    if (p.act_scale_mode == MOE_ACT_SCALE_STATIC) {
      p.a13_scale = scale_tensor(c, a13_scale, "a13_scale", {1}, {"1"}, dev);
      p.a2_scale = scale_tensor(c, a2_scale, "a2_scale", {1}, {"1"}, dev);
    } else {
      must_be_null(c, a13_scale, "a13_scale", "act_scale_mode is DYNAMIC");
      must_be_null(c, a2_scale, "a2_scale", "act_scale_mode is DYNAMIC");
    }
  } else {
    p.w13_scale = scale_tensor(c, w13_scale, "w13_scale",
                               {p.E_loc, ceil_div(p.rows13(), 128), ceil_div(p.H, 128)},
                               {"E_loc", "ceil(rows13/128)", "ceil(H/128)"}, dev);
    p.w2_scale = scale_tensor(c, w2_scale, "w2_scale",
                              {p.E_loc, ceil_div(p.H, 128), ceil_div(p.I, 128)},
                              {"E_loc", "ceil(H/128)", "ceil(I/128)"}, dev);
    must_be_null(c, a13_scale, "a13_scale", "block-128 activations are scaled on the fly");
    must_be_null(c, a2_scale, "a2_scale", "block-128 activations are scaled on the fly");
  }
  p.w_device_type = dev.backend == Backend::cpu ? kDLCPU : kDLCUDA;
  p.w_device_id = dev.id;
  // Ask the backend now so an unsupported combination fails here, not later.
  backend_runner_workspace(dev, p, 1, 1);
  runner->plan = p;
  runner->weights_device = dev;
  runner->has_weights = true;
  MOE_EXIT
}

MOE_API moe_status_t moe_runner_workspace_size(moe_runner_t runner, int64_t max_tokens,
                                               int32_t columns, int32_t device_type,
                                               size_t* bytes) {
  MOE_ENTRY
  ArgChecker c("moe_runner_workspace_size");
  c.not_null(runner, "runner");
  c.not_null(bytes, "bytes");
  if (columns < 1 || columns > 1024) c.bad("columns", "a value in [1, 1024]", std::to_string(columns));
  check_max_tokens(c, max_tokens, std::max<int64_t>(runner->plan.H, columns));
  Device dev;
  if (device_type == kDLCPU) dev = Device{Backend::cpu, 0};
  else if (device_type == kDLCUDA) dev = Device{Backend::cuda, runner->weights_device.id};
  else c.bad("device_type", "kDLCPU (1) or kDLCUDA (2)", std::to_string(device_type),
             MOE_STATUS_UNSUPPORTED);
  require_backend(c, dev, "device_type");
  *bytes = backend_runner_workspace(dev, runner->plan, max_tokens, columns);
  MOE_EXIT
}

MOE_API moe_status_t moe_runner_run(moe_runner_t runner, const DLTensor* hidden,
                                    const DLTensor* local_ids, const DLTensor* topk_weights,
                                    const DLTensor* expert_offsets, const DLTensor* sorted_slots,
                                    DLTensor* output, void* workspace, size_t workspace_bytes,
                                    void* stream) {
  MOE_ENTRY
  ArgChecker c("moe_runner_run");
  c.not_null(runner, "runner");
  RunArgs a{};
  Device dev = check_run_io(c, *runner, hidden, output, a);
  const RunnerPlan& p = runner->plan;
  c.tensor(local_ids, "local_ids", {DType::i32});
  c.shape(local_ids, "local_ids", {a.T, -1}, {"T", "K"});
  c.same_device(dev, local_ids, "local_ids");
  int64_t K = local_ids->shape[1];
  if (K < 1 || K > 1024) c.bad("local_ids", "K (dim 1) in [1, 1024]", std::to_string(K));
  if (p.weight_on_input && K != 1)
    c.bad("local_ids", "K = 1 (apply_router_weight_on_input is top-1 only)", std::to_string(K));
  c.tensor(topk_weights, "topk_weights", {DType::f32});
  c.shape(topk_weights, "topk_weights", {a.T, K}, {"T", "K"});
  c.same_device(dev, topk_weights, "topk_weights");
  c.tensor(expert_offsets, "expert_offsets", {DType::i32});
  c.shape(expert_offsets, "expert_offsets", {p.E_loc + 1}, {"E_loc + 1"});
  c.same_device(dev, expert_offsets, "expert_offsets");
  c.tensor(sorted_slots, "sorted_slots", {DType::i32});
  c.shape(sorted_slots, "sorted_slots", {a.T * K}, {"T * K"});
  c.same_device(dev, sorted_slots, "sorted_slots");
  a.K = int(K);
  a.local_ids = static_cast<const int32_t*>(tensor_data(local_ids));
  a.weights = static_cast<const float*>(tensor_data(topk_weights));
  a.offsets = static_cast<const int32_t*>(tensor_data(expert_offsets));
  a.sorted_slots = static_cast<const int32_t*>(tensor_data(sorted_slots));
  a.output_scale = p.output_scale;
  if (dev.backend == Backend::cpu) check_metadata(c, a, p.E_loc);
  size_t need = backend_runner_workspace(dev, p, a.T, a.K);
  WorkspaceLease ws = lease_workspace(c, runner->workspace, workspace, workspace_bytes, need, dev, stream);
  a.workspace = ws.ptr;
  a.workspace_bytes = need;
  if (a.T > 0) backend_run(dev, p, a, stream);
  MOE_EXIT
}

}  // extern "C"
