// CUDA runner vs the CPU backend (and the float64 reference of
// tests/ref_runner.h on small shapes),
// through the public API with device tensors: activation x gated x dtype,
// swap, weight-on-input, odd sizes, the three model shapes of BRIEF.md,
// outputs poisoned before every run; bad ids with and without validation.
// FP8 weights: tests/gpu/test_gpu_fp8.cpp.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>

#include "gpu_support.h"
#include "ref_runner.h"

using namespace moe_test;

namespace {

struct Model {
  const char* name;
  int E, ep_size, ep_rank, k, H, I;
  DT dt = DT::bf16;
  int activation = MOE_ACTIVATION_SILU;
  bool gated = true, swap = false, weight_on_input = false;
  float output_scale = 1.0f;
  int E_loc() const { return E / ep_size; }
};

struct Dispatcher {
  moe_dispatcher_t h = nullptr;
  Dispatcher(const Model& m, int device_type) {
    moe_dispatcher_config_t c;
    c.struct_size = uint32_t(sizeof(c));
    REQUIRE(moe_dispatcher_config_default(&c) == MOE_STATUS_SUCCESS);
    c.num_experts = m.E;
    c.ep_rank = m.ep_rank;
    c.ep_size = m.ep_size;
    c.device_type = device_type;
    MOE_CHECK_OK(moe_dispatcher_create(&c, &h));
  }
  ~Dispatcher() { moe_dispatcher_destroy(h); }
};

struct Runner {
  moe_runner_t h = nullptr;
  explicit Runner(const Model& m, bool validate = false) {
    moe_runner_config_t c;
    c.struct_size = uint32_t(sizeof(c));
    REQUIRE(moe_runner_config_default(&c) == MOE_STATUS_SUCCESS);
    c.num_experts = m.E_loc();
    c.hidden_size = m.H;
    c.intermediate_size = m.I;
    c.activation = m.activation;
    c.gated = m.gated;
    c.swap_gate_up = m.swap;
    c.apply_router_weight_on_input = m.weight_on_input;
    c.output_scale = m.output_scale;
    c.validate_ids = validate;
    MOE_CHECK_OK(moe_runner_create(&c, &h));
  }
  ~Runner() { moe_runner_destroy(h); }
};

// Host data of one layer and one batch.
struct Problem {
  Model m;
  int64_t T;
  HostTensor x, w13, w2, ids, w;
  Problem(const Model& m_, int64_t T_)
      : m(m_), T(T_), x(m.dt, {T, m.H}), w13(m.dt, {m.E_loc(), (m.gated ? 2 : 1) * m.I, m.H}),
        w2(m.dt, {m.E_loc(), m.H, m.I}), ids(DT::i32, {T, m.k}), w(DT::f32, {T, m.k}) {
    auto rng = fresh_rng();
    x.fill_normal(rng, 1.0);
    fill_uniform_fast(w13, rng(), std::sqrt(3.0 / m.H));
    fill_uniform_fast(w2, rng(), std::sqrt(3.0 / m.I));
    std::uniform_real_distribution<double> wd(0.1, 1.0);
    for (int64_t t = 0; t < T; ++t) {
      // k distinct global experts; some slots -1, some tokens with no slot at all.
      std::vector<int> pool(size_t(m.E));
      for (int e = 0; e < m.E; ++e) pool[size_t(e)] = e;
      std::shuffle(pool.begin(), pool.end(), rng);
      for (int j = 0; j < m.k; ++j) {
        int id = pool[size_t(j)];
        if ((t % 9 == 4 && j == 0) || t % 17 == 5) id = -1;
        ids.as<int32_t>()[t * m.k + j] = id;
        w.as<float>()[t * m.k + j] = float(wd(rng));
      }
    }
  }
  // Routes exactly loads[e] slots to local expert e (ep_size 1; the loads sum
  // to T * k, each at most T): the slots sorted by expert, slot j of the
  // t-th token of a random order taking the (j * T + t)-th, so that no token
  // has one expert twice.
  void route_with_loads(const std::vector<int>& loads) {
    REQUIRE(m.ep_size == 1);
    REQUIRE(int64_t(std::accumulate(loads.begin(), loads.end(), 0)) == T * m.k);
    std::vector<int32_t> tickets;
    for (size_t e = 0; e < loads.size(); ++e) {
      REQUIRE(loads[e] <= T);
      tickets.insert(tickets.end(), size_t(loads[e]), int32_t(e));
    }
    std::vector<int64_t> order(static_cast<size_t>(T));
    std::iota(order.begin(), order.end(), int64_t(0));
    auto rng = fresh_rng();
    std::shuffle(order.begin(), order.end(), rng);
    for (int64_t t = 0; t < T; ++t)
      for (int j = 0; j < m.k; ++j) ids.as<int32_t>()[order[size_t(t)] * m.k + j] = tickets[size_t(j * T + t)];
  }
};

// The CPU pipeline (dispatch + run) on host tensors; y poisoned first.
void run_cpu(const Problem& pb, HostTensor& y, HostTensor& local_out) {
  const Model& m = pb.m;
  Dispatcher d(m, kDLCPU);
  Runner r(m);
  HostTensor& ids = const_cast<HostTensor&>(pb.ids);
  HostTensor counts(DT::i32, {m.E_loc()}), offsets(DT::i32, {m.E_loc() + 1}),
      sorted(DT::i32, {pb.T * m.k});
  MOE_CHECK_OK(moe_dispatcher_dispatch(d.h, ids.dl(), local_out.dl(), counts.dl(), offsets.dl(),
                                       sorted.dl(), nullptr, 0, nullptr));
  MOE_CHECK_OK(moe_runner_set_weights(r.h, const_cast<HostTensor&>(pb.w13).dl(),
                                      const_cast<HostTensor&>(pb.w2).dl(), nullptr, nullptr,
                                      nullptr, nullptr));
  y.poison();
  MOE_CHECK_OK(moe_runner_run(r.h, const_cast<HostTensor&>(pb.x).dl(), local_out.dl(),
                              const_cast<HostTensor&>(pb.w).dl(), offsets.dl(), sorted.dl(),
                              y.dl(), nullptr, 0, nullptr));
}

// Device tensors of one problem plus the GPU dispatch outputs.
struct GpuProblem {
  DeviceTensor x, w13, w2, ids, w, local, counts, offsets, sorted;
  explicit GpuProblem(const Problem& pb)
      : x(pb.x), w13(pb.w13), w2(pb.w2), ids(pb.ids), w(pb.w), local(DT::i32, {pb.T, pb.m.k}),
        counts(DT::i32, {pb.m.E_loc()}), offsets(DT::i32, {pb.m.E_loc() + 1}),
        sorted(DT::i32, {pb.T * pb.m.k}) {
    Dispatcher d(pb.m, kDLCUDA);
    for (DeviceTensor* t : {&local, &counts, &offsets, &sorted}) t->poison();
    MOE_CHECK_OK(moe_dispatcher_dispatch(d.h, ids.dl(), local.dl(), counts.dl(), offsets.dl(),
                                         sorted.dl(), nullptr, 0, nullptr));
  }
};

// Runs the GPU runner with a caller workspace into a poisoned output;
// `launches` > 1 runs it that many times back to back on the stream (one
// workspace, one output, no sync in between, as a model's layers run).
moe_status_t run_gpu(moe_runner_t r, const Problem& pb, GpuProblem& g, HostTensor& y, int launches = 1) {
  DeviceTensor d_y(pb.m.dt, {pb.T, pb.m.H});
  d_y.poison();
  size_t bytes = 0;
  MOE_CHECK_OK(moe_runner_workspace_size(r, pb.T, pb.m.k, kDLCUDA, &bytes));
  void* ws = nullptr;
  CUDA_OK(cudaMalloc(&ws, std::max<size_t>(bytes, 256)));
  CUDA_OK(cudaMemset(ws, 0xff, std::max<size_t>(bytes, 256)));  // NaN garbage must not leak
  moe_status_t st = MOE_STATUS_SUCCESS;
  for (int i = 0; i < launches && st == MOE_STATUS_SUCCESS; ++i)
    st = moe_runner_run(r, g.x.dl(), g.local.dl(), g.w.dl(), g.offsets.dl(), g.sorted.dl(), d_y.dl(), ws,
                        bytes, nullptr);
  if (st == MOE_STATUS_SUCCESS) d_y.download(y);
  CUDA_OK(cudaFree(ws));
  return st;
}

double tolerance(DT dt) { return dt == DT::f32 ? 1e-5 : 1e-2; }

// Median time of 20 runs (after one warm-up) and the weight bandwidth it
// implies: a baseline for the later speed work, not a pass/fail criterion.
void report_time(moe_runner_t r, const Problem& pb, GpuProblem& g, const HostTensor& local) {
  const Model& m = pb.m;
  DeviceTensor d_y(m.dt, {pb.T, m.H});
  size_t bytes = 0;
  MOE_CHECK_OK(moe_runner_workspace_size(r, pb.T, m.k, kDLCUDA, &bytes));
  void* ws = nullptr;
  CUDA_OK(cudaMalloc(&ws, std::max<size_t>(bytes, 256)));
  cudaEvent_t a, b;
  CUDA_OK(cudaEventCreate(&a));
  CUDA_OK(cudaEventCreate(&b));
  std::vector<float> us;
  for (int rep = 0; rep < 21; ++rep) {
    CUDA_OK(cudaEventRecord(a, nullptr));
    MOE_CHECK_OK(moe_runner_run(r, g.x.dl(), g.local.dl(), g.w.dl(), g.offsets.dl(), g.sorted.dl(),
                                d_y.dl(), ws, bytes, nullptr));
    CUDA_OK(cudaEventRecord(b, nullptr));
    CUDA_OK(cudaEventSynchronize(b));
    float ms = 0;
    CUDA_OK(cudaEventElapsedTime(&ms, a, b));
    if (rep > 0) us.push_back(ms * 1000.0f);
  }
  std::sort(us.begin(), us.end());
  std::vector<char> used(size_t(m.E_loc()), 0);
  for (int64_t i = 0; i < local.numel(); ++i)
    if (local.as<int32_t>()[i] >= 0) used[size_t(local.as<int32_t>()[i])] = 1;
  const double experts = double(std::count(used.begin(), used.end(), 1));
  const double wbytes = experts * (double((m.gated ? 2 : 1) * m.I) * m.H + double(m.H) * m.I) *
                        double(dt_bytes(m.dt));
  const double med = us[us.size() / 2];
  MESSAGE("runner ", std::string(m.name), " ", std::string(dt_name(m.dt)), " T=", pb.T,
          ": median ", med, " us, ", wbytes / (med * 1e-6) / 1e12, " TB/s of weights");
  CUDA_OK(cudaEventDestroy(a));
  CUDA_OK(cudaEventDestroy(b));
  CUDA_OK(cudaFree(ws));
}

// Where a GPU output differs from the CPU one: how many tokens and columns
// carry a relative difference over 10x the tolerance, and the first few
// (token, column) pairs, so a layout bug in a kernel shows its pattern.
std::string mismatch_report(const std::vector<double>& gv, const std::vector<double>& cv, int64_t T,
                            int H, double tol) {
  double scale = 0;
  for (double v : cv) scale = std::max(scale, std::fabs(v));
  std::vector<char> bad_t(size_t(T), 0), bad_c(size_t(H), 0);
  std::string first;
  int shown = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int c = 0; c < H; ++c) {
      const size_t i = size_t(t * H + c);
      if (!(std::fabs(gv[i] - cv[i]) <= 10 * tol * scale)) {
        bad_t[size_t(t)] = bad_c[size_t(c)] = 1;
        if (shown++ < 6)
          first += " (" + std::to_string(t) + "," + std::to_string(c) + ": " + std::to_string(gv[i]) +
                   " vs " + std::to_string(cv[i]) + ")";
      }
    }
  return std::to_string(std::count(bad_t.begin(), bad_t.end(), 1)) + " of " + std::to_string(T) +
         " tokens, " + std::to_string(std::count(bad_c.begin(), bad_c.end(), 1)) + " of " +
         std::to_string(H) + " columns differ; first:" + first;
}

