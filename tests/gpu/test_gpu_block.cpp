// The MoE block on the GPU (gate projection, shared experts on a side
// stream, the one-call block) against the float64 reference of the whole
// block (tests/ref_block.h), and captured in a CUDA graph.
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>

#include "gpu_support.h"
#include "ref_block.h"

using namespace moe_test;

namespace {

// Device copies of a block's host data; pointers are null where the host has none.
struct DeviceBlock {
  std::unique_ptr<DeviceTensor> x, gate_w, bias, w13, w2, sw13, sw2, sgate;
  explicit DeviceBlock(const BlockData& d) {
    auto up = [](const std::unique_ptr<HostTensor>& h) {
      return h ? std::make_unique<DeviceTensor>(*h) : nullptr;
    };
    x = up(d.x);
    gate_w = up(d.gate_w);
    bias = up(d.bias);
    w13 = up(d.w13);
    w2 = up(d.w2);
    sw13 = up(d.sw13);
    sw2 = up(d.sw2);
    sgate = up(d.sgate);
  }
};

void set_weights(BlockHandles& h, DeviceBlock& g) {
  MOE_CHECK_OK(moe_runner_set_weights(h.runner, g.w13->dl(), g.w2->dl(), nullptr, nullptr,
                                      nullptr, nullptr));
  if (h.shared)
    MOE_CHECK_OK(moe_shared_experts_set_weights(h.shared, g.sw13->dl(), g.sw2->dl(),
                                                g.sgate ? g.sgate->dl() : nullptr));
}

struct DeviceBuffer {
  void* p = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t b) : bytes(std::max<size_t>(b, 256)) {
    CUDA_OK(cudaMalloc(&p, bytes));
    CUDA_OK(cudaMemset(p, 0xff, bytes));  // garbage must not leak into the output
  }
  ~DeviceBuffer() { cudaFree(p); }
};

const BlockSpec kSpecs[] = {deepseek_v3_like(), qwen2_moe_like(), mixtral_like()};

void check_block(const BlockSpec& spec, DT dt, int64_t T, int64_t valid) {
  auto rng = fresh_rng();
  BlockData d;
  make_block_data(spec, dt, T, rng, d);
  DeviceBlock g(d);
  BlockHandles h;
  make_block_handles(spec, kDLCUDA, h);
  set_weights(h, g);
  size_t bytes = 0;
  MOE_CHECK_OK(moe_block_workspace_size(h.router, h.dispatcher, h.runner, h.shared, T, kDLCUDA,
                                        &bytes));
  DeviceBuffer ws(bytes);
  HostTensor nv(DT::i32, {1}), y(dt, {T, spec.H});
  nv.as<int32_t>()[0] = int32_t(valid);
  DeviceTensor d_nv(nv), d_y(dt, {T, spec.H});
  d_y.poison();
  MOE_CHECK_OK(moe_block_forward(h.router, h.dispatcher, h.runner, h.shared, g.x->dl(),
                                 g.gate_w->dl(), spec.bias ? g.bias->dl() : nullptr,
                                 valid < T ? d_nv.dl() : nullptr, d_y.dl(), ws.p, ws.bytes,
                                 nullptr));
  d_y.download(y);
  std::vector<double> ref, margin;
  ref_block(d.ref, d.xd, T, valid, ref, margin);
  int64_t compared = 0;
  const double err = block_rel_error(y, ref, margin, compared);
  INFO("spec ", std::string(spec.name), " dtype ", std::string(dt_name(dt)), " T ", T, " valid ", valid, ": rel error ",
       err, " over ", compared, " rows");
  CHECK(compared >= T * 3 / 4);
  CHECK(err < tolerance(dt));
  for (int64_t i = valid * spec.H; i < T * spec.H; ++i) REQUIRE(y.get(i) == 0.0);
}

}  // namespace

