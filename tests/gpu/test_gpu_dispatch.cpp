// CUDA standard dispatcher vs the CPU one: local ids, counts, offsets and the
// stable permutation must be identical, with and without a caller workspace.
#include <algorithm>

#include "gpu_support.h"

using namespace moe_test;

namespace {

struct Dispatcher {
  moe_dispatcher_t h = nullptr;
  Dispatcher(int E, int rank, int size, const std::vector<int32_t>* mapping, int E_loc,
             int device_type) {
    moe_dispatcher_config_t c;
    c.struct_size = uint32_t(sizeof(c));
    REQUIRE(moe_dispatcher_config_default(&c) == MOE_STATUS_SUCCESS);
    c.num_experts = E;
    c.ep_rank = rank;
    c.ep_size = size;
    c.local_expert_mapping = mapping ? mapping->data() : nullptr;
    c.num_local_experts = mapping ? E_loc : 0;
    c.device_type = device_type;
    c.device_id = 0;
    MOE_CHECK_OK(moe_dispatcher_create(&c, &h));
  }
  ~Dispatcher() { moe_dispatcher_destroy(h); }
};

void compare(const HostTensor& a, const HostTensor& b, const char* what) {
  REQUIRE(a.numel() == b.numel());
  int64_t diff = 0, first = -1;
  for (int64_t i = 0; i < a.numel(); ++i)
    if (a.as<int32_t>()[i] != b.as<int32_t>()[i]) {
      ++diff;
      if (first < 0) first = i;
    }
  INFO(std::string(what), ": first difference at ", first);
  CHECK(diff == 0);
}

void check_dispatch(int E, int rank, int size, const std::vector<int32_t>* mapping, int E_loc,
                    int64_t T, int K, bool caller_workspace) {
  auto rng = fresh_rng();
  Dispatcher cpu(E, rank, size, mapping, E_loc, kDLCPU), gpu(E, rank, size, mapping, E_loc, kDLCUDA);
  HostTensor ids(DT::i32, {T, K});
  std::uniform_int_distribution<int> pick(-1, E - 1);
  for (int64_t i = 0; i < T * K; ++i) ids.as<int32_t>()[i] = pick(rng);

  HostTensor local(DT::i32, {T, K}), counts(DT::i32, {E_loc}), offsets(DT::i32, {E_loc + 1}),
      sorted(DT::i32, {T * K});
  for (HostTensor* h : {&local, &counts, &offsets, &sorted}) h->poison();
  MOE_CHECK_OK(moe_dispatcher_dispatch(cpu.h, ids.dl(), local.dl(), counts.dl(), offsets.dl(),
                                       sorted.dl(), nullptr, 0, nullptr));

  DeviceTensor d_ids(ids), d_local(DT::i32, {T, K}), d_counts(DT::i32, {E_loc}),
      d_offsets(DT::i32, {E_loc + 1}), d_sorted(DT::i32, {T * K});
  for (DeviceTensor* d : {&d_local, &d_counts, &d_offsets, &d_sorted}) d->poison();
  void* ws = nullptr;
  size_t ws_bytes = 0;
  if (caller_workspace) {
    MOE_CHECK_OK(moe_dispatcher_workspace_size(gpu.h, T, K, &ws_bytes));
    CUDA_OK(cudaMalloc(&ws, std::max<size_t>(ws_bytes, 256)));
    CUDA_OK(cudaMemset(ws, 0x5a, std::max<size_t>(ws_bytes, 256)));  // garbage must not matter
  }
  MOE_CHECK_OK(moe_dispatcher_dispatch(gpu.h, d_ids.dl(), d_local.dl(), d_counts.dl(),
                                       d_offsets.dl(), d_sorted.dl(), ws, ws_bytes, nullptr));
  HostTensor g_local(DT::i32, {T, K}), g_counts(DT::i32, {E_loc}), g_offsets(DT::i32, {E_loc + 1}),
      g_sorted(DT::i32, {T * K});
  d_local.download(g_local);
  d_counts.download(g_counts);
  d_offsets.download(g_offsets);
  d_sorted.download(g_sorted);
  if (ws) cudaFree(ws);
  INFO("E ", E, " rank ", rank, "/", size, " E_loc ", E_loc, " T ", T, " K ", K);
  compare(g_local, local, "local_ids");
  compare(g_counts, counts, "expert_counts");
  compare(g_offsets, offsets, "expert_offsets");
  compare(g_sorted, sorted, "sorted_slots");
}

}  // namespace