// GPU vs CPU (and vs float64 when asked); tokens with no local slot are
// exactly 0. `launches`: of the GPU layer, back to back (run_gpu).
void check_problem(const Problem& pb, bool with_ref, bool timed = false, int launches = 1) {
  const Model& m = pb.m;
  const int64_t T = pb.T;
  HostTensor y_cpu(m.dt, {T, m.H}), local_cpu(DT::i32, {T, m.k}), y_gpu(m.dt, {T, m.H});
  run_cpu(pb, y_cpu, local_cpu);
  GpuProblem g(pb);
  Runner r(m);
  MOE_CHECK_OK(moe_runner_set_weights(r.h, g.w13.dl(), g.w2.dl(), nullptr, nullptr, nullptr, nullptr));
  MOE_CHECK_OK(run_gpu(r.h, pb, g, y_gpu, launches));
  if (timed) report_time(r.h, pb, g, local_cpu);
  const std::vector<double> gv = values(y_gpu), cv = values(y_cpu);
  INFO("model ", std::string(m.name), " dtype ", std::string(dt_name(m.dt)), " act ", m.activation, " gated ", m.gated,
       " swap ", m.swap, " T ", T);
  const double e_cpu = rel_error(gv, cv);
  INFO("rel error vs CPU ", e_cpu);
  const std::string where = e_cpu < tolerance(m.dt) ? "" : mismatch_report(gv, cv, T, m.H, tolerance(m.dt));
  INFO(where);
  CHECK(e_cpu < tolerance(m.dt));
  int64_t nonzero_empty = 0;
  for (int64_t t = 0; t < T; ++t) {
    bool any = false;
    for (int j = 0; j < m.k; ++j) any |= local_cpu.as<int32_t>()[t * m.k + j] >= 0;
    if (!any)
      for (int c = 0; c < m.H; ++c) nonzero_empty += gv[size_t(t * m.H + c)] != 0.0;
  }
  CHECK(nonzero_empty == 0);
  if (with_ref) {
    RefMoeCfg rc;
    rc.activation = m.activation;
    rc.gated = m.gated;
    rc.swap_gate_up = m.swap;
    rc.weight_on_input = m.weight_on_input;
    rc.output_scale = m.output_scale;
    const double e_ref = rel_error(gv, ref_moe(rc, pb.x, local_cpu, pb.w, pb.w13, pb.w2));
    INFO("rel error vs float64 ", e_ref);
    CHECK(e_ref < tolerance(m.dt));
  }
}

