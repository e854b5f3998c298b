// The MoE block on the CUDA backend against the float64 reference of the
// whole block (tests/ref_block.h): DeepSeek-V3-, Qwen2-MoE- and Mixtral-like
// configurations per dtype, padding, the gate projection's f32 logits, the
// shared experts' cuBLASLt paths, independence from the stream overlap, and
// CUDA-graph capture of the whole block.
#include <cstring>
#include <memory>

#include "gpu_support.h"
#include "ref_block.h"

using namespace moe_test;

namespace {

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

// BlockData on the device, with the handles' weights set.
struct DeviceBlock {
  std::unique_ptr<DeviceTensor> x, gate_w, bias, w13, w2, sw13, sw2, sgate;
  BlockHandles h;
  DeviceBlock(const BlockData& d) {
    x = std::make_unique<DeviceTensor>(*d.x);
    gate_w = std::make_unique<DeviceTensor>(*d.gate_w);
    bias = std::make_unique<DeviceTensor>(*d.bias);
    w13 = std::make_unique<DeviceTensor>(*d.w13);
    w2 = std::make_unique<DeviceTensor>(*d.w2);
    make_block_handles(d.spec, kDLCUDA, h);
    MOE_CHECK_OK(moe_runner_set_weights(h.runner, w13->dl(), w2->dl(), nullptr, nullptr, nullptr,
                                        nullptr));
    if (h.shared) {
      sw13 = std::make_unique<DeviceTensor>(*d.sw13);
      sw2 = std::make_unique<DeviceTensor>(*d.sw2);
      if (d.sgate) sgate = std::make_unique<DeviceTensor>(*d.sgate);
      MOE_CHECK_OK(moe_shared_experts_set_weights(h.shared, sw13->dl(), sw2->dl(),
                                                  sgate ? sgate->dl() : nullptr));
    }
  }
  const DLTensor* bias_or_null(const BlockSpec& s) { return s.bias ? bias->dl() : nullptr; }
};

bool same_bits(const HostTensor& a, const HostTensor& b) {
  return a.storage.size() == b.storage.size() &&
         std::memcmp(a.storage.data(), b.storage.data(), a.storage.size()) == 0;
}

void check_against_ref(const BlockData& d, const HostTensor& y, int64_t valid) {
  std::vector<double> ref, margin;
  ref_block(d.ref, d.xd, d.T, valid, ref, margin);
  int64_t compared = 0;
  const double err = block_rel_error(y, ref, margin, compared);
  INFO("rel error ", err, " over ", compared, " of ", d.T, " rows");
  CHECK(compared >= d.T * 3 / 4);
  CHECK(err < tolerance(d.dtype));
  for (int64_t i = valid * d.spec.H; i < d.T * d.spec.H; ++i) REQUIRE(y.get(i) == 0.0);
}

// One block forward on the device with a workspace of the queried size.
void check_block_gpu(const BlockSpec& spec, DT dt, int64_t T, int64_t valid) {
  CAPTURE(spec.name);
  CAPTURE(dt_name(dt));
  CAPTURE(T);
  auto rng = fresh_rng();
  BlockData d;
  make_block_data(spec, dt, T, rng, d);
  DeviceBlock db(d);
  size_t bytes = 0;
  MOE_CHECK_OK(moe_block_workspace_size(db.h.router, db.h.dispatcher, db.h.runner, db.h.shared, T,
                                        kDLCUDA, &bytes));
  DeviceBuffer ws(bytes);
  HostTensor nv(DT::i32, {1}), y(dt, {T, spec.H});
  nv.as<int32_t>()[0] = int32_t(valid);
  DeviceTensor dnv(nv), dy(dt, {T, spec.H});
  Stream st;
  dy.poison();
  MOE_CHECK_OK(moe_block_forward(db.h.router, db.h.dispatcher, db.h.runner, db.h.shared,
                                 db.x->dl(), db.gate_w->dl(), db.bias_or_null(spec),
                                 valid < T ? dnv.dl() : nullptr, dy.dl(), ws.p, ws.bytes, st.s));
  CUDA_OK(cudaStreamSynchronize(st.s));
  dy.download(y);
  check_against_ref(d, y, valid);
}

}  // namespace

