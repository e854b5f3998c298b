// The all-to-all dispatcher on two GPUs driven by one process (ncclCommInitAll,
// one thread per rank): expert-parallel results equal the single-GPU
// standard dispatcher + runner on the same global batch; the receive buffers
// match a host model of the exchange exactly; combine matches a host sum in
// the documented order bit for bit; padding is sanitized even when the
// receive buffers start as NaN and garbage ids; the step replays from a CUDA
// graph; bad input fails on every rank that should fail.
#include <array>
#include <cstring>
#include <memory>

#include "nccl_support.h"

namespace {

using namespace moe_nccl_test;
using moe_test::fresh_rng;
using moe_test::rel_error;

constexpr int kRanks = 2;

double tolerance(DT dt) { return dt == DT::f32 ? 1e-5 : 1e-2; }

// The expert layer shared by both setups: global weights and the mapping.
struct Model {
  DT dtype = DT::f32;
  int E = 0, K = 0, H = 0, I = 0, M = 0;
  bool explicit_mapping = false;  // interleaved: expert e on rank e % 2, local id e / 2
  std::vector<int32_t> owner, local;
  std::unique_ptr<HostTensor> w13, w2;  // [E, 2I, H], [E, H, I]
};

std::unique_ptr<Model> make_model(DT dt, int E, int K, int H, int I, int M, bool explicit_mapping,
                                  std::mt19937_64& rng) {
  auto m = std::make_unique<Model>();
  m->dtype = dt;
  m->E = E;
  m->K = K;
  m->H = H;
  m->I = I;
  m->M = M;
  m->explicit_mapping = explicit_mapping;
  for (int e = 0; e < E; ++e) {
    m->owner.push_back(explicit_mapping ? e % kRanks : e / (E / kRanks));
    m->local.push_back(explicit_mapping ? e / kRanks : e % (E / kRanks));
  }
  m->w13 = std::make_unique<HostTensor>(dt, std::vector<int64_t>{E, 2 * I, H});
  m->w2 = std::make_unique<HostTensor>(dt, std::vector<int64_t>{E, H, I});
  m->w13->fill_normal(rng, 1.0 / std::sqrt(double(H)));
  m->w2->fill_normal(rng, 1.0 / std::sqrt(double(I)));
  return m;
}

moe_a2a_config_t a2a_config(const Model& m, int rank) {
  moe_a2a_config_t c;
  c.struct_size = uint32_t(sizeof(c));
  MOE_OK(moe_a2a_config_default(&c));
  c.num_experts = m.E;
  c.ep_size = kRanks;
  c.ep_rank = rank;
  if (m.explicit_mapping) {
    c.expert_rank = m.owner.data();
    c.expert_local_id = m.local.data();
  }
  c.hidden_size = m.H;
  c.hidden_dtype = moe_test::dl_dtype(m.dtype);
  c.max_tokens_per_rank = m.M;
  c.top_k = m.K;
  return c;
}

moe_runner_config_t runner_config(const Model& m, int experts) {
  moe_runner_config_t c;
  c.struct_size = uint32_t(sizeof(c));
  MOE_OK(moe_runner_config_default(&c));
  c.num_experts = experts;
  c.hidden_size = m.H;
  c.intermediate_size = m.I;
  return c;
}

enum class Route {
  balanced,  // k distinct experts drawn from all E
  to_rank0,  // every slot on an expert of rank 0: rank 1 receives nothing
  gaps,      // like balanced, with -1 slots, out-of-range ids and tokens that go nowhere
};

struct Batch {
  int64_t T = 0;
  std::unique_ptr<HostTensor> hidden, ids, weights;
};

std::unique_ptr<Batch> make_batch(const Model& m, int64_t T, Route route, std::mt19937_64& rng) {
  auto b = std::make_unique<Batch>();
  b->T = T;
  b->hidden = std::make_unique<HostTensor>(m.dtype, std::vector<int64_t>{T, m.H});
  b->ids = std::make_unique<HostTensor>(DT::i32, std::vector<int64_t>{T, m.K});
  b->weights = std::make_unique<HostTensor>(DT::f32, std::vector<int64_t>{T, m.K});
  b->hidden->fill_normal(rng);
  b->weights->fill_uniform(rng, 0.05, 1.0);
  std::vector<int32_t> pool;
  for (int e = 0; e < m.E; ++e)
    if (route != Route::to_rank0 || m.owner[size_t(e)] == 0) pool.push_back(e);
  REQUIRE(int(pool.size()) >= m.K);
  int32_t* ids = b->ids->as<int32_t>();
  for (int64_t t = 0; t < T; ++t) {
    std::shuffle(pool.begin(), pool.end(), rng);
    for (int j = 0; j < m.K; ++j) ids[t * m.K + j] = pool[size_t(j)];
    if (route == Route::gaps) {
      const uint64_t u = rng() % 8;
      if (u == 0)  // goes nowhere: its output must be exactly 0
        for (int j = 0; j < m.K; ++j) ids[t * m.K + j] = -1;
      else if (u == 1)
        ids[t * m.K + int(rng() % uint64_t(m.K))] = -1;
      else if (u == 2)  // out of range: treated as -1 on the CUDA backend
        ids[t * m.K + int(rng() % uint64_t(m.K))] = m.E + int32_t(rng() % 5);
    }
  }
  return b;
}

// Rows of `src` in [0, rows) of `n` columns, appended to `dst` at row `at`.
void copy_rows(const HostTensor& src, HostTensor& dst, int64_t at, int64_t rows, int64_t cols) {
  const size_t row_bytes = size_t(cols) * moe_test::dt_bytes(src.dtype);
  if (rows) std::memcpy(dst.storage.data() + size_t(at) * row_bytes, src.storage.data(),
                        size_t(rows) * row_bytes);
}

// The single-GPU path on GPU 0: standard dispatcher (ep_size 1) + runner
// holding all E experts, on both ranks' tokens concatenated.
std::unique_ptr<HostTensor> single_gpu(const Model& m, const Batch* const* batches) {
  const int64_t T = batches[0]->T + batches[1]->T;
  auto out = std::make_unique<HostTensor>(m.dtype, std::vector<int64_t>{T, m.H});
  if (T == 0) return out;
  HostTensor hidden(m.dtype, {T, m.H}), ids(DT::i32, {T, m.K}), w(DT::f32, {T, m.K});
  int64_t at = 0;
  for (int r = 0; r < kRanks; ++r) {
    copy_rows(*batches[r]->hidden, hidden, at, batches[r]->T, m.H);
    copy_rows(*batches[r]->ids, ids, at, batches[r]->T, m.K);
    copy_rows(*batches[r]->weights, w, at, batches[r]->T, m.K);
    at += batches[r]->T;
  }
  CUDA_OK(cudaSetDevice(0));
  cudaStream_t s = nullptr;
  CUDA_OK(cudaStreamCreate(&s));
  moe_dispatcher_config_t dc;
  dc.struct_size = uint32_t(sizeof(dc));
  MOE_OK(moe_dispatcher_config_default(&dc));
  dc.num_experts = m.E;
  dc.device_type = kDLCUDA;
  dc.device_id = 0;
  moe_dispatcher_t disp = nullptr;
  moe_runner_t runner = nullptr;
  MOE_OK(moe_dispatcher_create(&dc, &disp));
  moe_runner_config_t rc = runner_config(m, m.E);
  MOE_OK(moe_runner_create(&rc, &runner));
  DevTensor w13(m.dtype, {m.E, 2 * m.I, m.H}, 0), w2(m.dtype, {m.E, m.H, m.I}, 0);
  w13.upload(*m.w13, s);
  w2.upload(*m.w2, s);
  MOE_OK(moe_runner_set_weights(runner, w13.dl(), w2.dl(), nullptr, nullptr, nullptr, nullptr));
  DevTensor dh(m.dtype, {T, m.H}, 0), di(DT::i32, {T, m.K}, 0), dw(DT::f32, {T, m.K}, 0);
  DevTensor local(DT::i32, {T, m.K}, 0), counts(DT::i32, {m.E}, 0), offsets(DT::i32, {m.E + 1}, 0),
      sorted(DT::i32, {T * m.K}, 0), dout(m.dtype, {T, m.H}, 0);
  dh.upload(hidden, s);
  di.upload(ids, s);
  dw.upload(w, s);
  dout.poison(s);
  MOE_OK(moe_dispatcher_dispatch(disp, di.dl(), local.dl(), counts.dl(), offsets.dl(), sorted.dl(),
                                 nullptr, 0, s));
  MOE_OK(moe_runner_run(runner, dh.dl(), local.dl(), dw.dl(), offsets.dl(), sorted.dl(), dout.dl(),
                        nullptr, 0, s));
  dout.download(*out, s);
  moe_runner_destroy(runner);
  moe_dispatcher_destroy(disp);
  cudaStreamDestroy(s);
  return out;
}

// One rank of the expert-parallel layer: a2a handle, local dispatcher, runner
// and every buffer of one step.
struct EpRank {
  int rank = 0;
  int E_loc = 0;
  int64_t R = 0, T = -1;
  cudaStream_t stream = nullptr;
  moe_a2a_t a2a = nullptr;
  moe_dispatcher_t disp = nullptr;
  moe_runner_t runner = nullptr;
  DevTensor w13, w2, hidden, ids, weights, recv_hidden, recv_ids, recv_w, recv_counts, local_ids,
      counts, offsets, sorted, expert_out, out, ws_disp, ws_run;
  // Host snapshots of the last step.
  std::unique_ptr<HostTensor> h_recv_hidden, h_recv_ids, h_recv_w, h_recv_counts, h_expert_out,
      h_out;
  std::vector<int32_t> owner, local;