void check_model(const Model& m, int64_t T, bool with_ref, bool timed = false, int launches = 1) {
  check_problem(Problem(m, T), with_ref, timed, launches);
}

const DT kTypes[] = {DT::bf16, DT::f16, DT::f32};
const int kActs[] = {MOE_ACTIVATION_SILU, MOE_ACTIVATION_GELU, MOE_ACTIVATION_GELU_TANH,
                     MOE_ACTIVATION_RELU2, MOE_ACTIVATION_IDENTITY};

}  // namespace

TEST_CASE("gpu.runner.activation_gated_dtype") {
  for (DT dt : kTypes)
    for (int act : kActs)
      for (bool gated : {true, false}) {
        Model m{"small", 16, 2, 1, 4, 128, 96};
        m.dt = dt;
        m.activation = act;
        m.gated = gated;
        m.output_scale = 1.5f;
        for (int64_t T : {int64_t(1), int64_t(7), int64_t(64)}) check_model(m, T, T <= 7);
      }
}

TEST_CASE("gpu.runner.large_batch_small_model") {
  for (DT dt : kTypes) {
    Model m{"small", 16, 1, 0, 4, 256, 160};
    m.dt = dt;
    check_model(m, 1000, false);
  }
}

TEST_CASE("gpu.runner.many_local_experts") {
  // The tile map and the warps' tile search load 128 experts a round
  // (gemm::row_tile_map_warp, gemm::warp_find_tile): 128 and 129 local
  // experts sit on that edge, 300 takes three rounds. Batches for the 16-row
  // tiles (4 slots; 3 per expert), the 32-row tiles (24 per expert) and the
  // 128-row tiles (480 per expert, taken on the device over the 32-row candidate).
  for (int E : {128, 129, 300}) {
    Model m{"many", E, 1, 0, 4, 64, 64};
    for (int64_t T : {int64_t(1), int64_t(3) * E / 4, int64_t(6) * E, int64_t(120) * E}) check_model(m, T, T <= E);
  }
}

