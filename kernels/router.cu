#include "router.cuh"

#include <climits>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "moe/moe.h"

namespace moe::kernels {
namespace {

constexpr int kMaxWarpsPerBlock = 8;
constexpr size_t kDefaultSmem = 48 * 1024;

__device__ __forceinline__ bool selectable(float x) { return !isnan(x) && x != -INFINITY; }

// Same formula as the CPU backend (IEEE division; no fast-math).
__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

__host__ __device__ __forceinline__ bool is_grouped(int method, int n_group) {
  return (method == MOE_ROUTING_DEEPSEEK_V3 || method == MOE_ROUTING_GROUPED_SOFTMAX) &&
         n_group > 1;
}

// (key, idx) order: larger key first, then the lower index.
__device__ __forceinline__ bool better(float a, int ia, float b, int ib) {
  return a > b || (a == b && ia < ib);
}

__device__ __forceinline__ void warp_argmax(float& v, int& idx) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    float ov = __shfl_xor_sync(kFullMask, v, o);
    int oi = __shfl_xor_sync(kFullMask, idx, o);
    if (better(ov, oi, v, idx)) {
      v = ov;
      idx = oi;
    }
  }
}

// Group rank as on the CPU: more selectable experts (capped at 2 or 1) first,
// then the score, then the lower group index.
__device__ __forceinline__ bool group_better(int ca, float sa, int ia, int cb, float sb, int ib) {
  if (ca != cb) return ca > cb;
  return better(sa, ia, sb, ib);
}

size_t smem_floats_per_warp(int E, int n_group, int method) {
  return size_t(E) + (is_grouped(method, n_group) ? 2 * size_t(n_group) : 0);
}

