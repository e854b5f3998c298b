// All-to-all dispatcher over NCCL (include/moe/moe_nccl.h): validation at
// the boundary, the cross-rank config check at creation, and the fixed-size
// slab exchanges between the kernels of kernels/a2a.cu.
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "a2a.cuh"
#include "common.h"
#include "cuda/check.h"
#include "cuda/cuda_backend.h"
#include "nccl_api.h"
#include "moe/moe_nccl.h"
#include "validate.h"

namespace moe {
namespace {

using kernels::a2a_peer_slot;

moe_a2a_config_t a2a_defaults() {
  moe_a2a_config_t c{};
  c.struct_size = sizeof(c);
  c.num_experts = 0;
  c.ep_size = 1;
  c.ep_rank = 0;
  c.expert_rank = nullptr;
  c.expert_local_id = nullptr;
  c.hidden_size = 0;
  c.hidden_dtype = DLDataType{kDLBfloat, 16, 1};
  c.max_tokens_per_rank = 0;
  c.top_k = 0;
  return c;
}

// Every field up to top_k is required (there is no older layout of this struct).
constexpr size_t kA2aMinSize = offsetof(moe_a2a_config_t, top_k) + sizeof(int32_t);

[[noreturn]] void nccl_fail(const std::string& what, ncclResult_t r, ncclComm_t comm) {
  std::string detail = nccl::api().GetErrorString(r);
  const char* last = comm ? nccl::api().GetLastError(comm) : nullptr;
  if (last && *last) detail += std::string(" (") + last + ")";
  fail(MOE_STATUS_NCCL_ERROR, what + ": " + detail);
}

void nccl_check(ncclResult_t r, const char* what, ncclComm_t comm) {
  if (r != ncclSuccess) nccl_fail(what, r, comm);
}


// One NCCL group; its end is issued even when a call inside fails, so the
// communicator is never left inside an open group.
class NcclGroup {
 public:
  explicit NcclGroup(ncclComm_t comm) : comm_(comm) {
    nccl_check(nccl::api().GroupStart(), "ncclGroupStart", comm_);
  }
  void send(const void* buf, size_t bytes, int peer, cudaStream_t s) {
    note(nccl::api().Send(buf, bytes, ncclUint8, peer, comm_, s), "ncclSend");
  }
  void recv(void* buf, size_t bytes, int peer, cudaStream_t s) {
    note(nccl::api().Recv(buf, bytes, ncclUint8, peer, comm_, s), "ncclRecv");
  }
  void end() {
    ncclResult_t r = nccl::api().GroupEnd();
    if (first_ != ncclSuccess) nccl_fail(first_what_, first_, comm_);
    nccl_check(r, "ncclGroupEnd", comm_);
  }

