// The all-to-all dispatcher on P >= 2 GPUs driven by one process
// (ncclCommInitAll, one thread per rank; P from MOE_NCCL_RANKS, default every
// visible GPU up to 8): expert-parallel results equal the single-GPU
// standard dispatcher + runner on the same global batch; the receive buffers
// match a host model of the exchange exactly; combine matches a host sum in
// the documented order bit for bit; padding is sanitized even when the
// receive buffers start as NaN and garbage ids; the step replays from a CUDA
// graph; bad input fails on every rank that should fail. Every case holds a
// fixed number of experts per rank (E = that * P), so it runs at any P.
#include <cstring>
#include <memory>

#include "nccl_support.h"

namespace {

using namespace moe_nccl_test;
using moe_test::fresh_rng;
using moe_test::rel_error;

double tolerance(DT dt) { return dt == DT::f32 ? 1e-5 : 1e-2; }

// The expert layer shared by both setups: global weights and the mapping.
struct Model {
  DT dtype = DT::f32;
  int P = 0, E = 0, K = 0, H = 0, I = 0, M = 0;
  bool explicit_mapping = false;  // interleaved: expert e on rank e % P, local id e / P
  std::vector<int32_t> owner, local;
  std::unique_ptr<HostTensor> w13, w2;  // [E, 2I, H], [E, H, I]
};

// experts_per_rank experts on each of the num_ranks() ranks: E = experts_per_rank * P.
std::unique_ptr<Model> make_model(DT dt, int experts_per_rank, int K, int H, int I, int M,
                                  bool explicit_mapping, std::mt19937_64& rng) {
  auto m = std::make_unique<Model>();
  const int P = num_ranks();
  const int E = experts_per_rank * P;
  m->dtype = dt;
  m->P = P;
  m->E = E;
  m->K = K;
  m->H = H;
  m->I = I;
  m->M = M;
  m->explicit_mapping = explicit_mapping;
  for (int e = 0; e < E; ++e) {
    m->owner.push_back(explicit_mapping ? e % P : e / experts_per_rank);
    m->local.push_back(explicit_mapping ? e / P : e % experts_per_rank);
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
  c.ep_size = m.P;
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
  to_rank0,  // every slot on an expert of rank 0: the other ranks receive nothing
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

// One batch per rank.
using Batches = std::vector<const Batch*>;

// The single-GPU path on GPU 0: standard dispatcher (ep_size 1) + runner
// holding all E experts, on every rank's tokens concatenated in rank order.
std::unique_ptr<HostTensor> single_gpu(const Model& m, const Batches& batches) {
  int64_t T = 0;
  for (const Batch* b : batches) T += b->T;
  auto out = std::make_unique<HostTensor>(m.dtype, std::vector<int64_t>{T, m.H});
  if (T == 0) return out;
  HostTensor hidden(m.dtype, {T, m.H}), ids(DT::i32, {T, m.K}), w(DT::f32, {T, m.K});
  int64_t at = 0;
  for (const Batch* b : batches) {
    copy_rows(*b->hidden, hidden, at, b->T, m.H);
    copy_rows(*b->ids, ids, at, b->T, m.K);
    copy_rows(*b->weights, w, at, b->T, m.K);
    at += b->T;
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
    recv_counts.reset(DT::i32, {m.P}, r);
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
    h_recv_counts = std::make_unique<HostTensor>(DT::i32, std::vector<int64_t>{m.P});
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
void check_dispatch(const Model& m, const Batches& b, std::vector<EpRank>& ranks) {
  const size_t row_bytes = size_t(m.H) * moe_test::dt_bytes(m.dtype);
  for (int d = 0; d < m.P; ++d) {
    EpRank& er = ranks[size_t(d)];
    CHECK(er.owner == m.owner);
    CHECK(er.local == m.local);
    const int32_t* rid = er.h_recv_ids->as<int32_t>();
    const float* rw = er.h_recv_w->as<float>();
    for (int s = 0; s < m.P; ++s) {
      const Batch& src = *b[size_t(s)];
      const std::vector<int64_t> tokens = routed_tokens(m, src, d);
      INFO("destination rank ", d, ", source rank ", s);
      CHECK(er.h_recv_counts->as<int32_t>()[s] == int32_t(tokens.size()));
      int64_t bad_hidden = 0, bad_ids = 0, bad_weights = 0, bad_padding = 0;
      for (int64_t i = 0; i < m.M; ++i) {
        const int64_t row = int64_t(s) * m.M + i;
        if (i < int64_t(tokens.size())) {
          const int64_t t = tokens[size_t(i)];
          bad_hidden += std::memcmp(er.h_recv_hidden->storage.data() + size_t(row) * row_bytes,
                                    src.hidden->storage.data() + size_t(t) * row_bytes,
                                    row_bytes) != 0;
          for (int j = 0; j < m.K; ++j) {
            const int32_t g = src.ids->as<int32_t>()[t * m.K + j];
            const bool here = g >= 0 && g < m.E && m.owner[size_t(g)] == d;
            const int32_t want_id = here ? m.local[size_t(g)] : -1;
            const float want_w = here ? src.weights->as<float>()[t * m.K + j] : 0.0f;
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

// Combine against the host sum over ranks 0, 1, ..., P-1 in f32, rounded once: bit for bit.
void check_combine_exact(const Model& m, const Batches& b, std::vector<EpRank>& ranks) {
  const size_t row_bytes = size_t(m.H) * moe_test::dt_bytes(m.dtype);
  for (int s = 0; s < m.P; ++s) {
    const int64_t T = b[size_t(s)]->T;
    const EpRank& home = ranks[size_t(s)];
    HostTensor want(m.dtype, {T, m.H});
    std::vector<float> acc(size_t(T) * m.H, 0.0f);
    for (int d = 0; d < m.P; ++d) {
      const std::vector<int64_t> tokens = routed_tokens(m, *b[size_t(s)], d);
      const HostTensor& partial = *ranks[size_t(d)].h_expert_out;
      for (size_t i = 0; i < tokens.size(); ++i) {
        const int64_t row = int64_t(s) * m.M + int64_t(i);
        for (int c = 0; c < m.H; ++c)
          acc[size_t(tokens[i]) * m.H + c] += float(partial.get(row * m.H + c));
      }
    }
    for (int64_t i = 0; i < T * m.H; ++i) want.set(i, double(acc[size_t(i)]));
    INFO("combine output of rank ", s);
    CHECK(finite_all(*home.h_out));
    int64_t mismatched = 0;
    for (int64_t t = 0; t < T; ++t)
      mismatched += std::memcmp(home.h_out->storage.data() + size_t(t) * row_bytes,
                                want.storage.data() + size_t(t) * row_bytes, row_bytes) != 0;
    CHECK(mismatched == 0);
  }
}

// Expert-parallel outputs against the single-GPU layer on the same tokens.
void check_against_single(const Model& m, const Batches& b, std::vector<EpRank>& ranks) {
  std::unique_ptr<HostTensor> ref = single_gpu(m, b);
  std::vector<double> got, want;
  int64_t at = 0;
  for (int r = 0; r < m.P; ++r) {
    const int64_t T = b[size_t(r)]->T;
    for (int64_t i = 0; i < T * m.H; ++i) {
      got.push_back(ranks[size_t(r)].h_out->get(i));
      want.push_back(ref->get(at * m.H + i));
    }
    at += T;
  }
  const double err = rel_error(got, want);
  INFO("relative error against the single-GPU layer: ", err, " (", dt_name(m.dtype), ", ", m.P,
       " ranks)");
  CHECK(err < tolerance(m.dtype));
}

void check_step(const Model& m, const Batches& b, std::vector<EpRank>& ranks) {
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

// Tokens per rank: pattern[r % pattern.size()] on rank r.
std::vector<int64_t> cycled(int P, std::vector<int64_t> pattern) {
  std::vector<int64_t> T(size_t(P), 0);
  for (int r = 0; r < P; ++r) T[size_t(r)] = pattern[size_t(r) % pattern.size()];
  return T;
}

// One fresh batch per rank, T[r] tokens on rank r.
struct RankBatches {
  std::vector<std::unique_ptr<Batch>> owned;
  Batches view;
};

RankBatches make_batches(const Model& m, const std::vector<int64_t>& T, Route route,
                         std::mt19937_64& rng) {
  RankBatches rb;
  for (int64_t t : T) {
    rb.owned.push_back(make_batch(m, t, route, rng));
    rb.view.push_back(rb.owned.back().get());
  }
  return rb;
}

// Creates every rank, runs one step twice on the same tokens (poisoned
// buffers each time), checks it and that the two outputs are bit-identical.
void run_case(const Model& m, const std::vector<int64_t>& T, Route route) {
  const auto& cs = comms();
  REQUIRE(int(T.size()) == m.P);
  auto rng = fresh_rng();
  const RankBatches batches = make_batches(m, T, route, rng);
  const Batches& b = batches.view;
  std::vector<EpRank> ranks(size_t(m.P));
  std::vector<std::vector<unsigned char>> first(size_t(m.P));
  require_no_errors(run_ranks(m.P, [&](int r) {
    EpRank& er = ranks[size_t(r)];
    er.setup(m, r, cs[size_t(r)]);
    er.set_tokens(m, T[size_t(r)]);
    er.upload(*b[size_t(r)]);
    for (int rep = 0; rep < 2; ++rep) {
      er.poison();
      er.enqueue();
      er.download();
      if (rep == 0) first[size_t(r)] = er.h_out->storage;
    }
  }));
  check_step(m, b, ranks);
  for (int r = 0; r < m.P; ++r) {
    INFO("rank ", r, ": a repeated step gives the same bits");
    CHECK(first[size_t(r)] == ranks[size_t(r)].h_out->storage);
  }
}

}  // namespace

// make_model(dtype, experts per rank, k, H, I, M, explicit mapping, rng).
TEST_CASE("a2a.step.balanced") {
  auto rng = fresh_rng();
  const int P = num_ranks();
  SUBCASE("f32") { run_case(*make_model(DT::f32, 4, 2, 128, 64, 48, false, rng), cycled(P, {48, 37}), Route::balanced); }
  SUBCASE("bf16") { run_case(*make_model(DT::bf16, 8, 4, 256, 128, 64, false, rng), cycled(P, {64, 50}), Route::balanced); }
  SUBCASE("f16") { run_case(*make_model(DT::f16, 4, 3, 128, 64, 40, false, rng), cycled(P, {17, 40}), Route::balanced); }
}

TEST_CASE("a2a.step.explicit_mapping_and_gaps") {
  auto rng = fresh_rng();
  const int P = num_ranks();
  SUBCASE("f32") { run_case(*make_model(DT::f32, 8, 4, 128, 64, 64, true, rng), cycled(P, {60, 64}), Route::gaps); }
  SUBCASE("bf16") { run_case(*make_model(DT::bf16, 8, 4, 128, 64, 64, true, rng), cycled(P, {33, 64}), Route::gaps); }
}

TEST_CASE("a2a.step.skewed_all_to_rank0") {
  auto rng = fresh_rng();
  const int P = num_ranks();
  SUBCASE("f32") { run_case(*make_model(DT::f32, 4, 2, 128, 64, 32, false, rng), cycled(P, {32}), Route::to_rank0); }
  SUBCASE("bf16") { run_case(*make_model(DT::bf16, 8, 4, 128, 64, 32, true, rng), cycled(P, {20, 32}), Route::to_rank0); }
}

TEST_CASE("a2a.step.empty_batches") {
  auto rng = fresh_rng();
  const int P = num_ranks();
  SUBCASE("rank0_empty") {
    std::vector<int64_t> T = cycled(P, {16});
    T[0] = 0;
    run_case(*make_model(DT::bf16, 4, 2, 128, 64, 16, false, rng), T, Route::balanced);
  }
  SUBCASE("odd_ranks_empty") { run_case(*make_model(DT::f32, 4, 2, 128, 64, 16, false, rng), cycled(P, {9, 0}), Route::balanced); }
  SUBCASE("all_empty") { run_case(*make_model(DT::f32, 4, 2, 128, 64, 16, false, rng), cycled(P, {0}), Route::balanced); }
  SUBCASE("one_token") { run_case(*make_model(DT::bf16, 4, 2, 128, 64, 1, false, rng), cycled(P, {1}), Route::balanced); }
}

TEST_CASE("a2a.graph.replay") {
  auto rng = fresh_rng();
  for (DT dt : {DT::f32, DT::bf16}) {
    CAPTURE(dt_name(dt));
    auto model = make_model(dt, 8, 4, 256, 128, 64, true, rng);
    const Model& m = *model;
    const std::vector<int64_t> T = cycled(m.P, {64, 41});
    const auto& cs = comms();
    std::vector<EpRank> ranks(size_t(m.P));
    std::vector<cudaGraphExec_t> exec(size_t(m.P), nullptr);
    std::vector<cudaGraph_t> graph(size_t(m.P), nullptr);
    const RankBatches warm = make_batches(m, T, Route::balanced, rng);
    require_no_errors(run_ranks(m.P, [&](int r) {
      EpRank& er = ranks[size_t(r)];
      er.setup(m, r, cs[size_t(r)]);
      er.set_tokens(m, T[size_t(r)]);
      er.upload(*warm.view[size_t(r)]);
      er.poison();
      er.enqueue();  // eager step first: the runner and NCCL set up outside the capture
      CUDA_OK(cudaStreamSynchronize(er.stream));
      CUDA_OK(cudaStreamBeginCapture(er.stream, cudaStreamCaptureModeThreadLocal));
      er.enqueue();
      CUDA_OK(cudaStreamEndCapture(er.stream, &graph[size_t(r)]));
      CUDA_OK(cudaGraphInstantiate(&exec[size_t(r)], graph[size_t(r)], 0));
    }));
    for (int rep = 0; rep < 3; ++rep) {
      CAPTURE(rep);
      // Fresh tokens in the captured input buffers, skewed on the last replay.
      const Route route = rep == 2 ? Route::to_rank0 : Route::balanced;
      const RankBatches batches = make_batches(m, T, route, rng);
      const Batches& b = batches.view;
      require_no_errors(run_ranks(m.P, [&](int r) {
        EpRank& er = ranks[size_t(r)];
        CUDA_OK(cudaSetDevice(r));
        er.upload(*b[size_t(r)]);
        er.poison();
        CUDA_OK(cudaGraphLaunch(exec[size_t(r)], er.stream));
        er.download();
      }));
      check_step(m, b, ranks);
    }
    for (int r = 0; r < m.P; ++r) {
      cudaSetDevice(r);
      cudaGraphExecDestroy(exec[size_t(r)]);
      cudaGraphDestroy(graph[size_t(r)]);
    }
  }
}

TEST_CASE("a2a.errors.tokens_over_max") {
  auto rng = fresh_rng();
  auto model = make_model(DT::bf16, 4, 2, 128, 64, 16, false, rng);
  const Model& m = *model;
  const auto& cs = comms();
  std::vector<EpRank> ranks(size_t(m.P));
  std::vector<moe_status_t> status(size_t(m.P), MOE_STATUS_SUCCESS);
  std::vector<std::string> message(size_t(m.P));
  auto big = make_batch(m, m.M + 1, Route::balanced, rng);
  const RankBatches valid = make_batches(m, cycled(m.P, {m.M, 5}), Route::balanced, rng);
  const Batches& b = valid.view;
  require_no_errors(run_ranks(m.P, [&](int r) {
    EpRank& er = ranks[size_t(r)];
    er.setup(m, r, cs[size_t(r)]);
    // Every rank passes T = M + 1: each fails before sending, so none waits.
    er.set_tokens(m, m.M + 1);
    er.upload(*big);
    status[size_t(r)] = moe_a2a_dispatch(er.a2a, er.hidden.dl(), er.ids.dl(), er.weights.dl(),
                                         er.recv_hidden.dl(), er.recv_ids.dl(), er.recv_w.dl(),
                                         er.recv_counts.dl(), er.stream);
    message[size_t(r)] = moe_last_error();
    // The communicator is untouched: a valid step still works.
    er.set_tokens(m, b[size_t(r)]->T);
    er.upload(*b[size_t(r)]);
    er.poison();
    er.enqueue();
    er.download();
  }));
  for (int r = 0; r < m.P; ++r) {
    INFO("rank ", r, ": ", message[size_t(r)]);
    CHECK(status[size_t(r)] == MOE_STATUS_INVALID_ARGUMENT);
    CHECK(message[size_t(r)].find("max_tokens_per_rank") != std::string::npos);
    CHECK(message[size_t(r)].find("T = 17") != std::string::npos);
  }
  check_step(m, b, ranks);
}

TEST_CASE("a2a.errors.combine_before_dispatch") {
  auto rng = fresh_rng();
  auto model = make_model(DT::f32, 4, 2, 128, 64, 8, false, rng);
  const Model& m = *model;
  const auto& cs = comms();
  std::vector<EpRank> ranks(size_t(m.P));
  std::vector<moe_status_t> status(size_t(m.P), MOE_STATUS_SUCCESS);
  std::vector<std::string> message(size_t(m.P));
  require_no_errors(run_ranks(m.P, [&](int r) {
    EpRank& er = ranks[size_t(r)];
    er.setup(m, r, cs[size_t(r)]);
    er.set_tokens(m, 4);
    status[size_t(r)] = moe_a2a_combine(er.a2a, er.expert_out.dl(), er.out.dl(), er.stream);
    message[size_t(r)] = moe_last_error();
  }));
  for (int r = 0; r < m.P; ++r) {
    INFO(message[size_t(r)]);
    CHECK(status[size_t(r)] == MOE_STATUS_INVALID_ARGUMENT);
    CHECK(message[size_t(r)].find("no dispatch yet") != std::string::npos);
  }
}

TEST_CASE("a2a.create.config_mismatch") {
  auto rng = fresh_rng();
  auto model = make_model(DT::bf16, 4, 2, 128, 64, 16, false, rng);
  auto interleaved = make_model(DT::bf16, 4, 2, 128, 64, 16, true, rng);
  const int P = model->P;
  const int odd = P - 1;  // the rank whose config differs (rank 1 at P = 2)
  const auto& cs = comms();
  const std::string odd_rejected = "rank " + std::to_string(odd) + " rejected";
  // change(config) alters rank `odd`'s config; the message of rank `odd` must
  // contain at_odd, every other rank's at_others.
  struct Case {
    const char* name;
    std::function<void(moe_a2a_config_t&)> change;
    std::string at_others, at_odd;
  };
  const std::vector<Case> cases = {
      {"hidden_size", [](moe_a2a_config_t& c) { c.hidden_size = 256; }, "hidden_size",
       "hidden_size"},
      {"max_tokens", [](moe_a2a_config_t& c) { c.max_tokens_per_rank = 32; },
       "max_tokens_per_rank", "max_tokens_per_rank"},
      {"dtype", [](moe_a2a_config_t& c) { c.hidden_dtype = DLDataType{kDLFloat, 32, 1}; },
       "hidden_dtype", "hidden_dtype"},
      {"mapping",
       [&](moe_a2a_config_t& c) {
         c.expert_rank = interleaved->owner.data();
         c.expert_local_id = interleaved->local.data();
       },
       "expert_rank", "expert_rank"},
      {"invalid_top_k", [](moe_a2a_config_t& c) { c.top_k = 0; }, odd_rejected, "top_k"},
      {"wrong_ep_rank", [](moe_a2a_config_t& c) { c.ep_rank = 0; }, odd_rejected, "ep_rank"},
  };
  for (const Case& tc : cases) {
    CAPTURE(tc.name);
    std::vector<moe_status_t> status(size_t(P), MOE_STATUS_SUCCESS);
    std::vector<std::string> message(static_cast<size_t>(P));
    std::vector<moe_a2a_t> handle(size_t(P), nullptr);
    require_no_errors(run_ranks(P, [&](int r) {
      CUDA_OK(cudaSetDevice(r));
      moe_a2a_config_t cfg = a2a_config(*model, r);
      if (r == odd) tc.change(cfg);
      status[size_t(r)] = moe_a2a_create(&cfg, cs[size_t(r)], &handle[size_t(r)]);
      message[size_t(r)] = moe_last_error();
    }));
    for (int r = 0; r < P; ++r) {
      INFO("rank ", r, ": ", message[size_t(r)]);
      CHECK(status[size_t(r)] == MOE_STATUS_INVALID_ARGUMENT);
      CHECK(handle[size_t(r)] == nullptr);
      CHECK(message[size_t(r)].find(r == odd ? tc.at_odd : tc.at_others) != std::string::npos);
      moe_a2a_destroy(handle[size_t(r)]);
    }
  }
}