template <class T>
__global__ void route_kernel(RouteParams p, int warps_per_block, int stride_floats) {
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t = int64_t(blockIdx.x) * warps_per_block + warp;
  if (t >= p.T) return;
  const int E = p.E, cols = p.k + p.n_shared;
  int32_t* ids = p.ids + t * cols;
  float* wout = p.weights + t * cols;
  int64_t valid = p.T;
  if (p.num_valid) {
    const int64_t nv = *p.num_valid;
    valid = nv < 0 ? 0 : (nv < p.T ? nv : p.T);
  }
  if (t >= valid) {
    for (int j = lane; j < cols; j += 32) {
      ids[j] = -1;
      wout[j] = 0.0f;
    }
    return;
  }
  const T* z_row = static_cast<const T*>(p.logits) + t * E;
  float* key = smem + size_t(warp) * stride_floats;
  const int method = p.method;
  const bool sigmoid_key =
      method == MOE_ROUTING_DEEPSEEK_V3 || (method == MOE_ROUTING_SIGMOID_TOPK && p.bias);
  const bool softmax_all =
      method == MOE_ROUTING_SOFTMAX_TOPK || method == MOE_ROUTING_GROUPED_SOFTMAX;

  // Selection keys; -inf marks "not selectable". Softmax max over selectable z.
  float m = -INFINITY;
  for (int e = lane; e < E; e += 32) {
    const float z = to_f32(z_row[e]);
    const float kk = sigmoid_key ? sigmoid(z) + (p.bias ? p.bias[e] : 0.0f) : z;
    const bool ok = selectable(z) && selectable(kk);
    key[e] = ok ? kk : -INFINITY;
    if (ok) m = fmaxf(m, z);
  }
  float den = 0.0f;
  int n_inf = 0;
  if (softmax_all) {
    m = warp_max(m);
    if (m == INFINITY) {
      for (int e = lane; e < E; e += 32) n_inf += key[e] == INFINITY;
      n_inf = warp_sum_int(n_inf);
    } else if (m != -INFINITY) {
      // exp in parallel, summed in ascending expert order as the CPU does, so
      // the weights agree to rounding (a tree sum differs by up to E ulps).
      for (int base = 0; base < E; base += 32) {
        const int e = base + lane;
        const float v = e < E ? key[e] : -INFINITY;  // key == z for softmax methods
        const float x = v == -INFINITY ? 0.0f : expf(v - m);
#pragma unroll
        for (int l = 0; l < 32; ++l) den += __shfl_sync(kFullMask, x, l);
      }
    }
  }
  __syncwarp();

  // Group stage: keep the topk_group best groups, mask the others.
  if (is_grouped(method, p.n_group)) {
    const int ng = p.n_group, gsize = E / ng;
    const int max_count = method == MOE_ROUTING_DEEPSEEK_V3 ? 2 : 1;
    float* gscore = key + E;
    int* gcnt = reinterpret_cast<int*>(gscore + ng);
    for (int g = lane; g < ng; g += 32) {
      float top1 = -INFINITY, top2 = -INFINITY;
      int count = 0;
      for (int e = g * gsize; e < (g + 1) * gsize; ++e) {
        const float v = key[e];
        if (v == -INFINITY) continue;
        ++count;
        if (v > top1) {
          top2 = top1;
          top1 = v;
        } else if (v > top2) {
          top2 = v;
        }
      }
      count = min(count, max_count);
      gcnt[g] = count;
      gscore[g] = count == 2 ? top1 + top2 : top1;
    }
    __syncwarp();
    for (int r = 0; r < p.topk_group; ++r) {
      int bc = 0, bi = INT_MAX;
      float bs = -INFINITY;
      for (int g = lane; g < ng; g += 32) {
        const int c = gcnt[g];
        if (c > 0 && group_better(c, gscore[g], g, bc, bs, bi)) {
          bc = c;
          bs = gscore[g];
          bi = g;
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const int oc = __shfl_xor_sync(kFullMask, bc, o);
        const float os = __shfl_xor_sync(kFullMask, bs, o);
        const int oi = __shfl_xor_sync(kFullMask, bi, o);
        if (oc > 0 && (bc == 0 || group_better(oc, os, oi, bc, bs, bi))) {
          bc = oc;
          bs = os;
          bi = oi;
        }
      }
      if (bi == INT_MAX) break;
      __syncwarp();  // every lane's reads of this round precede the write
      if (lane == 0) gcnt[bi] = -1;  // kept
      __syncwarp();
    }
    __syncwarp();
    for (int e = lane; e < E; e += 32)
      if (gcnt[e / gsize] >= 0) key[e] = -INFINITY;
    __syncwarp();
  }

  // Top-k: k rounds of warp argmax; a chosen expert's key becomes -inf.
  int n = 0;
  for (; n < p.k; ++n) {
    float bv = -INFINITY;
    int bi = INT_MAX;
    for (int e = lane; e < E; e += 32) {
      const float v = key[e];
      if (v != -INFINITY && better(v, e, bv, bi)) {
        bv = v;
        bi = e;
      }
    }
    warp_argmax(bv, bi);
    if (bi == INT_MAX) break;
    __syncwarp();  // every lane's reads of this round precede the write
    if (lane == 0) {
      ids[n] = bi;
      key[bi] = -INFINITY;
    }
    __syncwarp();
  }

  // Weights: one lane, in slot order, the CPU's summation order.
  if (lane == 0) {
    auto zsel = [&](int i) { return to_f32(z_row[ids[i]]); };
    float denom = 1.0f;
    bool divide = false;
    float tm = -INFINITY, tden = 0.0f;
    int tinf = 0;
    auto raw = [&](int i) -> float {
      const float z = zsel(i);
      switch (method) {
        case MOE_ROUTING_SOFTMAX_TOPK:
        case MOE_ROUTING_GROUPED_SOFTMAX:
          if (m == INFINITY) return z == INFINITY ? 1.0f / float(n_inf) : 0.0f;
          return expf(z - m) / den;
        case MOE_ROUTING_TOPK_SOFTMAX:
          if (tm == INFINITY) return z == INFINITY ? 1.0f / float(tinf) : 0.0f;
          return expf(z - tm) / tden;
        default:  // SIGMOID_TOPK, DEEPSEEK_V3, LLAMA4
          return sigmoid(z);
      }
    };
    if (method == MOE_ROUTING_TOPK_SOFTMAX && n > 0) {
      for (int i = 0; i < n; ++i) tm = fmaxf(tm, zsel(i));
      if (tm == INFINITY) {
        for (int i = 0; i < n; ++i) tinf += zsel(i) == INFINITY;
      } else {
        for (int i = 0; i < n; ++i) tden += expf(zsel(i) - tm);
      }
    }
    const bool renorm = p.renormalize && method != MOE_ROUTING_TOPK_SOFTMAX &&
                        method != MOE_ROUTING_LLAMA4 && n > 0;
    if (renorm) {
      float sum = 0.0f;
      for (int i = 0; i < n; ++i) sum += raw(i);
      const bool sig = method == MOE_ROUTING_SIGMOID_TOPK || method == MOE_ROUTING_DEEPSEEK_V3;
      denom = sig ? sum + 1e-20f : sum;
      divide = true;
    }
    for (int i = 0; i < n; ++i) {
      float w = raw(i);
      if (divide) w /= denom;
      wout[i] = w * p.weight_scale;
    }
    for (int i = n; i < p.k; ++i) {
      ids[i] = -1;
      wout[i] = 0.0f;
    }
  }
  for (int j = lane; j < p.n_shared; j += 32) {
    ids[p.k + j] = E + j;
    wout[p.k + j] = p.shared_weight;
  }
}

// --- DEEPSEEK_V3 fast path: E = 32 * V, lane l holds experts l*V .. l*V+V-1 -
// Same decisions and arithmetic as route_kernel, with the keys in registers:
// one coalesced vector load of the row, group top-2 by shuffles within the
// lanes of a group, k rounds of a warp-wide (key, lower index) argmax.

constexpr int kFastWarps = 4;  // tokens per block (one warp each)

// Whether 32 % n_group == 0, so that each lane's experts lie in one group.
bool fast_groups_fit(int n_group) { return n_group >= 1 && n_group <= 32 && 32 % n_group == 0; }

// V consecutive elements as f32, read in the widest aligned vectors: the row
// offset is a multiple of V elements, so a chunk of gcd(V * sizeof(T), 16)
// bytes is aligned when the base pointer is 16-byte aligned.
template <class T, int V>
__device__ __forceinline__ void load_f32(const T* __restrict__ src, float (&out)[V]) {
  constexpr int kBytes = V * int(sizeof(T));
  constexpr int kChunk = kBytes % 16 == 0 ? 16 : kBytes % 8 == 0 ? 8 : kBytes % 4 == 0 ? 4 : 2;
  using Vec = typename std::conditional<
      kChunk == 16, uint4,
      typename std::conditional<kChunk == 8, uint2,
                                typename std::conditional<kChunk == 4, uint32_t,
                                                          uint16_t>::type>::type>::type;
  static_assert(int(sizeof(Vec)) == kChunk && kBytes % kChunk == 0, "chunking");
  union {
    Vec v[kBytes / kChunk];
    T e[V];
  } buf;
  const Vec* s = reinterpret_cast<const Vec*>(src);
#pragma unroll
  for (int c = 0; c < kBytes / kChunk; ++c) buf.v[c] = s[c];
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = to_f32(buf.e[j]);
}

// Order-preserving map of a non-NaN float to uint32 (-0 counts as +0, as
// float == does: x + 0.0f turns -0 into +0); -inf, "not selectable", maps
// to 0, which no selectable key takes.
__device__ __forceinline__ uint32_t key_bits(float x) {
  const uint32_t u = __float_as_uint(x + 0.0f);
  const uint32_t k = u ^ (uint32_t(int32_t(u) >> 31) | 0x80000000u);
  return x == -INFINITY ? 0u : k;
}

// 1 / x for 1 <= x < 2^126: the approximate reciprocal and one Newton step,
// which is the fast path CUDA's IEEE division takes for such x (so the same
// bits as 1.0f / x), without its per-value range check and branch.
__device__ __forceinline__ float recip_fast(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return fmaf(r, fmaf(-x, r, 1.0f), r);
}

__device__ __forceinline__ uint32_t warp_max_u32(uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(kFullMask, v);
#else
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
#endif
}

// The lane's best two candidates in (larger ordered key, lower j) order among
// the keys whose bit in `taken` is clear (key 0: none). Scanning j upwards
// with strict compares keeps the lower j ahead on equal keys.
template <int V>
__device__ __forceinline__ void lane_top2(const uint32_t (&key)[V], unsigned taken, uint32_t& b1,
                                          int& j1, uint32_t& b2, int& j2) {
  b1 = b2 = 0;
  j1 = j2 = 0;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const uint32_t v = (taken >> j & 1u) ? 0u : key[j];
    const bool first = v > b1, second = v > b2;
    b2 = first ? b1 : (second ? v : b2);
    j2 = first ? j1 : (second ? j : j2);
    b1 = first ? v : b1;
    j1 = first ? j : j1;
  }
}

