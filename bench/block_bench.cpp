// MoE block benchmark (CUDA): the one-call block's time split into gate
// projection, routing, routed experts (dispatch + runner) and shared
// experts, for the DeepSeek-V3 EP-of-8 slice and Qwen3-30B-A3B at T = 1, 64,
// 4096 (bf16). Each part runs alone on one stream with caller workspaces;
// times are medians of CUDA-event timings. "block" is moe_block_forward
// (shared experts overlapped on a second stream), "graph" the same block
// replayed from a captured CUDA graph.
//
//   moe_block_bench [--iters N] [--tokens 1,64,4096] [--csv FILE]
//
// The gate column is router_run_hidden minus router_run on the same data
// (the cuBLASLt GEMM alone is not a public call). Hidden states and gate
// weights are random (so routing spreads tokens like a trained router);
// expert weights are a constant fill: GEMM time does not depend on values.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "moe/moe.h"
#include "moe/moe_block.h"

namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "moe_block_bench: %s\n", what.c_str());
  std::exit(1);
}

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) die(std::string(what) + ": " + cudaGetErrorString(e));
}

void moe_ok(moe_status_t s, const char* what) {
  if (s != MOE_STATUS_SUCCESS)
    die(std::string(what) + ": " + moe_status_string(s) + ": " + moe_last_error());
}

// A device tensor of bf16 (code kDLBfloat), f32 or int32 with its DLTensor.
struct Tensor {
  void* ptr = nullptr;
  std::vector<int64_t> shape;
  DLTensor t{};
  Tensor(DLDataType dt, std::vector<int64_t> s) : shape(std::move(s)) {
    size_t n = 1;
    for (int64_t d : shape) n *= size_t(d);
    cuda_ok(cudaMalloc(&ptr, std::max<size_t>(n * dt.bits / 8, 256)), "cudaMalloc");
    t.data = ptr;
    t.device = DLDevice{kDLCUDA, 0};
    t.ndim = int(shape.size());
    t.dtype = dt;
    t.shape = shape.data();
  }
  ~Tensor() { cudaFree(ptr); }
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  size_t bytes() const {
    size_t n = 1;
    for (int64_t d : shape) n *= size_t(d);
    return n * t.dtype.bits / 8;
  }
};

const DLDataType kBf16{kDLBfloat, 16, 1}, kF32{kDLFloat, 32, 1}, kI32{kDLInt, 32, 1};

uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// Random bf16 values of standard deviation sd.
void fill_random_bf16(Tensor& t, std::mt19937_64& rng, float sd) {
  std::vector<uint16_t> h(t.bytes() / 2);
  std::normal_distribution<float> nd(0.0f, sd);
  for (auto& v : h) v = bf16_bits(nd(rng));
  cuda_ok(cudaMemcpy(t.ptr, h.data(), t.bytes(), cudaMemcpyHostToDevice), "upload");
}

struct Config {
  const char* name;
  int method, E, ep_size, k, n_group, topk_group, renormalize;
  float scale;
  int H, I, n_shared, I_shared;
};