 private:
  void note(ncclResult_t r, const char* what) {
    if (r != ncclSuccess && first_ == ncclSuccess) {
      first_ = r;
      first_what_ = what;
    }
  }
  ncclComm_t comm_;
  ncclResult_t first_ = ncclSuccess;
  const char* first_what_ = "";
};

// DType of the config's hidden_dtype, or false if it is not f32/f16/bf16.
bool hidden_dtype_of(const DLDataType& dt, DType& out) {
  if (dt.lanes != 1) return false;
  if (dt.code == kDLFloat && dt.bits == 32) out = DType::f32;
  else if (dt.code == kDLFloat && dt.bits == 16) out = DType::f16;
  else if (dt.code == kDLBfloat && dt.bits == 16) out = DType::bf16;
  else return false;
  return true;
}

uint64_t fnv1a(uint64_t h, const void* data, size_t bytes) {
  const auto* b = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < bytes; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

// What every rank all-gathers at creation. Fields after `ok` are compared
// across ranks only when every rank's own checks passed.
enum Fingerprint : int {
  kMagic, kOk, kCommRank, kEpSize, kEpRank, kExperts, kHidden, kDtype, kMaxTokens, kTopK,
  kMapping, kFields
};
constexpr int64_t kFingerprintMagic = 0x6d6f652d61326131;  // "moe-a2a1"

const char* fingerprint_name(int f) {
  switch (f) {
    case kEpSize: return "ep_size";
    case kExperts: return "num_experts";
    case kHidden: return "hidden_size";
    case kDtype: return "hidden_dtype (code | bits << 8 | lanes << 16)";
    case kMaxTokens: return "max_tokens_per_rank";
    case kTopK: return "top_k";
    case kMapping: return "expert_rank / expert_local_id (hash of the resolved mapping)";
    default: return "?";
  }
}

}  // namespace
}  // namespace moe

struct moe_a2a_s {
  moe_a2a_config_t config{};  // mapping pointers cleared: they are borrowed only during create
  ncclComm_t comm = nullptr;
  int device = 0;
  int ep_size = 1, rank = 0, E = 0, H = 0, M = 0, K = 0, E_loc = 0;
  moe::DType dtype = moe::DType::bf16;
  std::vector<int32_t> expert_rank, expert_local;
  size_t row_bytes = 0, slab_bytes = 0, meta_bytes = 0;
  // One device allocation, carved into the regions below.
  void* base = nullptr;
  size_t device_bytes = 0;
  char* send_hidden = nullptr;  // (ep_size - 1) peer slabs
  char* back_hidden = nullptr;  // (ep_size - 1) peer slabs: combine's receive side
  char* send_meta = nullptr;    // ep_size meta slabs
  char* recv_meta = nullptr;    // ep_size meta slabs
  int32_t* pos_map = nullptr;   // [ep_size, M]
  int32_t* src_token = nullptr; // [ep_size, M]
  int32_t* expert_rank_dev = nullptr;
  int32_t* expert_local_dev = nullptr;
  int64_t last_T = -1;          // tokens of the last dispatch (combine's output rows)