TEST_CASE("gpu.runner.swap_and_weight_on_input") {
  for (DT dt : kTypes) {
    Model m{"swap", 8, 1, 0, 2, 64, 64};
    m.dt = dt;
    m.swap = true;
    check_model(m, 33, true);
    Model l{"llama4", 16, 1, 0, 1, 128, 64};
    l.dt = dt;
    l.weight_on_input = true;
    check_model(l, 40, true);
  }
}

TEST_CASE("gpu.runner.odd_sizes") {
  for (DT dt : kTypes) {
    Model m{"odd", 6, 1, 0, 3, 72, 40};  // multiples of 8, not of the tile sizes
    m.dt = dt;
    check_model(m, 19, true);
    m.gated = false;
    m.activation = MOE_ACTIVATION_RELU2;
    check_model(m, 5, true);
  }
  // Rows that are not 16-byte multiples are refused with UNSUPPORTED, at set_weights.
  Model bad{"bad", 4, 1, 0, 2, 100, 64};
  Runner r(bad);
  DeviceTensor w13(DT::bf16, {4, 128, 100}), w2(DT::bf16, {4, 100, 64});
  moe_status_t st = moe_runner_set_weights(r.h, w13.dl(), w2.dl(), nullptr, nullptr, nullptr, nullptr);
  check_error_mentions(st, MOE_STATUS_UNSUPPORTED, {"multiples of 8"});
}