TEST_CASE("block_gpu.forward.deepseek_v3") {
  for (DT dt : {DT::bf16, DT::f16, DT::f32}) {
    SUBCASE(dt_name(dt)) {
      check_block_gpu(deepseek_v3_like(), dt, 53, 53);
      check_block_gpu(deepseek_v3_like(), dt, 1, 1);
      check_block_gpu(deepseek_v3_like(), dt, 300, 300);
    }
  }
}

TEST_CASE("block_gpu.forward.qwen2_moe") {
  for (DT dt : {DT::bf16, DT::f16, DT::f32}) {
    SUBCASE(dt_name(dt)) {
      check_block_gpu(qwen2_moe_like(), dt, 47, 47);
      check_block_gpu(qwen2_moe_like(), dt, 1, 1);
      check_block_gpu(qwen2_moe_like(), dt, 257, 257);
    }
  }
}

TEST_CASE("block_gpu.forward.mixtral") {
  for (DT dt : {DT::bf16, DT::f16, DT::f32}) {
    SUBCASE(dt_name(dt)) {
      check_block_gpu(mixtral_like(), dt, 40, 40);
      check_block_gpu(mixtral_like(), dt, 1, 1);
    }
  }
}

TEST_CASE("block_gpu.forward.padded_scaling_on_output") {
  BlockSpec s = deepseek_v3_like();
  s.scaling_on_output = 1;
  for (DT dt : {DT::bf16, DT::f32}) {
    SUBCASE(dt_name(dt)) {
      check_block_gpu(s, dt, 64, 57);
      check_block_gpu(qwen2_moe_like(), dt, 64, 0);
    }
  }
}

TEST_CASE("block_gpu.forward.qwen3_shape_with_gated_shared_expert") {
  // Real sizes: E=128, k=8, H=2048, I=768 (one rank of 8), plus a gated
  // shared expert.
  BlockSpec s = qwen2_moe_like();
  s.name = "qwen3_30b_a3b+shared";
  s.E = 128, s.k = 8, s.renormalize = 1;
  s.ep_size = 8, s.ep_rank = 3;
  s.H = 2048, s.I = 768, s.I_shared = 1024;
  check_block_gpu(s, DT::bf16, 24, 24);
}

TEST_CASE("block_gpu.forward.equals_its_parts") {
  // The shared experts on the side stream give the same bits as gate ->
  // layer -> shared experts run one after the other on one stream.
  auto rng = fresh_rng();
  for (const BlockSpec& spec : {deepseek_v3_like(), qwen2_moe_like()}) {
    for (DT dt : {DT::bf16, DT::f32}) {
      CAPTURE(spec.name);
      CAPTURE(dt_name(dt));
      const int64_t T = 77;
      BlockData d;
      make_block_data(spec, dt, T, rng, d);
      DeviceBlock db(d);
      const DLTensor* bias = db.bias_or_null(spec);
      DeviceTensor dy(dt, {T, spec.H}), dparts(dt, {T, spec.H}), logits(DT::f32, {T, spec.E}),
          ids(DT::i32, {T, spec.k}), w(DT::f32, {T, spec.k});
      HostTensor y(dt, {T, spec.H}), parts(dt, {T, spec.H});
      Stream st;
      dy.poison();
      dparts.poison();
      MOE_CHECK_OK(moe_block_forward(db.h.router, db.h.dispatcher, db.h.runner, db.h.shared,
                                     db.x->dl(), db.gate_w->dl(), bias, nullptr, dy.dl(), nullptr,
                                     0, st.s));
      MOE_CHECK_OK(moe_router_run_hidden(db.h.router, db.x->dl(), db.gate_w->dl(), bias, nullptr,
                                         ids.dl(), w.dl(), logits.dl(), nullptr, 0, st.s));
      MOE_CHECK_OK(moe_layer_forward(db.h.router, db.h.dispatcher, db.h.runner, db.x->dl(),
                                     logits.dl(), bias, nullptr, dparts.dl(), nullptr, 0, st.s));
      MOE_CHECK_OK(moe_shared_experts_run(db.h.shared, db.x->dl(), nullptr, dparts.dl(), 1,
                                          nullptr, 0, st.s));
      CUDA_OK(cudaStreamSynchronize(st.s));
      dy.download(y);
      dparts.download(parts);
      CHECK(same_bits(y, parts));
      check_against_ref(d, y, T);
    }
  }
}

