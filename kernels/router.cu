#include "router.cuh"

#include <climits>

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
  route_kernel<T><<<blocks, 32 * wpb, smem, stream>>>(p, wpb, stride);
  return launch_status();
}

}  // namespace

bool route_fits(int E, int n_group, int method) {
  return smem_floats_per_warp(E, n_group, method) * sizeof(float) <= size_t(optin_smem_limit());
}

cudaError_t launch_route(const RouteParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
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