  ~EpRank() {
    moe_runner_destroy(runner);
    moe_dispatcher_destroy(disp);
    moe_a2a_destroy(a2a);
    if (stream) cudaStreamDestroy(stream);
  }

  void setup(const Model& m, int r, ncclComm_t comm) {
    rank = r;
    CUDA_OK(cudaSetDevice(r));
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    moe_a2a_config_t cfg = a2a_config(m, r);
    MOE_OK(moe_a2a_create(&cfg, comm, &a2a));
    size_t bytes = 0;
    MOE_OK(moe_a2a_buffer_sizes(a2a, &R, &E_loc, &bytes));
    owner.assign(size_t(m.E), 0);
    local.assign(size_t(m.E), 0);
    MOE_OK(moe_a2a_get_mapping(a2a, owner.data(), local.data(), m.E));

    // This rank's experts, in local-id order.
    HostTensor lw13(m.dtype, {E_loc, 2 * m.I, m.H}), lw2(m.dtype, {E_loc, m.H, m.I});
    const size_t b13 = size_t(2 * m.I) * m.H * moe_test::dt_bytes(m.dtype);
    const size_t b2 = size_t(m.H) * m.I * moe_test::dt_bytes(m.dtype);
    for (int e = 0; e < m.E; ++e) {
      if (owner[size_t(e)] != r) continue;
      std::memcpy(lw13.storage.data() + size_t(local[size_t(e)]) * b13,
                  m.w13->storage.data() + size_t(e) * b13, b13);
      std::memcpy(lw2.storage.data() + size_t(local[size_t(e)]) * b2,
                  m.w2->storage.data() + size_t(e) * b2, b2);
    }
    w13.reset(m.dtype, {E_loc, 2 * m.I, m.H}, r);
    w2.reset(m.dtype, {E_loc, m.H, m.I}, r);
    w13.upload(lw13, stream);
    w2.upload(lw2, stream);
    moe_runner_config_t rc = runner_config(m, E_loc);
    MOE_OK(moe_runner_create(&rc, &runner));
    MOE_OK(moe_runner_set_weights(runner, w13.dl(), w2.dl(), nullptr, nullptr, nullptr, nullptr));
    // Received ids are already local: a standard dispatcher over E_loc experts, ep_size 1.
    moe_dispatcher_config_t dc;
    dc.struct_size = uint32_t(sizeof(dc));
    MOE_OK(moe_dispatcher_config_default(&dc));
    dc.num_experts = E_loc;
    dc.device_type = kDLCUDA;
    dc.device_id = r;
    MOE_OK(moe_dispatcher_create(&dc, &disp));

    recv_hidden.reset(m.dtype, {R, m.H}, r);
    recv_ids.reset(DT::i32, {R, m.K}, r);
    recv_w.reset(DT::f32, {R, m.K}, r);
    recv_counts.reset(DT::i32, {kRanks}, r);
    local_ids.reset(DT::i32, {R, m.K}, r);  // the local dispatcher's copy of recv_ids (identity map)
    counts.reset(DT::i32, {E_loc}, r);
    offsets.reset(DT::i32, {E_loc + 1}, r);
    sorted.reset(DT::i32, {R * m.K}, r);
    expert_out.reset(m.dtype, {R, m.H}, r);
    size_t wd = 0, wr = 0;
    MOE_OK(moe_dispatcher_workspace_size(disp, R, m.K, &wd));
    MOE_OK(moe_runner_workspace_size(runner, R, m.K, kDLCUDA, &wr));
    ws_disp.reset(DT::u8, {int64_t(wd)}, r);
    ws_run.reset(DT::u8, {int64_t(wr)}, r);
    h_recv_hidden = std::make_unique<HostTensor>(m.dtype, std::vector<int64_t>{R, m.H});
    h_recv_ids = std::make_unique<HostTensor>(DT::i32, std::vector<int64_t>{R, m.K});
    h_recv_w = std::make_unique<HostTensor>(DT::f32, std::vector<int64_t>{R, m.K});
    h_recv_counts = std::make_unique<HostTensor>(DT::i32, std::vector<int64_t>{kRanks});
    h_expert_out = std::make_unique<HostTensor>(m.dtype, std::vector<int64_t>{R, m.H});
    // Handles upload tables on the legacy stream, which `stream` (non-blocking) does not wait for.
    CUDA_OK(cudaDeviceSynchronize());
  }