TEST_CASE("block_gpu.graph.capture") {
  // The whole block (gate, routing, routed experts, shared experts on the
  // side stream) captured with a caller workspace and replayed; the padded
  // count is read on the device at replay time.
  auto rng = fresh_rng();
  for (const BlockSpec& spec : {deepseek_v3_like(), qwen2_moe_like(), mixtral_like()}) {
    CAPTURE(spec.name);
    const int64_t T = 96;
    const DT dt = DT::bf16;
    BlockData d;
    make_block_data(spec, dt, T, rng, d);
    DeviceBlock db(d);
    const DLTensor* bias = db.bias_or_null(spec);
    size_t bytes = 0;
    MOE_CHECK_OK(moe_block_workspace_size(db.h.router, db.h.dispatcher, db.h.runner, db.h.shared,
                                          T, kDLCUDA, &bytes));
    DeviceBuffer ws(bytes);
    HostTensor nv(DT::i32, {1}), eager(dt, {T, spec.H}), replay(dt, {T, spec.H}),
        eager_padded(dt, {T, spec.H});
    nv.as<int32_t>()[0] = int32_t(T);
    DeviceTensor dnv(nv), dy(dt, {T, spec.H});
    Stream st;
    auto enqueue = [&] {
      MOE_CHECK_OK(moe_block_forward(db.h.router, db.h.dispatcher, db.h.runner, db.h.shared,
                                     db.x->dl(), db.gate_w->dl(), bias, dnv.dl(), dy.dl(), ws.p,
                                     ws.bytes, st.s));
    };
    dy.poison();
    enqueue();
    CUDA_OK(cudaStreamSynchronize(st.s));
    dy.download(eager);
    check_against_ref(d, eager, T);
    nv.as<int32_t>()[0] = int32_t(T - 13);
    dnv.upload(nv);
    dy.poison();
    enqueue();
    CUDA_OK(cudaStreamSynchronize(st.s));
    dy.download(eager_padded);
    check_against_ref(d, eager_padded, T - 13);

    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    CUDA_OK(cudaStreamBeginCapture(st.s, cudaStreamCaptureModeGlobal));
    enqueue();
    CUDA_OK(cudaStreamEndCapture(st.s, &graph));
    CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
    for (int32_t valid : {int32_t(T), int32_t(T - 13), int32_t(T)}) {
      nv.as<int32_t>()[0] = valid;
      dnv.upload(nv);
      dy.poison();
      CUDA_OK(cudaGraphLaunch(exec, st.s));
      CUDA_OK(cudaStreamSynchronize(st.s));
      dy.download(replay);
      CHECK(same_bits(replay, valid == T ? eager : eager_padded));
    }
    CUDA_OK(cudaGraphExecDestroy(exec));
    CUDA_OK(cudaGraphDestroy(graph));
  }
}

