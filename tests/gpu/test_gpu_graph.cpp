// The CUDA path is graph-capturable: route + dispatch + run with caller
// workspaces, and moe_layer_forward, captured on a stream, replayed, and
// compared bit for bit with an eager run of the same inputs.
#include <cstring>

#include "gpu_support.h"

using namespace moe_test;

namespace {

struct Handles {
  moe_router_t router = nullptr;
  moe_dispatcher_t dispatcher = nullptr;
  moe_runner_t runner = nullptr;
  ~Handles() {
    moe_router_destroy(router);
    moe_dispatcher_destroy(dispatcher);
    moe_runner_destroy(runner);
  }
};

struct Stream {
  cudaStream_t s = nullptr;
  Stream() { CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(s); }
};

struct DeviceBuffer {
  void* p = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t b) : bytes(std::max<size_t>(b, 256)) { CUDA_OK(cudaMalloc(&p, bytes)); }
  ~DeviceBuffer() { cudaFree(p); }
};

// Qwen3-like layer, scaled down: DeepSeek-V3 routing with groups and a bias.
constexpr int E = 64, K = 6, H = 256, I = 128;

void make_handles(Handles& h) {
  moe_router_config_t rc;
  rc.struct_size = uint32_t(sizeof(rc));
  REQUIRE(moe_router_config_default(&rc, MOE_ROUTING_DEEPSEEK_V3) == MOE_STATUS_SUCCESS);
  rc.num_experts = E;
  rc.top_k = K;
  rc.n_group = 8;
  rc.topk_group = 4;
  rc.routed_scaling_factor = 2.0f;
  MOE_CHECK_OK(moe_router_create(&rc, &h.router));
  moe_dispatcher_config_t dc;
  dc.struct_size = uint32_t(sizeof(dc));
  REQUIRE(moe_dispatcher_config_default(&dc) == MOE_STATUS_SUCCESS);
  dc.num_experts = E;
  dc.ep_size = 2;
  dc.ep_rank = 1;
  dc.device_type = kDLCUDA;
  MOE_CHECK_OK(moe_dispatcher_create(&dc, &h.dispatcher));
  moe_runner_config_t c;
  c.struct_size = uint32_t(sizeof(c));
  REQUIRE(moe_runner_config_default(&c) == MOE_STATUS_SUCCESS);
  c.num_experts = E / 2;
  c.hidden_size = H;
  c.intermediate_size = I;
  MOE_CHECK_OK(moe_runner_create(&c, &h.runner));
}

bool same_bits(const HostTensor& a, const HostTensor& b) {
  return a.storage.size() == b.storage.size() &&
         std::memcmp(a.storage.data(), b.storage.data(), a.storage.size()) == 0;
}

}  // namespace