  void set_tokens(const Model& m, int64_t tokens) {
    T = tokens;
    hidden.reset(m.dtype, {T, m.H}, rank);
    ids.reset(DT::i32, {T, m.K}, rank);
    weights.reset(DT::f32, {T, m.K}, rank);
    out.reset(m.dtype, {T, m.H}, rank);
    h_out = std::make_unique<HostTensor>(m.dtype, std::vector<int64_t>{T, m.H});
  }

  void upload(const Batch& b) {
    hidden.upload(*b.hidden, stream);
    ids.upload(*b.ids, stream);
    weights.upload(*b.weights, stream);
  }

  // NaN and garbage ids in every output buffer before each step.
  void poison() {
    for (DevTensor* t : {&recv_hidden, &recv_ids, &recv_w, &recv_counts, &local_ids, &counts, &offsets,
                         &sorted, &expert_out, &out})
      t->poison(stream);
  }

  // dispatch -> local metadata -> runner -> combine, all on `stream`.
  void enqueue() {
    CUDA_OK(cudaSetDevice(rank));
    MOE_OK(moe_a2a_dispatch(a2a, hidden.dl(), ids.dl(), weights.dl(), recv_hidden.dl(),
                            recv_ids.dl(), recv_w.dl(), recv_counts.dl(), stream));
    MOE_OK(moe_dispatcher_dispatch(disp, recv_ids.dl(), local_ids.dl(), counts.dl(), offsets.dl(),
                                   sorted.dl(), ws_disp.ptr, ws_disp.bytes, stream));
    MOE_OK(moe_runner_run(runner, recv_hidden.dl(), local_ids.dl(), recv_w.dl(), offsets.dl(),
                          sorted.dl(), expert_out.dl(), ws_run.ptr, ws_run.bytes, stream));
    MOE_OK(moe_a2a_combine(a2a, expert_out.dl(), out.dl(), stream));
  }