template <class T, int V>
__global__ void __launch_bounds__(32 * kFastWarps, V <= 8 ? 8 : 4)
    route_dsv3_kernel(RouteParams p) {
  pdl_wait();  // first: see launch_pdl
  pdl_trigger();
  constexpr int E = 32 * V;
  __shared__ float s_smem[kFastWarps][E];
  __shared__ int32_t id_smem[kFastWarps][32];
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kFastWarps + (threadIdx.x >> 5);
  if (t >= p.T) return;  // uniform per warp

  // Every load is issued first; a padded row (t >= valid) is computed anyway
  // and discarded at the end, so that no load waits on num_valid.
  float z[V], b[V];
  load_f32<T, V>(static_cast<const T*>(p.logits) + t * E + lane * V, z);
  if (p.bias) {
    load_f32<float, V>(p.bias + lane * V, b);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) b[j] = 0.0f;
  }
  int64_t valid = p.T;
  if (p.num_valid) {
    const int64_t nv = *p.num_valid;
    valid = nv < 0 ? 0 : (nv < p.T ? nv : p.T);
  }

  // s = sigmoid(z) (the weight), c = s + b (the key; -inf: not selectable).
  // The reciprocal's fast path for every value; only where a lane holds a
  // NaN, Inf or huge 1 + exp(-z) does the warp redo them by IEEE division.
  float s[V], c[V];
  bool exact = false;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float x = 1.0f + expf(-z[j]);
    exact |= !(x < 0x1p126f);
    s[j] = recip_fast(x);
  }
  if (__any_sync(kFullMask, exact)) {
#pragma unroll
    for (int j = 0; j < V; ++j) s[j] = sigmoid(z[j]);
  }
  // selectable(z) && selectable(kk) in two compares: a NaN z makes s and
  // kk NaN, and kk > -inf is false for NaN and -inf.
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float kk = s[j] + b[j];
    c[j] = z[j] != -INFINITY && kk > -INFINITY ? kk : -INFINITY;
  }

  // Group stage: the L = 32 / n_group lanes of a group merge their top-2
  // (n_group divides 32: a power of two, so shifts, not divisions).
  if (p.n_group > 1) {
    const int lg = __ffs(p.n_group) - 1, L = 32 >> lg;
    // Top-2 of the lane's keys as a multiset (equal values both count),
    // branch-free: a -inf key (not selectable) changes neither.
    float t1 = -INFINITY, t2 = -INFINITY;
    int cnt = 0;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float v = c[j];
      cnt += v != -INFINITY;
      t2 = fmaxf(t2, fminf(t1, v));
      t1 = fmaxf(t1, v);
    }
    for (int o = 1; o < L; o <<= 1) {
      const float o1 = __shfl_xor_sync(kFullMask, t1, o);
      const float o2 = __shfl_xor_sync(kFullMask, t2, o);
      cnt += __shfl_xor_sync(kFullMask, cnt, o);
      // Top-2 of the union (a multiset: equal values both count). No NaN here.
      t2 = fmaxf(fminf(t1, o1), fmaxf(t2, o2));
      t1 = fmaxf(t1, o1);
    }
    cnt = min(cnt, 2);
    const float score = cnt == 2 ? t1 + t2 : t1;
    const int g = lane >> (5 - lg);
    int rank = 0;  // groups ranked above g
    for (int h = 0; h < p.n_group; ++h) {
      const int hc = __shfl_sync(kFullMask, cnt, h * L);
      const float hs = __shfl_sync(kFullMask, score, h * L);
      rank += group_better(hc, hs, h, cnt, score, g) ? 1 : 0;
    }
    if (cnt == 0 || rank >= p.topk_group) {
#pragma unroll
      for (int j = 0; j < V; ++j) c[j] = -INFINITY;
    }
  }

  uint32_t key[V];
