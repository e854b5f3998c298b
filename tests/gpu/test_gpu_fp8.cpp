// CUDA FP8 runner (kernels/moe_runner_fp8.cu) through the public API: the
// same inputs on the CPU backend and on the GPU (outputs poisoned, caller
// workspaces full of NaN bytes), and the float64 dequantized reference of
// tests/ref_runner.h. Per-tensor dynamic and static, block-128; gated SILU
// and non-gated RELU2; DeepSeek-like small shapes; degenerate scales; NaN and
// Inf confined to their token; batch independence; graph capture; refused sizes.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "gpu_support.h"
#include "ref_runner.h"

using namespace moe_test;

namespace {

// The activation quantization is the CPU's (same scale and rounding rules),
// so the GPU differs from it and from the float64 reference by summation
// order, the accumulation of the tensor cores and the E4M3 rounding flips of
// h that these cause. mma.sync accumulates in f32 (run 21: <= 5e-4 against
// the CPU); wgmma's FP8 MMAs keep fewer mantissa bits inside each 128-deep K
// block, which is promoted to f32 as DeepGEMM does (run 21, 128-row tiles:
// 3.4e-3 to 5.9e-3 against the CPU). The contract is 3e-2.
constexpr double kTol = 1e-2;

struct Case {
  const char* name = "case";
  int E = 16, ep_size = 2, ep_rank = 1, k = 4, H = 256, I = 256;
  int quant = MOE_QUANT_FP8_BLOCK_128;
  int act_scale = MOE_ACT_SCALE_DYNAMIC;
  int activation = MOE_ACTIVATION_SILU;
  bool gated = true, swap = false, weight_on_input = false;
  DT x_dt = DT::bf16;
  float output_scale = 1.0f;
  int E_loc() const { return E / ep_size; }
  int rows13() const { return (gated ? 2 : 1) * I; }
  bool block() const { return quant == MOE_QUANT_FP8_BLOCK_128; }
  bool static_act() const { return act_scale == MOE_ACT_SCALE_STATIC; }
};

const char* quant_name(const Case& c) {
  if (c.block()) return "block-128";
  return c.static_act() ? "per-tensor static" : "per-tensor dynamic";
}

// Random E4M3 codes over the whole finite range (NaN codes 0x7f / 0xff
// replaced), from splitmix64 in several threads: fast enough for model shapes.
void fill_codes(HostTensor& t, uint64_t seed) {
  const int64_t n = t.numel();
  uint8_t* p = t.as<uint8_t>();
  const int nth = int(std::max(1u, std::min(16u, std::thread::hardware_concurrency())));
  std::vector<std::thread> threads;
  for (int w = 0; w < nth; ++w)
    threads.emplace_back([=] {
      uint64_t s = seed ^ (0x9e3779b97f4a7c15ull * uint64_t(w + 1));
      for (int64_t i = n * w / nth; i < n * (w + 1) / nth; ++i) {
        uint64_t z = (s += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        uint8_t c = uint8_t(z >> 56);
        if ((c & 0x7f) == 0x7f) c = uint8_t(c - 1);  // NaN -> +-448
        p[i] = c;
      }
    });
  for (auto& th : threads) th.join();
}

std::vector<int64_t> scale_shape(const Case& c, int64_t rows, int64_t cols) {
  if (c.block()) return {c.E_loc(), (rows + 127) / 128, (cols + 127) / 128};
  return {c.E_loc()};
}

// Host weights of one layer: E4M3 codes and f32 scales.
struct Weights {
  HostTensor w13, w2, s13, s2, a13, a2;
  Weights(const Case& c, std::mt19937_64& rng)
      : w13(DT::e4m3, {c.E_loc(), c.rows13(), c.H}), w2(DT::e4m3, {c.E_loc(), c.H, c.I}),
        s13(DT::f32, scale_shape(c, c.rows13(), c.H)), s2(DT::f32, scale_shape(c, c.H, c.I)),
        a13(DT::f32, {1}), a2(DT::f32, {1}) {
    fill_codes(w13, rng());
    fill_codes(w2, rng());
    // Uniform random codes have an rms near 110; the scales bring the weights
    // to variance ~1/fan_in so that every layer output stays O(1).
    std::uniform_real_distribution<double> jitter(0.5, 2.0);
    const double b13 = 1.0 / std::sqrt(double(c.H)) / 110, b2 = 1.0 / std::sqrt(double(c.I)) / 110;
    for (int64_t i = 0; i < s13.numel(); ++i) s13.set(i, b13 * jitter(rng));
    for (int64_t i = 0; i < s2.numel(); ++i) s2.set(i, b2 * jitter(rng));
    a13.set(0, 4.0 / 448);  // |x| ~ N(0, 1): rare saturation
    a2.set(0, 2.0 / 448);
  }
};

// Hidden rows, global ids (some -1, some tokens without any local slot) and weights.
struct Inputs {
  int64_t T;
  HostTensor x, ids, w;
  Inputs(const Case& c, int64_t T_, std::mt19937_64& rng)
      : T(T_), x(c.x_dt, {T, c.H}), ids(DT::i32, {T, c.k}), w(DT::f32, {T, c.k}) {
    x.fill_normal(rng, 1.0);
    std::uniform_real_distribution<double> wd(0.1, 1.0);
    std::vector<int> pool(size_t(c.E));
    for (int64_t t = 0; t < T; ++t) {
      for (int e = 0; e < c.E; ++e) pool[size_t(e)] = e;
      std::shuffle(pool.begin(), pool.end(), rng);
      for (int j = 0; j < c.k; ++j) {
        int id = pool[size_t(j)];
        if ((t % 9 == 4 && j == 0) || t % 17 == 5) id = -1;
        ids.as<int32_t>()[t * c.k + j] = id;
        w.as<float>()[t * c.k + j] = float(wd(rng));
      }
    }
  }
};

struct Runner {
  moe_runner_t h = nullptr;
  explicit Runner(const Case& c) {
    moe_runner_config_t rc;
    rc.struct_size = uint32_t(sizeof(rc));
    REQUIRE(moe_runner_config_default(&rc) == MOE_STATUS_SUCCESS);
    rc.num_experts = c.E_loc();
    rc.hidden_size = c.H;
    rc.intermediate_size = c.I;
    rc.activation = c.activation;
    rc.gated = c.gated;
    rc.swap_gate_up = c.swap;
    rc.apply_router_weight_on_input = c.weight_on_input;
    rc.quant_mode = c.quant;
    rc.act_scale_mode = c.act_scale;
    rc.output_scale = c.output_scale;
    MOE_CHECK_OK(moe_runner_create(&rc, &h));
  }
  ~Runner() { moe_runner_destroy(h); }
  template <class Tensor>
  moe_status_t set(const Case& c, Tensor& w13, Tensor& w2, Tensor& s13, Tensor& s2, Tensor& a13,
                   Tensor& a2) {
    return moe_runner_set_weights(h, w13.dl(), w2.dl(), s13.dl(), s2.dl(),
                                  c.static_act() ? a13.dl() : nullptr,
                                  c.static_act() ? a2.dl() : nullptr);
  }
};

struct Dispatcher {
  moe_dispatcher_t h = nullptr;
  Dispatcher(const Case& c, int device_type) {
    moe_dispatcher_config_t dc;
    dc.struct_size = uint32_t(sizeof(dc));
    REQUIRE(moe_dispatcher_config_default(&dc) == MOE_STATUS_SUCCESS);
    dc.num_experts = c.E;
    dc.ep_rank = c.ep_rank;
    dc.ep_size = c.ep_size;
    dc.device_type = device_type;
    MOE_CHECK_OK(moe_dispatcher_create(&dc, &h));
  }
  ~Dispatcher() { moe_dispatcher_destroy(h); }
};

// CPU backend: dispatch and run; y poisoned first. local gets the local ids.
void run_cpu(const Case& c, Weights& wt, Inputs& in, HostTensor& y, HostTensor& local) {
  Dispatcher d(c, kDLCPU);
  Runner r(c);
  MOE_CHECK_OK(r.set(c, wt.w13, wt.w2, wt.s13, wt.s2, wt.a13, wt.a2));
  HostTensor counts(DT::i32, {c.E_loc()}), offsets(DT::i32, {c.E_loc() + 1}),
      sorted(DT::i32, {in.T * c.k});
  MOE_CHECK_OK(moe_dispatcher_dispatch(d.h, in.ids.dl(), local.dl(), counts.dl(), offsets.dl(),
                                       sorted.dl(), nullptr, 0, nullptr));
  y.poison();
  MOE_CHECK_OK(moe_runner_run(r.h, in.x.dl(), local.dl(), in.w.dl(), offsets.dl(), sorted.dl(),
                              y.dl(), nullptr, 0, nullptr));
}

// Device copies of the weights and a runner holding them.
struct GpuLayer {
  DeviceTensor w13, w2, s13, s2, a13, a2;
  Runner r;
  GpuLayer(const Case& c, Weights& wt)
      : w13(wt.w13), w2(wt.w2), s13(wt.s13), s2(wt.s2), a13(wt.a13), a2(wt.a2), r(c) {
    MOE_CHECK_OK(r.set(c, w13, w2, s13, s2, a13, a2));
  }
};

// Device inputs and the GPU dispatcher's metadata for them.
struct GpuBatch {
  DeviceTensor x, ids, w, local, counts, offsets, sorted;
  GpuBatch(const Case& c, const Inputs& in)
      : x(in.x), ids(in.ids), w(in.w), local(DT::i32, {in.T, c.k}), counts(DT::i32, {c.E_loc()}),
        offsets(DT::i32, {c.E_loc() + 1}), sorted(DT::i32, {in.T * c.k}) {
    Dispatcher d(c, kDLCUDA);
    for (DeviceTensor* t : {&local, &counts, &offsets, &sorted}) t->poison();
    MOE_CHECK_OK(moe_dispatcher_dispatch(d.h, ids.dl(), local.dl(), counts.dl(), offsets.dl(),
                                         sorted.dl(), nullptr, 0, nullptr));
  }
};

// A device buffer of the runner's workspace size, filled with 0xff (NaN in f32).
struct Workspace {
  void* p = nullptr;
  size_t bytes = 0;
  Workspace(moe_runner_t r, int64_t T, int K) {
    MOE_CHECK_OK(moe_runner_workspace_size(r, T, K, kDLCUDA, &bytes));
    CUDA_OK(cudaMalloc(&p, std::max<size_t>(bytes, 256)));
    CUDA_OK(cudaMemset(p, 0xff, std::max<size_t>(bytes, 256)));
  }
  ~Workspace() { cudaFree(p); }
};

// GPU run into a poisoned output, downloaded to y.
void run_gpu(const Case& c, GpuLayer& l, GpuBatch& b, HostTensor& y) {
  const int64_t T = b.x.shape[0];
  DeviceTensor d_y(c.x_dt, {T, c.H});
  d_y.poison();
  Workspace ws(l.r.h, T, c.k);
  MOE_CHECK_OK(moe_runner_run(l.r.h, b.x.dl(), b.local.dl(), b.w.dl(), b.offsets.dl(),
                              b.sorted.dl(), d_y.dl(), ws.p, ws.bytes, nullptr));
  d_y.download(y);
}

RefMoeCfg ref_cfg(const Case& c) {
  RefMoeCfg rc;
  rc.activation = c.activation;
  rc.gated = c.gated;
  rc.swap_gate_up = c.swap;
  rc.weight_on_input = c.weight_on_input;
  rc.quant_mode = c.quant;
  rc.act_scale_mode = c.act_scale;
  rc.output_scale = c.output_scale;
  return rc;
}

bool has_local_slot(const HostTensor& local, int64_t t, int k) {
  for (int j = 0; j < k; ++j)
    if (local.as<int32_t>()[t * k + j] >= 0) return true;
  return false;
}

// GPU vs CPU (and vs float64 with with_ref) on fresh data; every value finite,
// tokens without a local slot exactly 0. Returns the GPU output.
std::vector<double> check_case(const Case& c, int64_t T, bool with_ref) {
  auto rng = fresh_rng();
  Weights wt(c, rng);
  Inputs in(c, T, rng);
  HostTensor y_cpu(c.x_dt, {T, c.H}), local(DT::i32, {T, c.k}), y_gpu(c.x_dt, {T, c.H});
  run_cpu(c, wt, in, y_cpu, local);
  GpuLayer l(c, wt);
  GpuBatch b(c, in);
  run_gpu(c, l, b, y_gpu);
  const std::vector<double> gv = values(y_gpu), cv = values(y_cpu);
  INFO(std::string(c.name), " ", std::string(quant_name(c)), " x ", std::string(dt_name(c.x_dt)),
       " act ", c.activation, " gated ", c.gated, " swap ", c.swap, " won ", c.weight_on_input,
       " H ", c.H, " I ", c.I, " T ", T);
  int64_t bad = 0, nonzero_empty = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int col = 0; col < c.H; ++col) {
      const double v = gv[size_t(t * c.H + col)];
      bad += !std::isfinite(v);
      if (!has_local_slot(local, t, c.k)) nonzero_empty += v != 0.0;
    }
  CHECK(bad == 0);
  CHECK(nonzero_empty == 0);
  const double e_cpu = rel_error(gv, cv);
  INFO("rel error vs CPU ", e_cpu);
  if (std::getenv("MOE_TEST_PRINT_ERRORS"))  // one line per case, for comparing kernel variants
    std::printf("fp8 case %s %s act %d gated %d swap %d H %d I %d T %lld: rel error vs CPU %.3e\n",
                c.name, quant_name(c), c.activation, int(c.gated), int(c.swap), c.H, c.I,
                static_cast<long long>(T), e_cpu);
  CHECK(e_cpu < kTol);
  if (with_ref) {
    const std::vector<double> ref =
        ref_moe(ref_cfg(c), in.x, local, in.w, wt.w13, wt.w2, &wt.s13, &wt.s2,
                c.static_act() ? &wt.a13 : nullptr, c.static_act() ? &wt.a2 : nullptr);
    const double e_ref = rel_error(gv, ref);
    INFO("rel error vs float64 ", e_ref);
    CHECK(e_ref < kTol);
  }
  return gv;
}

struct Shape {
  int H, I;
};
const Shape kShapes[] = {{256, 256}, {512, 384}, {1024, 512}};
const int64_t kTokens[] = {1, 7, 40, 64, 300};  // 16-, 16-, 32-, 64- and 128-row tiles (E_loc 8, k 4)

// The float64 reference is slow: run it on the smaller problems only.
bool ref_affordable(const Shape& s, int64_t T) { return int64_t(s.H) * s.I * T <= 256 * 256 * 64; }

void sweep(Case c) {
  for (const Shape& s : kShapes)
    for (int64_t T : kTokens) {
      c.H = s.H;
      c.I = s.I;
      check_case(c, T, ref_affordable(s, T) || T == 1);
    }
}

Case silu_gated(int quant, int act_scale) {
  Case c;
  c.name = "silu gated";
  c.quant = quant;
  c.act_scale = act_scale;
  return c;
}

// c with its expert layout (E experts over ep_size ranks, this one ep_rank),
// top-k and sizes replaced.
Case sized(Case c, int E, int ep_size, int ep_rank, int k, int H, int I) {
  c.E = E;
  c.ep_size = ep_size;
  c.ep_rank = ep_rank;
  c.k = k;
  c.H = H;
  c.I = I;
  return c;
}

Case relu2_plain(int quant, int act_scale) {
  Case c = silu_gated(quant, act_scale);
  c.name = "relu2 non-gated";
  c.activation = MOE_ACTIVATION_RELU2;
  c.gated = false;
  return c;
}

}  // namespace