  void download() {
    recv_hidden.download(*h_recv_hidden, stream);
    recv_ids.download(*h_recv_ids, stream);
    recv_w.download(*h_recv_w, stream);
    recv_counts.download(*h_recv_counts, stream);
    expert_out.download(*h_expert_out, stream);
    out.download(*h_out, stream);
  }
};

// Host model of the exchange: the tokens of source s that have a slot on
// rank d, in ascending token order.
std::vector<int64_t> routed_tokens(const Model& m, const Batch& b, int d) {
  std::vector<int64_t> rows;
  const int32_t* ids = b.ids->as<int32_t>();
  for (int64_t t = 0; t < b.T; ++t)
    for (int j = 0; j < m.K; ++j) {
      const int32_t g = ids[t * m.K + j];
      if (g >= 0 && g < m.E && m.owner[size_t(g)] == d) {
        rows.push_back(t);
        break;
      }
    }
  return rows;
}

bool finite_all(const HostTensor& h) {
  for (int64_t i = 0; i < h.numel(); ++i)
    if (!std::isfinite(h.get(i))) return false;
  return true;
}

// Every receive buffer of every rank against the host model, exactly.
void check_dispatch(const Model& m, const Batch* const* b, EpRank* ranks) {
  const size_t row_bytes = size_t(m.H) * moe_test::dt_bytes(m.dtype);
  for (int d = 0; d < kRanks; ++d) {
    EpRank& er = ranks[d];
    CHECK(er.owner == m.owner);
    CHECK(er.local == m.local);
    const int32_t* rid = er.h_recv_ids->as<int32_t>();
    const float* rw = er.h_recv_w->as<float>();
    for (int s = 0; s < kRanks; ++s) {
      const std::vector<int64_t> tokens = routed_tokens(m, *b[s], d);
      INFO("destination rank ", d, ", source rank ", s);
      CHECK(er.h_recv_counts->as<int32_t>()[s] == int32_t(tokens.size()));
      int64_t bad_hidden = 0, bad_ids = 0, bad_weights = 0, bad_padding = 0;
      for (int64_t i = 0; i < m.M; ++i) {
        const int64_t row = int64_t(s) * m.M + i;
        if (i < int64_t(tokens.size())) {
          const int64_t t = tokens[size_t(i)];
          bad_hidden += std::memcmp(er.h_recv_hidden->storage.data() + size_t(row) * row_bytes,
                                    b[s]->hidden->storage.data() + size_t(t) * row_bytes,
                                    row_bytes) != 0;
          for (int j = 0; j < m.K; ++j) {
            const int32_t g = b[s]->ids->as<int32_t>()[t * m.K + j];
            const bool here = g >= 0 && g < m.E && m.owner[size_t(g)] == d;
            const int32_t want_id = here ? m.local[size_t(g)] : -1;
            const float want_w = here ? b[s]->weights->as<float>()[t * m.K + j] : 0.0f;
            bad_ids += rid[row * m.K + j] != want_id;
            bad_weights += std::memcmp(&rw[row * m.K + j], &want_w, 4) != 0;
          }
        } else {
          for (int j = 0; j < m.K; ++j) {
            const float w = rw[row * m.K + j];
            bad_padding += rid[row * m.K + j] != -1 || w != 0.0f || std::signbit(w);
          }
        }
      }
      CHECK(bad_hidden == 0);
      CHECK(bad_ids == 0);
      CHECK(bad_weights == 0);
      CHECK(bad_padding == 0);
    }
    // Padding rows give exactly 0 (the runner never reads their NaN hidden values).
    CHECK(finite_all(*er.h_expert_out));
  }
}

// Combine against the host sum over ranks 0, 1 in f32, rounded once: bit for bit.
void check_combine_exact(const Model& m, const Batch* const* b, EpRank* ranks) {
  const size_t row_bytes = size_t(m.H) * moe_test::dt_bytes(m.dtype);
  for (int s = 0; s < kRanks; ++s) {
    const int64_t T = b[s]->T;
    HostTensor want(m.dtype, {T, m.H});
    std::vector<float> acc(size_t(T) * m.H, 0.0f);
    for (int d = 0; d < kRanks; ++d) {
      const std::vector<int64_t> tokens = routed_tokens(m, *b[s], d);
      for (size_t i = 0; i < tokens.size(); ++i) {
        const int64_t row = int64_t(s) * m.M + int64_t(i);
        for (int c = 0; c < m.H; ++c)
          acc[size_t(tokens[i]) * m.H + c] += float(ranks[d].h_expert_out->get(row * m.H + c));
      }
    }
    for (int64_t i = 0; i < T * m.H; ++i) want.set(i, double(acc[size_t(i)]));
    INFO("combine output of rank ", s);
    CHECK(finite_all(*ranks[s].h_out));
    int64_t mismatched = 0;
    for (int64_t t = 0; t < T; ++t)
      mismatched += std::memcmp(ranks[s].h_out->storage.data() + size_t(t) * row_bytes,
                                want.storage.data() + size_t(t) * row_bytes, row_bytes) != 0;
    CHECK(mismatched == 0);
  }
}

// Expert-parallel outputs against the single-GPU layer on the same tokens.
void check_against_single(const Model& m, const Batch* const* b, EpRank* ranks) {
  std::unique_ptr<HostTensor> ref = single_gpu(m, b);
  std::vector<double> got, want;
  int64_t at = 0;
  for (int r = 0; r < kRanks; ++r) {
    for (int64_t i = 0; i < b[r]->T * m.H; ++i) {
      got.push_back(ranks[r].h_out->get(i));
      want.push_back(ref->get(at * m.H + i));
    }
    at += b[r]->T;
  }
  const double err = rel_error(got, want);
  INFO("relative error against the single-GPU layer: ", err, " (", dt_name(m.dtype), ")");
  CHECK(err < tolerance(m.dtype));
}

void check_step(const Model& m, const Batch* const* b, EpRank* ranks) {
  check_dispatch(m, b, ranks);
  check_combine_exact(m, b, ranks);
  check_against_single(m, b, ranks);
}

void require_no_errors(const std::vector<std::string>& errors) {
  for (size_t r = 0; r < errors.size(); ++r) {
    INFO("rank ", r, ": ", errors[r]);
    REQUIRE(errors[r].empty());
  }
}

// Creates both ranks, runs one step twice on the same tokens (poisoned
// buffers each time), checks it and that the two outputs are bit-identical.
void run_case(const Model& m, std::array<int64_t, kRanks> T, Route route) {
  const auto& cs = comms(kRanks);
  auto rng = fresh_rng();
  std::unique_ptr<Batch> batches[kRanks];
  for (int r = 0; r < kRanks; ++r) batches[r] = make_batch(m, T[size_t(r)], route, rng);
  const Batch* b[kRanks] = {batches[0].get(), batches[1].get()};
  EpRank ranks[kRanks];
  std::vector<std::vector<unsigned char>> first(kRanks);
  require_no_errors(run_ranks(kRanks, [&](int r) {
    EpRank& er = ranks[r];
    er.setup(m, r, cs[size_t(r)]);
    er.set_tokens(m, T[size_t(r)]);
    er.upload(*b[r]);
    for (int rep = 0; rep < 2; ++rep) {
      er.poison();
      er.enqueue();
      er.download();
      if (rep == 0) first[size_t(r)] = er.h_out->storage;
    }
  }));
  check_step(m, b, ranks);
  for (int r = 0; r < kRanks; ++r) {
    INFO("rank ", r, ": a repeated step gives the same bits");
    CHECK(first[size_t(r)] == ranks[r].h_out->storage);
  }
}

}  // namespace

