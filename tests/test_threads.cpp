// Thread safety on the CPU backend (issue 9 item 5), as the header promises:
// handles are immutable after creation, any number of threads may run one
// handle at once with their own workspaces, calls without a workspace share
// the handle's and are serialized, and the last error is per thread.
// Every threaded result must equal, bit for bit, the single-threaded one
// (which test_layer.cpp checks against the float64 reference).
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "support.h"

using namespace moe_test;

namespace {

constexpr int kThreads = 4;
constexpr int kRepeats = 12;
constexpr int E = 16, K = 4, H = 32, I = 16;

template <class C>
C sized() {
  C c;
  std::memset(&c, 0, sizeof(c));
  c.struct_size = uint32_t(sizeof(C));
  return c;
}

// One DeepSeek-V3-style layer: grouped router, identity dispatcher, runner
// with bf16 weights.
struct Layer {
  moe_router_t router = nullptr;
  moe_dispatcher_t disp = nullptr;
  moe_runner_t runner = nullptr;
  HostTensor w13{DT::bf16, {E, 2 * I, H}}, w2{DT::bf16, {E, H, I}};
  explicit Layer(std::mt19937_64& rng) {
    auto rc = sized<moe_router_config_t>();
    REQUIRE(moe_router_config_default(&rc, MOE_ROUTING_DEEPSEEK_V3) == MOE_STATUS_SUCCESS);
    rc.num_experts = E;
    rc.top_k = K;
    rc.n_group = 4;
    rc.topk_group = 2;
    rc.routed_scaling_factor = 2.5f;
    MOE_CHECK_OK(moe_router_create(&rc, &router));
    auto dc = sized<moe_dispatcher_config_t>();
    REQUIRE(moe_dispatcher_config_default(&dc) == MOE_STATUS_SUCCESS);
    dc.num_experts = E;
    MOE_CHECK_OK(moe_dispatcher_create(&dc, &disp));
    auto uc = sized<moe_runner_config_t>();
    REQUIRE(moe_runner_config_default(&uc) == MOE_STATUS_SUCCESS);
    uc.num_experts = E;
    uc.hidden_size = H;
    uc.intermediate_size = I;
    MOE_CHECK_OK(moe_runner_create(&uc, &runner));
    w13.fill_normal(rng, 0.2);
    w2.fill_normal(rng, 0.2);
    MOE_CHECK_OK(moe_runner_set_weights(runner, w13.dl(), w2.dl(), 0, 0, 0, 0));
  }
  ~Layer() {
    moe_router_destroy(router);
    moe_dispatcher_destroy(disp);
    moe_runner_destroy(runner);
  }
  size_t workspace_bytes(int64_t T) const {
    size_t b = 0;
    CHECK(moe_layer_workspace_size(router, disp, runner, T, kDLCPU, &b) == MOE_STATUS_SUCCESS);
    return b;
  }
};

// One thread's batch: its own inputs, output and (optionally) workspace.
struct Batch {
  HostTensor x, logits, out;
  std::unique_ptr<unsigned char, decltype(&std::free)> ws{nullptr, &std::free};
  size_t ws_bytes = 0;
  std::vector<unsigned char> expected;
  Batch(std::mt19937_64& rng, int64_t T)
      : x(DT::f32, {T, H}), logits(DT::f32, {T, E}), out(DT::f32, {T, H}) {
    x.fill_normal(rng);
    logits.fill_normal(rng, 2.0);
  }
  void give_workspace(size_t bytes) {
    ws_bytes = bytes;
    ws.reset(static_cast<unsigned char*>(std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256)));
  }
  moe_status_t forward(const Layer& l) {
    out.poison();
    return moe_layer_forward(l.router, l.disp, l.runner, x.dl(), logits.dl(), nullptr, nullptr,
                             out.dl(), ws.get(), ws.get() ? ws_bytes : 0, nullptr);
  }
  bool matches() const { return std::memcmp(out.storage.data(), expected.data(), expected.size()) == 0; }
};

// Runs body(t) on kThreads threads at once (released together); returns the
// number of failed repeats reported by the bodies.
template <class F>
int run_threads(F body) {
  std::atomic<int> ready{0}, failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      ready.fetch_add(1);
      while (ready.load() < kThreads) std::this_thread::yield();
      failures.fetch_add(body(t));
    });
  for (auto& th : threads) th.join();
  return failures.load();
}