TEST_CASE("gpu.fp8.block_128") {
  SUBCASE("silu gated") { sweep(silu_gated(MOE_QUANT_FP8_BLOCK_128, MOE_ACT_SCALE_DYNAMIC)); }
  SUBCASE("relu2 non-gated") { sweep(relu2_plain(MOE_QUANT_FP8_BLOCK_128, MOE_ACT_SCALE_DYNAMIC)); }
}

TEST_CASE("gpu.fp8.per_tensor_dynamic") {
  SUBCASE("silu gated") { sweep(silu_gated(MOE_QUANT_FP8_PER_TENSOR, MOE_ACT_SCALE_DYNAMIC)); }
  SUBCASE("relu2 non-gated") { sweep(relu2_plain(MOE_QUANT_FP8_PER_TENSOR, MOE_ACT_SCALE_DYNAMIC)); }
}

TEST_CASE("gpu.fp8.per_tensor_static") {
  SUBCASE("silu gated") { sweep(silu_gated(MOE_QUANT_FP8_PER_TENSOR, MOE_ACT_SCALE_STATIC)); }
  SUBCASE("relu2 non-gated") { sweep(relu2_plain(MOE_QUANT_FP8_PER_TENSOR, MOE_ACT_SCALE_STATIC)); }
}

TEST_CASE("gpu.fp8.options") {
  // Activations, swapped halves, weight on input, output scale, f16/f32
  // hidden rows, and per-tensor sizes that are multiples of 16 only.
  for (int quant : {MOE_QUANT_FP8_BLOCK_128, MOE_QUANT_FP8_PER_TENSOR}) {
    Case c = silu_gated(quant, MOE_ACT_SCALE_DYNAMIC);
    for (int act : {MOE_ACTIVATION_GELU, MOE_ACTIVATION_GELU_TANH, MOE_ACTIVATION_IDENTITY}) {
      c.activation = act;
      check_case(c, 33, true);
    }
    c = silu_gated(quant, MOE_ACT_SCALE_DYNAMIC);
    c.swap = true;
    c.output_scale = -1.5f;
    check_case(c, 40, true);
    for (DT dt : {DT::f16, DT::f32}) {
      Case d = silu_gated(quant, MOE_ACT_SCALE_DYNAMIC);
      d.x_dt = dt;
      check_case(d, 21, true);
    }
    Case won = silu_gated(quant, MOE_ACT_SCALE_DYNAMIC);
    won.name = "llama4-like";
    won.k = 1;
    won.weight_on_input = true;
    check_case(won, 50, true);
  }
  Case odd = silu_gated(MOE_QUANT_FP8_PER_TENSOR, MOE_ACT_SCALE_STATIC);
  odd.name = "multiples of 16";
  odd.H = 208;
  odd.I = 80;
  check_case(odd, 70, true);
  odd.gated = false;
  odd.act_scale = MOE_ACT_SCALE_DYNAMIC;
  check_case(odd, 9, true);
}