TEST_CASE("a2a.step.balanced") {
  auto rng = fresh_rng();
  SUBCASE("f32") { run_case(*make_model(DT::f32, 8, 2, 128, 64, 48, false, rng), {48, 37}, Route::balanced); }
  SUBCASE("bf16") { run_case(*make_model(DT::bf16, 16, 4, 256, 128, 64, false, rng), {64, 50}, Route::balanced); }
  SUBCASE("f16") { run_case(*make_model(DT::f16, 8, 3, 128, 64, 40, false, rng), {17, 40}, Route::balanced); }
}

TEST_CASE("a2a.step.explicit_mapping_and_gaps") {
  auto rng = fresh_rng();
  SUBCASE("f32") { run_case(*make_model(DT::f32, 16, 4, 128, 64, 64, true, rng), {60, 64}, Route::gaps); }
  SUBCASE("bf16") { run_case(*make_model(DT::bf16, 16, 4, 128, 64, 64, true, rng), {33, 64}, Route::gaps); }
}

TEST_CASE("a2a.step.skewed_all_to_rank0") {
  auto rng = fresh_rng();
  SUBCASE("f32") { run_case(*make_model(DT::f32, 8, 2, 128, 64, 32, false, rng), {32, 32}, Route::to_rank0); }
  SUBCASE("bf16") { run_case(*make_model(DT::bf16, 16, 4, 128, 64, 32, true, rng), {20, 32}, Route::to_rank0); }
}