TEST_CASE("gpu.block.forward_vs_reference") {
  for (const BlockSpec& spec : kSpecs)
    for (DT dt : {DT::bf16, DT::f16, DT::f32}) {
      SUBCASE((std::string(spec.name) + "." + dt_name(dt)).c_str()) {
        for (int64_t T : {int64_t(1), int64_t(7), int64_t(64), int64_t(300)})
          check_block(spec, dt, T, T);
        check_block(spec, dt, 50, 37);  // a padded batch
      }
    }
}

TEST_CASE("gpu.block.shared_experts_accumulate") {
  // moe_shared_experts_run alone: y = routed (given) + gated shared sum.
  for (DT dt : {DT::bf16, DT::f32}) {
    const BlockSpec spec = qwen2_moe_like();
    const int64_t T = 40;
    auto rng = fresh_rng();
    BlockData d;
    make_block_data(spec, dt, T, rng, d);
    DeviceBlock g(d);
    BlockHandles h;
    make_block_handles(spec, kDLCUDA, h);
    set_weights(h, g);
    size_t bytes = 0;
    MOE_CHECK_OK(moe_shared_experts_workspace_size(h.shared, T, kDLCUDA, &bytes));
    DeviceBuffer ws(bytes);
    HostTensor base(dt, {T, spec.H}), y(dt, {T, spec.H});
    base.fill_normal(rng);
    DeviceTensor d_y(base);
    MOE_CHECK_OK(moe_shared_experts_run(h.shared, g.x->dl(), nullptr, d_y.dl(), 1, ws.p, ws.bytes,
                                        nullptr));
    d_y.download(y);
    std::vector<double> want = ref_shared(d.ref, d.xd, T);
    for (int64_t i = 0; i < T * spec.H; ++i) want[size_t(i)] += base.get(i);
    const double err = rel_error(values(y), want);
    INFO("dtype ", std::string(dt_name(dt)), " rel error ", err);
    CHECK(err < tolerance(dt));
  }
}

TEST_CASE("gpu.block.graph_capture") {
  // Gate, routed layer and shared experts on the side stream, all captured.
  const BlockSpec spec = deepseek_v3_like();
  const DT dt = DT::bf16;
  const int64_t T = 64;
  auto rng = fresh_rng();
  BlockData d;
  make_block_data(spec, dt, T, rng, d);
  DeviceBlock g(d);
  BlockHandles h;
  make_block_handles(spec, kDLCUDA, h);
  set_weights(h, g);
  size_t bytes = 0;
  MOE_CHECK_OK(moe_block_workspace_size(h.router, h.dispatcher, h.runner, h.shared, T, kDLCUDA,
                                        &bytes));
  DeviceBuffer ws(bytes);
  DeviceTensor d_y(dt, {T, spec.H});
  cudaStream_t s;
  CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  auto forward = [&] {
    MOE_CHECK_OK(moe_block_forward(h.router, h.dispatcher, h.runner, h.shared, g.x->dl(),
                                   g.gate_w->dl(), spec.bias ? g.bias->dl() : nullptr, nullptr,
                                   d_y.dl(), ws.p, ws.bytes, s));
  };
  HostTensor eager(dt, {T, spec.H}), replay(dt, {T, spec.H});
  d_y.poison();
  forward();
  CUDA_OK(cudaStreamSynchronize(s));
  d_y.download(eager);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  forward();
  CUDA_OK(cudaStreamEndCapture(s, &graph));
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  for (int rep = 0; rep < 2; ++rep) {
    d_y.poison();
    CUDA_OK(cudaGraphLaunch(exec, s));
    CUDA_OK(cudaStreamSynchronize(s));
    d_y.download(replay);
    CHECK(std::memcmp(replay.storage.data(), eager.storage.data(), eager.storage.size()) == 0);
  }
  std::vector<double> ref, margin;
  ref_block(d.ref, d.xd, T, T, ref, margin);
  int64_t compared = 0;
  CHECK(block_rel_error(eager, ref, margin, compared) < tolerance(dt));
  CUDA_OK(cudaGraphExecDestroy(exec));
  CUDA_OK(cudaGraphDestroy(graph));
  CUDA_OK(cudaStreamDestroy(s));
}