// Creates, uses and destroys one handle of each kind (no doctest asserts:
// this runs on worker threads); returns the number of failed calls.
int churn_handles() {
  int bad = 0;
  auto rc = sized<moe_router_config_t>();
  bad += moe_router_config_default(&rc, MOE_ROUTING_SOFTMAX_TOPK) != MOE_STATUS_SUCCESS;
  rc.num_experts = E;
  rc.top_k = K;
  moe_router_t r = nullptr;
  bad += moe_router_create(&rc, &r) != MOE_STATUS_SUCCESS;
  int32_t cols = 0;
  bad += moe_router_output_columns(r, &cols) != MOE_STATUS_SUCCESS || cols != K;
  auto dc = sized<moe_dispatcher_config_t>();
  bad += moe_dispatcher_config_default(&dc) != MOE_STATUS_SUCCESS;
  dc.num_experts = E;
  dc.ep_size = 2;
  moe_dispatcher_t d = nullptr;
  bad += moe_dispatcher_create(&dc, &d) != MOE_STATUS_SUCCESS;
  auto uc = sized<moe_runner_config_t>();
  bad += moe_runner_config_default(&uc) != MOE_STATUS_SUCCESS;
  uc.num_experts = E / 2;
  uc.hidden_size = H;
  uc.intermediate_size = I;
  moe_runner_t u = nullptr;
  bad += moe_runner_create(&uc, &u) != MOE_STATUS_SUCCESS;
  size_t bytes = 0;
  bad += moe_layer_workspace_size(r, d, u, 8, kDLCPU, &bytes) != MOE_STATUS_SUCCESS || bytes == 0;
  bad += moe_router_destroy(r) != MOE_STATUS_SUCCESS;
  bad += moe_dispatcher_destroy(d) != MOE_STATUS_SUCCESS;
  bad += moe_runner_destroy(u) != MOE_STATUS_SUCCESS;
  return bad;
}

std::vector<std::unique_ptr<Batch>> make_batches(std::mt19937_64& rng, const Layer& l) {
  std::vector<std::unique_ptr<Batch>> b;
  for (int t = 0; t < kThreads; ++t) {
    b.push_back(std::make_unique<Batch>(rng, 3 + 5 * t));
    MOE_CHECK_OK(b.back()->forward(l));  // single-threaded baseline
    b.back()->expected = b.back()->out.storage;
  }
  return b;
}

}  // namespace

TEST_CASE("threads.layer.own_handles_per_thread") {
  auto rng = fresh_rng();
  std::vector<std::unique_ptr<Layer>> layers;
  std::vector<std::unique_ptr<Batch>> batches;
  for (int t = 0; t < kThreads; ++t) {
    layers.push_back(std::make_unique<Layer>(rng));
    batches.push_back(std::make_unique<Batch>(rng, 4 + 3 * t));
    MOE_CHECK_OK(batches[size_t(t)]->forward(*layers[size_t(t)]));
    batches[size_t(t)]->expected = batches[size_t(t)]->out.storage;
  }
  int failures = run_threads([&](int t) {
    int bad = 0;
    for (int r = 0; r < kRepeats; ++r) {
      bad += churn_handles();  // created and destroyed while other threads run
      bad += batches[size_t(t)]->forward(*layers[size_t(t)]) != MOE_STATUS_SUCCESS ||
             !batches[size_t(t)]->matches();
    }
    return bad;
  });
  CHECK(failures == 0);
}

TEST_CASE("threads.layer.shared_handles_own_workspaces") {
  auto rng = fresh_rng();
  Layer layer(rng);
  auto batches = make_batches(rng, layer);
  for (auto& b : batches) b->give_workspace(layer.workspace_bytes(b->x.shape[0]));
  int failures = run_threads([&](int t) {
    int bad = 0;
    for (int r = 0; r < kRepeats; ++r)
      bad += batches[size_t(t)]->forward(layer) != MOE_STATUS_SUCCESS || !batches[size_t(t)]->matches();
    return bad;
  });
  CHECK(failures == 0);
}

TEST_CASE("threads.layer.shared_handles_internal_workspace") {
  auto rng = fresh_rng();
  Layer layer(rng);
  auto batches = make_batches(rng, layer);
  // Different T per thread: the shared workspace grows while others use it.
  int failures = run_threads([&](int t) {
    int bad = 0;
    for (int r = 0; r < kRepeats; ++r)
      bad += batches[size_t(t)]->forward(layer) != MOE_STATUS_SUCCESS || !batches[size_t(t)]->matches();
    return bad;
  });
  CHECK(failures == 0);
}