TEST_CASE("a2a.step.empty_batches") {
  auto rng = fresh_rng();
  SUBCASE("rank0_empty") { run_case(*make_model(DT::bf16, 8, 2, 128, 64, 16, false, rng), {0, 16}, Route::balanced); }
  SUBCASE("rank1_empty") { run_case(*make_model(DT::f32, 8, 2, 128, 64, 16, false, rng), {9, 0}, Route::balanced); }
  SUBCASE("both_empty") { run_case(*make_model(DT::f32, 8, 2, 128, 64, 16, false, rng), {0, 0}, Route::balanced); }
  SUBCASE("one_token") { run_case(*make_model(DT::bf16, 8, 2, 128, 64, 1, false, rng), {1, 1}, Route::balanced); }
}

TEST_CASE("a2a.graph.replay") {
  auto rng = fresh_rng();
  for (DT dt : {DT::f32, DT::bf16}) {
    CAPTURE(dt_name(dt));
    auto model = make_model(dt, 16, 4, 256, 128, 64, true, rng);
    const Model& m = *model;
    const std::array<int64_t, kRanks> T = {64, 41};
    const auto& cs = comms(kRanks);
    EpRank ranks[kRanks];
    cudaGraphExec_t exec[kRanks] = {nullptr, nullptr};
    cudaGraph_t graph[kRanks] = {nullptr, nullptr};
    auto warm = make_batch(m, T[0], Route::balanced, rng);
    auto warm1 = make_batch(m, T[1], Route::balanced, rng);
    const Batch* wb[kRanks] = {warm.get(), warm1.get()};
    require_no_errors(run_ranks(kRanks, [&](int r) {
      EpRank& er = ranks[r];
      er.setup(m, r, cs[size_t(r)]);
        er.set_tokens(m, T[size_t(r)]);
      er.upload(*wb[r]);
      er.poison();
      er.enqueue();  // eager step first: the runner and NCCL set up outside the capture
      CUDA_OK(cudaStreamSynchronize(er.stream));
      CUDA_OK(cudaStreamBeginCapture(er.stream, cudaStreamCaptureModeThreadLocal));
      er.enqueue();
      CUDA_OK(cudaStreamEndCapture(er.stream, &graph[r]));
      CUDA_OK(cudaGraphInstantiate(&exec[r], graph[r], 0));
    }));
    for (int rep = 0; rep < 3; ++rep) {
      CAPTURE(rep);
      // Fresh tokens in the captured input buffers, skewed on the last replay.
      const Route route = rep == 2 ? Route::to_rank0 : Route::balanced;
      std::unique_ptr<Batch> batches[kRanks];
      for (int r = 0; r < kRanks; ++r) batches[r] = make_batch(m, T[size_t(r)], route, rng);
      const Batch* b[kRanks] = {batches[0].get(), batches[1].get()};
      require_no_errors(run_ranks(kRanks, [&](int r) {
        EpRank& er = ranks[r];
        CUDA_OK(cudaSetDevice(r));
        er.upload(*b[r]);
        er.poison();
        CUDA_OK(cudaGraphLaunch(exec[r], er.stream));
        er.download();
      }));
      check_step(m, b, ranks);
    }
    for (int r = 0; r < kRanks; ++r) {
      cudaSetDevice(r);
      cudaGraphExecDestroy(exec[r]);
      cudaGraphDestroy(graph[r]);
    }
  }
}