TEST_CASE("gpu.fp8.degenerate_scales") {
  // Zero, denormal and tiny scales. Experts without tokens are never read
  // (their scales may even be NaN); experts with tokens give finite outputs.
  for (int quant : {MOE_QUANT_FP8_PER_TENSOR, MOE_QUANT_FP8_BLOCK_128}) {
    for (bool with_tokens : {false, true}) {
      const std::string what =
          std::string(quant == MOE_QUANT_FP8_BLOCK_128 ? "block-128" : "per-tensor") +
          (with_tokens ? ", degenerate experts with tokens" : ", degenerate experts without tokens");
      INFO(what);
      auto rng = fresh_rng();
      Case c = silu_gated(quant, MOE_ACT_SCALE_DYNAMIC);
      c.E = 8;
      c.ep_size = 1;
      c.ep_rank = 0;
      c.H = 384;
      c.I = 256;
      Weights wt(c, rng);
      const float degenerate[] = {0.0f, 1e-45f, 1e-40f, 1e-30f};
      const int64_t n13 = wt.s13.numel() / c.E_loc(), n2 = wt.s2.numel() / c.E_loc();
      for (int e = 0; e < 4; ++e) {
        const double v13 = with_tokens ? degenerate[e] : (e == 0 ? std::nan("") : degenerate[e]);
        const double v2 = with_tokens ? degenerate[3 - e] : (e == 1 ? INFINITY : degenerate[3 - e]);
        for (int64_t i = 0; i < n13; ++i) wt.s13.set(e * n13 + i, v13);
        for (int64_t i = 0; i < n2; ++i) wt.s2.set(e * n2 + i, v2);
      }
      const int64_t T = 45;
      Inputs in(c, T, rng);
      for (int64_t i = 0; i < T * c.k; ++i) {
        int32_t& id = in.ids.as<int32_t>()[i];
        // Without tokens: experts 4..7 only (distinct per token); with: every expert.
        id = with_tokens ? int32_t((i / c.k + i % c.k * 3) % c.E) : int32_t(4 + i % c.k);
      }
      HostTensor y_cpu(c.x_dt, {T, c.H}), local(DT::i32, {T, c.k}), y_gpu(c.x_dt, {T, c.H});
      run_cpu(c, wt, in, y_cpu, local);
      GpuLayer l(c, wt);
      GpuBatch b(c, in);
      run_gpu(c, l, b, y_gpu);
      const std::vector<double> gv = values(y_gpu);
      for (double v : gv) REQUIRE(std::isfinite(v));
      INFO("rel error vs CPU ", rel_error(gv, values(y_cpu)));
      CHECK(rel_error(gv, values(y_cpu)) < kTol);
      const std::vector<double> ref =
          ref_moe(ref_cfg(c), in.x, local, in.w, wt.w13, wt.w2, &wt.s13, &wt.s2);
      CHECK(rel_error(gv, ref) < kTol);
    }
  }
}

