// The MoE block entry points (moe/moe_block.h): the gate projection in front
// of the router, the shared-experts handle, and the one-call block, which is
// the gate, then moe_layer_forward (route -> dispatch -> routed experts), then
// the shared experts summed into the layer's output.
#include "moe/moe_block.h"

#include <algorithm>
#include <cstddef>
#include <map>
#include <memory>
#include <utility>

#include "backend.h"
#include "block_plan.h"
#include "checks.h"

struct moe_shared_experts_s {
  moe_shared_experts_config_t config;
  moe::SharedPlan plan;
  bool has_weights = false;
  moe::Device weights_device;
  // One fork/join sequence at a time on the side stream (CUDA).
  std::mutex side_mutex;
#ifdef MOE_WITH_CUDA
  moe::cuda::SideStream* side = nullptr;
#endif
  ~moe_shared_experts_s() {
#ifdef MOE_WITH_CUDA
    moe::cuda::side_stream_destroy(side);
#endif
  }
};

namespace moe {

namespace {

// Callers must know at least the sizes (through intermediate_size).
constexpr size_t kSharedMinSize =
    offsetof(moe_shared_experts_config_t, intermediate_size) + sizeof(int32_t);

moe_shared_experts_config_t shared_defaults() {
  moe_shared_experts_config_t c{};
  c.struct_size = sizeof(c);
  c.num_shared_experts = 1;
  c.hidden_size = 0;
  c.intermediate_size = 0;
  c.activation = MOE_ACTIVATION_SILU;
  c.gated = 1;
  c.swap_gate_up = 0;
  return c;
}

// Calls that pass no workspace share one library-owned workspace per
// device. Leaked on purpose: freeing device memory from a static destructor
// can run after the CUDA runtime has shut down.
OwnedWorkspace& library_workspace(const Device& d) {
  static std::mutex mutex;
  static auto* table = new std::map<std::pair<int, int>, OwnedWorkspace*>();
  std::lock_guard<std::mutex> lock(mutex);
  OwnedWorkspace*& ws = (*table)[{int(d.backend), d.id}];
  if (!ws) ws = new OwnedWorkspace();
  return *ws;
}

// The device a *_workspace_size query names; cuda_id is the handle's ordinal.
Device queried_device(const ArgChecker& c, int32_t device_type, int cuda_id) {
  Device dev;
  if (device_type == kDLCPU) dev = Device{Backend::cpu, 0};
  else if (device_type == kDLCUDA) dev = Device{Backend::cuda, cuda_id};
  else c.bad("device_type", "kDLCPU (1) or kDLCUDA (2)", std::to_string(device_type),
             MOE_STATUS_UNSUPPORTED);
  require_backend(c, dev, "device_type");
  return dev;
}

// A status from a libmoe call made inside this one, as this call's error.
void forward_status(const ArgChecker& c, moe_status_t st) {
  if (st != MOE_STATUS_SUCCESS) fail(st, std::string(c.fn()) + ": " + moe_last_error());
}

// gate_weight [E, H] of a float dtype on dev.
DType check_gate_weight(const ArgChecker& c, const DLTensor* gate_weight, int E, int64_t H,
                        const Device& dev) {
  DType dt = c.tensor(gate_weight, "gate_weight", {DType::f32, DType::f16, DType::bf16});
  c.shape(gate_weight, "gate_weight", {E, H}, {"E", "H"});
  c.same_device(dev, gate_weight, "gate_weight");
  return dt;
}

// num_valid_tokens: NULL or int32 [1] on dev.
const int32_t* check_num_valid(const ArgChecker& c, const DLTensor* t, const Device& dev) {
  if (!t) return nullptr;
  c.tensor(t, "num_valid_tokens", {DType::i32});
  c.shape(t, "num_valid_tokens", {1}, {"1"});
  c.same_device(dev, t, "num_valid_tokens");
  return static_cast<const int32_t*>(tensor_data(t));
}

// A shared-experts handle with weights on dev, for hidden size H.
void check_shared_fits(const ArgChecker& c, const moe_shared_experts_s& s, int64_t H,
                       const Device& dev) {
  if (!s.has_weights)
    c.bad("shared", "shared experts whose weights were set with moe_shared_experts_set_weights",
          "shared experts without weights");
  if (s.plan.H != H)
    c.bad("shared", "hidden_size = H of hidden = " + std::to_string(H), std::to_string(s.plan.H));
  if (s.weights_device != dev)
    c.bad("shared", "weights on the tensors' device (" + device_string(dev) + ")",
          "weights on " + device_string(s.weights_device));
}

// A contiguous f32 [rows, cols] view of workspace memory, for the router's
// and the layer's own checks.
struct F32View {
  int64_t shape[2];
  DLTensor t{};
  F32View(float* data, int64_t rows, int64_t cols, const Device& dev) : shape{rows, cols} {
    t.data = data;
    t.device = DLDevice{dev.backend == Backend::cpu ? kDLCPU : kDLCUDA, dev.id};
    t.ndim = 2;
    t.dtype = DLDataType{kDLFloat, 32, 1};
    t.shape = shape;
    t.strides = nullptr;
    t.byte_offset = 0;
  }
};

// Backend selection ---------------------------------------------------------

#ifdef MOE_WITH_CUDA
// The CUDA block's GEMMs run on cuBLASLt.
namespace block_gemms = cuda::lt;
#define MOE_BLOCK_ON_CUDA(call) return block_gemms::call
#else
#define MOE_BLOCK_ON_CUDA(call) \
  fail(MOE_STATUS_NOT_AVAILABLE, "libmoe was built without the CUDA backend")
#endif

size_t gate_workspace(const Device& d, int64_t T, int H, int E) {
  if (d.backend == Backend::cpu) return cpu::gate_workspace_bytes(T, H, E);
  MOE_BLOCK_ON_CUDA(gate_workspace_bytes(T, H, E));
}

void run_gate(const Device& d, const GateArgs& a, [[maybe_unused]] void* stream) {
  if (d.backend == Backend::cpu) return cpu::gate_logits(a);
  MOE_BLOCK_ON_CUDA(gate_logits(a, stream));
}

size_t shared_workspace(const Device& d, const SharedPlan& p, int64_t T) {
  if (d.backend == Backend::cpu) return cpu::shared_workspace_bytes(p, T);
  MOE_BLOCK_ON_CUDA(shared_workspace_bytes(p, T));
}

// The shared experts on one stream: compute, then the pass that writes y.
void run_shared(const Device& d, const SharedPlan& p, const SharedArgs& a,
                [[maybe_unused]] void* stream) {
  if (d.backend == Backend::cpu) return cpu::shared_run(p, a);
#ifdef MOE_WITH_CUDA
  block_gemms::shared_compute(p, a, stream);
  block_gemms::shared_combine(p, a, stream);
#else
  fail(MOE_STATUS_NOT_AVAILABLE, "libmoe was built without the CUDA backend");
#endif
}

#ifdef MOE_WITH_CUDA
// Everything created lazily on the device, made before a graph capture.
void prepare_cuda(int device) {
  cuda::prepare_device(device);
  cuda::lt::prepare_device(device);
}
#endif

// Byte layout of the block workspace: logits, the gate's scratch, the shared
// experts' scratch (disjoint from the rest: it runs on a second stream) and
// the layer's workspace.
struct BlockLayout {
  size_t logits, gate, shared, layer, total;
  size_t layer_bytes;
};

BlockLayout block_layout(const Device& dev, const moe_router_s& router, int H,
                         const moe_shared_experts_s* shared, size_t layer_bytes, int64_t T) {
  BlockLayout l{};
  size_t at = 0;
  auto take = [&](size_t bytes) {
    size_t here = at;
    at += align256(bytes);
    return here;
  };
  l.logits = take(size_t(T) * size_t(router.plan.E) * 4);
  l.gate = take(gate_workspace(dev, T, H, router.plan.E));
  l.shared = take(shared ? shared_workspace(dev, shared->plan, T) : 0);
  l.layer = take(layer_bytes);
  l.layer_bytes = layer_bytes;
  l.total = at;
  return l;
}

// The workspace bytes moe_layer_forward needs (this also checks that the
// three handles fit together).
size_t layer_bytes(const ArgChecker& c, moe_router_t router, moe_dispatcher_t dispatcher,
                   moe_runner_t runner, int64_t T, const Device& dev) {
  size_t bytes = 0;
  forward_status(c, moe_layer_workspace_size(router, dispatcher, runner, T,
                                             dev.backend == Backend::cpu ? kDLCPU : kDLCUDA,
                                             &bytes));
  return bytes;
}

}  // namespace

}  // namespace moe