TEST_CASE("gpu.dispatcher.contiguous_vs_cpu") {
  for (int64_t T : {int64_t(1), int64_t(7), int64_t(64), int64_t(1000), int64_t(4096)}) {
    check_dispatch(256, 3, 8, nullptr, 32, T, 8, true);   // DeepSeek EP slice
    check_dispatch(128, 0, 1, nullptr, 128, T, 8, false); // Qwen3, one rank
    check_dispatch(8, 0, 1, nullptr, 8, T, 2, true);      // Mixtral
    check_dispatch(512, 0, 1, nullptr, 512, T, 8, true);  // histogram too big for the fused scan
  }
}

TEST_CASE("gpu.dispatcher.explicit_mapping_vs_cpu") {
  auto rng = fresh_rng();
  const int E = 300, E_loc = 37;
  std::vector<int32_t> mapping(size_t(E), -1);
  std::uniform_int_distribution<int> loc(0, E_loc - 1);
  for (int e = 0; e < E; e += 3) mapping[size_t(e)] = loc(rng);  // redundant experts share a slot
  for (int64_t T : {int64_t(1), int64_t(33), int64_t(2000)})
    check_dispatch(E, 0, 1, &mapping, E_loc, T, 5, true);
  // More local experts than the kernels keep in shared memory (global counters).
  for (int64_t T : {int64_t(3), int64_t(700)}) check_dispatch(6000, 1, 2, nullptr, 3000, T, 8, true);
}

TEST_CASE("gpu.dispatcher.empty_batch_and_all_remote") {
  check_dispatch(64, 1, 4, nullptr, 16, 0, 4, true);
  // Every id remote or -1: counts 0, offsets 0, sorted all -1.
  std::vector<int32_t> none(64, -1);
  none[0] = 0;
  check_dispatch(64, 0, 1, &none, 1, 500, 4, true);
}

// Every kernel path against the CPU, MOE_DISPATCH_ALGO=0 (histogram, one-block
// scan, scatter; the fused kernel for small batches), 1 (the default choice:
// one block up to 256 slots, one block per expert up to 4096, the prefix path
// beyond) and 2 (the
// prefix path wherever its histogram fits: up to 1024 padded columns and
// 512 KB).
static void check_algorithms(const std::vector<int64_t>& tokens, bool odd_shapes) {
  ScopedEnv algo("MOE_DISPATCH_ALGO");
  for (const char* a : {"0", "1", "2"}) {
    algo.set(a);
    INFO("MOE_DISPATCH_ALGO=", a);
    for (int64_t T : tokens) {
      check_dispatch(128, 0, 1, nullptr, 128, T, 8, true);  // Qwen3
      check_dispatch(256, 5, 8, nullptr, 32, T, 8, false);  // DeepSeek EP slice
      check_dispatch(8, 0, 1, nullptr, 8, T, 2, true);      // Mixtral
    }
    if (odd_shapes) {
      // Columns padded from 1, 37 and 600 experts; too many experts for the
      // prefix path (3000); tile counts that are not a multiple of the prefix
      // kernel's 8 tiles per block.
      check_dispatch(1, 0, 1, nullptr, 1, 3000, 1, true);
      check_dispatch(74, 0, 2, nullptr, 37, 2345, 3, true);
      check_dispatch(600, 0, 1, nullptr, 600, 1500, 6, true);
      check_dispatch(6000, 1, 2, nullptr, 3000, 900, 8, true);
      // The one-block kernel at its limits: 1000 local experts, 240-256 slots.
      check_dispatch(600, 0, 1, nullptr, 600, 40, 6, true);
      check_dispatch(1000, 0, 1, nullptr, 1000, 32, 8, true);
    }
  }
}