TEST_CASE("block_gpu.router_run_hidden.logits") {
  // Continuous data: cuBLASLt's f32 logits against float64 for every dtype
  // mix (mixed ones go through the f32 widening), and routing on them equals
  // moe_router_run on the same logits.
  auto rng = fresh_rng();
  const int64_t T = 67;
  const int E = 256, H = 7168 / 8, k = 8;
  moe_router_config_t rc;
  rc.struct_size = uint32_t(sizeof(rc));
  MOE_CHECK_OK(moe_router_config_default(&rc, MOE_ROUTING_DEEPSEEK_V3));
  rc.num_experts = E;
  rc.top_k = k;
  rc.n_group = 8;
  rc.topk_group = 4;
  rc.routed_scaling_factor = 2.5f;
  moe_router_t router = nullptr;
  MOE_CHECK_OK(moe_router_create(&rc, &router));
  for (DT xt : {DT::bf16, DT::f16, DT::f32}) {
    for (DT wt : {DT::f32, DT::bf16, DT::f16}) {
      CAPTURE(dt_name(xt));
      CAPTURE(dt_name(wt));
      HostTensor x(xt, {T, H}), gw(wt, {E, H}), bias(DT::f32, {E}), logits(DT::f32, {T, E}),
          ids(DT::i32, {T, k}), w(DT::f32, {T, k}), ids2(DT::i32, {T, k}), w2(DT::f32, {T, k});
      x.fill_normal(rng);
      gw.fill_normal(rng, 0.03);
      bias.fill_normal(rng, 0.05);
      DeviceTensor dx(x), dgw(gw), dbias(bias), dlogits(DT::f32, {T, E}), dids(DT::i32, {T, k}),
          dw(DT::f32, {T, k}), dids2(DT::i32, {T, k}), dw2(DT::f32, {T, k});
      dlogits.poison();
      dids.poison();
      dw.poison();
      size_t bytes = 0;
      MOE_CHECK_OK(moe_router_hidden_workspace_size(router, H, T, kDLCUDA, &bytes));
      DeviceBuffer ws(bytes);
      Stream st;
      MOE_CHECK_OK(moe_router_run_hidden(router, dx.dl(), dgw.dl(), dbias.dl(), nullptr,
                                         dids.dl(), dw.dl(), dlogits.dl(), ws.p, ws.bytes, st.s));
      MOE_CHECK_OK(moe_router_run(router, dlogits.dl(), dbias.dl(), nullptr, dids2.dl(), dw2.dl(),
                                  st.s));
      CUDA_OK(cudaStreamSynchronize(st.s));
      dlogits.download(logits);
      dids.download(ids);
      dw.download(w);
      dids2.download(ids2);
      dw2.download(w2);
      CHECK(rel_error(values(logits), ref_gate(values(x), values(gw).data(), T, H, E)) < 1e-5);
      CHECK(same_bits(ids, ids2));
      CHECK(same_bits(w, w2));
    }
  }
  moe_router_destroy(router);
}

