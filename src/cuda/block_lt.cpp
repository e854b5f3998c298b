#include "block_lt.h"

#include <cublasLt.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "../common.h"
#include "cuda_backend.h"

namespace moe::cuda {
namespace {

moe_status_t status_of(cublasStatus_t st) {
  switch (st) {
    case CUBLAS_STATUS_ALLOC_FAILED: return MOE_STATUS_OUT_OF_MEMORY;
    case CUBLAS_STATUS_NOT_SUPPORTED:
    case CUBLAS_STATUS_ARCH_MISMATCH: return MOE_STATUS_UNSUPPORTED;
    case CUBLAS_STATUS_INVALID_VALUE: return MOE_STATUS_INTERNAL_ERROR;  // arguments were validated
    default: return MOE_STATUS_CUDA_ERROR;
  }
}

void lt_check(cublasStatus_t st, const char* what) {
  if (st == CUBLAS_STATUS_SUCCESS) return;
  fail(status_of(st), std::string("cuBLASLt ") + what + " failed: " + cublasLtGetStatusName(st) +
                          " (" + cublasLtGetStatusString(st) + ")");
}

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::bf16: return CUDA_R_16BF;
    case DType::f16: return CUDA_R_16F;
    default: return CUDA_R_32F;
  }
}

// Largest power of two (up to 256) dividing the address.
uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) al >>= 1;
  return al;
}

struct Key {
  int device;
  int64_t m, n, k, lda, ldb, ldd;
  int ab, d;
  bool accumulate;
  int epilogue;
  uint32_t align_a, align_b, align_d;
  auto tie() const {
    return std::tie(device, m, n, k, lda, ldb, ldd, ab, d, accumulate, epilogue, align_a, align_b,
                    align_d);
  }
  bool operator<(const Key& o) const { return tie() < o.tie(); }
};

Key key_of(const LtGemm& g) {
  return Key{g.device, g.m,        g.n, g.k,          g.lda,           g.ldb,
             g.ldd,    int(g.ab_dtype), int(g.d_dtype), g.accumulate, int(g.epilogue),
             alignment(g.a), alignment(g.b), alignment(g.d)};
}

// A planned GEMM: descriptors and the heuristic's algorithm, immutable once
// made, so any thread may run it concurrently.
struct Plan {
  cublasLtHandle_t handle = nullptr;
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool found = false;
  ~Plan() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

struct Cache {
  std::mutex mutex;
  std::map<int, cublasLtHandle_t> handles;
  std::map<Key, std::unique_ptr<Plan>> plans;
};

// Never destroyed: cublasLtDestroy from a static destructor could run after
// the CUDA runtime has shut down.
Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

cublasLtHandle_t handle_locked(Cache& c, int device) {
  auto it = c.handles.find(device);
  if (it != c.handles.end()) return it->second;
  DeviceGuard guard(device);
  cublasLtHandle_t h = nullptr;
  lt_check(cublasLtCreate(&h), "cublasLtCreate");
  c.handles.emplace(device, h);
  return h;
}

template <class V>
void set_desc(cublasLtMatmulDesc_t op, cublasLtMatmulDescAttributes_t attr, V v) {
  lt_check(cublasLtMatmulDescSetAttribute(op, attr, &v, sizeof(v)), "cublasLtMatmulDescSetAttribute");
}

template <class V>
void set_pref(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr, V v) {
  lt_check(cublasLtMatmulPreferenceSetAttribute(pref, attr, &v, sizeof(v)),
           "cublasLtMatmulPreferenceSetAttribute");
}

void make_plan(const LtGemm& g, const Key& key, Plan& p) {
  lt_check(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F),
           "cublasLtMatmulDescCreate");
  // Column-major view: D^T [m, n] = op(A^T as stored) [m, k] x B^T [k, n].
  set_desc(p.op, CUBLASLT_MATMUL_DESC_TRANSA, int32_t(CUBLAS_OP_T));
  set_desc(p.op, CUBLASLT_MATMUL_DESC_TRANSB, int32_t(CUBLAS_OP_N));
  if (g.epilogue == LtEpilogue::gelu_tanh)
    set_desc(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, uint32_t(CUBLASLT_EPILOGUE_GELU));
  const cudaDataType_t ab = cuda_type(g.ab_dtype), d = cuda_type(g.d_dtype);
  lt_check(cublasLtMatrixLayoutCreate(&p.a, ab, uint64_t(g.k), uint64_t(g.m), g.lda),
           "cublasLtMatrixLayoutCreate(A)");
  lt_check(cublasLtMatrixLayoutCreate(&p.b, ab, uint64_t(g.k), uint64_t(g.n), g.ldb),
           "cublasLtMatrixLayoutCreate(B)");
  lt_check(cublasLtMatrixLayoutCreate(&p.d, d, uint64_t(g.m), uint64_t(g.n), g.ldd),
           "cublasLtMatrixLayoutCreate(D)");
  cublasLtMatmulPreference_t pref = nullptr;
  lt_check(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
  struct PrefGuard {
    cublasLtMatmulPreference_t p;
    ~PrefGuard() { cublasLtMatmulPreferenceDestroy(p); }
  } pref_guard{pref};
  set_pref(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, uint64_t(kLtWorkspaceBytes));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_a);
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_b);
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_d);
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_d);
  cublasLtMatmulHeuristicResult_t result{};
  int count = 0;
  DeviceGuard guard(g.device);
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(p.handle, p.op, p.a, p.b, p.d, p.d,
                                                           pref, 1, &result, &count);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED) return;  // no algorithm: found stays false
  lt_check(st, "cublasLtMatmulAlgoGetHeuristic");
  if (count > 0 && result.state == CUBLAS_STATUS_SUCCESS) {
    p.algo = result.algo;
    p.found = true;
  }
}

const Plan& plan_for(const LtGemm& g) {
  Cache& c = cache();
  const Key key = key_of(g);
  std::lock_guard<std::mutex> lock(c.mutex);
  auto it = c.plans.find(key);
  if (it != c.plans.end()) return *it->second;
  auto p = std::make_unique<Plan>();
  p->handle = handle_locked(c, g.device);
  make_plan(g, key, *p);
  return *c.plans.emplace(key, std::move(p)).first->second;
}

std::string describe(const LtGemm& g) {
  return "m=" + std::to_string(g.m) + " n=" + std::to_string(g.n) + " k=" + std::to_string(g.k) +
         ", inputs " + dtype_name(g.ab_dtype) + ", output " + dtype_name(g.d_dtype) +
         (g.epilogue == LtEpilogue::gelu_tanh ? ", GELU epilogue" : "");
}

}  // namespace

void lt_prepare(int device) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  handle_locked(c, device);
}

bool lt_supported(const LtGemm& g) { return plan_for(g).found; }

void lt_gemm(const LtGemm& g, cudaStream_t stream) {
  const Plan& p = plan_for(g);
  if (!p.found)
    fail(MOE_STATUS_UNSUPPORTED, "cuBLASLt has no algorithm for the GEMM " + describe(g) +
                                     " on device " + std::to_string(g.device));
  const float alpha = 1.0f, beta = g.accumulate ? 1.0f : 0.0f;
  lt_check(cublasLtMatmul(p.handle, p.op, &alpha, g.a, p.a, g.b, p.b, &beta, g.d, p.d, g.d, p.d,
                          &p.algo, g.workspace, kLtWorkspaceBytes, stream),
           ("cublasLtMatmul (" + describe(g) + ")").c_str());
}

}  // namespace moe::cuda