TEST_CASE("a2a.errors.tokens_over_max") {
  auto rng = fresh_rng();
  auto model = make_model(DT::bf16, 8, 2, 128, 64, 16, false, rng);
  const Model& m = *model;
  const auto& cs = comms(kRanks);
  EpRank ranks[kRanks];
  moe_status_t status[kRanks];
  std::string message[kRanks];
  auto big0 = make_batch(m, m.M + 1, Route::balanced, rng);
  auto b0 = make_batch(m, m.M, Route::balanced, rng);
  auto b1 = make_batch(m, 5, Route::balanced, rng);
  const Batch* b[kRanks] = {b0.get(), b1.get()};
  require_no_errors(run_ranks(kRanks, [&](int r) {
    EpRank& er = ranks[r];
    er.setup(m, r, cs[size_t(r)]);
    // Both ranks pass T = M + 1: each fails before sending, so neither waits.
    er.set_tokens(m, m.M + 1);
    er.upload(*big0);
    status[r] = moe_a2a_dispatch(er.a2a, er.hidden.dl(), er.ids.dl(), er.weights.dl(),
                                 er.recv_hidden.dl(), er.recv_ids.dl(), er.recv_w.dl(),
                                 er.recv_counts.dl(), er.stream);
    message[r] = moe_last_error();
    // The communicator is untouched: a valid step still works.
    er.set_tokens(m, b[r]->T);
    er.upload(*b[r]);
    er.poison();
    er.enqueue();
    er.download();
  }));
  for (int r = 0; r < kRanks; ++r) {
    INFO("rank ", r, ": ", message[r]);
    CHECK(status[r] == MOE_STATUS_INVALID_ARGUMENT);
    CHECK(message[r].find("max_tokens_per_rank") != std::string::npos);
    CHECK(message[r].find("T = 17") != std::string::npos);
  }
  check_step(m, b, ranks);
}

