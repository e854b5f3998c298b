/*
 * An expert-parallel MoE layer in C on RANKS GPUs: each GPU is one rank of an
 * NCCL communicator and holds 8 of the E = 8 * RANKS experts. Per rank:
 *   route (GPU) -> moe_a2a_dispatch -> local routing metadata
 *   (moe_dispatcher_dispatch) -> moe_runner_run -> moe_a2a_combine
 * then checks every token's output against the CPU backend's one-rank
 * layer on the same tokens, and prints the step time.
 *
 * One process drives every GPU: ncclCommInitAll makes the RANKS
 * communicators and one thread per rank makes the (collective) calls.
 *
 * Build and run (from the repository root, on a machine with >= 2 GPUs):
 *   cmake -S . -B build -G Ninja && ninja -C build nccl_ep_layer
 *   NCCL_NVLS_ENABLE=0 ./build/tests/nccl/nccl_ep_layer [RANKS]
 * RANKS defaults to every visible GPU, at most 8.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include "moe/moe.h"
#include "moe/moe_nccl.h"

enum { EXPERTS_PER_RANK = 8, K = 4, H = 256, I = 128, T = 96, ITERS = 20, MAX_DEFAULT_RANKS = 8 };

#define CHECK_MOE(call)                                                             \
  do {                                                                              \
    moe_status_t st_ = (call);                                                      \
    if (st_ != MOE_STATUS_SUCCESS) {                                                \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, moe_status_string(st_), \
              moe_last_error());                                                    \
      exit(1);                                                                      \
    }                                                                               \
  } while (0)
#define CHECK_CUDA(call)                                                                    \
  do {                                                                                      \
    cudaError_t e_ = (call);                                                                \
    if (e_ != cudaSuccess) {                                                                \
      fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));           \
      exit(1);                                                                              \
    }                                                                                       \
  } while (0)

static const DLDataType F32 = {kDLFloat, 32, 1};
static const DLDataType I32 = {kDLInt, 32, 1};

/* A tensor descriptor; shape points into `dims` of the caller. */
static DLTensor tensor(void* data, int on_gpu, int device, DLDataType dt, int ndim, int64_t* dims) {
  DLTensor t;
  memset(&t, 0, sizeof(t));
  t.data = data;
  t.device.device_type = on_gpu ? kDLCUDA : kDLCPU;
  t.device.device_id = on_gpu ? device : 0;
  t.ndim = ndim;
  t.dtype = dt;
  t.shape = dims;
  return t;
}

static void* gpu_alloc(size_t bytes) {
  void* p = NULL;
  CHECK_CUDA(cudaMalloc(&p, bytes ? bytes : 1));
  return p;
}

static void* gpu_copy(const void* host, size_t bytes) {
  void* p = gpu_alloc(bytes);
  CHECK_CUDA(cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice));
  return p;
}

/* Deterministic uniform values in [-scale, scale). */
static void fill(float* x, size_t n, unsigned seed, float scale) {
  unsigned s = seed * 2654435761u + 1u;
  for (size_t i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    x[i] = scale * (2.0f * (float)(s >> 8) / 16777216.0f - 1.0f);
  }
}

/* Set once in main before any rank thread starts. */
static int num_ranks, num_experts; /* RANKS and E = EXPERTS_PER_RANK * RANKS */
static float *w13, *w2;             /* [E, 2I, H], [E, H, I] */
static ncclComm_t* comms;

struct rank_state {
  int rank;
  float hidden[T * H], output[T * H];
  float* logits; /* [T, E] */
  double step_us;
};

static void* host_alloc(size_t bytes) {
  void* p = malloc(bytes ? bytes : 1);
  if (!p) {
    fprintf(stderr, "out of host memory (%zu bytes)\n", bytes);
    exit(1);
  }
  return p;
}

static moe_router_t make_router(void) {
  moe_router_config_t rc;
  moe_router_t router;
  rc.struct_size = (uint32_t)sizeof(rc);
  CHECK_MOE(moe_router_config_default(&rc, MOE_ROUTING_SOFTMAX_TOPK));
  rc.num_experts = num_experts;
  rc.top_k = K;
  rc.renormalize = 1;
  CHECK_MOE(moe_router_create(&rc, &router));
  return router;
}