TEST_CASE("gpu.fp8.wide_tiles") {
  // Enough slots per local expert (>= 128) for the 128-row tiles (the wgmma
  // path on sm_90a), with partial row tiles, and for per-tensor scales an H
  // and I that are multiples of 16 but not of the 128-byte K block or the
  // 128-column tile (k and column tails). Small enough for the sanitizers.
  check_case(sized(silu_gated(MOE_QUANT_FP8_BLOCK_128, MOE_ACT_SCALE_DYNAMIC), 4, 2, 0, 2, 256, 128), 300, true);
  check_case(sized(relu2_plain(MOE_QUANT_FP8_PER_TENSOR, MOE_ACT_SCALE_DYNAMIC), 4, 2, 1, 2, 272, 144), 300, true);
  Case gated = sized(silu_gated(MOE_QUANT_FP8_PER_TENSOR, MOE_ACT_SCALE_DYNAMIC), 2, 1, 0, 1, 272, 144);
  gated.swap = true;
  check_case(gated, 257, true);
}

TEST_CASE("gpu.fp8.persistent_items") {
  // More (row tile, column tile) items than an H100 has SMs, so that each
  // block of the persistent TMA kernel (the default 128-row path on sm_90a)
  // walks several items and its pipeline runs on across them; against the
  // CPU backend only (the float64 reference is too slow here).
  // 64 row tiles; with 256-row weight tiles (128 gate + 128 up) 192 GEMM1
  // and 256 GEMM2 items (MOE_RUNNER_FP8_BN=128: 384 and 512).
  check_case(sized(silu_gated(MOE_QUANT_FP8_BLOCK_128, MOE_ACT_SCALE_DYNAMIC), 8, 1, 0, 2, 1024, 384), 4096, false);
  // k and column tails (the last 256-wide tile half past N, or partly),
  // 128 row tiles: 256 items per GEMM (MOE_RUNNER_FP8_BN=128: 512 and 384).
  check_case(sized(relu2_plain(MOE_QUANT_FP8_PER_TENSOR, MOE_ACT_SCALE_DYNAMIC), 4, 1, 0, 2, 272, 400), 8192, false);
  // Block scales, non-gated, N = 384 for GEMM1 and GEMM2: the second column
  // tile's upper half lies past N (its MMAs skipped, its scale row not read).
  check_case(sized(relu2_plain(MOE_QUANT_FP8_BLOCK_128, MOE_ACT_SCALE_DYNAMIC), 4, 1, 0, 2, 384, 384), 2048, false);
}

