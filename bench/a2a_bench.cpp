// All-to-all dispatcher benchmark on P GPUs of one host: median latency of
// moe_a2a_dispatch and moe_a2a_combine at T tokens per rank, beside NCCL's
// own all-to-all (one group of ncclSend/ncclRecv to every peer moving the
// same bytes), DeepSeek-V3 routing geometry (E = 256, k = 8, H = 7168, bf16,
// uniform random routing). Each handle is created with
// max_tokens_per_rank = T, so every call moves whole slabs of T rows.
//
//   NCCL_NVLS_ENABLE=0 moe_a2a_bench [--ranks P] [--tokens 1,32,128,1024,4096]
//                                    [--json PATH] [--iters N]
//
// P defaults to every visible GPU, at most 8; it must divide E = 256. One
// process drives GPUs 0..P-1 (ncclCommInitAll, one thread per rank). Times
// are CUDA-event times on each rank's stream; a row reports the largest of
// the ranks' medians. Bandwidth per GPU = bytes one rank sends to all its
// P-1 peers per call / time.
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "moe/moe.h"
#include "moe/moe_nccl.h"

namespace {

constexpr int kE = 256, kK = 8, kH = 7168, kMaxRanks = 8;

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
void moe_ok(moe_status_t st, const char* what) {
  if (st != MOE_STATUS_SUCCESS)
    throw std::runtime_error(std::string(what) + ": " + moe_last_error());
}
void nccl_ok(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) throw std::runtime_error(std::string(what) + ": " + ncclGetErrorString(r));
}
#define CUDA(x) cuda_ok((x), #x)
#define MOE(x) moe_ok((x), #x)
#define NCCL(x) nccl_ok((x), #x)

uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// A device buffer with its tensor descriptor.
struct Buf {
  void* ptr = nullptr;
  int64_t shape[2] = {0, 0};
  DLTensor t{};
  Buf(int device, DLDataType dt, int64_t rows, int64_t cols, int ndim = 2) {
    shape[0] = rows;
    shape[1] = cols;
    const size_t bytes = size_t(rows) * (ndim == 2 ? size_t(cols) : 1) * (dt.bits / 8);
    CUDA(cudaMalloc(&ptr, bytes ? bytes : 1));
    t.data = ptr;
    t.device = DLDevice{kDLCUDA, device};
    t.ndim = ndim;
    t.dtype = dt;
    t.shape = shape;
  }
  ~Buf() { cudaFree(ptr); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

const DLDataType kBf16{kDLBfloat, 16, 1}, kF32{kDLFloat, 32, 1}, kI32{kDLInt, 32, 1};

struct Inputs {
  std::vector<uint16_t> hidden;  // [T, H] bf16
  std::vector<int32_t> ids;      // [T, K]
  std::vector<float> weights;    // [T, K]
  int64_t rows_to_peers = 0;     // sum over peers of the tokens with a slot on that peer
};

Inputs make_inputs(int rank, int ranks, int T, std::mt19937_64& rng) {
  Inputs in;
  std::normal_distribution<float> normal;
  in.hidden.resize(size_t(T) * kH);
  for (auto& h : in.hidden) h = bf16_bits(normal(rng));
  std::vector<int32_t> pool(kE);
  for (int e = 0; e < kE; ++e) pool[size_t(e)] = e;
  for (int t = 0; t < T; ++t) {
    std::shuffle(pool.begin(), pool.end(), rng);
    std::vector<char> to(size_t(ranks), 0);  // this token goes to rank d (contiguous mapping)
    for (int j = 0; j < kK; ++j) {
      in.ids.push_back(pool[size_t(j)]);
      in.weights.push_back(1.0f / kK);
      to[size_t(pool[size_t(j)] / (kE / ranks))] = 1;
    }
    for (int d = 0; d < ranks; ++d) in.rows_to_peers += d != rank && to[size_t(d)];
  }
  return in;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

struct RankTimes {
  double dispatch_us = 0, combine_us = 0, nccl_dispatch_us = 0, nccl_combine_us = 0;
  size_t slab_bytes = 0, meta_bytes = 0;
  std::string error;
};

// Times `op` iters times on `stream` (after warm-up); returns the median in us.
template <class Op>
double time_op(cudaStream_t stream, int iters, Op op) {
  std::vector<cudaEvent_t> ev(size_t(iters) + 1);
  for (auto& e : ev) CUDA(cudaEventCreate(&e));
  for (int i = 0; i < 3; ++i) op();
  for (int i = 0; i < iters; ++i) {
    CUDA(cudaEventRecord(ev[size_t(i)], stream));
    op();
  }
  CUDA(cudaEventRecord(ev[size_t(iters)], stream));
  CUDA(cudaEventSynchronize(ev[size_t(iters)]));
  std::vector<double> us;
  for (int i = 0; i < iters; ++i) {
    float ms = 0;
    CUDA(cudaEventElapsedTime(&ms, ev[size_t(i)], ev[size_t(i) + 1]));
    us.push_back(1000.0 * ms);
  }
  for (auto& e : ev) cudaEventDestroy(e);
  return median(us);
}

void run_rank(int rank, int ranks, int T, ncclComm_t comm, const Inputs& in, int iters,
              RankTimes& out) {
  CUDA(cudaSetDevice(rank));
  cudaStream_t s = nullptr;
  CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  moe_a2a_config_t cfg;
  cfg.struct_size = uint32_t(sizeof(cfg));
  MOE(moe_a2a_config_default(&cfg));
  cfg.num_experts = kE;
  cfg.ep_size = ranks;
  cfg.ep_rank = rank;
  cfg.hidden_size = kH;
  cfg.hidden_dtype = kBf16;
  cfg.max_tokens_per_rank = T;
  cfg.top_k = kK;
  moe_a2a_t a2a = nullptr;
  MOE(moe_a2a_create(&cfg, comm, &a2a));
  int64_t R = 0;
  MOE(moe_a2a_buffer_sizes(a2a, &R, nullptr, nullptr));
  {
    Buf hidden(rank, kBf16, T, kH), ids(rank, kI32, T, kK), w(rank, kF32, T, kK);
    Buf recv_hidden(rank, kBf16, R, kH), recv_ids(rank, kI32, R, kK), recv_w(rank, kF32, R, kK);
    Buf counts(rank, kI32, ranks, 1, 1), output(rank, kBf16, T, kH);
    CUDA(cudaMemcpy(hidden.ptr, in.hidden.data(), in.hidden.size() * 2, cudaMemcpyHostToDevice));
    CUDA(cudaMemcpy(ids.ptr, in.ids.data(), in.ids.size() * 4, cudaMemcpyHostToDevice));
    CUDA(cudaMemcpy(w.ptr, in.weights.data(), in.weights.size() * 4, cudaMemcpyHostToDevice));
    CUDA(cudaMemset(recv_hidden.ptr, 0, size_t(R) * kH * 2));
    CUDA(cudaDeviceSynchronize());  // legacy-stream uploads before the non-blocking stream reads them
    out.dispatch_us = time_op(s, iters, [&] {
      MOE(moe_a2a_dispatch(a2a, &hidden.t, &ids.t, &w.t, &recv_hidden.t, &recv_ids.t, &recv_w.t,
                           &counts.t, s));
    });
    // The received rows stand in for the expert output (combine's cost does not depend on values).
    out.combine_us = time_op(s, iters, [&] {
      MOE(moe_a2a_combine(a2a, &recv_hidden.t, &output.t, s));
    });
  }
  // NCCL's own all-to-all moving the same bytes: dispatch sends a hidden
  // slab and a meta slab (ids, weights, count) to every peer, combine a hidden slab.
  out.slab_bytes = size_t(T) * kH * 2;
  out.meta_bytes = (16 + size_t(T) * kK * 8 + 255) / 256 * 256;
  void *send = nullptr, *recv = nullptr;
  const size_t per_peer = out.slab_bytes + out.meta_bytes;
  const size_t total = size_t(ranks - 1) * per_peer;
  CUDA(cudaMalloc(&send, total));
  CUDA(cudaMalloc(&recv, total));
  CUDA(cudaMemset(send, 0, total));
  CUDA(cudaDeviceSynchronize());
  auto exchange = [&](size_t bytes_a, size_t bytes_b) {
    NCCL(ncclGroupStart());
    for (int peer = 0; peer < ranks; ++peer) {
      if (peer == rank) continue;
      const size_t at = size_t(peer < rank ? peer : peer - 1) * per_peer;
      char* snd = static_cast<char*>(send) + at;
      char* rcv = static_cast<char*>(recv) + at;
      NCCL(ncclSend(snd, bytes_a, ncclUint8, peer, comm, s));
      NCCL(ncclRecv(rcv, bytes_a, ncclUint8, peer, comm, s));
      if (bytes_b) {
        NCCL(ncclSend(snd + bytes_a, bytes_b, ncclUint8, peer, comm, s));
        NCCL(ncclRecv(rcv + bytes_a, bytes_b, ncclUint8, peer, comm, s));
      }
    }
    NCCL(ncclGroupEnd());
  };
  out.nccl_dispatch_us = time_op(s, iters, [&] { exchange(out.slab_bytes, out.meta_bytes); });
  out.nccl_combine_us = time_op(s, iters, [&] { exchange(out.slab_bytes, 0); });
  CUDA(cudaStreamSynchronize(s));
  cudaFree(send);
  cudaFree(recv);
  moe_a2a_destroy(a2a);
  cudaStreamDestroy(s);
}

// Comma-separated positive token counts, e.g. "1,32,128"; empty on a bad list.
std::vector<int> parse_tokens(const char* text) {
  std::vector<int> out;
  const char* p = text;
  while (*p) {
    char* end = nullptr;
    const long v = std::strtol(p, &end, 10);
    if (end == p || v < 1 || v > (1 << 24) || (*end != ',' && *end != '\0')) return {};
    out.push_back(int(v));
    p = *end == ',' ? end + 1 : end;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const char* json_path = nullptr;
  int iters = 50, ranks = 0;  // 0: every visible GPU, at most kMaxRanks
  std::vector<int> tokens = {1, 32, 128, 1024, 4096};
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json_path = argv[++i];
    else if (!std::strcmp(argv[i], "--iters") && i + 1 < argc) iters = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--ranks") && i + 1 < argc)
      ranks = std::max(-1, std::atoi(argv[++i]));
    else if (!std::strcmp(argv[i], "--tokens") && i + 1 < argc) tokens = parse_tokens(argv[++i]);
    else {
      std::fprintf(stderr, "usage: %s [--ranks P] [--tokens T1,T2,...] [--json PATH] [--iters N]\n",
                   argv[0]);
      return 2;
    }
  }
  if (tokens.empty() || iters < 1) {
    std::fprintf(stderr, "--tokens needs positive integers separated by commas, --iters >= 1\n");
    return 2;
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
  if (ranks == 0) ranks = std::min(devices, kMaxRanks);
  if (ranks < 2 || ranks > devices) {
    std::fprintf(stderr, "moe_a2a_bench needs 2 <= ranks <= visible GPUs (%d); ranks = %d\n",
                 devices, ranks);
    return 1;
  }
  if (kE % ranks != 0) {
    std::fprintf(stderr, "moe_a2a_bench: ranks = %d does not divide E = %d (contiguous mapping); "
                 "pass --ranks with a divisor, e.g. 2, 4 or 8\n", ranks, kE);
    return 1;
  }
  std::vector<ncclComm_t> comms(size_t(ranks), nullptr);
  std::vector<int> list(static_cast<size_t>(ranks));
  for (int r = 0; r < ranks; ++r) list[size_t(r)] = r;
  const ncclResult_t init = ncclCommInitAll(comms.data(), ranks, list.data());
  if (init != ncclSuccess) {
    std::fprintf(stderr, "ncclCommInitAll over %d GPUs: %s\n", ranks, ncclGetErrorString(init));
    return 1;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  int nccl_version = 0;
  ncclGetVersion(&nccl_version);

  std::printf("a2a dispatcher vs NCCL send/recv all-to-all, %d x %s, NCCL %d, E=%d k=%d H=%d "
              "bf16, max_tokens_per_rank = T, median of %d; GB/s per GPU (bytes sent to all "
              "%d peers)\n",
              ranks, prop.name, nccl_version, kE, kK, kH, iters, ranks - 1);
  std::printf("%6s %12s %12s %12s %12s %12s %12s %12s %12s\n", "T", "dispatch_us", "nccl_d_us",
              "combine_us", "nccl_c_us", "disp_GB/s", "comb_GB/s", "slab_MB", "useful_%");
  std::string rows;
  std::mt19937_64 rng(12345);
  int failures = 0;
  for (int T : tokens) {
    std::vector<Inputs> in;
    for (int r = 0; r < ranks; ++r) in.push_back(make_inputs(r, ranks, T, rng));
    std::vector<RankTimes> times(static_cast<size_t>(ranks));
    std::vector<std::thread> threads;
    for (int r = 0; r < ranks; ++r)
      threads.emplace_back([&, r] {
        try {
          run_rank(r, ranks, T, comms[size_t(r)], in[size_t(r)], iters, times[size_t(r)]);
        } catch (const std::exception& e) {
          times[size_t(r)].error = e.what();
        }
      });
    for (auto& t : threads) t.join();
    bool ok = true;
    for (int r = 0; r < ranks; ++r)
      if (!times[size_t(r)].error.empty()) {
        std::fprintf(stderr, "T=%d rank %d: %s\n", T, r, times[size_t(r)].error.c_str());
        ok = false;
      }
    if (!ok) {
      ++failures;
      continue;
    }
    auto worst = [&](double RankTimes::*f) {
      double w = 0;
      for (const RankTimes& t : times) w = std::max(w, t.*f);
      return w;
    };
    const double d = worst(&RankTimes::dispatch_us), c = worst(&RankTimes::combine_us);
    const double nd = worst(&RankTimes::nccl_dispatch_us), nc = worst(&RankTimes::nccl_combine_us);
    const double peers = double(ranks - 1);
    const double dispatch_bytes = double(times[0].slab_bytes + times[0].meta_bytes);
    const double combine_bytes = double(times[0].slab_bytes);
    int64_t useful_rows = 0;
    for (const Inputs& x : in) useful_rows += x.rows_to_peers;
    // Share of the rows sent to peers that carry a token (the rest is slab padding).
    const double useful = 100.0 * double(useful_rows) / (double(ranks) * peers * T);
    std::printf("%6d %12.1f %12.1f %12.1f %12.1f %12.1f %12.1f %12.2f %12.1f\n", T, d, nd, c, nc,
                peers * dispatch_bytes / d / 1e3, peers * combine_bytes / c / 1e3,
                times[0].slab_bytes / 1e6, useful);
    char buf[640];
    std::snprintf(buf, sizeof buf,
                  "%s{\"T\": %d, \"dispatch_us\": %.3f, \"combine_us\": %.3f, "
                  "\"nccl_dispatch_bytes_us\": %.3f, \"nccl_combine_bytes_us\": %.3f, "
                  "\"dispatch_bytes_per_peer\": %.0f, \"combine_bytes_per_peer\": %.0f, "
                  "\"dispatch_bytes_sent_per_gpu\": %.0f, \"combine_bytes_sent_per_gpu\": %.0f, "
                  "\"dispatch_GBps_per_gpu\": %.2f, \"combine_GBps_per_gpu\": %.2f, "
                  "\"rows_with_a_peer_slot_pct\": %.2f}",
                  rows.empty() ? "" : ",\n    ", T, d, c, nd, nc, dispatch_bytes, combine_bytes,
                  peers * dispatch_bytes, peers * combine_bytes, peers * dispatch_bytes / d / 1e3,
                  peers * combine_bytes / c / 1e3, useful);
    rows += buf;
  }
  if (json_path) {
    FILE* f = std::fopen(json_path, "w");
    if (!f) {
      std::fprintf(stderr, "cannot write %s\n", json_path);
      return 1;
    }
    std::fprintf(f,
                 "{\n  \"bench\": \"a2a\", \"device\": \"%s\", \"ranks\": %d, \"nccl_version\": %d, "
                 "\"num_experts\": %d, \"top_k\": %d, \"hidden_size\": %d, \"dtype\": \"bf16\", "
                 "\"iters\": %d, \"max_tokens_per_rank\": \"= T\",\n  \"rows\": [\n    %s\n  ]\n}\n",
                 prop.name, ranks, nccl_version, kE, kK, kH, iters, rows.c_str());
    std::fclose(f);
  }
  for (ncclComm_t c : comms) ncclCommDestroy(c);
  return failures ? 1 : 0;
}