static moe_runner_t make_runner(int experts) {
  moe_runner_config_t c;
  moe_runner_t runner;
  c.struct_size = (uint32_t)sizeof(c);
  CHECK_MOE(moe_runner_config_default(&c));
  c.num_experts = experts;
  c.hidden_size = H;
  c.intermediate_size = I;
  CHECK_MOE(moe_runner_create(&c, &runner));
  return runner;
}

static moe_dispatcher_t make_dispatcher(int experts, int on_gpu, int device) {
  moe_dispatcher_config_t c;
  moe_dispatcher_t d;
  c.struct_size = (uint32_t)sizeof(c);
  CHECK_MOE(moe_dispatcher_config_default(&c));
  c.num_experts = experts;
  c.device_type = on_gpu ? kDLCUDA : kDLCPU;
  c.device_id = on_gpu ? device : 0;
  CHECK_MOE(moe_dispatcher_create(&c, &d));
  return d;
}

static void* run_rank(void* arg) {
  struct rank_state* st = (struct rank_state*)arg;
  const int r = st->rank;
  CHECK_CUDA(cudaSetDevice(r));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  /* The all-to-all dispatcher (collective: both ranks create it together). */
  moe_a2a_config_t ac;
  moe_a2a_t a2a;
  ac.struct_size = (uint32_t)sizeof(ac);
  CHECK_MOE(moe_a2a_config_default(&ac));
  ac.num_experts = num_experts;
  ac.ep_size = num_ranks;
  ac.ep_rank = r;
  ac.hidden_size = H;
  ac.hidden_dtype = F32;
  ac.max_tokens_per_rank = T;
  ac.top_k = K;
  CHECK_MOE(moe_a2a_create(&ac, comms[r], &a2a));
  int64_t R;
  int32_t e_loc;
  CHECK_MOE(moe_a2a_buffer_sizes(a2a, &R, &e_loc, NULL));

  /* Contiguous mapping: this rank holds experts [r * e_loc, (r + 1) * e_loc). */
  void* d_w13 = gpu_copy(w13 + (size_t)r * e_loc * 2 * I * H, sizeof(float) * e_loc * 2 * I * H);
  void* d_w2 = gpu_copy(w2 + (size_t)r * e_loc * H * I, sizeof(float) * e_loc * H * I);
  int64_t w13_dims[3] = {e_loc, 2 * I, H}, w2_dims[3] = {e_loc, H, I};
  DLTensor tw13 = tensor(d_w13, 1, r, F32, 3, w13_dims), tw2 = tensor(d_w2, 1, r, F32, 3, w2_dims);
  moe_runner_t runner = make_runner(e_loc);
  CHECK_MOE(moe_runner_set_weights(runner, &tw13, &tw2, NULL, NULL, NULL, NULL));
  /* Received ids are this rank's local ids already: an identity dispatcher over e_loc experts. */
  moe_dispatcher_t local = make_dispatcher(e_loc, 1, r);
  moe_router_t router = make_router();

  int64_t th[2] = {T, H}, te[2] = {T, num_experts}, tk[2] = {T, K}, rh[2] = {R, H};
  int64_t rk[2] = {R, K};
  int64_t ranks[1] = {num_ranks}, el[1] = {e_loc}, el1[1] = {e_loc + 1}, rkn[1] = {R * K};
  DLTensor hidden = tensor(gpu_copy(st->hidden, sizeof st->hidden), 1, r, F32, 2, th);
  DLTensor logits =
      tensor(gpu_copy(st->logits, sizeof(float) * T * num_experts), 1, r, F32, 2, te);
  DLTensor ids = tensor(gpu_alloc(sizeof(int32_t) * T * K), 1, r, I32, 2, tk);
  DLTensor weights = tensor(gpu_alloc(sizeof(float) * T * K), 1, r, F32, 2, tk);
  DLTensor recv_hidden = tensor(gpu_alloc(sizeof(float) * R * H), 1, r, F32, 2, rh);
  DLTensor recv_ids = tensor(gpu_alloc(sizeof(int32_t) * R * K), 1, r, I32, 2, rk);
  DLTensor recv_w = tensor(gpu_alloc(sizeof(float) * R * K), 1, r, F32, 2, rk);
  DLTensor recv_counts = tensor(gpu_alloc(sizeof(int32_t) * num_ranks), 1, r, I32, 1, ranks);
  DLTensor local_ids = tensor(gpu_alloc(sizeof(int32_t) * R * K), 1, r, I32, 2, rk);
  DLTensor counts = tensor(gpu_alloc(sizeof(int32_t) * e_loc), 1, r, I32, 1, el);
  DLTensor offsets = tensor(gpu_alloc(sizeof(int32_t) * (e_loc + 1)), 1, r, I32, 1, el1);
  DLTensor sorted = tensor(gpu_alloc(sizeof(int32_t) * R * K), 1, r, I32, 1, rkn);
  DLTensor expert_out = tensor(gpu_alloc(sizeof(float) * R * H), 1, r, F32, 2, rh);
  DLTensor output = tensor(gpu_alloc(sizeof(float) * T * H), 1, r, F32, 2, th);
  size_t ws_d, ws_r;
  CHECK_MOE(moe_dispatcher_workspace_size(local, R, K, &ws_d));
  CHECK_MOE(moe_runner_workspace_size(runner, R, K, kDLCUDA, &ws_r));
  void* wsd = gpu_alloc(ws_d);
  void* wsr = gpu_alloc(ws_r);

  /* The uploads above ran on the legacy stream, which a non-blocking stream does not wait for. */
  CHECK_CUDA(cudaDeviceSynchronize());
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  for (int it = 0; it <= ITERS; ++it) {
    if (it == 1) CHECK_CUDA(cudaEventRecord(start, stream)); /* iteration 0 warms up */
    CHECK_MOE(moe_router_run(router, &logits, NULL, NULL, &ids, &weights, stream));
    CHECK_MOE(moe_a2a_dispatch(a2a, &hidden, &ids, &weights, &recv_hidden, &recv_ids, &recv_w,
                               &recv_counts, stream));
    CHECK_MOE(moe_dispatcher_dispatch(local, &recv_ids, &local_ids, &counts, &offsets, &sorted,
                                      wsd, ws_d, stream));
    CHECK_MOE(moe_runner_run(runner, &recv_hidden, &local_ids, &recv_w, &offsets, &sorted,
                             &expert_out, wsr, ws_r, stream));
    CHECK_MOE(moe_a2a_combine(a2a, &expert_out, &output, stream));
  }
  CHECK_CUDA(cudaEventRecord(stop, stream));
  CHECK_CUDA(cudaEventSynchronize(stop));
  float ms = 0;
  CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
  st->step_us = 1000.0 * ms / ITERS;
  CHECK_CUDA(cudaMemcpy(st->output, output.data, sizeof st->output, cudaMemcpyDeviceToHost));

  void* bufs[] = {hidden.data, logits.data, ids.data, weights.data, recv_hidden.data,
                  recv_ids.data, recv_w.data, recv_counts.data, local_ids.data, counts.data,
                  offsets.data, sorted.data, expert_out.data, output.data, wsd, wsr, d_w13, d_w2};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; ++i) cudaFree(bufs[i]);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  moe_router_destroy(router);
  moe_dispatcher_destroy(local);
  moe_runner_destroy(runner);
  moe_a2a_destroy(a2a);
  cudaStreamDestroy(stream);
  return NULL;
}