TEST_CASE("gpu.fp8.static_scale_zero") {
  auto rng = fresh_rng();
  Case c = silu_gated(MOE_QUANT_FP8_PER_TENSOR, MOE_ACT_SCALE_STATIC);
  Weights wt(c, rng);
  wt.a13.set(0, 0.0);
  Inputs in(c, 12, rng);
  HostTensor y(c.x_dt, {12, c.H});
  GpuLayer l(c, wt);
  GpuBatch b(c, in);
  run_gpu(c, l, b, y);
  // x quantizes to 0, so h = act(0) * 0 = 0 and y = 0 exactly.
  for (double v : values(y)) REQUIRE(v == 0.0);
}

TEST_CASE("gpu.fp8.nan_confined") {
  // NaN (and Inf) in one token's hidden row shows up in that token only:
  // every other token is bitwise the output of the same batch without it.
  for (int quant : {MOE_QUANT_FP8_PER_TENSOR, MOE_QUANT_FP8_BLOCK_128}) {
    INFO(std::string(quant == MOE_QUANT_FP8_BLOCK_128 ? "block-128" : "per-tensor"));
    auto rng = fresh_rng();
    Case c = silu_gated(quant, MOE_ACT_SCALE_DYNAMIC);
    c.E = 3;  // the bad tokens share experts and tiles with the others
    c.ep_size = 1;
    c.ep_rank = 0;
    c.k = 2;
    c.H = 384;
    Weights wt(c, rng);
    Inputs in(c, 40, rng);
    for (int64_t i = 0; i < in.ids.numel(); ++i)
      in.ids.as<int32_t>()[i] = int32_t((i / c.k + i % c.k) % c.E);  // every slot valid
    GpuLayer l(c, wt);
    HostTensor clean(c.x_dt, {in.T, c.H}), dirty(c.x_dt, {in.T, c.H});
    {
      GpuBatch b(c, in);
      run_gpu(c, l, b, clean);
    }
    const int64_t nan_tok = 7, inf_tok = 22;
    in.x.set(nan_tok * c.H + 3, std::nan(""));
    in.x.set(inf_tok * c.H + 200, INFINITY);
    GpuBatch b(c, in);
    run_gpu(c, l, b, dirty);
    const size_t row = size_t(c.H) * dt_bytes(c.x_dt);
    for (int64_t t = 0; t < in.T; ++t) {
      if (t == nan_tok || t == inf_tok) {
        bool nan_seen = false;
        for (int col = 0; col < c.H; ++col) nan_seen |= std::isnan(dirty.get(t * c.H + col));
        INFO("token ", t);
        CHECK(nan_seen);  // propagated, not silently dropped
        continue;
      }
      INFO("token ", t);
      REQUIRE(std::memcmp(clean.storage.data() + row * size_t(t),
                          dirty.storage.data() + row * size_t(t), row) == 0);
    }
  }
}

// The GPU output of the tokens of `in` run as one batch.
static void run_batch(const Case& c, GpuLayer& l, const Inputs& in, HostTensor& y) {
  GpuBatch b(c, in);
  run_gpu(c, l, b, y);
}