  int64_t recv_rows() const { return int64_t(ep_size) * M; }
  ~moe_a2a_s() {
    if (!base) return;
    // In-flight exchanges may still use the slabs. No throwing guard in a destructor.
    int previous = -1;
    if (cudaGetDevice(&previous) == cudaSuccess && cudaSetDevice(device) == cudaSuccess) {
      cudaDeviceSynchronize();
      cudaSetDevice(previous);
    }
    moe::cuda::device_free(base, device);
  }
};

namespace moe {
namespace {

// Checks the config and fills the handle's geometry and mapping (no device work).
void plan_a2a(const ArgChecker& c, const moe_a2a_config_t& cfg, int comm_size, int comm_rank,
              moe_a2a_s& h) {
  if (cfg.ep_size != comm_size)
    c.bad("config->ep_size", "the communicator's size (" + std::to_string(comm_size) + ")",
          std::to_string(cfg.ep_size));
  if (cfg.ep_rank != comm_rank)
    c.bad("config->ep_rank", "the communicator's rank of this caller (" +
                                 std::to_string(comm_rank) + ")",
          std::to_string(cfg.ep_rank));
  if (cfg.ep_size < 1 || cfg.ep_size > kernels::kA2aMaxRanks)
    c.bad("config->ep_size", "a value in [1, " + std::to_string(kernels::kA2aMaxRanks) + "]",
          std::to_string(cfg.ep_size));
  if (cfg.num_experts < 1 || cfg.num_experts > 32767)
    c.bad("config->num_experts", "E in [1, 32767]", std::to_string(cfg.num_experts));
  if (cfg.hidden_size < 1 || cfg.hidden_size > (1 << 20))
    c.bad("config->hidden_size", "H in [1, 2^20]", std::to_string(cfg.hidden_size));
  if (cfg.top_k < 1 || cfg.top_k > 1024)
    c.bad("config->top_k", "k in [1, 1024]", std::to_string(cfg.top_k));
  if (cfg.max_tokens_per_rank < 1 || cfg.max_tokens_per_rank > (1 << 24))
    c.bad("config->max_tokens_per_rank", "M in [1, 2^24]",
          std::to_string(cfg.max_tokens_per_rank));
  if (int64_t(cfg.ep_size) * cfg.max_tokens_per_rank * cfg.top_k > INT32_MAX)
    c.bad("config->max_tokens_per_rank", "ep_size * M * top_k < 2^31 (receive slots)",
          std::to_string(int64_t(cfg.ep_size) * cfg.max_tokens_per_rank * cfg.top_k));
  DType dt;
  if (!hidden_dtype_of(cfg.hidden_dtype, dt))
    c.bad("config->hidden_dtype", "f32 {kDLFloat, 32, 1}, f16 {kDLFloat, 16, 1} or bf16 "
                                  "{kDLBfloat, 16, 1}",
          "code " + std::to_string(cfg.hidden_dtype.code) + ", bits " +
              std::to_string(cfg.hidden_dtype.bits) + ", lanes " +
              std::to_string(cfg.hidden_dtype.lanes));

  const int E = cfg.num_experts, P = cfg.ep_size;
  std::vector<int32_t> owner(static_cast<size_t>(E), 0);
  std::vector<int32_t> local(static_cast<size_t>(E), -1);
  if (cfg.expert_rank) {
    for (int e = 0; e < E; ++e) {
      owner[size_t(e)] = cfg.expert_rank[e];
      if (owner[size_t(e)] < 0 || owner[size_t(e)] >= P)
        c.bad("config->expert_rank[" + std::to_string(e) + "]",
              "a rank in [0, ep_size=" + std::to_string(P) + ")",
              std::to_string(owner[size_t(e)]));
    }
  } else {
    if (E % P != 0)
      c.bad("config->ep_size", "a divisor of E=" + std::to_string(E) +
                                   " (or pass an explicit expert_rank)",
            std::to_string(P));
    for (int e = 0; e < E; ++e) owner[size_t(e)] = e / (E / P);
  }
  std::vector<int32_t> held(size_t(P), 0);  // experts per rank
  for (int e = 0; e < E; ++e) ++held[size_t(owner[size_t(e)])];
  if (cfg.expert_local_id) {
    // Each rank's local ids must be exactly 0..held-1: no gap, no duplicate.
    std::vector<std::vector<char>> seen(static_cast<size_t>(P));
    for (int r = 0; r < P; ++r) seen[size_t(r)].assign(size_t(held[size_t(r)]), 0);
    for (int e = 0; e < E; ++e) {
      const int r = owner[size_t(e)];
      const int32_t l = cfg.expert_local_id[e];
      if (l < 0 || l >= held[size_t(r)] || seen[size_t(r)][size_t(l)])
        c.bad("config->expert_local_id[" + std::to_string(e) + "]",
              "a local id in [0, " + std::to_string(held[size_t(r)]) +
                  ") not used by another expert of rank " + std::to_string(r),
              std::to_string(l));
      seen[size_t(r)][size_t(l)] = 1;
      local[size_t(e)] = l;
    }
  } else {
    std::vector<int32_t> next(size_t(P), 0);
    for (int e = 0; e < E; ++e) local[size_t(e)] = next[size_t(owner[size_t(e)])]++;
  }

  h.ep_size = P;
  h.rank = cfg.ep_rank;
  h.E = E;
  h.H = cfg.hidden_size;
  h.M = cfg.max_tokens_per_rank;
  h.K = cfg.top_k;
  h.E_loc = held[size_t(cfg.ep_rank)];
  h.dtype = dt;
  h.expert_rank = std::move(owner);
  h.expert_local = std::move(local);
  h.row_bytes = size_t(h.H) * dtype_bytes(dt);
  h.slab_bytes = size_t(h.M) * h.row_bytes;
  h.meta_bytes = kernels::a2a_meta_bytes(h.M, h.K);
}

// Allocates and carves the handle's device memory and uploads the mapping.
void allocate_a2a(moe_a2a_s& h) {
  const size_t peers = size_t(h.ep_size - 1);
  const size_t map_bytes = align256(size_t(h.ep_size) * h.M * sizeof(int32_t));
  const size_t table_bytes = align256(size_t(h.E) * sizeof(int32_t));
  const size_t hidden_bytes = align256(peers * h.slab_bytes);
  size_t sizes[] = {hidden_bytes, hidden_bytes, size_t(h.ep_size) * h.meta_bytes,
                    size_t(h.ep_size) * h.meta_bytes, map_bytes, map_bytes, table_bytes,
                    table_bytes};
  size_t total = 0;
  for (size_t s : sizes) total += s;
  h.base = cuda::device_alloc(total, h.device);
  h.device_bytes = total;
  char* p = static_cast<char*>(h.base);
  char* regions[8];
  for (int i = 0; i < 8; ++i) {
    regions[i] = p;
    p += sizes[i];
  }
  h.send_hidden = regions[0];
  h.back_hidden = regions[1];
  h.send_meta = regions[2];
  h.recv_meta = regions[3];
  h.pos_map = reinterpret_cast<int32_t*>(regions[4]);
  h.src_token = reinterpret_cast<int32_t*>(regions[5]);
  h.expert_rank_dev = reinterpret_cast<int32_t*>(regions[6]);
  h.expert_local_dev = reinterpret_cast<int32_t*>(regions[7]);
  cuda::DeviceGuard guard(h.device);
  // Zeroed once so that no exchange ever moves uninitialised bytes.
  cuda::check(cudaMemset(h.base, 0, total), "cudaMemset of the a2a slabs");
  cuda::copy_to_device(h.expert_rank_dev, h.expert_rank.data(), size_t(h.E) * 4, h.device);
  cuda::copy_to_device(h.expert_local_dev, h.expert_local.data(), size_t(h.E) * 4, h.device);
  // The memset and copies ran on the legacy stream, which callers' non-blocking streams do not wait for.
  cuda::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize after setting up the a2a slabs");
}

// All-gathers each rank's fingerprint (synchronous: creation only).
std::vector<int64_t> allgather_fingerprints(ncclComm_t comm, int device, int ranks,
                                            const int64_t* mine) {
  cuda::DeviceGuard guard(device);
  const size_t bytes = size_t(kFields) * sizeof(int64_t);
  void* buf = cuda::device_alloc(bytes * (size_t(ranks) + 1), device);
  cudaStream_t stream = nullptr;
  std::vector<int64_t> all(size_t(kFields) * ranks);
  try {
    char* send = static_cast<char*>(buf);
    char* recv = send + bytes;
    cuda::check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    cuda::check(cudaMemcpyAsync(send, mine, bytes, cudaMemcpyHostToDevice, stream),
               "cudaMemcpyAsync of the config fingerprint");
    nccl_check(nccl::api().AllGather(send, recv, kFields, ncclInt64, comm, stream),
               "ncclAllGather of the config fingerprint", comm);
    cuda::check(cudaMemcpyAsync(all.data(), recv, bytes * size_t(ranks), cudaMemcpyDeviceToHost,
                               stream),
               "cudaMemcpyAsync of the gathered fingerprints");
    cuda::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize after the config all-gather");
  } catch (...) {
    if (stream) cudaStreamDestroy(stream);
    cuda::device_free(buf, device);
    throw;
  }
  cudaStreamDestroy(stream);
  cuda::device_free(buf, device);
  return all;
}

// Compares the gathered fingerprints; the same verdict on every rank.
void compare_fingerprints(const ArgChecker& c, const std::vector<int64_t>& all, int ranks) {
  auto at = [&](int r, int f) { return all[size_t(r) * kFields + size_t(f)]; };
  for (int r = 0; r < ranks; ++r)
    if (at(r, kMagic) != kFingerprintMagic || at(r, kCommRank) != r)
      c.bad("nccl_comm", "a communicator on which every rank calls moe_a2a_create",
            "rank " + std::to_string(r) + " took part in a different collective");
  for (int r = 0; r < ranks; ++r)
    if (at(r, kOk) != 1)
      c.bad("config", "a valid config on every rank",
            "rank " + std::to_string(r) + " rejected its config (its moe_last_error() says why)");
  for (int f = kEpSize; f < kFields; ++f) {
    if (f == kEpRank) continue;
    for (int r = 1; r < ranks; ++r)
      if (at(r, f) != at(0, f))
        c.bad(std::string("config->") + fingerprint_name(f), "the same value on every rank",
              std::to_string(at(0, f)) + " on rank 0 but " + std::to_string(at(r, f)) +
                  " on rank " + std::to_string(r));
  }
}

// One exchange of full slabs with every peer, so that NCCL connects the
// peers now rather than inside a later (possibly captured) dispatch.
void connect_peers(moe_a2a_s& h) {
  if (h.ep_size == 1) return;
  cuda::DeviceGuard guard(h.device);
  cudaStream_t stream = nullptr;
  cuda::check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  try {
    NcclGroup g(h.comm);
    for (int d = 0; d < h.ep_size; ++d) {
      if (d == h.rank) continue;
      const size_t slot = size_t(a2a_peer_slot(d, h.rank));
      g.send(h.send_hidden + slot * h.slab_bytes, h.slab_bytes, d, stream);
      g.recv(h.back_hidden + slot * h.slab_bytes, h.slab_bytes, d, stream);
      g.send(h.send_meta + size_t(d) * h.meta_bytes, h.meta_bytes, d, stream);
      g.recv(h.recv_meta + size_t(d) * h.meta_bytes, h.meta_bytes, d, stream);
    }
    g.end();
    cuda::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize after connecting peers");
  } catch (...) {
    cudaStreamDestroy(stream);
    throw;
  }
  cudaStreamDestroy(stream);
}

void check_tensor(const ArgChecker& c, const DLTensor* t, const char* arg, DType dt,
                  std::initializer_list<int64_t> shape, std::initializer_list<const char*> names,
                  const Device& dev) {
  c.tensor(t, arg, {dt});
  c.shape(t, arg, shape, names);
  c.same_device(dev, t, arg);
}

template <class T>
T* data_of(const DLTensor* t) {
  return static_cast<T*>(tensor_data(t));
}

}  // namespace
}  // namespace moe

using namespace moe;

extern "C" {

MOE_API moe_status_t moe_a2a_config_default(moe_a2a_config_t* config) {
  MOE_ENTRY
  ArgChecker c("moe_a2a_config_default");
  c.write_defaults(config, "config", a2a_defaults(), kA2aMinSize);
  MOE_EXIT
}

MOE_API moe_status_t moe_a2a_create(const moe_a2a_config_t* config, void* nccl_comm,
                                    moe_a2a_t* a2a) {
  MOE_ENTRY
  ArgChecker c("moe_a2a_create");
  c.not_null(a2a, "a2a");
  *a2a = nullptr;
  c.not_null(nccl_comm, "nccl_comm");
  auto comm = static_cast<ncclComm_t>(nccl_comm);
  int ranks = 0, comm_rank = 0, device = 0;
  nccl_check(nccl::api().CommCount(comm, &ranks), "ncclCommCount", comm);
  nccl_check(nccl::api().CommUserRank(comm, &comm_rank), "ncclCommUserRank", comm);
  nccl_check(nccl::api().CommCuDevice(comm, &device), "ncclCommCuDevice", comm);

  // Local checks and allocation do not throw before the all-gather: a rank
  // that fails them still joins it (ok = 0), so every rank fails together.
  auto* h = new moe_a2a_s{};
  h->comm = comm;
  h->device = device;
  bool ok = true;
  Error local{MOE_STATUS_SUCCESS, ""};
  try {
    moe_a2a_config_t cfg =
        c.config(config, "config", a2a_defaults(), kA2aMinSize);
    plan_a2a(c, cfg, ranks, comm_rank, *h);
    cfg.expert_rank = nullptr;
    cfg.expert_local_id = nullptr;
    h->config = cfg;
    allocate_a2a(*h);
  } catch (const Error& e) {
    ok = false;
    local = e;
  } catch (const std::bad_alloc&) {
    ok = false;
    local = Error{MOE_STATUS_OUT_OF_MEMORY, "moe_a2a_create: host allocation failed"};
  }

  int64_t fp[kFields] = {};
  fp[kMagic] = kFingerprintMagic;
  fp[kOk] = ok ? 1 : 0;
  fp[kCommRank] = comm_rank;
  if (ok) {
    fp[kEpSize] = h->ep_size;
    fp[kEpRank] = h->rank;
    fp[kExperts] = h->E;
    fp[kHidden] = h->H;
    const DLDataType dt = h->config.hidden_dtype;
    fp[kDtype] = int64_t(dt.code) | int64_t(dt.bits) << 8 | int64_t(dt.lanes) << 16;
    fp[kMaxTokens] = h->M;
    fp[kTopK] = h->K;
    uint64_t hash = 1469598103934665603ull;
    hash = fnv1a(hash, h->expert_rank.data(), h->expert_rank.size() * 4);
    hash = fnv1a(hash, h->expert_local.data(), h->expert_local.size() * 4);
    fp[kMapping] = int64_t(hash & 0x7fffffffffffffffull);
  }
  try {
    std::vector<int64_t> all = allgather_fingerprints(comm, device, ranks, fp);
    if (!ok)
      throw Error{local.status, local.message + " (the other ranks' moe_a2a_create fail too)"};
    compare_fingerprints(c, all, ranks);
    connect_peers(*h);
  } catch (...) {
    delete h;
    throw;
  }
  *a2a = h;
  MOE_EXIT
}

MOE_API moe_status_t moe_a2a_destroy(moe_a2a_t a2a) {
  MOE_ENTRY
  delete a2a;
  MOE_EXIT
}

MOE_API moe_status_t moe_a2a_buffer_sizes(moe_a2a_t a2a, int64_t* recv_rows,
                                          int32_t* num_local_experts, size_t* device_bytes) {
  MOE_ENTRY
  ArgChecker c("moe_a2a_buffer_sizes");
  c.not_null(a2a, "a2a");
  if (recv_rows) *recv_rows = a2a->recv_rows();
  if (num_local_experts) *num_local_experts = a2a->E_loc;
  if (device_bytes) *device_bytes = a2a->device_bytes;
  MOE_EXIT
}

MOE_API moe_status_t moe_a2a_get_mapping(moe_a2a_t a2a, int32_t* expert_rank,
                                         int32_t* expert_local_id, int64_t len) {
  MOE_ENTRY
  ArgChecker c("moe_a2a_get_mapping");
  c.not_null(a2a, "a2a");
  if (len != a2a->E) c.bad("len", "E = " + std::to_string(a2a->E), std::to_string(len));
  for (int e = 0; e < a2a->E; ++e) {
    if (expert_rank) expert_rank[e] = a2a->expert_rank[size_t(e)];
    if (expert_local_id) expert_local_id[e] = a2a->expert_local[size_t(e)];
  }
  MOE_EXIT
}

MOE_API moe_status_t moe_a2a_dispatch(moe_a2a_t a2a, const DLTensor* hidden,
                                      const DLTensor* topk_ids, const DLTensor* topk_weights,
                                      DLTensor* recv_hidden, DLTensor* recv_local_ids,
                                      DLTensor* recv_weights, DLTensor* recv_counts,
                                      void* stream) {
  MOE_ENTRY
  ArgChecker c("moe_a2a_dispatch");
  c.not_null(a2a, "a2a");
  moe_a2a_s& h = *a2a;
  const Device dev{Backend::cuda, h.device};
  check_tensor(c, hidden, "hidden", h.dtype, {-1, h.H}, {"T", "H"}, dev);
  const int64_t T = hidden->shape[0];
  if (T > h.M)
    c.bad("hidden", "T <= max_tokens_per_rank = " + std::to_string(h.M) +
                        " (nothing was sent; the other ranks wait in this dispatch)",
          "T = " + std::to_string(T));
  const int64_t R = h.recv_rows();
  check_tensor(c, topk_ids, "topk_ids", DType::i32, {T, h.K}, {"T", "top_k"}, dev);
  check_tensor(c, topk_weights, "topk_weights", DType::f32, {T, h.K}, {"T", "top_k"}, dev);
  check_tensor(c, recv_hidden, "recv_hidden", h.dtype, {R, h.H}, {"ep_size * M", "H"}, dev);
  check_tensor(c, recv_local_ids, "recv_local_ids", DType::i32, {R, h.K},
               {"ep_size * M", "top_k"}, dev);
  check_tensor(c, recv_weights, "recv_weights", DType::f32, {R, h.K}, {"ep_size * M", "top_k"},
               dev);
  check_tensor(c, recv_counts, "recv_counts", DType::i32, {h.ep_size}, {"ep_size"}, dev);

  cuda::DeviceGuard guard(h.device);
  auto s = static_cast<cudaStream_t>(stream);
  char* recv_base = data_of<char>(recv_hidden);

  kernels::A2aPackParams pack{};
  pack.hidden = tensor_data(hidden);
  pack.T = T;
  pack.topk_ids = data_of<const int32_t>(topk_ids);
  pack.topk_weights = data_of<const float>(topk_weights);
  pack.expert_rank = h.expert_rank_dev;
  pack.expert_local = h.expert_local_dev;
  pack.E = h.E;
  pack.ep_size = h.ep_size;
  pack.rank = h.rank;
  pack.M = h.M;
  pack.K = h.K;
  pack.row_bytes = h.row_bytes;
  pack.send_hidden = h.send_hidden;
  pack.send_meta = h.send_meta;
  pack.meta_bytes = h.meta_bytes;
  pack.self_hidden = recv_base + size_t(h.rank) * h.slab_bytes;
  pack.pos_map = h.pos_map;
  pack.src_token = h.src_token;
  cuda::check(kernels::launch_a2a_pack(pack, s), "a2a pack kernel launch");

  if (h.ep_size > 1) {
    NcclGroup g(h.comm);
    for (int d = 0; d < h.ep_size; ++d) {
      if (d == h.rank) continue;
      const size_t slot = size_t(a2a_peer_slot(d, h.rank));
      g.send(h.send_hidden + slot * h.slab_bytes, h.slab_bytes, d, s);
      g.send(h.send_meta + size_t(d) * h.meta_bytes, h.meta_bytes, d, s);
      g.recv(recv_base + size_t(d) * h.slab_bytes, h.slab_bytes, d, s);
      g.recv(h.recv_meta + size_t(d) * h.meta_bytes, h.meta_bytes, d, s);
    }
    g.end();
  }

  kernels::A2aSanitizeParams san{};
  san.send_meta = h.send_meta;
  san.recv_meta = h.recv_meta;
  san.meta_bytes = h.meta_bytes;
  san.ep_size = h.ep_size;
  san.rank = h.rank;
  san.M = h.M;
  san.K = h.K;
  san.E_loc = h.E_loc;
  san.local_ids = data_of<int32_t>(recv_local_ids);
  san.weights = data_of<float>(recv_weights);
  san.counts = data_of<int32_t>(recv_counts);
  cuda::check(kernels::launch_a2a_sanitize(san, s), "a2a sanitize kernel launch");
  h.last_T = T;
  MOE_EXIT
}

MOE_API moe_status_t moe_a2a_combine(moe_a2a_t a2a, const DLTensor* expert_output,
                                     DLTensor* output, void* stream) {
  MOE_ENTRY
  ArgChecker c("moe_a2a_combine");
  c.not_null(a2a, "a2a");
  moe_a2a_s& h = *a2a;
  if (h.last_T < 0)
    c.bad("a2a", "a handle on which moe_a2a_dispatch has run (combine returns its tokens)",
          "no dispatch yet");
  const Device dev{Backend::cuda, h.device};
  check_tensor(c, expert_output, "expert_output", h.dtype, {h.recv_rows(), h.H},
               {"ep_size * M", "H"}, dev);
  check_tensor(c, output, "output", h.dtype, {h.last_T, h.H}, {"T of the last dispatch", "H"},
               dev);

  cuda::DeviceGuard guard(h.device);
  auto s = static_cast<cudaStream_t>(stream);
  const char* eo = data_of<const char>(expert_output);
  if (h.ep_size > 1) {
    NcclGroup g(h.comm);
    for (int d = 0; d < h.ep_size; ++d) {
      if (d == h.rank) continue;
      const size_t slot = size_t(a2a_peer_slot(d, h.rank));
      g.send(eo + size_t(d) * h.slab_bytes, h.slab_bytes, d, s);
      g.recv(h.back_hidden + slot * h.slab_bytes, h.slab_bytes, d, s);
    }
    g.end();
  }

  kernels::A2aCombineParams p{};
  p.dtype = h.dtype;
  p.H = h.H;
  p.T = h.last_T;
  p.expert_output = eo;
  p.back_hidden = h.back_hidden;
  p.pos_map = h.pos_map;
  p.ep_size = h.ep_size;
  p.rank = h.rank;
  p.M = h.M;
  p.output = tensor_data(output);
  cuda::check(kernels::launch_a2a_combine(p, s), "a2a combine kernel launch");
  MOE_EXIT
}

}  // extern "C"