TEST_CASE("gpu.runner.wide_tiles_odd_sizes") {
  // Enough rows per expert for the 128-row tiles (the wgmma path on sm_90a),
  // with H and I multiples of 8 but not of the 64-deep k step or the
  // 128/256-column tiles: k tails, column tails and partial row tiles; on
  // every 128-row kernel (MOE_RUNNER_WGMMA: variant 2 is the default for
  // large expert matrices since v20, whose sizes may be odd too).
  {
    // 4104 x 8200 >= 2^25 elements: variant 2 when MOE_RUNNER_WGMMA is unset.
    Model big{"odd_large", 4, 1, 0, 2, 4104, 8200};
    check_model(big, 300, false);
  }
  ScopedEnv env("MOE_RUNNER_WGMMA");
  for (const char* mode : {"1", "2", "3"}) {
    env.set(mode);
    CAPTURE(mode);
    for (DT dt : {DT::bf16, DT::f16}) {
      Model m{"odd_wide", 4, 1, 0, 2, 200, 136};
      m.dt = dt;
      check_model(m, 300, true);
      m.gated = false;
      m.activation = MOE_ACTIVATION_RELU2;
      check_model(m, 300, true);
      m.gated = true;
      m.swap = true;
      m.activation = MOE_ACTIVATION_GELU;
      check_model(m, 257, true);
    }
  }
}

TEST_CASE("gpu.runner.wgmma_variants_partial_tiles") {
  // Every 128-row kernel (MOE_RUNNER_WGMMA, read at each launch; on a device
  // without the sm_90a kernels all of them run mma.sync) on experts whose last
  // tile has at most 64 rows (its second warpgroup skips its MMAs), more than
  // 64, or is the only one; T=300 gives ~150 rows per expert, T=100 ~50, and
  // tile counts of both parities (variant 2 pairs tiles: a pair may hold one
  // empty tile or two experts' tiles).
  // Variant 1 reads the weights by bulk tensor copies, or by cp.async with
  // MOE_RUNNER_WGMMA_WEIGHTS=cpasync (its path where the driver cannot map
  // them): both.
  ScopedEnv env("MOE_RUNNER_WGMMA");
  ScopedEnv weights("MOE_RUNNER_WGMMA_WEIGHTS");
  for (const char* mode : {"1", "1c", "2", "3"}) {
    env.set(mode[1] ? "1" : mode);
    weights.set(mode[1] ? "cpasync" : "tma");
    for (DT dt : {DT::bf16, DT::f16}) {
      CAPTURE(mode);
      Model m{"partial", 4, 1, 0, 2, 256, 192};
      m.dt = dt;
      check_model(m, 300, true);
      check_model(m, 100, false);
      m.gated = false;
      m.activation = MOE_ACTIVATION_RELU2;
      check_model(m, 230, false);
    }
  }
  // Under expert parallelism the host expects 150 rows per local expert and
  // launches both row-tile candidates; ~19 are local, so the tile map picks
  // the 32-row one (the persistent gemm_tc_kernel) and the 128-row kernels
  // find no tile.
  Model ep{"ep_small_tiles", 32, 8, 3, 2, 256, 192};
  check_model(ep, 300, true);
}