/* The same layer on the CPU backend, one rank holding every expert. */
static double cpu_check(const struct rank_state* st) {
  static float ref[T * H];
  moe_router_t router = make_router();
  moe_dispatcher_t disp = make_dispatcher(num_experts, 0, 0);
  moe_runner_t runner = make_runner(num_experts);
  int64_t w13_dims[3] = {num_experts, 2 * I, H}, w2_dims[3] = {num_experts, H, I};
  int64_t th[2] = {T, H}, te[2] = {T, num_experts};
  DLTensor tw13 = tensor(w13, 0, 0, F32, 3, w13_dims), tw2 = tensor(w2, 0, 0, F32, 3, w2_dims);
  CHECK_MOE(moe_runner_set_weights(runner, &tw13, &tw2, NULL, NULL, NULL, NULL));
  DLTensor hidden = tensor((void*)st->hidden, 0, 0, F32, 2, th);
  DLTensor logits = tensor((void*)st->logits, 0, 0, F32, 2, te);
  DLTensor out = tensor(ref, 0, 0, F32, 2, th);
  CHECK_MOE(moe_layer_forward(router, disp, runner, &hidden, &logits, NULL, NULL, &out, NULL, 0,
                              NULL));
  double num = 0, den = 0;
  for (int i = 0; i < T * H; ++i) {
    double d = (double)st->output[i] - ref[i];
    num += d * d;
    den += (double)ref[i] * ref[i];
  }
  moe_router_destroy(router);
  moe_dispatcher_destroy(disp);
  moe_runner_destroy(runner);
  return isnan(num) ? INFINITY : sqrt(num / den);
}

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
  num_ranks = devices < MAX_DEFAULT_RANKS ? devices : MAX_DEFAULT_RANKS;
  if (argc > 2) {
    fprintf(stderr, "usage: %s [RANKS]\n", argv[0]);
    return 2;
  }
  if (argc == 2) {
    char* end = NULL;
    long v = strtol(argv[1], &end, 10);
    num_ranks = *end == '\0' && v > 0 && v <= devices ? (int)v : -1;
  }
  if (num_ranks < 2) {
    fprintf(stderr, "nccl_ep_layer needs 2 <= RANKS <= visible GPUs (%d)%s%s\n", devices,
            argc == 2 ? "; RANKS = " : "", argc == 2 ? argv[1] : "");
    return 1;
  }
  num_experts = EXPERTS_PER_RANK * num_ranks;
  comms = (ncclComm_t*)host_alloc(sizeof(ncclComm_t) * num_ranks);
  int* list = (int*)host_alloc(sizeof(int) * num_ranks);
  for (int r = 0; r < num_ranks; ++r) list[r] = r;
  ncclResult_t nr = ncclCommInitAll(comms, num_ranks, list);
  free(list);
  if (nr != ncclSuccess) {
    fprintf(stderr, "ncclCommInitAll over %d GPUs: %s\n", num_ranks, ncclGetErrorString(nr));
    return 1;
  }
  const size_t n13 = (size_t)num_experts * 2 * I * H, n2 = (size_t)num_experts * H * I;
  w13 = (float*)host_alloc(sizeof(float) * n13);
  w2 = (float*)host_alloc(sizeof(float) * n2);
  fill(w13, n13, 1, 1.0f / sqrtf((float)H));
  fill(w2, n2, 2, 1.0f / sqrtf((float)I));
  struct rank_state* states =
      (struct rank_state*)host_alloc(sizeof(struct rank_state) * num_ranks);
  pthread_t* threads = (pthread_t*)host_alloc(sizeof(pthread_t) * num_ranks);
  for (int r = 0; r < num_ranks; ++r) {
    states[r].rank = r;
    states[r].logits = (float*)host_alloc(sizeof(float) * T * num_experts);
    fill(states[r].hidden, T * H, 10 + r, 1.0f);
    fill(states[r].logits, (size_t)T * num_experts, 20 + r, 2.0f);
  }
  for (int r = 0; r < num_ranks; ++r) pthread_create(&threads[r], NULL, run_rank, &states[r]);
  for (int r = 0; r < num_ranks; ++r) pthread_join(threads[r], NULL);

  int ok = 1;
  for (int r = 0; r < num_ranks; ++r) {
    double err = cpu_check(&states[r]);
    printf("rank %d of %d: %d tokens, E=%d (%d per rank), k=%d, H=%d, I=%d, f32: "
           "step %.1f us, relative error vs CPU one-rank layer %.3g\n",
           r, num_ranks, T, num_experts, EXPERTS_PER_RANK, K, H, I, states[r].step_us, err);
    ok &= err < 1e-5;
  }
  for (int r = 0; r < num_ranks; ++r) {
    ncclCommDestroy(comms[r]);
    free(states[r].logits);
  }
  free(states);
  free(threads);
  free(comms);
  free(w13);
  free(w2);
  printf(ok ? "OK\n" : "FAILED\n");
  return ok ? 0 : 1;
}