TEST_CASE("gpu.dispatcher.algorithms_vs_cpu") {
  check_algorithms({1, 7, 32, 33, 200, 512, 1025, 4096}, true);
}

TEST_CASE("gpu.dispatcher.algorithms_large_vs_cpu") {
  // Qwen3 at T=40000 has a 625 KB histogram: past the prefix path's 512 KB.
  check_algorithms({16384, 40000}, false);
}

TEST_CASE("gpu.dispatcher.workspace_for_max_tokens_serves_smaller_batches") {
  // The workspace size never decreases with the batch, whatever path the
  // kernels take at each size.
  for (int E_loc : {1, 8, 32, 37, 128, 513, 600, 1024, 1025, 3000}) {
    Dispatcher gpu(E_loc, 0, 1, nullptr, E_loc, kDLCUDA);
    size_t prev = 0;
    for (int64_t T = 0; T <= 70000; T += 997) {
      size_t bytes = 0;
      MOE_CHECK_OK(moe_dispatcher_workspace_size(gpu.h, T, 8, &bytes));
      INFO("E_loc ", E_loc, " T ", T);
      CHECK(bytes >= prev);
      prev = bytes;
    }
  }
}

TEST_CASE("gpu.dispatcher.graph_replay_timing") {
  // T=4096, K=8, the DeepSeek EP slice: replays of a captured dispatch give the
  // eager result; the median replay time is reported (target <= 10 us).
  auto rng = fresh_rng();
  const int64_t T = 4096;
  const int K = 8, E = 256, E_loc = 32;
  Dispatcher gpu(E, 2, 8, nullptr, E_loc, kDLCUDA);
  HostTensor ids(DT::i32, {T, K});
  std::uniform_int_distribution<int> pick(-1, E - 1);
  for (int64_t i = 0; i < T * K; ++i) ids.as<int32_t>()[i] = pick(rng);
  DeviceTensor d_ids(ids), local(DT::i32, {T, K}), counts(DT::i32, {E_loc}),
      offsets(DT::i32, {E_loc + 1}), sorted(DT::i32, {T * K});
  size_t bytes = 0;
  MOE_CHECK_OK(moe_dispatcher_workspace_size(gpu.h, T, K, &bytes));
  void* ws = nullptr;
  CUDA_OK(cudaMalloc(&ws, std::max<size_t>(bytes, 256)));
  cudaStream_t s;
  CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  auto enqueue = [&] {
    MOE_CHECK_OK(moe_dispatcher_dispatch(gpu.h, d_ids.dl(), local.dl(), counts.dl(), offsets.dl(),
                                         sorted.dl(), ws, bytes, s));
  };
  enqueue();
  CUDA_OK(cudaStreamSynchronize(s));
  HostTensor eager(DT::i32, {T * K}), replayed(DT::i32, {T * K});
  sorted.download(eager);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  enqueue();
  CUDA_OK(cudaStreamEndCapture(s, &graph));
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  sorted.poison();
  cudaEvent_t a, b;
  CUDA_OK(cudaEventCreate(&a));
  CUDA_OK(cudaEventCreate(&b));
  std::vector<float> times;
  for (int rep = 0; rep < 101; ++rep) {
    CUDA_OK(cudaEventRecord(a, s));
    CUDA_OK(cudaGraphLaunch(exec, s));
    CUDA_OK(cudaEventRecord(b, s));
    CUDA_OK(cudaEventSynchronize(b));
    float ms = 0;
    CUDA_OK(cudaEventElapsedTime(&ms, a, b));
    times.push_back(ms * 1000.0f);
  }
  std::sort(times.begin(), times.end());
  MESSAGE("dispatch T=4096 K=8 E=256 E_loc=32, graph replay median ", times[times.size() / 2],
          " us (min ", times.front(), " us)");
  sorted.download(replayed);
  compare(replayed, eager, "sorted_slots after replays");
  CUDA_OK(cudaEventDestroy(a));
  CUDA_OK(cudaEventDestroy(b));
  CUDA_OK(cudaGraphExecDestroy(exec));
  CUDA_OK(cudaGraphDestroy(graph));
  CUDA_OK(cudaStreamDestroy(s));
  CUDA_OK(cudaFree(ws));
}