// The three objects one by one on shared handles: router and dispatcher from
// every thread, the runner with the internal workspace and with caller ones.
TEST_CASE("threads.objects.shared_handles") {
  auto rng = fresh_rng();
  Layer layer(rng);
  struct Work {
    HostTensor logits, ids, w, local, counts, offsets, sorted, x, out;
    std::vector<unsigned char> ids0, w0, sorted0, out0;
    std::unique_ptr<unsigned char, decltype(&std::free)> ws{nullptr, &std::free};
    size_t ws_bytes = 0;
    Work(std::mt19937_64& rng, int64_t T)
        : logits(DT::bf16, {T, E}), ids(DT::i32, {T, K}), w(DT::f32, {T, K}),
          local(DT::i32, {T, K}), counts(DT::i32, {E}), offsets(DT::i32, {E + 1}),
          sorted(DT::i32, {T * K}), x(DT::f16, {T, H}), out(DT::f16, {T, H}) {
      logits.fill_normal(rng, 2.0);
      x.fill_normal(rng);
    }
    bool step(const Layer& l, bool own_ws) {
      ids.poison();
      w.poison();
      sorted.poison();
      out.poison();
      bool ok = moe_router_run(l.router, logits.dl(), nullptr, nullptr, ids.dl(), w.dl(), nullptr) ==
                MOE_STATUS_SUCCESS;
      ok = ok && moe_dispatcher_dispatch(l.disp, ids.dl(), local.dl(), counts.dl(), offsets.dl(),
                                         sorted.dl(), nullptr, 0, nullptr) == MOE_STATUS_SUCCESS;
      ok = ok && moe_runner_run(l.runner, x.dl(), local.dl(), w.dl(), offsets.dl(), sorted.dl(),
                                out.dl(), own_ws ? ws.get() : nullptr, own_ws ? ws_bytes : 0,
                                nullptr) == MOE_STATUS_SUCCESS;
      return ok;
    }
    bool same() const {
      return ids.storage == ids0 && w.storage == w0 && sorted.storage == sorted0 &&
             out.storage == out0;
    }
  };
  std::vector<std::unique_ptr<Work>> work;
  for (int t = 0; t < kThreads; ++t) {
    work.push_back(std::make_unique<Work>(rng, 2 + 4 * t));
    Work& wk = *work.back();
    MOE_CHECK_OK(moe_runner_workspace_size(layer.runner, wk.x.shape[0], K, kDLCPU, &wk.ws_bytes));
    wk.ws.reset(static_cast<unsigned char*>(std::aligned_alloc(256, (wk.ws_bytes + 255) / 256 * 256 + 256)));
    REQUIRE(wk.step(layer, false));
    wk.ids0 = wk.ids.storage;
    wk.w0 = wk.w.storage;
    wk.sorted0 = wk.sorted.storage;
    wk.out0 = wk.out.storage;
  }
  int failures = run_threads([&](int t) {
    int bad = 0;
    for (int r = 0; r < kRepeats; ++r) {
      Work& wk = *work[size_t(t)];
      bad += !wk.step(layer, (r + t) % 2 == 0) || !wk.same();
    }
    return bad;
  });
  CHECK(failures == 0);
}

TEST_CASE("threads.last_error_is_per_thread") {
  std::atomic<int> phase{0};
  std::string seen_by_b;
  std::string a_before, a_after;
  std::thread a([&] {
    CHECK(moe_router_config_default(nullptr, 0) == MOE_STATUS_INVALID_ARGUMENT);
    a_before = moe_last_error();
    phase.store(1);
    while (phase.load() < 2) std::this_thread::yield();
    a_after = moe_last_error();
  });
  std::thread b([&] {
    while (phase.load() < 1) std::this_thread::yield();
    seen_by_b = moe_last_error();  // this thread has not failed
    auto c = sized<moe_runner_config_t>();
    CHECK(moe_runner_create(&c, nullptr) == MOE_STATUS_INVALID_ARGUMENT);  // its own failure
    phase.store(2);
  });
  a.join();
  b.join();
  CHECK(seen_by_b.empty());
  CHECK(a_before.find("moe_router_config_default") != std::string::npos);
  CHECK(a_after == a_before);
}