TEST_CASE("a2a.errors.combine_before_dispatch") {
  auto rng = fresh_rng();
  auto model = make_model(DT::f32, 8, 2, 128, 64, 8, false, rng);
  const Model& m = *model;
  const auto& cs = comms(kRanks);
  EpRank ranks[kRanks];
  moe_status_t status[kRanks];
  std::string message[kRanks];
  require_no_errors(run_ranks(kRanks, [&](int r) {
    EpRank& er = ranks[r];
    er.setup(m, r, cs[size_t(r)]);
    er.set_tokens(m, 4);
    status[r] = moe_a2a_combine(er.a2a, er.expert_out.dl(), er.out.dl(), er.stream);
    message[r] = moe_last_error();
  }));
  for (int r = 0; r < kRanks; ++r) {
    INFO(message[r]);
    CHECK(status[r] == MOE_STATUS_INVALID_ARGUMENT);
    CHECK(message[r].find("no dispatch yet") != std::string::npos);
  }
}

TEST_CASE("a2a.create.config_mismatch") {
  auto rng = fresh_rng();
  auto model = make_model(DT::bf16, 8, 2, 128, 64, 16, false, rng);
  auto interleaved = make_model(DT::bf16, 8, 2, 128, 64, 16, true, rng);
  const auto& cs = comms(kRanks);
  // change(rank, config) alters rank 1's config; words[r] must appear in rank r's message.
  struct Case {
    const char* name;
    std::function<void(moe_a2a_config_t&)> change;
    std::array<const char*, kRanks> words;
  };
  const std::vector<Case> cases = {
      {"hidden_size", [](moe_a2a_config_t& c) { c.hidden_size = 256; },
       {"hidden_size", "hidden_size"}},
      {"max_tokens", [](moe_a2a_config_t& c) { c.max_tokens_per_rank = 32; },
       {"max_tokens_per_rank", "max_tokens_per_rank"}},
      {"dtype", [](moe_a2a_config_t& c) { c.hidden_dtype = DLDataType{kDLFloat, 32, 1}; },
       {"hidden_dtype", "hidden_dtype"}},
      {"mapping",
       [&](moe_a2a_config_t& c) {
         c.expert_rank = interleaved->owner.data();
         c.expert_local_id = interleaved->local.data();
       },
       {"expert_rank", "expert_rank"}},
      {"invalid_top_k", [](moe_a2a_config_t& c) { c.top_k = 0; }, {"rank 1 rejected", "top_k"}},
      {"wrong_ep_rank", [](moe_a2a_config_t& c) { c.ep_rank = 0; }, {"rank 1 rejected", "ep_rank"}},
  };
  for (const Case& tc : cases) {
    CAPTURE(tc.name);
    moe_status_t status[kRanks];
    std::string message[kRanks];
    moe_a2a_t handle[kRanks] = {nullptr, nullptr};
    require_no_errors(run_ranks(kRanks, [&](int r) {
      CUDA_OK(cudaSetDevice(r));
      moe_a2a_config_t cfg = a2a_config(*model, r);
      if (r == 1) tc.change(cfg);
      status[r] = moe_a2a_create(&cfg, cs[size_t(r)], &handle[r]);
      message[r] = moe_last_error();
    }));
    for (int r = 0; r < kRanks; ++r) {
      INFO("rank ", r, ": ", message[r]);
      CHECK(status[r] == MOE_STATUS_INVALID_ARGUMENT);
      CHECK(handle[r] == nullptr);
      CHECK(message[r].find(tc.words[size_t(r)]) != std::string::npos);
      moe_a2a_destroy(handle[r]);
    }
  }
}
