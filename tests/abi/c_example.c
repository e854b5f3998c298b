/* The README's minimal C example: route 4 tokens over 8 experts (top-2) and
 * run a tiny MoE layer on the CPU in one call. Exits non-zero on failure. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <moe/moe.h>

#define CHECK(call)                                                          \
  do {                                                                       \
    moe_status_t st = (call);                                                \
    if (st != MOE_STATUS_SUCCESS) {                                          \
      fprintf(stderr, "%s failed: %s: %s\n", #call, moe_status_string(st),   \
              moe_last_error());                                             \
      return 1;                                                              \
    }                                                                        \
  } while (0)

static DLTensor tensor(void* data, int ndim, int64_t* shape, uint8_t code, uint8_t bits) {
  DLTensor t;
  t.data = data;
  t.device.device_type = kDLCPU;
  t.device.device_id = 0;
  t.ndim = ndim;
  t.dtype.code = code;
  t.dtype.bits = bits;
  t.dtype.lanes = 1;
  t.shape = shape;
  t.strides = NULL; /* row-major contiguous */
  t.byte_offset = 0;
  return t;
}

int main(void) {
  enum { T = 4, E = 8, K = 2, H = 16, I = 32 };
  static float x[T * H], logits[T * E], y[T * H];
  static float w13[E * 2 * I * H], w2[E * H * I];
  int64_t x_shape[2] = {T, H}, l_shape[2] = {T, E};
  int64_t w13_shape[3] = {E, 2 * I, H}, w2_shape[3] = {E, H, I};
  moe_router_config_t rc;
  moe_dispatcher_config_t dc;
  moe_runner_config_t uc;
  moe_router_t router = NULL;
  moe_dispatcher_t dispatcher = NULL;
  moe_runner_t runner = NULL;
  DLTensor tx, tl, ty, tw13, tw2;
  int i;
  double sum = 0;

  for (i = 0; i < T * H; ++i) x[i] = (float)sin(0.1 * i);
  for (i = 0; i < T * E; ++i) logits[i] = (float)cos(0.37 * i);
  for (i = 0; i < E * 2 * I * H; ++i) w13[i] = (float)(0.05 * sin(0.013 * i));
  for (i = 0; i < E * H * I; ++i) w2[i] = (float)(0.05 * cos(0.017 * i));

  rc.struct_size = (uint32_t)sizeof(rc);
  CHECK(moe_router_config_default(&rc, MOE_ROUTING_SOFTMAX_TOPK));
  rc.num_experts = E;
  rc.top_k = K;
  rc.renormalize = 1;
  CHECK(moe_router_create(&rc, &router));

  dc.struct_size = (uint32_t)sizeof(dc);
  CHECK(moe_dispatcher_config_default(&dc));
  dc.num_experts = E;
  CHECK(moe_dispatcher_create(&dc, &dispatcher));

  uc.struct_size = (uint32_t)sizeof(uc);
  CHECK(moe_runner_config_default(&uc));
  uc.num_experts = E;
  uc.hidden_size = H;
  uc.intermediate_size = I;
  uc.activation = MOE_ACTIVATION_SILU;
  CHECK(moe_runner_create(&uc, &runner));
  tw13 = tensor(w13, 3, w13_shape, kDLFloat, 32);
  tw2 = tensor(w2, 3, w2_shape, kDLFloat, 32);
  CHECK(moe_runner_set_weights(runner, &tw13, &tw2, NULL, NULL, NULL, NULL));

  tx = tensor(x, 2, x_shape, kDLFloat, 32);
  tl = tensor(logits, 2, l_shape, kDLFloat, 32);
  ty = tensor(y, 2, x_shape, kDLFloat, 32);
  /* NULL workspace: the library allocates and keeps its own. */
  CHECK(moe_layer_forward(router, dispatcher, runner, &tx, &tl, NULL, NULL, &ty, NULL, 0, NULL));

  for (i = 0; i < T * H; ++i) sum += fabs(y[i]);
  printf("libmoe %s: layer output L1 norm %.6f\n", moe_version_string(), sum);
  moe_runner_destroy(runner);
  moe_dispatcher_destroy(dispatcher);
  moe_router_destroy(router);
  return (sum > 0 && isfinite(sum)) ? 0 : 1;
}