// Median milliseconds of fn over iters runs on stream (after 3 warm-ups).
double time_ms(cudaStream_t s, int iters, const std::function<void()>& fn) {
  for (int i = 0; i < 3; ++i) fn();
  cudaEvent_t a, b;
  cuda_ok(cudaEventCreate(&a), "cudaEventCreate");
  cuda_ok(cudaEventCreate(&b), "cudaEventCreate");
  std::vector<float> ms(static_cast<size_t>(iters));
  for (int i = 0; i < iters; ++i) {
    cuda_ok(cudaEventRecord(a, s), "cudaEventRecord");
    fn();
    cuda_ok(cudaEventRecord(b, s), "cudaEventRecord");
    cuda_ok(cudaEventSynchronize(b), "cudaEventSynchronize");
    cuda_ok(cudaEventElapsedTime(&ms[size_t(i)], a, b), "cudaEventElapsedTime");
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct Row {
  double gate, route, routed, shared, sum, block, graph;
};

Row bench(const Config& c, int64_t T, int iters, std::mt19937_64& rng) {
  const int E_loc = c.E / c.ep_size;
  moe_router_config_t rc;
  rc.struct_size = uint32_t(sizeof(rc));
  moe_ok(moe_router_config_default(&rc, c.method), "router config");
  rc.num_experts = c.E;
  rc.top_k = c.k;
  rc.n_group = c.n_group;
  rc.topk_group = c.topk_group;
  rc.renormalize = c.renormalize;
  rc.routed_scaling_factor = c.scale;
  moe_router_t router = nullptr;
  moe_ok(moe_router_create(&rc, &router), "moe_router_create");
  moe_dispatcher_config_t dc;
  dc.struct_size = uint32_t(sizeof(dc));
  moe_ok(moe_dispatcher_config_default(&dc), "dispatcher config");
  dc.num_experts = c.E;
  dc.ep_size = c.ep_size;
  dc.ep_rank = 0;
  dc.device_type = kDLCUDA;
  moe_dispatcher_t dispatcher = nullptr;
  moe_ok(moe_dispatcher_create(&dc, &dispatcher), "moe_dispatcher_create");
  moe_runner_config_t uc;
  uc.struct_size = uint32_t(sizeof(uc));
  moe_ok(moe_runner_config_default(&uc), "runner config");
  uc.num_experts = E_loc;
  uc.hidden_size = c.H;
  uc.intermediate_size = c.I;
  moe_runner_t runner = nullptr;
  moe_ok(moe_runner_create(&uc, &runner), "moe_runner_create");

  Tensor x(kBf16, {T, c.H}), gate_w(kBf16, {c.E, c.H}), bias(kF32, {c.E}), y(kBf16, {T, c.H}),
      w13(kBf16, {E_loc, 2 * c.I, c.H}), w2(kBf16, {E_loc, c.H, c.I}), logits(kF32, {T, c.E}),
      ids(kI32, {T, c.k}), wts(kF32, {T, c.k}), local(kI32, {T, c.k}), counts(kI32, {E_loc}),
      offsets(kI32, {E_loc + 1}), sorted(kI32, {T * c.k});
  fill_random_bf16(x, rng, 1.0f);
  fill_random_bf16(gate_w, rng, 0.02f);
  cuda_ok(cudaMemset(bias.ptr, 0, bias.bytes()), "cudaMemset");
  cuda_ok(cudaMemset(w13.ptr, 0x3c, w13.bytes()), "cudaMemset");  // bf16 0x3c3c = 0.0115
  cuda_ok(cudaMemset(w2.ptr, 0x3c, w2.bytes()), "cudaMemset");
  moe_ok(moe_runner_set_weights(runner, &w13.t, &w2.t, nullptr, nullptr, nullptr, nullptr),
         "moe_runner_set_weights");
  moe_shared_experts_t shared = nullptr;
  std::unique_ptr<Tensor> s13, s2;
  if (c.n_shared > 0) {
    moe_shared_experts_config_t sc;
    sc.struct_size = uint32_t(sizeof(sc));
    moe_ok(moe_shared_experts_config_default(&sc), "shared config");
    sc.num_shared_experts = c.n_shared;
    sc.hidden_size = c.H;
    sc.intermediate_size = c.I_shared;
    moe_ok(moe_shared_experts_create(&sc, &shared), "moe_shared_experts_create");
    s13 = std::make_unique<Tensor>(kBf16, std::vector<int64_t>{c.n_shared, 2 * c.I_shared, c.H});
    s2 = std::make_unique<Tensor>(kBf16, std::vector<int64_t>{c.n_shared, c.H, c.I_shared});
    cuda_ok(cudaMemset(s13->ptr, 0x3c, s13->bytes()), "cudaMemset");
    cuda_ok(cudaMemset(s2->ptr, 0x3c, s2->bytes()), "cudaMemset");
    moe_ok(moe_shared_experts_set_weights(shared, &s13->t, &s2->t, nullptr),
           "moe_shared_experts_set_weights");
  }
  const bool biased = c.method == MOE_ROUTING_DEEPSEEK_V3;
  const DLTensor* b = biased ? &bias.t : nullptr;

  size_t rh = 0, dw = 0, rw = 0, sw = 0, bw = 0;
  moe_ok(moe_router_hidden_workspace_size(router, c.H, T, kDLCUDA, &rh), "workspace size");
  moe_ok(moe_dispatcher_workspace_size(dispatcher, T, c.k, &dw), "workspace size");
  moe_ok(moe_runner_workspace_size(runner, T, c.k, kDLCUDA, &rw), "workspace size");
  if (shared) moe_ok(moe_shared_experts_workspace_size(shared, T, kDLCUDA, &sw), "workspace size");
  moe_ok(moe_block_workspace_size(router, dispatcher, runner, shared, T, kDLCUDA, &bw),
         "workspace size");
  const size_t ws_bytes = std::max({rh, dw, rw, sw, bw, size_t(256)});
  void* ws = nullptr;
  cuda_ok(cudaMalloc(&ws, ws_bytes), "cudaMalloc workspace");
  cudaStream_t s;
  cuda_ok(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");

  Row r{};
  const double gate_route = time_ms(s, iters, [&] {
    moe_ok(moe_router_run_hidden(router, &x.t, &gate_w.t, b, nullptr, &ids.t, &wts.t, &logits.t,
                                 ws, rh, s),
           "moe_router_run_hidden");
  });
  r.route = time_ms(s, iters, [&] {
    moe_ok(moe_router_run(router, &logits.t, b, nullptr, &ids.t, &wts.t, s), "moe_router_run");
  });
  r.gate = std::max(0.0, gate_route - r.route);
  r.routed = time_ms(s, iters, [&] {
    moe_ok(moe_dispatcher_dispatch(dispatcher, &ids.t, &local.t, &counts.t, &offsets.t, &sorted.t,
                                   ws, dw, s),
           "moe_dispatcher_dispatch");
    moe_ok(moe_runner_run(runner, &x.t, &local.t, &wts.t, &offsets.t, &sorted.t, &y.t, ws, rw, s),
           "moe_runner_run");
  });
  if (shared)
    r.shared = time_ms(s, iters, [&] {
      moe_ok(moe_shared_experts_run(shared, &x.t, nullptr, &y.t, 1, ws, sw, s),
             "moe_shared_experts_run");
    });
  r.sum = r.gate + r.route + r.routed + r.shared;
  auto block = [&] {
    moe_ok(moe_block_forward(router, dispatcher, runner, shared, &x.t, &gate_w.t, b, nullptr, &y.t,
                             ws, bw, s),
           "moe_block_forward");
  };
  r.block = time_ms(s, iters, block);
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  cuda_ok(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture");
  block();
  cuda_ok(cudaStreamEndCapture(s, &graph), "cudaStreamEndCapture");
  cuda_ok(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
  r.graph = time_ms(s, iters, [&] { cuda_ok(cudaGraphLaunch(exec, s), "cudaGraphLaunch"); });
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);

  cudaStreamDestroy(s);
  cudaFree(ws);
  moe_shared_experts_destroy(shared);
  moe_runner_destroy(runner);
  moe_dispatcher_destroy(dispatcher);
  moe_router_destroy(router);
  return r;
}

std::vector<int64_t> parse_list(const char* s) {
  std::vector<int64_t> v;
  for (const char* p = s; *p;) {
    char* end = nullptr;
    v.push_back(std::strtoll(p, &end, 10));
    if (end == p) die(std::string("bad token list: ") + s);
    p = *end == ',' ? end + 1 : end;
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 20;
  std::vector<int64_t> tokens = {1, 64, 4096};
  const char* csv_path = nullptr;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--iters" && i + 1 < argc) iters = std::max(1, std::atoi(argv[++i]));
    else if (a == "--tokens" && i + 1 < argc) tokens = parse_list(argv[++i]);
    else if (a == "--csv" && i + 1 < argc) csv_path = argv[++i];
    else die("usage: moe_block_bench [--iters N] [--tokens 1,64,4096] [--csv FILE]");
  }
  const Config configs[] = {
      {"deepseek_v3_ep8_slice", MOE_ROUTING_DEEPSEEK_V3, 256, 8, 8, 8, 4, 1, 2.5f, 7168, 2048, 1,
       2048},
      {"qwen3_30b_a3b", MOE_ROUTING_SOFTMAX_TOPK, 128, 1, 8, 1, 1, 1, 1.0f, 2048, 768, 0, 0},
  };
  cudaDeviceProp prop{};
  cuda_ok(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("device: %s, libmoe %s, bf16, median of %d runs, microseconds\n", prop.name,
              moe_version_string(), iters);
  std::printf("%-22s %6s %9s %9s %9s %9s %9s %9s %9s\n", "config", "T", "gate", "routing",
              "routed", "shared", "sum", "block", "graph");
  FILE* csv = csv_path ? std::fopen(csv_path, "w") : nullptr;
  if (csv_path && !csv) die(std::string("cannot write ") + csv_path);
  if (csv) std::fprintf(csv, "config,T,gate_us,routing_us,routed_us,shared_us,sum_us,block_us,graph_us\n");
  std::mt19937_64 rng(20260411);
  for (const Config& c : configs)
    for (int64_t T : tokens) {
      const Row r = bench(c, T, iters, rng);
      char shared_col[32] = "-";
      if (c.n_shared) std::snprintf(shared_col, sizeof(shared_col), "%.1f", r.shared * 1e3);
      std::printf("%-22s %6lld %9.1f %9.1f %9.1f %9s %9.1f %9.1f %9.1f\n", c.name, (long long)T,
                  r.gate * 1e3, r.route * 1e3, r.routed * 1e3, shared_col, r.sum * 1e3,
                  r.block * 1e3, r.graph * 1e3);
      if (csv)
        std::fprintf(csv, "%s,%lld,%.2f,%.2f,%.2f,%.2f,%.2f,%.2f,%.2f\n", c.name, (long long)T,
                     r.gate * 1e3, r.route * 1e3, r.routed * 1e3, r.shared * 1e3, r.sum * 1e3,
                     r.block * 1e3, r.graph * 1e3);
    }
  if (csv) std::fclose(csv);
  return 0;
}