// Tokens [first, first + count) of `all` run as a batch of their own: their
// outputs must be bitwise those they got in the whole batch (y_all).
static void check_tokens_alone(const Case& c, GpuLayer& l, const Inputs& all, const HostTensor& y_all, int64_t first,
                        int64_t count, std::mt19937_64& rng) {
  const size_t row = size_t(c.H) * dt_bytes(c.x_dt);
  Inputs part(c, count, rng);
  std::memcpy(part.x.data(), all.x.storage.data() + row * size_t(first), row * size_t(count));
  for (int64_t i = 0; i < count * c.k; ++i) {
    part.ids.as<int32_t>()[i] = all.ids.as<int32_t>()[first * c.k + i];
    part.w.as<float>()[i] = all.w.as<float>()[first * c.k + i];
  }
  HostTensor y(c.x_dt, {count, c.H});
  run_batch(c, l, part, y);
  INFO("tokens ", first, " to ", first + count - 1, " alone");
  CHECK(std::memcmp(y.storage.data(), y_all.storage.data() + row * size_t(first), row * size_t(count)) == 0);
}

TEST_CASE("gpu.fp8.batch_independent") {
  // A token alone gives bitwise its output inside a batch of 150.
  for (int quant : {MOE_QUANT_FP8_PER_TENSOR, MOE_QUANT_FP8_BLOCK_128}) {
    INFO(std::string(quant == MOE_QUANT_FP8_BLOCK_128 ? "block-128" : "per-tensor"));
    auto rng = fresh_rng();
    Case c = silu_gated(quant, MOE_ACT_SCALE_DYNAMIC);
    c.E = 8;
    c.ep_size = 1;
    c.ep_rank = 0;
    Weights wt(c, rng);
    GpuLayer l(c, wt);
    Inputs all(c, 150, rng);
    HostTensor y_all(c.x_dt, {all.T, c.H});
    run_batch(c, l, all, y_all);
    for (int64_t t : {int64_t(0), int64_t(77), int64_t(149)}) check_tokens_alone(c, l, all, y_all, t, 1, rng);
  }
}

TEST_CASE("gpu.fp8.stream_kernels") {
  // Expert matrices of more than 4M elements, so that on sm_90a the 16-row
  // decode tiles run fp8_stream_kernel (stream_kernels_for; a batch of 1:
  // fewer slots than local experts, 16 columns a tile; 20: 32 columns) while
  // a batch of 75 slots per local expert runs fp8_gemm_kernel's 64-row
  // tiles and one of 40 its 32-row tiles: the same fragments, K order and
  // promotions, so a token's output must be bitwise the same in each as in
  // the batch of 150 (on mma.sync, MOE_RUNNER_WGMMA=0: 128-row wgmma tiles
  // would take the batches of 40 and 150 by default). Gated block-128 and
  // non-gated per-tensor, partial tiles and skipped slots (-1) included.
  ScopedEnv mode("MOE_RUNNER_WGMMA");
  mode.set("0");
  const Case cases[] = {
      sized(silu_gated(MOE_QUANT_FP8_BLOCK_128, MOE_ACT_SCALE_DYNAMIC), 4, 1, 0, 2, 2176, 2048),
      sized(relu2_plain(MOE_QUANT_FP8_PER_TENSOR, MOE_ACT_SCALE_DYNAMIC), 4, 1, 0, 2, 2176, 2048),
  };
  for (const Case& c : cases) {
    INFO(std::string(c.name), " ", std::string(quant_name(c)));
    auto rng = fresh_rng();
    Weights wt(c, rng);
    GpuLayer l(c, wt);
    Inputs all(c, 150, rng);
    HostTensor y_all(c.x_dt, {all.T, c.H});
    run_batch(c, l, all, y_all);
    for (int64_t t = 0; t < all.T; ++t)
      for (int col = 0; col < c.H; ++col) REQUIRE(std::isfinite(y_all.get(t * c.H + col)));
    for (int64_t T : {int64_t(1), int64_t(20), int64_t(40)}) check_tokens_alone(c, l, all, y_all, 0, T, rng);
    // The streaming kernel's output repeats bitwise: its ring's weight tiles,
    // read by ldmatrix, are refilled by TMA (see gemm::StreamRing::release).
    Inputs part(c, 20, rng);
    GpuBatch b(c, part);
    HostTensor y0(c.x_dt, {part.T, c.H}), y(c.x_dt, {part.T, c.H});
    run_gpu(c, l, b, y0);
    for (int i = 0; i < 20; ++i) {
      run_gpu(c, l, b, y);
      INFO("launch ", i + 1);
      REQUIRE(std::memcmp(y.storage.data(), y0.storage.data(), y0.storage.size()) == 0);
    }
  }
}

TEST_CASE("gpu.fp8.device_row_tile") {
  // Expert parallelism: 32 experts over 8 ranks (4 local), k 8, expert
  // matrices over 4M elements (on sm_90a both GEMMs' 16-row tiles stream).
  // The host sees T * k / 4 = 2T slots per local expert and plans 128-row
  // tiles, with the 16-row tiles as the candidate the tile map takes when
  // the local slots (about T in all here) are at most 10 per expert. A
  // batch of 24 tokens must take them: each of its tokens bitwise as alone
  // (one token: 16-row tiles), which the 128-row wgmma tiles would not give
  // (they accumulate differently). A batch of 200 (about 50 local slots per
  // expert) takes the 128-row tiles: against the CPU backend. With
  // MOE_RUNNER_STREAM=0 the 16-row tiles are not a candidate (their tile
  // kernel is not persistent): the bitwise part is skipped.
  const char* stream_env = std::getenv("MOE_RUNNER_STREAM");
  const bool streamed = !(stream_env && std::string(stream_env) == "0");
  const Case cases[] = {
      sized(silu_gated(MOE_QUANT_FP8_BLOCK_128, MOE_ACT_SCALE_DYNAMIC), 32, 8, 3, 8, 2048, 2176),
      sized(relu2_plain(MOE_QUANT_FP8_PER_TENSOR, MOE_ACT_SCALE_DYNAMIC), 32, 8, 5, 8, 2048, 2176),
  };
  for (const Case& c : cases) {
    INFO(std::string(c.name), " ", std::string(quant_name(c)));
    auto rng = fresh_rng();
    Weights wt(c, rng);
    GpuLayer l(c, wt);
    Inputs all(c, 24, rng);
    HostTensor y_all(c.x_dt, {all.T, c.H});
    run_batch(c, l, all, y_all);
    if (streamed) {
      for (int64_t t : {int64_t(0), int64_t(11), int64_t(23)}) check_tokens_alone(c, l, all, y_all, t, 1, rng);
      check_tokens_alone(c, l, all, y_all, 12, 5, rng);  // 40 slots: 16-row tiles planned on the host
    }
    check_case(c, 24, false);
    check_case(c, 200, false);
  }
}