TEST_CASE("gpu.runner.wgmma_idle_warpgroup_steps") {
  // Run 140: in the TMA kernel (variant 2, and variant 3's GEMM2) a consumer
  // warpgroup that no row of a tile reaches (a tile of at most 64 rows) only
  // waits for each k step's copies and hands the buffer back. With one
  // release per warpgroup, a warp of it could fall two uses of a buffer
  // behind (or run one ahead), wait on the parity of a running phase and hang
  // the layer: Mixtral and the DeepSeek slice at T=1024 did in the benchmark
  // (runs 133-140). In a release build this case did not reproduce that hang
  // on the old kernel (run 143, twice; nor did uniform routing, runs
  // 141-142); in a debug build that holds one warp per warpgroup at each
  // idle step (cmake -DMOE_MBAR_WATCHDOG=ON -DMOE_DEBUG_SKEW_NS=20000,
  // tuning_run.sh step skew) the old kernel hangs on it at once and the
  // fixed one passes (run 145). Its tiles are those the hanging layers
  // mixed: full ones, ones of 65-127 rows whose second warpgroup's warps
  // have unequal epilogues (100 rows: 16, 16, 4, 0), and ones it idles
  // through (40, 20), 64 and 32 k steps per item, 20 launches back to back.
  ScopedEnv env("MOE_RUNNER_WGMMA");
  const int cycle[] = {100, 40, 228, 20, 128, 72};
  Model m{"mixed_tiles", 48, 1, 0, 2, 4096, 2048};
  std::vector<int> loads;
  for (int e = 0; e < m.E; ++e) loads.push_back(cycle[e % 6]);
  const int64_t T = std::accumulate(loads.begin(), loads.end(), int64_t(0)) / m.k;
  Problem pb(m, T);
  pb.route_with_loads(loads);
  for (const char* mode : {"2", "3"}) {
    env.set(mode);
    CAPTURE(mode);
    check_problem(pb, false, false, /*launches=*/20);
  }
}

TEST_CASE("gpu.runner.wgmma_persistent_items") {
  // More 128-row items than an H100 has SMs, so that every persistent block
  // runs several: variant 1 stages an item's first k steps during the
  // previous item's epilogue, variant 2's producer runs on into the next
  // item. E=64, T=3200, k=2: ~100 rows per expert (one tile, or two with a
  // short last one), ~280 GEMM1 items (4 column tiles) and ~210 GEMM2 items
  // (3); a small model, so that compute-sanitizer can run it.
  ScopedEnv env("MOE_RUNNER_WGMMA");
  for (const char* mode : {"1", "2", "3"}) {
    env.set(mode);
    CAPTURE(mode);
    Model m{"many_items", 64, 1, 0, 2, 768, 512};
    check_model(m, 3200, false);
    m.gated = false;
    m.activation = MOE_ACTIVATION_RELU2;
    check_model(m, 3001, false);
  }
}

TEST_CASE("gpu.runner.model_shapes") {
  // BRIEF.md: Mixtral-8x7B, Qwen3-30B-A3B, one EP-of-8 slice of DeepSeek-V3.
  const Model shapes[] = {
      {"mixtral", 8, 1, 0, 2, 4096, 14336},
      {"qwen3", 128, 1, 0, 8, 2048, 768},
      {"deepseek_ep_slice", 256, 8, 5, 8, 7168, 2048},
  };
  for (const Model& m : shapes) {
    SUBCASE(m.name) {
      for (int64_t T : {int64_t(1), int64_t(7), int64_t(64), int64_t(1000)})
        check_model(m, T, false, /*timed=*/T == 7 || T == 64);
    }
  }
}