TEST_CASE("gpu.graph.route_dispatch_run") {
  auto rng = fresh_rng();
  const int64_t T = 96;
  Handles h;
  make_handles(h);
  HostTensor x(DT::bf16, {T, H}), logits(DT::f32, {T, E}), bias(DT::f32, {E}),
      w13(DT::bf16, {E / 2, 2 * I, H}), w2(DT::bf16, {E / 2, H, I}), nvalid(DT::i32, {1});
  x.fill_normal(rng);
  logits.fill_normal(rng);
  bias.fill_normal(rng, 0.1);
  fill_uniform_fast(w13, rng(), 0.1);
  fill_uniform_fast(w2, rng(), 0.1);
  nvalid.as<int32_t>()[0] = int32_t(T - 10);  // a padded batch
  DeviceTensor dx(x), dlog(logits), dbias(bias), dw13(w13), dw2(w2), dnv(nvalid);
  MOE_CHECK_OK(moe_runner_set_weights(h.runner, dw13.dl(), dw2.dl(), nullptr, nullptr, nullptr, nullptr));
  DeviceTensor ids(DT::i32, {T, K}), wts(DT::f32, {T, K}), local(DT::i32, {T, K}),
      counts(DT::i32, {E / 2}), offsets(DT::i32, {E / 2 + 1}), sorted(DT::i32, {T * K}),
      y(DT::bf16, {T, H});
  size_t dbytes = 0, rbytes = 0, lbytes = 0;
  MOE_CHECK_OK(moe_dispatcher_workspace_size(h.dispatcher, T, K, &dbytes));
  MOE_CHECK_OK(moe_runner_workspace_size(h.runner, T, K, kDLCUDA, &rbytes));
  MOE_CHECK_OK(moe_layer_workspace_size(h.router, h.dispatcher, h.runner, T, kDLCUDA, &lbytes));
  DeviceBuffer dws(dbytes), rws(rbytes), lws(lbytes);
  Stream st;

  auto enqueue = [&] {
    MOE_CHECK_OK(moe_router_run(h.router, dlog.dl(), dbias.dl(), dnv.dl(), ids.dl(), wts.dl(), st.s));
    MOE_CHECK_OK(moe_dispatcher_dispatch(h.dispatcher, ids.dl(), local.dl(), counts.dl(),
                                         offsets.dl(), sorted.dl(), dws.p, dws.bytes, st.s));
    MOE_CHECK_OK(moe_runner_run(h.runner, dx.dl(), local.dl(), wts.dl(), offsets.dl(), sorted.dl(),
                                y.dl(), rws.p, rws.bytes, st.s));
  };
  HostTensor eager(DT::bf16, {T, H}), replay(DT::bf16, {T, H}), layer_eager(DT::bf16, {T, H}),
      layer_replay(DT::bf16, {T, H});

  y.poison();
  enqueue();
  CUDA_OK(cudaStreamSynchronize(st.s));
  y.download(eager);
  for (int64_t i = 0; i < eager.numel(); ++i) REQUIRE(!std::isnan(eager.get(i)));

  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  CUDA_OK(cudaStreamBeginCapture(st.s, cudaStreamCaptureModeThreadLocal));
  enqueue();
  CUDA_OK(cudaStreamEndCapture(st.s, &graph));
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  for (int rep = 0; rep < 3; ++rep) {
    y.poison();
    for (DeviceTensor* t : {&ids, &wts, &local, &counts, &offsets, &sorted}) t->poison();
    CUDA_OK(cudaGraphLaunch(exec, st.s));
    CUDA_OK(cudaStreamSynchronize(st.s));
    y.download(replay);
    CHECK(same_bits(replay, eager));
  }
  CUDA_OK(cudaGraphExecDestroy(exec));
  CUDA_OK(cudaGraphDestroy(graph));

  // The one-call layer, eager then captured.
  y.poison();
  MOE_CHECK_OK(moe_layer_forward(h.router, h.dispatcher, h.runner, dx.dl(), dlog.dl(), dbias.dl(),
                                 dnv.dl(), y.dl(), lws.p, lws.bytes, st.s));
  CUDA_OK(cudaStreamSynchronize(st.s));
  y.download(layer_eager);
  CHECK(same_bits(layer_eager, eager));
  CUDA_OK(cudaStreamBeginCapture(st.s, cudaStreamCaptureModeThreadLocal));
  MOE_CHECK_OK(moe_layer_forward(h.router, h.dispatcher, h.runner, dx.dl(), dlog.dl(), dbias.dl(),
                                 dnv.dl(), y.dl(), lws.p, lws.bytes, st.s));
  CUDA_OK(cudaStreamEndCapture(st.s, &graph));
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  y.poison();
  CUDA_OK(cudaGraphLaunch(exec, st.s));
  CUDA_OK(cudaStreamSynchronize(st.s));
  y.download(layer_replay);
  CHECK(same_bits(layer_replay, eager));
  CUDA_OK(cudaGraphExecDestroy(exec));
  CUDA_OK(cudaGraphDestroy(graph));
}