#pragma unroll
  for (int j = 0; j < V; ++j) key[j] = key_bits(c[j]);

  // The weights, for the chosen experts' lookup after the top-k rounds.
  float* s_row = s_smem[threadIdx.x >> 5];
#pragma unroll
  for (int j = 0; j < V; ++j) s_row[lane * V + j] = s[j];

  // Top-k: k rounds of a warp-wide max of each lane's best key. Lane l holds
  // experts l*V .. l*V+V-1, so among lanes whose best equals the maximum the
  // lowest lane holds the lowest expert: the (key, lower index) winner
  // without a second reduction. Each lane keeps its best two keys; a lane
  // that wins rescans only when it wins again with its second already used.
  int32_t* id_row = id_smem[threadIdx.x >> 5];
  uint32_t b1, b2;
  int j1, j2;
  lane_top2<V>(key, 0u, b1, j1, b2, j2);
  unsigned taken = 0;
  bool have2 = true;
  int n = 0;
  for (; n < p.k; ++n) {
    const uint32_t m = warp_max_u32(b1);
    if (m == 0) break;  // no selectable expert left (uniform)
    if (lane == __ffs(__ballot_sync(kFullMask, b1 == m)) - 1) {
      id_row[n] = lane * V + j1;
      taken |= 1u << j1;
      if (have2) {
        b1 = b2;
        j1 = j2;
        have2 = false;
      } else {
        lane_top2<V>(key, taken, b1, j1, b2, j2);
        have2 = true;
      }
    }
  }
  __syncwarp();
  // Lane i < n: the expert of slot i and its weight.
  const int my_id = lane < n ? id_row[lane] : -1;
  const float my_s = lane < n ? s_row[my_id] : 0.0f;
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) sum += __shfl_sync(kFullMask, my_s, i);

  const int cols = p.k + p.n_shared;
  int32_t* ids = p.ids + t * cols;
  float* wout = p.weights + t * cols;
  const bool row_valid = t < valid;
  const float denom = sum + 1e-20f;
  for (int j = lane; j < cols; j += 32) {
    int32_t id = -1;
    float w = 0.0f;
    if (row_valid) {
      if (j < n) {  // j == lane: n <= k <= 32
        id = my_id;
        w = my_s;
        if (p.renormalize) w /= denom;
        w *= p.weight_scale;
      } else if (j >= p.k) {
        id = E + (j - p.k);
        w = p.shared_weight;
      }
    }
    ids[j] = id;
    wout[j] = w;
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// The instantiated experts per lane: E = 64, 128, 160, 256, 384, 512.
bool fast_v_supported(int V) {
  return V == 2 || V == 4 || V == 5 || V == 8 || V == 12 || V == 16;
}

bool use_fast_path(const RouteParams& p) {
  return p.method == MOE_ROUTING_DEEPSEEK_V3 && p.E % 32 == 0 && fast_v_supported(p.E / 32) &&
         p.k <= 32 && fast_groups_fit(p.n_group) && aligned16(p.logits) &&
         (!p.bias || aligned16(p.bias));
}

template <class T, int V>
cudaError_t launch_fast_v(const RouteParams& p, cudaStream_t stream) {
  const int blocks = ceil_div(p.T, kFastWarps);
  return launch_pdl(route_dsv3_kernel<T, V>, dim3(blocks), dim3(32 * kFastWarps), 0, stream, p);
}

template <class T>
cudaError_t launch_fast(const RouteParams& p, cudaStream_t stream) {
  switch (p.E / 32) {
    case 2: return launch_fast_v<T, 2>(p, stream);
    case 4: return launch_fast_v<T, 4>(p, stream);
    case 5: return launch_fast_v<T, 5>(p, stream);
    case 8: return launch_fast_v<T, 8>(p, stream);
    case 12: return launch_fast_v<T, 12>(p, stream);
    default: return launch_fast_v<T, 16>(p, stream);
  }
}

__device__ __forceinline__ uint32_t bf16_bits(float f) {
  // Round to nearest even; NaN stays a quiet NaN (the CPU backend's rule).
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return ((u >> 16) | 0x40u) & 0xffffu;
  u += 0x7fffu + ((u >> 16) & 1u);
  return u >> 16;
}

__global__ void pack_topk_kernel(PackParams p) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n;
       i += int64_t(gridDim.x) * blockDim.x) {
    // uint32 arithmetic: -1 becomes 0xFFFF0000 (skipped by consumers).
    const uint32_t hi = uint32_t(p.ids[i]) << 16;
    p.packed[i] = int32_t(hi | bf16_bits(p.weights[i]));
  }
}