using namespace moe;

extern "C" {

// Gate projection -------------------------------------------------------------

MOE_API moe_status_t moe_router_hidden_workspace_size(moe_router_t router, int32_t hidden_size,
                                                      int64_t max_tokens, int32_t device_type,
                                                      size_t* bytes) {
  MOE_ENTRY
  ArgChecker c("moe_router_hidden_workspace_size");
  c.not_null(router, "router");
  c.not_null(bytes, "bytes");
  if (hidden_size < 1 || hidden_size > (1 << 20))
    c.bad("hidden_size", "H in [1, 2^20]", std::to_string(hidden_size));
  const int E = router->plan.E;
  check_max_tokens(c, max_tokens, std::max<int64_t>(hidden_size, E));
  Device dev = queried_device(c, device_type, 0);
  *bytes = align256(size_t(max_tokens) * size_t(E) * 4) +
           gate_workspace(dev, max_tokens, hidden_size, E);
  MOE_EXIT
}

MOE_API moe_status_t moe_router_run_hidden(moe_router_t router, const DLTensor* hidden,
                                           const DLTensor* gate_weight,
                                           const DLTensor* correction_bias,
                                           const DLTensor* num_valid_tokens, DLTensor* topk_ids,
                                           DLTensor* topk_weights, DLTensor* logits,
                                           void* workspace, size_t workspace_bytes,
                                           void* stream) {
  MOE_ENTRY
  ArgChecker c("moe_router_run_hidden");
  c.not_null(router, "router");
  const RouterPlan& rp = router->plan;
  GateArgs g{};
  g.x_dtype = c.tensor(hidden, "hidden", {DType::f32, DType::f16, DType::bf16});
  c.shape(hidden, "hidden", {-1, -1}, {"T", "H"});
  Device dev = c.device(hidden, "hidden");
  require_backend(c, dev);
  g.T = hidden->shape[0];
  if (hidden->shape[1] < 1 || hidden->shape[1] > (1 << 20))
    c.bad("hidden", "H (dim 1) in [1, 2^20]", "shape " + shape_string(hidden));
  g.H = int(hidden->shape[1]);
  g.x = tensor_data(hidden);
  g.w_dtype = check_gate_weight(c, gate_weight, rp.E, g.H, dev);
  g.w = tensor_data(gate_weight);
  g.E = rp.E;
  g.device = dev.id;
  if (logits) {
    c.tensor(logits, "logits", {DType::f32});
    c.shape(logits, "logits", {g.T, rp.E}, {"T", "E"});
    c.same_device(dev, logits, "logits");
  }
  const int64_t cols = rp.columns();
  c.tensor(topk_ids, "topk_ids", {DType::i32});
  c.shape(topk_ids, "topk_ids", {g.T, cols}, {"T", "k + n_shared"});
  c.same_device(dev, topk_ids, "topk_ids");
  c.tensor(topk_weights, "topk_weights", {DType::f32});
  c.shape(topk_weights, "topk_weights", {g.T, cols}, {"T", "k + n_shared"});
  c.same_device(dev, topk_weights, "topk_weights");

  const size_t logits_bytes = align256(size_t(g.T) * size_t(rp.E) * 4);
  const size_t need = logits_bytes + gate_workspace(dev, g.T, g.H, rp.E);
  WorkspaceLease ws =
      lease_workspace(c, library_workspace(dev), workspace, workspace_bytes, need, dev, stream);
  char* base = static_cast<char*>(ws.ptr);
  g.logits = logits ? static_cast<float*>(tensor_data(logits)) : reinterpret_cast<float*>(base);
  g.workspace = base + logits_bytes;
  F32View view(g.logits, g.T, rp.E, dev);
  RouteArgs ra{};
  check_route_inputs(c, *router, &view.t, correction_bias, num_valid_tokens, ra);
  ra.ids = static_cast<int32_t*>(tensor_data(topk_ids));
  ra.weights = static_cast<float*>(tensor_data(topk_weights));
  if (g.T == 0) return MOE_STATUS_SUCCESS;
  run_gate(dev, g, stream);
  backend_route(dev, rp, ra, stream);
  MOE_EXIT
}

// Shared experts ---------------------------------------------------------------

MOE_API moe_status_t moe_shared_experts_config_default(moe_shared_experts_config_t* config) {
  MOE_ENTRY
  ArgChecker c("moe_shared_experts_config_default");
  c.write_defaults(config, "config", shared_defaults(), kSharedMinSize);
  MOE_EXIT
}

MOE_API moe_status_t moe_shared_experts_create(const moe_shared_experts_config_t* config,
                                               moe_shared_experts_t* shared) {
  MOE_ENTRY
  ArgChecker c("moe_shared_experts_create");
  c.not_null(shared, "shared");
  *shared = nullptr;
  moe_shared_experts_config_t cfg =
      c.config(config, "config", shared_defaults(), kSharedMinSize);
  if (cfg.num_shared_experts < 1 || cfg.num_shared_experts > 64)
    c.bad("config->num_shared_experts", "n_shared in [1, 64]",
          std::to_string(cfg.num_shared_experts));
  if (cfg.hidden_size < 1 || cfg.hidden_size > (1 << 20))
    c.bad("config->hidden_size", "H in [1, 2^20]", std::to_string(cfg.hidden_size));
  if (cfg.intermediate_size < 1 || cfg.intermediate_size > (1 << 20))
    c.bad("config->intermediate_size", "I_shared in [1, 2^20]",
          std::to_string(cfg.intermediate_size));
  if (cfg.activation < 0 || cfg.activation >= MOE_ACTIVATION_NUM_ACTIVATIONS)
    c.bad("config->activation", "a moe_activation_t in [0, " +
                                    std::to_string(MOE_ACTIVATION_NUM_ACTIVATIONS) + ")",
          std::to_string(cfg.activation));
  c.flag("config->gated", cfg.gated);
  c.flag("config->swap_gate_up", cfg.swap_gate_up);
  if (cfg.swap_gate_up && !cfg.gated)
    c.bad("config->swap_gate_up", "0 when gated is 0 (there is no gate/up pair)",
          std::to_string(cfg.swap_gate_up));
  auto* s = new moe_shared_experts_s{};
  s->config = cfg;
  SharedPlan& p = s->plan;
  p.n = cfg.num_shared_experts;
  p.H = cfg.hidden_size;
  p.I = cfg.intermediate_size;
  p.activation = cfg.activation;
  p.gated = cfg.gated != 0;
  p.swap_gate_up = cfg.swap_gate_up != 0;
  *shared = s;
  MOE_EXIT
}

MOE_API moe_status_t moe_shared_experts_destroy(moe_shared_experts_t shared) {
  MOE_ENTRY
  delete shared;
  MOE_EXIT
}

MOE_API moe_status_t moe_shared_experts_set_weights(moe_shared_experts_t shared,
                                                    const DLTensor* w13, const DLTensor* w2,
                                                    const DLTensor* gate_weight) {
  MOE_ENTRY
  ArgChecker c("moe_shared_experts_set_weights");
  c.not_null(shared, "shared");
  SharedPlan p = shared->plan;
  DType wt = c.tensor(w13, "w13", {DType::f32, DType::f16, DType::bf16});
  c.shape(w13, "w13", {p.n, p.rows(), p.H}, {"n_shared", p.gated ? "2 * I_shared" : "I_shared", "H"});
  Device dev = c.device(w13, "w13");
  require_backend(c, dev);
  DType wt2 = c.tensor(w2, "w2", {DType::f32, DType::f16, DType::bf16});
  if (wt2 != wt)
    c.bad("w2.dtype", std::string("the dtype of w13 (") + dtype_name(wt) + ")", dtype_name(wt2));
  c.shape(w2, "w2", {p.n, p.H, p.I}, {"n_shared", "H", "I_shared"});
  c.same_device(dev, w2, "w2");
  p.gate = nullptr;
  if (gate_weight) {
    p.gate_dtype = c.tensor(gate_weight, "gate_weight", {DType::f32, DType::f16, DType::bf16});
    c.shape(gate_weight, "gate_weight", {1, p.H}, {"1", "H"});
    c.same_device(dev, gate_weight, "gate_weight");
    p.gate = tensor_data(gate_weight);
  }
  p.w_dtype = wt;
  p.w13 = tensor_data(w13);
  p.w2 = tensor_data(w2);
  p.device = dev.id;
#ifdef MOE_WITH_CUDA
  if (dev.backend == Backend::cuda && (!shared->side || shared->plan.device != dev.id ||
                                       shared->weights_device.backend != Backend::cuda)) {
    cuda::SideStream* fresh = cuda::side_stream_create(dev.id);
    cuda::side_stream_destroy(shared->side);
    shared->side = fresh;
    prepare_cuda(dev.id);
  }
#endif
  shared->plan = p;
  shared->weights_device = dev;
  shared->has_weights = true;
  MOE_EXIT
}

MOE_API moe_status_t moe_shared_experts_workspace_size(moe_shared_experts_t shared,
                                                       int64_t max_tokens, int32_t device_type,
                                                       size_t* bytes) {
  MOE_ENTRY
  ArgChecker c("moe_shared_experts_workspace_size");
  c.not_null(shared, "shared");
  c.not_null(bytes, "bytes");
  const SharedPlan& p = shared->plan;
  check_max_tokens(c, max_tokens, std::max<int64_t>(p.H, int64_t(p.n) * p.rows()));
  Device dev = queried_device(c, device_type, shared->weights_device.id);
  *bytes = shared_workspace(dev, shared->plan, max_tokens);
  MOE_EXIT
}

MOE_API moe_status_t moe_shared_experts_run(moe_shared_experts_t shared, const DLTensor* hidden,
                                            const DLTensor* num_valid_tokens, DLTensor* output,
                                            int32_t accumulate, void* workspace,
                                            size_t workspace_bytes, void* stream) {
  MOE_ENTRY
  ArgChecker c("moe_shared_experts_run");
  c.not_null(shared, "shared");
  if (!shared->has_weights)
    c.bad("shared", "shared experts whose weights were set with moe_shared_experts_set_weights",
          "shared experts without weights");
  const SharedPlan& p = shared->plan;
  const Device dev = shared->weights_device;
  SharedArgs a{};
  a.x_dtype = c.tensor(hidden, "hidden", {DType::f32, DType::f16, DType::bf16});
  c.shape(hidden, "hidden", {-1, p.H}, {"T", "H"});
  c.same_device(dev, hidden, "hidden");
  a.T = hidden->shape[0];
  a.x = tensor_data(hidden);
  DType out = c.tensor(output, "output", {DType::f32, DType::f16, DType::bf16});
  if (out != a.x_dtype)
    c.bad("output.dtype", std::string("the dtype of hidden (") + dtype_name(a.x_dtype) + ")",
          dtype_name(out));
  c.shape(output, "output", {a.T, p.H}, {"T", "H"});
  c.same_device(dev, output, "output");
  a.y = tensor_data(output);
  c.flag("accumulate", accumulate);
  a.accumulate = accumulate != 0;
  a.num_valid = check_num_valid(c, num_valid_tokens, dev);
  const size_t need = shared_workspace(dev, p, a.T);
  WorkspaceLease ws =
      lease_workspace(c, library_workspace(dev), workspace, workspace_bytes, need, dev, stream);
  a.workspace = ws.ptr;
  if (a.T == 0) return MOE_STATUS_SUCCESS;
  run_shared(dev, p, a, stream);
  MOE_EXIT
}

// The block ----------------------------------------------------------------------

MOE_API moe_status_t moe_block_workspace_size(moe_router_t router, moe_dispatcher_t dispatcher,
                                              moe_runner_t runner, moe_shared_experts_t shared,
                                              int64_t max_tokens, int32_t device_type,
                                              size_t* bytes) {
  MOE_ENTRY
  ArgChecker c("moe_block_workspace_size");
  c.not_null(router, "router");
  c.not_null(dispatcher, "dispatcher");
  c.not_null(runner, "runner");
  c.not_null(bytes, "bytes");
  check_max_tokens(c, max_tokens, std::max<int64_t>(runner->plan.H, router->plan.E));
  Device dev = queried_device(c, device_type, dispatcher->device.id);
  const size_t lb = layer_bytes(c, router, dispatcher, runner, max_tokens, dev);
  const int H = runner->plan.H;
  if (shared && shared->plan.H != H)
    c.bad("shared", "hidden_size = the runner's hidden_size " + std::to_string(H),
          std::to_string(shared->plan.H));
  *bytes = block_layout(dev, *router, H, shared, lb, max_tokens).total;
#ifdef MOE_WITH_CUDA
  if (dev.backend == Backend::cuda) prepare_cuda(dev.id);
#endif
  MOE_EXIT
}

MOE_API moe_status_t moe_block_forward(moe_router_t router, moe_dispatcher_t dispatcher,
                                       moe_runner_t runner, moe_shared_experts_t shared,
                                       const DLTensor* hidden, const DLTensor* gate_weight,
                                       const DLTensor* correction_bias,
                                       const DLTensor* num_valid_tokens, DLTensor* output,
                                       void* workspace, size_t workspace_bytes, void* stream) {
  MOE_ENTRY
  ArgChecker c("moe_block_forward");
  c.not_null(router, "router");
  c.not_null(dispatcher, "dispatcher");
  c.not_null(runner, "runner");
  RunArgs ra{};
  const Device dev = check_run_io(c, *runner, hidden, output, ra);
  require_backend(c, dev);
  if (dispatcher->device != dev)
    c.bad("dispatcher", "a dispatcher on the tensors' device (" + device_string(dev) + ")",
          "one on " + device_string(dispatcher->device));
  const int64_t T = ra.T;
  const int H = runner->plan.H;
  GateArgs g{};
  g.device = dev.id;
  g.x_dtype = ra.x_dtype;
  g.x = ra.x;
  g.T = T;
  g.H = H;
  g.w_dtype = check_gate_weight(c, gate_weight, router->plan.E, H, dev);
  g.w = tensor_data(gate_weight);
  g.E = router->plan.E;
  if (shared) check_shared_fits(c, *shared, H, dev);
  const size_t lb = layer_bytes(c, router, dispatcher, runner, T, dev);
  const BlockLayout l = block_layout(dev, *router, H, shared, lb, T);
  WorkspaceLease ws =
      lease_workspace(c, library_workspace(dev), workspace, workspace_bytes, l.total, dev, stream);
  char* base = static_cast<char*>(ws.ptr);
  g.logits = reinterpret_cast<float*>(base + l.logits);
  g.workspace = base + l.gate;
  F32View logits(g.logits, T, g.E, dev);
  RouteArgs route_args{};  // checks bias and num_valid_tokens by the router's rules
  check_route_inputs(c, *router, &logits.t, correction_bias, num_valid_tokens, route_args);
  if (T == 0) return MOE_STATUS_SUCCESS;

  SharedArgs sa{};
  sa.x_dtype = ra.x_dtype;
  sa.x = ra.x;
  sa.T = T;
  sa.num_valid = route_args.num_valid;
  sa.y = ra.y;
  sa.accumulate = true;
  sa.workspace = base + l.shared;

  auto layer = [&] {
    forward_status(c, moe_layer_forward(router, dispatcher, runner, hidden, &logits.t,
                                        correction_bias, num_valid_tokens, output,
                                        base + l.layer, l.layer_bytes, stream));
  };
  if (!shared || dev.backend == Backend::cpu) {
    run_gate(dev, g, stream);
    layer();
    if (shared) cpu::shared_run(shared->plan, sa);
    return MOE_STATUS_SUCCESS;
  }
#ifdef MOE_WITH_CUDA
  // The shared experts' GEMMs on the side stream, overlapped with the gate,
  // routing and routed experts on `stream`; the combine after the join.
  std::lock_guard<std::mutex> side_lock(shared->side_mutex);
  void* side = cuda::side_stream_fork(shared->side, stream);
  struct Join {  // joins the side stream back even when an enqueue fails (no dangling fork in a capture)
    cuda::SideStream* side;
    void* stream;
    bool done = false;
    ~Join() {
      if (!done) try {
          cuda::side_stream_join(side, stream);
        } catch (...) {
        }
    }
  } join{shared->side, stream};
  block_gemms::shared_compute(shared->plan, sa, side);
  run_gate(dev, g, stream);
  layer();
  join.done = true;
  cuda::side_stream_join(shared->side, stream);
  block_gemms::shared_combine(shared->plan, sa, stream);
#endif
  MOE_EXIT
}

}  // extern "C"
