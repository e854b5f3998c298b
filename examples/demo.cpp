// libmoe demo: one Qwen3-30B-A3B-shaped MoE layer (E=128, k=8, H=2048,
// I=768, bf16) end to end through the C API: softmax top-k routing,
// dispatch, fused experts. Checks sampled tokens against a float64
// reference of SEMANTICS.md and prints the time per layer. Runs on the GPU
// when the library has the CUDA backend and a device is present, else on
// the CPU backend.
//
//   moe_demo [--tokens T] [--cpu]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "moe/moe.h"
#ifdef MOE_DEMO_CUDA
#include <cuda_runtime.h>
#endif

namespace {

constexpr int E = 128, K = 8, H = 2048, I = 768;

#define CHECK(call)                                                                   \
  do {                                                                                \
    moe_status_t st_ = (call);                                                        \
    if (st_ != MOE_STATUS_SUCCESS) {                                                  \
      std::fprintf(stderr, "%s failed: %s: %s\n", #call, moe_status_string(st_),      \
                   moe_last_error());                                                 \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float from_bf16(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Tensor {
  std::vector<int64_t> shape;
  DLTensor t{};
  Tensor(void* data, std::vector<int64_t> s, DLDataType dt, DLDevice dev) : shape(std::move(s)) {
    t.data = data;
    t.device = dev;
    t.ndim = int(shape.size());
    t.dtype = dt;
    t.shape = shape.data();
    t.strides = nullptr;
    t.byte_offset = 0;
  }
  Tensor(const Tensor&) = delete;
};

// Memory on the chosen device (host vector or cudaMalloc).
struct Buffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  bool cuda = false;
  Buffer(size_t n, bool on_cuda) : bytes(n), cuda(on_cuda) {
#ifdef MOE_DEMO_CUDA
    if (cuda) {
      if (cudaMalloc(&ptr, n) != cudaSuccess) {
        std::fprintf(stderr, "cudaMalloc(%zu) failed\n", n);
        std::exit(1);
      }
      return;
    }
#endif
    ptr = std::aligned_alloc(256, (n + 255) / 256 * 256);
  }
  ~Buffer() {
#ifdef MOE_DEMO_CUDA
    if (cuda) {
      cudaFree(ptr);
      return;
    }
#endif
    std::free(ptr);
  }
  void upload(const void* src) {
#ifdef MOE_DEMO_CUDA
    if (cuda) {
      cudaMemcpy(ptr, src, bytes, cudaMemcpyHostToDevice);
      return;
    }
#endif
    std::memcpy(ptr, src, bytes);
  }
  void download(void* dst) const {
#ifdef MOE_DEMO_CUDA
    if (cuda) {
      cudaMemcpy(dst, ptr, bytes, cudaMemcpyDeviceToHost);
      return;
    }
#endif
    std::memcpy(dst, ptr, bytes);
  }
};

bool have_gpu() {
#ifdef MOE_DEMO_CUDA
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
#else
  return false;
#endif
}

void sync_device(bool cuda) {
#ifdef MOE_DEMO_CUDA
  if (cuda) cudaDeviceSynchronize();
#else
  (void)cuda;
#endif
}

// float64 reference of one token: softmax top-k (renormalized), SwiGLU experts.
std::vector<double> reference_token(const std::vector<uint16_t>& x, const std::vector<uint16_t>& logits,
                                    const std::vector<uint16_t>& w13, const std::vector<uint16_t>& w2,
                                    int t) {
  std::vector<double> z(E), p(E);
  double mx = -INFINITY, sum = 0;
  for (int e = 0; e < E; ++e) mx = std::max(mx, z[e] = from_bf16(logits[size_t(t) * E + e]));
  for (int e = 0; e < E; ++e) sum += (p[e] = std::exp(z[e] - mx));
  std::vector<int> order(E);
  for (int e = 0; e < E; ++e) order[e] = e;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
  double wsum = 0;
  for (int j = 0; j < K; ++j) wsum += p[order[j]] / sum;
  std::vector<double> y(H, 0.0), h(I);
  for (int j = 0; j < K; ++j) {
    int e = order[j];
    double w = p[e] / sum / wsum;
    for (int i = 0; i < I; ++i) {
      double g = 0, u = 0;
      const uint16_t* rg = &w13[(size_t(e) * 2 * I + i) * H];
      const uint16_t* ru = &w13[(size_t(e) * 2 * I + I + i) * H];
      for (int c = 0; c < H; ++c) {
        double xv = from_bf16(x[size_t(t) * H + c]);
        g += double(from_bf16(rg[c])) * xv;
        u += double(from_bf16(ru[c])) * xv;
      }
      h[i] = g / (1.0 + std::exp(-g)) * u;
    }
    for (int c = 0; c < H; ++c) {
      const uint16_t* r = &w2[(size_t(e) * H + c) * I];
      double acc = 0;
      for (int i = 0; i < I; ++i) acc += double(from_bf16(r[i])) * h[i];
      y[c] += w * acc;
    }
  }
  return y;
}

}  // namespace

int main(int argc, char** argv) {
  int T = 64;
  bool force_cpu = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--tokens") && i + 1 < argc) T = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--cpu")) force_cpu = true;
    else {
      std::fprintf(stderr, "usage: %s [--tokens T] [--cpu]\n", argv[0]);
      return 2;
    }
  }
  if (T < 1) T = 1;
  const bool cuda = !force_cpu && moe_has_cuda() && have_gpu();
  const DLDevice dev{cuda ? kDLCUDA : kDLCPU, 0};
  const DLDataType bf16{kDLBfloat, 16, 1};
  std::printf("libmoe %s demo: Qwen3-30B-A3B layer (E=%d, k=%d, H=%d, I=%d, bf16), T=%d, on %s\n",
              moe_version_string(), E, K, H, I, T, cuda ? "the GPU (CUDA backend)" : "the CPU backend");

  // A cheap uniform generator with unit variance: the weights are 600M values.
  uint64_t state = 0x9e3779b97f4a7c15ull;
  auto nd = [&state]() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (float(state >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f) * 1.7320508f;
  };
  std::vector<uint16_t> hx(size_t(T) * H), hl(size_t(T) * E), hw13(size_t(E) * 2 * I * H),
      hw2(size_t(E) * H * I), hy(size_t(T) * H);
  for (auto& v : hx) v = to_bf16(nd());
  for (auto& v : hl) v = to_bf16(2.0f * nd());
  for (auto& v : hw13) v = to_bf16(nd() / std::sqrt(float(H)));
  for (auto& v : hw2) v = to_bf16(nd() / std::sqrt(float(I)));

  Buffer bx(hx.size() * 2, cuda), bl(hl.size() * 2, cuda), bw13(hw13.size() * 2, cuda),
      bw2(hw2.size() * 2, cuda), by(hy.size() * 2, cuda);
  bx.upload(hx.data());
  bl.upload(hl.data());
  bw13.upload(hw13.data());
  bw2.upload(hw2.data());

  moe_router_config_t rc;
  rc.struct_size = uint32_t(sizeof(rc));
  CHECK(moe_router_config_default(&rc, MOE_ROUTING_SOFTMAX_TOPK));
  rc.num_experts = E;
  rc.top_k = K;
  rc.renormalize = 1;
  moe_router_t router;
  CHECK(moe_router_create(&rc, &router));
  moe_dispatcher_config_t dc;
  dc.struct_size = uint32_t(sizeof(dc));
  CHECK(moe_dispatcher_config_default(&dc));
  dc.num_experts = E;
  dc.device_type = dev.device_type;
  moe_dispatcher_t dispatcher;
  CHECK(moe_dispatcher_create(&dc, &dispatcher));
  moe_runner_config_t uc;
  uc.struct_size = uint32_t(sizeof(uc));
  CHECK(moe_runner_config_default(&uc));
  uc.num_experts = E;
  uc.hidden_size = H;
  uc.intermediate_size = I;
  moe_runner_t runner;
  CHECK(moe_runner_create(&uc, &runner));
  Tensor tw13(bw13.ptr, {E, 2 * I, H}, bf16, dev), tw2(bw2.ptr, {E, H, I}, bf16, dev);
  CHECK(moe_runner_set_weights(runner, &tw13.t, &tw2.t, nullptr, nullptr, nullptr, nullptr));

  size_t ws_bytes = 0;
  CHECK(moe_layer_workspace_size(router, dispatcher, runner, T, dev.device_type, &ws_bytes));
  Buffer ws(ws_bytes, cuda);
  Tensor tx(bx.ptr, {T, H}, bf16, dev), tl(bl.ptr, {T, E}, bf16, dev), ty(by.ptr, {T, H}, bf16, dev);

  auto forward = [&] {
    CHECK(moe_layer_forward(router, dispatcher, runner, &tx.t, &tl.t, nullptr, nullptr, &ty.t,
                            ws.ptr, ws_bytes, nullptr));
  };
  forward();  // warm-up
  sync_device(cuda);
  const int reps = cuda ? 50 : 5;
  std::vector<double> ms;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    forward();
    sync_device(cuda);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  by.download(hy.data());

  // Check a sample of tokens against the float64 reference.
  std::vector<int> sample;
  for (int t = 0; t < T && sample.size() < 8; t += std::max(1, T / 8)) sample.push_back(t);
  double num = 0, den = 0;
  bool finite = true;
  for (int t : sample) {
    std::vector<double> ref = reference_token(hx, hl, hw13, hw2, t);
    for (int c = 0; c < H; ++c) {
      double got = from_bf16(hy[size_t(t) * H + c]);
      finite = finite && std::isfinite(got);
      num += (got - ref[c]) * (got - ref[c]);
      den += ref[c] * ref[c];
    }
  }
  double rel = std::sqrt(num / den);
  bool ok = finite && rel < 1e-2;
  std::printf("median layer time: %.3f ms over %d runs (route + dispatch + experts)\n", ms[ms.size() / 2], reps);
  std::printf("check vs float64 reference on %zu tokens: rel error %.2e (limit 1e-2): %s\n",
              sample.size(), rel, ok ? "PASS" : "FAIL");
  moe_runner_destroy(runner);
  moe_dispatcher_destroy(dispatcher);
  moe_router_destroy(router);
  return ok ? 0 : 1;
}