int optin_smem_limit() {
  int dev = 0, limit = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return int(kDefaultSmem);
  if (cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return int(kDefaultSmem);
  return limit;
}

template <class T>
cudaError_t launch_typed(const RouteParams& p, cudaStream_t stream) {
  const int stride = int(smem_floats_per_warp(p.E, p.n_group, p.method));
  const size_t per_warp = size_t(stride) * sizeof(float);
  int wpb = int(kDefaultSmem / per_warp);
  wpb = wpb < 1 ? 1 : (wpb > kMaxWarpsPerBlock ? kMaxWarpsPerBlock : wpb);
  const size_t smem = per_warp * wpb;
  if (smem > kDefaultSmem) {
    cudaError_t err =
        cudaFuncSetAttribute(route_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  const int blocks = ceil_div(p.T, wpb);
  return launch_pdl(route_kernel<T>, dim3(blocks), dim3(32 * wpb), smem, stream, p, wpb, stride);
}

}  // namespace

bool route_fits(int E, int n_group, int method) {
  return smem_floats_per_warp(E, n_group, method) * sizeof(float) <= size_t(optin_smem_limit());
}

cudaError_t launch_route(const RouteParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  if (use_fast_path(p)) {
    switch (p.logits_dtype) {
      case DType::bf16: return launch_fast<__nv_bfloat16>(p, stream);
      case DType::f16: return launch_fast<__half>(p, stream);
      default: return launch_fast<float>(p, stream);
    }
  }
  switch (p.logits_dtype) {
    case DType::bf16: return launch_typed<__nv_bfloat16>(p, stream);
    case DType::f16: return launch_typed<__half>(p, stream);
    default: return launch_typed<float>(p, stream);
  }
}

cudaError_t launch_pack_topk(const PackParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  const int threads = 256;
  const int blocks = int(std::min<int64_t>((p.n + threads - 1) / threads, 4096));
  pack_topk_kernel<<<blocks, threads, 0, stream>>>(p);
  return launch_status();
}

}  // namespace moe::kernels