TEST_CASE("gpu.runner.direct_decode_tiles") {
  // When the host's row choice is the 16-row decode tile alone (up to 10
  // slots per local expert), the GEMMs find their tiles from the offsets and
  // no tile map kernel runs. Against the tile map
  // (MOE_RUNNER_DIRECT_TILES=0): bitwise the same output, and the CPU's, on
  // back-to-back launches. Tokens with no local slot
  // (expert parallelism, the Problem's all -1 tokens); 300 local experts
  // (three rounds of the search); non-gated with H not a multiple of 16;
  // weight on input. The streaming kernels run these with
  // MOE_RUNNER_STREAM=1 (tuning_run.sh step stream); model_shapes covers
  // them at T=1 and 7 by default.
  ScopedEnv direct("MOE_RUNNER_DIRECT_TILES");
  struct Case {
    Model m;
    int64_t T;
  };
  std::vector<Case> cases;
  for (DT dt : {DT::bf16, DT::f16}) {
    Model m{"decode", 16, 1, 0, 4, 128, 128};
    m.dt = dt;
    for (int64_t T : {int64_t(1), int64_t(7), int64_t(40)}) cases.push_back({m, T});
    Model ep{"decode_ep", 64, 8, 2, 8, 192, 64};  // 8 local experts of 64: most tokens have none
    ep.dt = dt;
    cases.push_back({ep, 1});
    cases.push_back({ep, 10});
  }
  {
    Model many{"decode_many", 300, 1, 0, 4, 64, 64};
    cases.push_back({many, 700});  // 2800 slots: 9.3 per expert
    Model relu{"decode_relu2", 16, 1, 0, 2, 72, 40};
    relu.gated = false;
    relu.activation = MOE_ACTIVATION_RELU2;
    cases.push_back({relu, 9});
    Model l4{"decode_llama4", 16, 1, 0, 1, 128, 64};
    l4.weight_on_input = true;
    cases.push_back({l4, 33});
  }
  for (const Case& c : cases) {
    const Model& m = c.m;
    Problem pb(m, c.T);
    GpuProblem g(pb);
    Runner r(m);
    MOE_CHECK_OK(moe_runner_set_weights(r.h, g.w13.dl(), g.w2.dl(), nullptr, nullptr, nullptr, nullptr));
    HostTensor y_map(m.dt, {c.T, m.H}), y_direct(m.dt, {c.T, m.H});
    direct.set("0");
    MOE_CHECK_OK(run_gpu(r.h, pb, g, y_map));
    direct.set("1");
    MOE_CHECK_OK(run_gpu(r.h, pb, g, y_direct, /*launches=*/3));
    INFO("model ", std::string(m.name), " dtype ", std::string(dt_name(m.dt)), " T ", c.T);
    CHECK(std::memcmp(y_map.storage.data(), y_direct.storage.data(), y_direct.storage.size()) == 0);
    check_problem(pb, c.T <= 40, false, /*launches=*/2);
  }
}

TEST_CASE("gpu.runner.stream_repeats_bitwise") {
  // The streaming decode kernels (forced for every size, MOE_RUNNER_STREAM=1;
  // sm_90a) give bitwise the same output launch after launch, on 16- and
  // 32-row tiles and with 2, 3 and 4 blocks per SM (rings of 108, 72 and 54
  // KB: the smaller the ring, the sooner a buffer is refilled). Before v25
  // their consumers handed a weight tile back without a proxy fence between
  // their ldmatrix reads and the next TMA copy into it: replays of the
  // DeepSeek slice at T=256 differed in single weight columns of a tile
  // (bench/replay_check.py, 1 in 40 to 8 in 100). The settings give bitwise the same
  // output (the same MMAs in the same order), checked once against the CPU.
  ScopedEnv stream("MOE_RUNNER_STREAM"), blocks("MOE_RUNNER_STREAM_BLOCKS");
  stream.set("1");
  Model m{"stream", 8, 1, 0, 2, 2048, 1024};  // K steps: 32 (GEMM1), 16 (GEMM2)
  for (int64_t T : {int64_t(24), int64_t(64)}) {  // 3 and 16 slots per expert: 16- and 32-row tiles
    Problem pb(m, T);
    GpuProblem g(pb);
    Runner r(m);
    MOE_CHECK_OK(moe_runner_set_weights(r.h, g.w13.dl(), g.w2.dl(), nullptr, nullptr, nullptr, nullptr));
    HostTensor y(m.dt, {T, m.H});
    std::vector<unsigned char> y_first;
    for (const char* b : {"2", "3", "4"}) {
      blocks.set(b);
      INFO("T ", T, " blocks per SM ", b);
      HostTensor y0(m.dt, {T, m.H});
      MOE_CHECK_OK(run_gpu(r.h, pb, g, y0));
      if (y_first.empty()) y_first = y0.storage;
      REQUIRE(y0.storage == y_first);
      for (int i = 0; i < 30; ++i) {
        MOE_CHECK_OK(run_gpu(r.h, pb, g, y, /*launches=*/2));
        INFO("launch ", i + 1);
        REQUIRE(std::memcmp(y.storage.data(), y0.storage.data(), y0.storage.size()) == 0);
      }
    }
    check_problem(pb, false);
  }
}

