// Thread safety on the GPU: shared handles used from several threads at
// once, each with its own stream, with caller workspaces and with the
// handles' internal workspace (which the library orders across streams).
// Every threaded result must equal the single-threaded one bit for bit.
#include <atomic>
#include <cstring>
#include <memory>
#include <thread>

#include "gpu_support.h"

using namespace moe_test;

namespace {

constexpr int E = 32, K = 4, H = 128, I = 64, T = 77, THREADS = 4, REPS = 6;

struct Shared {
  moe_router_t router = nullptr;
  moe_dispatcher_t dispatcher = nullptr;
  moe_runner_t runner = nullptr;
  ~Shared() {
    moe_runner_destroy(runner);
    moe_dispatcher_destroy(dispatcher);
    moe_router_destroy(router);
  }
};

// One thread's inputs, output and stream.
struct Job {
  std::unique_ptr<DeviceTensor> x, logits, y;
  HostTensor result;
  cudaStream_t stream = nullptr;
  void* ws = nullptr;
  size_t ws_bytes = 0;
  Job() : result(DT::bf16, {T, H}) {}
  ~Job() {
    if (stream) cudaStreamDestroy(stream);
    if (ws) cudaFree(ws);
  }
};

void make(Shared& s, DeviceTensor& w13, DeviceTensor& w2) {
  moe_router_config_t rc;
  rc.struct_size = uint32_t(sizeof(rc));
  MOE_CHECK_OK(moe_router_config_default(&rc, MOE_ROUTING_SOFTMAX_TOPK));
  rc.num_experts = E;
  rc.top_k = K;
  rc.renormalize = 1;
  MOE_CHECK_OK(moe_router_create(&rc, &s.router));
  moe_dispatcher_config_t dc;
  dc.struct_size = uint32_t(sizeof(dc));
  MOE_CHECK_OK(moe_dispatcher_config_default(&dc));
  dc.num_experts = E;
  dc.device_type = kDLCUDA;
  MOE_CHECK_OK(moe_dispatcher_create(&dc, &s.dispatcher));
  moe_runner_config_t uc;
  uc.struct_size = uint32_t(sizeof(uc));
  MOE_CHECK_OK(moe_runner_config_default(&uc));
  uc.num_experts = E;
  uc.hidden_size = H;
  uc.intermediate_size = I;
  MOE_CHECK_OK(moe_runner_create(&uc, &s.runner));
  MOE_CHECK_OK(moe_runner_set_weights(s.runner, w13.dl(), w2.dl(), nullptr, nullptr, nullptr, nullptr));
}

// Runs job j once on its stream and downloads its output; returns the status.
moe_status_t forward(Shared& s, Job& j, bool caller_workspace) {
  moe_status_t st = moe_layer_forward(s.router, s.dispatcher, s.runner, j.x->dl(), j.logits->dl(),
                                      nullptr, nullptr, j.y->dl(),
                                      caller_workspace ? j.ws : nullptr,
                                      caller_workspace ? j.ws_bytes : 0, j.stream);
  if (st != MOE_STATUS_SUCCESS) return st;
  if (cudaMemcpyAsync(j.result.data(), j.y->ptr, j.y->bytes, cudaMemcpyDeviceToHost, j.stream) !=
          cudaSuccess ||
      cudaStreamSynchronize(j.stream) != cudaSuccess)
    return MOE_STATUS_CUDA_ERROR;
  return MOE_STATUS_SUCCESS;
}

}  // namespace

TEST_CASE("gpu.threads.shared_handles_stream_per_thread") {
  auto rng = fresh_rng();
  HostTensor hw13(DT::bf16, {E, 2 * I, H}), hw2(DT::bf16, {E, H, I});
  fill_uniform_fast(hw13, rng(), 0.1);
  fill_uniform_fast(hw2, rng(), 0.1);
  DeviceTensor w13(hw13), w2(hw2);
  Shared s;
  make(s, w13, w2);
  size_t ws_bytes = 0;
  MOE_CHECK_OK(moe_layer_workspace_size(s.router, s.dispatcher, s.runner, T, kDLCUDA, &ws_bytes));

  std::vector<Job> jobs(THREADS);
  std::vector<std::unique_ptr<HostTensor>> keep;
  for (auto& j : jobs) {
    HostTensor x(DT::bf16, {T, H}), logits(DT::f32, {T, E});
    x.fill_normal(rng);
    logits.fill_normal(rng, 2.0);
    j.x = std::make_unique<DeviceTensor>(x);
    j.logits = std::make_unique<DeviceTensor>(logits);
    j.y = std::make_unique<DeviceTensor>(DT::bf16, std::vector<int64_t>{T, H});
    CUDA_OK(cudaStreamCreateWithFlags(&j.stream, cudaStreamNonBlocking));
    CUDA_OK(cudaMalloc(&j.ws, ws_bytes));
    j.ws_bytes = ws_bytes;
    // The single-threaded answer of this job.
    j.y->poison();
    MOE_CHECK_OK(forward(s, j, true));
    keep.push_back(std::make_unique<HostTensor>(DT::bf16, std::vector<int64_t>{T, H}));
    std::memcpy(keep.back()->data(), j.result.data(), j.result.storage.size());
    for (int64_t i = 0; i < j.result.numel(); ++i) REQUIRE(std::isfinite(j.result.get(i)));
  }

  for (bool caller_workspace : {true, false}) {
    CAPTURE(caller_workspace);
    std::atomic<int> failures{0}, mismatches{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < THREADS; ++t)
      threads.emplace_back([&, t] {
        Job& j = jobs[size_t(t)];
        for (int r = 0; r < REPS; ++r) {
          if (forward(s, j, caller_workspace) != MOE_STATUS_SUCCESS) {
            ++failures;
            return;
          }
          if (std::memcmp(j.result.data(), keep[size_t(t)]->data(), j.result.storage.size()) != 0)
            ++mismatches;
        }
      });
    for (auto& th : threads) th.join();
    CHECK(failures == 0);
    CHECK(mismatches == 0);
  }
}