TEST_CASE("block_gpu.shared_experts.variants") {
  // Every cuBLASLt path: the GELU epilogue (non-gated GELU_TANH, 16-bit),
  // no epilogue (IDENTITY), f32 pre-activations + our kernel (gated, f32),
  // several shared experts summed in f32, the sigmoid gate, accumulate.
  auto rng = fresh_rng();
  struct Variant {
    int n, act, gated, swap;
    bool gate;
  };
  const Variant variants[] = {{2, MOE_ACTIVATION_GELU_TANH, 0, 0, false},
                              {3, MOE_ACTIVATION_RELU2, 1, 1, true},
                              {1, MOE_ACTIVATION_GELU, 1, 0, true},
                              {2, MOE_ACTIVATION_IDENTITY, 0, 0, false},
                              {1, MOE_ACTIVATION_SILU, 1, 0, false}};
  const int H = 256, I = 136;
  for (int64_t T : {int64_t(1), int64_t(45), int64_t(513)}) {
    for (const Variant& v : variants) {
      for (DT dt : {DT::bf16, DT::f16, DT::f32}) {
        for (int acc : {0, 1}) {
          CAPTURE(T);
          CAPTURE(v.n);
          CAPTURE(v.act);
          CAPTURE(dt_name(dt));
          CAPTURE(acc);
          moe_shared_experts_config_t sc;
          sc.struct_size = uint32_t(sizeof(sc));
          MOE_CHECK_OK(moe_shared_experts_config_default(&sc));
          sc.num_shared_experts = v.n;
          sc.hidden_size = H;
          sc.intermediate_size = I;
          sc.activation = v.act;
          sc.gated = v.gated;
          sc.swap_gate_up = v.swap;
          moe_shared_experts_t sh = nullptr;
          MOE_CHECK_OK(moe_shared_experts_create(&sc, &sh));
          const int rows = v.gated ? 2 * I : I;
          HostTensor x(dt, {T, H}), w13(dt, {v.n, rows, H}), w2(dt, {v.n, H, I}),
              gate(DT::bf16, {1, H}), y0(dt, {T, H}), y(dt, {T, H});
          x.fill_normal(rng);
          w13.fill_normal(rng, 0.08);
          w2.fill_normal(rng, 0.1);
          gate.fill_normal(rng, 0.1);
          y0.fill_normal(rng);
          DeviceTensor dx(x), dw13(w13), dw2(w2), dgate(gate), dy(y0);
          MOE_CHECK_OK(moe_shared_experts_set_weights(sh, dw13.dl(), dw2.dl(),
                                                      v.gate ? dgate.dl() : nullptr));
          if (!acc) dy.poison();
          size_t bytes = 0;
          MOE_CHECK_OK(moe_shared_experts_workspace_size(sh, T, kDLCUDA, &bytes));
          DeviceBuffer ws(bytes);
          Stream st;
          MOE_CHECK_OK(moe_shared_experts_run(sh, dx.dl(), nullptr, dy.dl(), acc, ws.p, ws.bytes,
                                              st.s));
          CUDA_OK(cudaStreamSynchronize(st.s));
          dy.download(y);
          const std::vector<double> xd = values(x), w13d = values(w13), w2d = values(w2),
                                    gd = values(gate), y0d = values(y0);
          RefBlock b;
          b.has_shared = true;
          b.shared = RefMlp{v.n, H, I, v.act, v.gated != 0, v.swap != 0, w13d.data(), w2d.data()};
          b.shared_gate = v.gate ? gd.data() : nullptr;
          std::vector<double> ref = ref_shared(b, xd, T);
          if (acc)
            for (size_t i = 0; i < ref.size(); ++i) ref[i] += y0d[i];
          CHECK(rel_error(values(y), ref) < tolerance(dt));
          moe_shared_experts_destroy(sh);
        }
      }
    }
  }
}

TEST_CASE("block_gpu.errors") {
  // The CUDA shared experts need hidden in the weights' dtype; a CPU tensor
  // in a CUDA call is refused.
  moe_shared_experts_config_t sc;
  sc.struct_size = uint32_t(sizeof(sc));
  MOE_CHECK_OK(moe_shared_experts_config_default(&sc));
  sc.hidden_size = 64;
  sc.intermediate_size = 32;
  moe_shared_experts_t sh = nullptr;
  MOE_CHECK_OK(moe_shared_experts_create(&sc, &sh));
  DeviceTensor w13(DT::bf16, {1, 64, 64}), w2(DT::bf16, {1, 64, 32}), x(DT::f32, {4, 64}),
      y(DT::f32, {4, 64});
  MOE_CHECK_OK(moe_shared_experts_set_weights(sh, w13.dl(), w2.dl(), nullptr));
  moe_status_t st = moe_shared_experts_run(sh, x.dl(), nullptr, y.dl(), 0, nullptr, 0, nullptr);
  check_error_mentions(st, MOE_STATUS_UNSUPPORTED, {"shared experts", "dtype"});
  HostTensor hx(DT::bf16, {4, 64}), hy(DT::bf16, {4, 64});
  st = moe_shared_experts_run(sh, hx.dl(), nullptr, hy.dl(), 0, nullptr, 0, nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"hidden", "cuda:0"});
  moe_shared_experts_destroy(sh);
}