TEST_CASE("gpu.fp8.tma_tile_widths") {
  // The persistent TMA kernel (128-row tiles on sm_90a) with 256 weight rows
  // per tile (two 128-column MMA halves, the default) and with 128
  // (MOE_RUNNER_FP8_BN=128): each column goes through the same MMAs and
  // promotions, so the outputs must be bitwise the same. Gated and non-gated
  // with the last tile's upper half past N (N = 384), per-tensor with k and
  // column tails (H 272, I 400). Elsewhere both runs take the same path.
  ScopedEnv width("MOE_RUNNER_FP8_BN");
  const Case cases[] = {
      sized(silu_gated(MOE_QUANT_FP8_BLOCK_128, MOE_ACT_SCALE_DYNAMIC), 4, 1, 0, 2, 384, 384),
      sized(relu2_plain(MOE_QUANT_FP8_BLOCK_128, MOE_ACT_SCALE_DYNAMIC), 4, 1, 0, 2, 384, 384),
      sized(relu2_plain(MOE_QUANT_FP8_PER_TENSOR, MOE_ACT_SCALE_STATIC), 4, 1, 0, 2, 272, 400),
  };
  for (const Case& c : cases) {
    INFO(std::string(c.name), " ", std::string(quant_name(c)), " H ", c.H, " I ", c.I);
    auto rng = fresh_rng();
    Weights wt(c, rng);
    GpuLayer l(c, wt);
    Inputs in(c, 600, rng);  // 1200 slots over 4 experts: 128-row tiles
    GpuBatch b(c, in);
    HostTensor y128(c.x_dt, {in.T, c.H}), y256(c.x_dt, {in.T, c.H});
    width.set("128");
    run_gpu(c, l, b, y128);
    width.set("256");
    run_gpu(c, l, b, y256);
    CHECK(std::memcmp(y128.storage.data(), y256.storage.data(), y128.storage.size()) == 0);
    int64_t bad = 0;
    for (double v : values(y256)) bad += !std::isfinite(v);
    CHECK(bad == 0);
  }
}

TEST_CASE("gpu.fp8.graph_capture") {
  // Dispatch + FP8 run captured on a stream with caller workspaces; replays
  // (metadata and output poisoned in between) equal the eager run bit for bit.
  for (int quant : {MOE_QUANT_FP8_PER_TENSOR, MOE_QUANT_FP8_BLOCK_128}) {
    INFO(std::string(quant == MOE_QUANT_FP8_BLOCK_128 ? "block-128" : "per-tensor"));
    auto rng = fresh_rng();
    Case c = silu_gated(quant, MOE_ACT_SCALE_DYNAMIC);
    c.H = 512;
    const int64_t T = 96;
    Weights wt(c, rng);
    Inputs in(c, T, rng);
    GpuLayer l(c, wt);
    Dispatcher d(c, kDLCUDA);
    DeviceTensor x(in.x), ids(in.ids), w(in.w), local(DT::i32, {T, c.k}),
        counts(DT::i32, {c.E_loc()}), offsets(DT::i32, {c.E_loc() + 1}),
        sorted(DT::i32, {T * c.k}), y(c.x_dt, {T, c.H});
    size_t dbytes = 0;
    MOE_CHECK_OK(moe_dispatcher_workspace_size(d.h, T, c.k, &dbytes));
    void* dws = nullptr;
    CUDA_OK(cudaMalloc(&dws, std::max<size_t>(dbytes, 256)));
    Workspace rws(l.r.h, T, c.k);
    cudaStream_t s = nullptr;
    CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    auto enqueue = [&] {
      MOE_CHECK_OK(moe_dispatcher_dispatch(d.h, ids.dl(), local.dl(), counts.dl(), offsets.dl(),
                                           sorted.dl(), dws, std::max<size_t>(dbytes, 256), s));
      MOE_CHECK_OK(moe_runner_run(l.r.h, x.dl(), local.dl(), w.dl(), offsets.dl(), sorted.dl(),
                                  y.dl(), rws.p, rws.bytes, s));
    };
    HostTensor eager(c.x_dt, {T, c.H}), replay(c.x_dt, {T, c.H});
    y.poison();
    enqueue();
    CUDA_OK(cudaStreamSynchronize(s));
    y.download(eager);
    for (int64_t i = 0; i < eager.numel(); ++i) REQUIRE(std::isfinite(eager.get(i)));
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    enqueue();
    CUDA_OK(cudaStreamEndCapture(s, &graph));
    CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
    for (int rep = 0; rep < 3; ++rep) {
      y.poison();
      for (DeviceTensor* t : {&local, &counts, &offsets, &sorted}) t->poison();
      CUDA_OK(cudaGraphLaunch(exec, s));
      CUDA_OK(cudaStreamSynchronize(s));
      y.download(replay);
      CHECK(std::memcmp(replay.storage.data(), eager.storage.data(), eager.storage.size()) == 0);
    }
    CUDA_OK(cudaGraphExecDestroy(exec));
    CUDA_OK(cudaGraphDestroy(graph));
    CUDA_OK(cudaStreamDestroy(s));
    CUDA_OK(cudaFree(dws));
  }
}