TEST_CASE("gpu.runner.bad_ids") {
  Model m{"ids", 16, 1, 0, 4, 64, 32};
  Problem pb(m, 20);
  GpuProblem g(pb);
  // Slot (3, 1) gets id 40: outside [-1, 16).
  HostTensor local(DT::i32, {pb.T, m.k});
  g.local.download(local);
  local.as<int32_t>()[3 * m.k + 1] = 40;
  g.local.upload(local);
  HostTensor y(m.dt, {pb.T, m.H});
  {
    Runner r(m, /*validate=*/true);
    MOE_CHECK_OK(moe_runner_set_weights(r.h, g.w13.dl(), g.w2.dl(), nullptr, nullptr, nullptr, nullptr));
    moe_status_t st = run_gpu(r.h, pb, g, y);
    check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"token 3", "slot 1", "40"});
  }
  // Without validation the bad slot counts as -1: same as the CPU with -1 there.
  Runner r(m);
  MOE_CHECK_OK(moe_runner_set_weights(r.h, g.w13.dl(), g.w2.dl(), nullptr, nullptr, nullptr, nullptr));
  MOE_CHECK_OK(run_gpu(r.h, pb, g, y));
  pb.ids.as<int32_t>()[3 * m.k + 1] = -1;
  HostTensor y_cpu(m.dt, {pb.T, m.H}), local_cpu(DT::i32, {pb.T, m.k});
  run_cpu(pb, y_cpu, local_cpu);
  CHECK(rel_error(values(y), values(y_cpu)) < 1e-2);
}

TEST_CASE("gpu.runner.batch_independent") {
  // Deterministic mode (the default): a token's output is bitwise the same
  // alone and inside a batch, whichever tile row it lands on.
  for (DT dt : kTypes) {
    Model m{"det", 32, 1, 0, 4, 128, 64};
    m.dt = dt;
    Problem pb(m, 150);
    GpuProblem g(pb);
    Runner r(m);
    MOE_CHECK_OK(moe_runner_set_weights(r.h, g.w13.dl(), g.w2.dl(), nullptr, nullptr, nullptr, nullptr));
    HostTensor y_all(m.dt, {pb.T, m.H});
    MOE_CHECK_OK(run_gpu(r.h, pb, g, y_all));
    for (int64_t t : {int64_t(0), int64_t(77), int64_t(149)}) {
      Model one = m;
      Problem p1(one, 1);
      std::memcpy(p1.x.data(), pb.x.storage.data() + t * m.H * dt_bytes(dt),
                  size_t(m.H) * dt_bytes(dt));
      for (int j = 0; j < m.k; ++j) {
        p1.ids.as<int32_t>()[j] = pb.ids.as<int32_t>()[t * m.k + j];
        p1.w.as<float>()[j] = pb.w.as<float>()[t * m.k + j];
      }
      GpuProblem g1(p1);
      HostTensor y1(m.dt, {1, m.H});
      MOE_CHECK_OK(run_gpu(r.h, p1, g1, y1));
      INFO("dtype ", std::string(dt_name(dt)), " token ", t);
      CHECK(std::memcmp(y1.storage.data(),
                        y_all.storage.data() + t * m.H * dt_bytes(dt),
                        size_t(m.H) * dt_bytes(dt)) == 0);
    }
  }
}

TEST_CASE("gpu.runner.misaligned_rows_unsupported") {
  // A hidden view starting 8 bytes into its buffer: valid DLPack, but the
  // kernels' 16-byte loads need 16-byte-aligned rows.
  Model m{"align", 4, 1, 0, 2, 64, 32};
  Problem pb(m, 3);
  GpuProblem g(pb);
  Runner r(m);
  MOE_CHECK_OK(moe_runner_set_weights(r.h, g.w13.dl(), g.w2.dl(), nullptr, nullptr, nullptr, nullptr));
  DeviceTensor big(m.dt, {pb.T * m.H + 8}), y(m.dt, {pb.T, m.H});
  DLTensor x = *g.x.dl();
  x.data = big.ptr;
  x.byte_offset = 8;
  moe_status_t st = moe_runner_run(r.h, &x, g.local.dl(), g.w.dl(), g.offsets.dl(), g.sorted.dl(),
                                   y.dl(), nullptr, 0, nullptr);
  check_error_mentions(st, MOE_STATUS_UNSUPPORTED, {"hidden", "16-byte"});
}