TEST_CASE("gpu.fp8.model_shapes") {
  // One EP-of-8 slice of DeepSeek-V3 (block-128) and Mixtral-8x7B
  // (per-tensor) against the CPU backend; median time printed as a baseline.
  Case ds = silu_gated(MOE_QUANT_FP8_BLOCK_128, MOE_ACT_SCALE_DYNAMIC);
  ds.name = "deepseek_ep_slice";
  ds.E = 256;
  ds.ep_size = 8;
  ds.ep_rank = 5;
  ds.k = 8;
  ds.H = 7168;
  ds.I = 2048;
  Case mx = silu_gated(MOE_QUANT_FP8_PER_TENSOR, MOE_ACT_SCALE_DYNAMIC);
  mx.name = "mixtral";
  mx.E = 8;
  mx.ep_size = 1;
  mx.ep_rank = 0;
  mx.k = 2;
  mx.H = 4096;
  mx.I = 14336;
  // T=2: fewer slots than local experts, 16-row tiles with 12 stages; T=7:
  // 16-row tiles with 6 stages (the FP8 runner's decode_stages choice); T=64:
  // 32-row tiles.
  for (const Case& c : {ds, mx}) {
    for (int64_t T : {int64_t(2), int64_t(7), int64_t(64)}) {
      auto rng = fresh_rng();
      Weights wt(c, rng);
      Inputs in(c, T, rng);
      HostTensor y_cpu(c.x_dt, {T, c.H}), local(DT::i32, {T, c.k}), y_gpu(c.x_dt, {T, c.H});
      run_cpu(c, wt, in, y_cpu, local);
      GpuLayer l(c, wt);
      GpuBatch b(c, in);
      run_gpu(c, l, b, y_gpu);
      const double err = rel_error(values(y_gpu), values(y_cpu));
      INFO(std::string(c.name), " T ", T, " rel error vs CPU ", err);
      CHECK(err < kTol);
      // Median of 20 timed runs after a warm-up.
      DeviceTensor d_y(c.x_dt, {T, c.H});
      Workspace ws(l.r.h, T, c.k);
      cudaEvent_t e0, e1;
      CUDA_OK(cudaEventCreate(&e0));
      CUDA_OK(cudaEventCreate(&e1));
      std::vector<float> us;
      for (int rep = 0; rep < 21; ++rep) {
        CUDA_OK(cudaEventRecord(e0, nullptr));
        MOE_CHECK_OK(moe_runner_run(l.r.h, b.x.dl(), b.local.dl(), b.w.dl(), b.offsets.dl(),
                                    b.sorted.dl(), d_y.dl(), ws.p, ws.bytes, nullptr));
        CUDA_OK(cudaEventRecord(e1, nullptr));
        CUDA_OK(cudaEventSynchronize(e1));
        float ms = 0;
        CUDA_OK(cudaEventElapsedTime(&ms, e0, e1));
        if (rep > 0) us.push_back(ms * 1000.0f);
      }
      std::sort(us.begin(), us.end());
      std::vector<char> used(size_t(c.E_loc()), 0);
      for (int64_t i = 0; i < local.numel(); ++i)
        if (local.as<int32_t>()[i] >= 0) used[size_t(local.as<int32_t>()[i])] = 1;
      const double experts = double(std::count(used.begin(), used.end(), 1));
      const double wbytes = experts * 3.0 * double(c.I) * double(c.H);  // E4M3: 1 byte each
      const double med = us[us.size() / 2];
      MESSAGE("fp8 runner ", std::string(c.name), " ", std::string(quant_name(c)), " T=", T,
              ": median ", med, " us, ", wbytes / (med * 1e-6) / 1e12, " TB/s of FP8 weights");
      CUDA_OK(cudaEventDestroy(e0));
      CUDA_OK(cudaEventDestroy(e1));
    }
  }
}

TEST_CASE("gpu.fp8.refused_sizes") {
  // Sizes the FP8 kernels do not tile are refused clearly at set_weights.
  struct Bad {
    int quant, H, I;
    const char* words;
  };
  const Bad bad[] = {{MOE_QUANT_FP8_BLOCK_128, 192, 256, "multiples of 128"},
                     {MOE_QUANT_FP8_BLOCK_128, 256, 200, "multiples of 128"},
                     {MOE_QUANT_FP8_PER_TENSOR, 120, 64, "multiples of 16"}};
  for (const Bad& b : bad) {
    Case c = silu_gated(b.quant, MOE_ACT_SCALE_DYNAMIC);
    c.H = b.H;
    c.I = b.I;
    auto rng = fresh_rng();
    Weights wt(c, rng);
    DeviceTensor w13(wt.w13), w2(wt.w2), s13(wt.s13), s2(wt.s2), a13(wt.a13), a2(wt.a2);
    Runner r(c);
    check_error_mentions(r.set(c, w13, w2, s13, s2, a13, a2), MOE_STATUS_UNSUPPORTED,
                         {"FP8", b.words});
  }
}
