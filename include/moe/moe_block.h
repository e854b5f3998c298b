/*
 * libmoe: the complete MoE block (gate projection, shared experts, one call).
 *
 * Same conventions as moe/moe.h (which this header includes): moe_ prefix,
 * moe_status_t returns, config structs with struct_size and *_default(),
 * DLPack tensors, CUDA streams as void*, a workspace-size query and a
 * caller workspace (or NULL with 0 bytes for one the library owns; calls
 * that use it are serialized per device). See docs/block.md.
 *
 *   block(x) = routed(x) + shared(x)
 *   routed(x): logits = x . W_g^T in f32 -> route -> dispatch -> run
 *              (routed_scaling_factor applies here only)
 *   shared(x) = g(x) * sum_s W2_s . act(W13_s . x),
 *              g(x) = sigmoid(x . w_sg) with a shared gate (Qwen2-MoE), else 1
 */
#ifndef MOE_MOE_BLOCK_H_
#define MOE_MOE_BLOCK_H_

#include "moe/moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* Gate projection: hidden states -> f32 logits -> routing                   */
/* ------------------------------------------------------------------------ */

/* Workspace bytes of moe_router_run_hidden for up to max_tokens tokens of
 * hidden size hidden_size on device_type (kDLCPU or kDLCUDA). */
MOE_API moe_status_t moe_router_hidden_workspace_size(moe_router_t router,
                                                      int32_t hidden_size,
                                                      int64_t max_tokens,
                                                      int32_t device_type,
                                                      size_t* bytes);

/*
 * Route from hidden states: logits = hidden . gate_weight^T computed in f32
 * (any mix of f32/f16/bf16 inputs; the CUDA backend uses cuBLASLt with an f32
 * output), then moe_router_run on those f32 logits.
 *   hidden       [T, H]  f32/f16/bf16
 *   gate_weight  [E, H]  f32/f16/bf16 (E = the router's num_experts)
 *   correction_bias, num_valid_tokens, topk_ids, topk_weights: as in
 *                moe_router_run
 *   logits       NULL, or [T, E] f32: receives the logits (otherwise they
 *                live in the workspace)
 * workspace: at least moe_router_hidden_workspace_size() bytes, 256-byte
 * aligned, on the tensors' device; or NULL with 0.
 */
MOE_API moe_status_t moe_router_run_hidden(moe_router_t router, const DLTensor* hidden,
                                           const DLTensor* gate_weight,
                                           const DLTensor* correction_bias,
                                           const DLTensor* num_valid_tokens,
                                           DLTensor* topk_ids, DLTensor* topk_weights,
                                           DLTensor* logits, void* workspace,
                                           size_t workspace_bytes, void* stream);

/* ------------------------------------------------------------------------ */
/* Shared experts: n_shared dense MLPs every token goes through               */
/* ------------------------------------------------------------------------ */

typedef struct moe_shared_experts_s* moe_shared_experts_t;

typedef struct moe_shared_experts_config_t {
  uint32_t struct_size;          /* sizeof(moe_shared_experts_config_t) of the caller */
  int32_t num_shared_experts;    /* n_shared >= 1 (default 1) */
  int32_t hidden_size;           /* H */
  int32_t intermediate_size;     /* I_shared of one shared expert */
  int32_t activation;            /* moe_activation_t (default SILU) */
  int32_t gated;                 /* 1: w13 is [n, 2I, H], h = act(gate) * up (default 1) */
  int32_t swap_gate_up;          /* 1: w13 rows are [up; gate] */
} moe_shared_experts_config_t;

MOE_API moe_status_t moe_shared_experts_config_default(moe_shared_experts_config_t* config);
MOE_API moe_status_t moe_shared_experts_create(const moe_shared_experts_config_t* config,
                                               moe_shared_experts_t* shared);
/* NULL is fine. */
MOE_API moe_status_t moe_shared_experts_destroy(moe_shared_experts_t shared);

/*
 * Borrow the weights (kept alive and unchanged by the caller), row-major
 * [out, in]:
 *   w13          [n_shared, 2 * I_shared, H] (gated) or [n_shared, I_shared, H]
 *   w2           [n_shared, H, I_shared], the dtype of w13 (f32/f16/bf16)
 *   gate_weight  NULL, or [1, H] f32/f16/bf16: the per-token sigmoid gate
 *                sigmoid(x . gate_weight) that scales the sum of the shared
 *                experts (Qwen2-MoE's shared_expert_gate)
 * All on one device. Must not run concurrently with other calls on the handle.
 */
MOE_API moe_status_t moe_shared_experts_set_weights(moe_shared_experts_t shared,
                                                    const DLTensor* w13, const DLTensor* w2,
                                                    const DLTensor* gate_weight);

/* Workspace bytes of moe_shared_experts_run for up to max_tokens tokens. */
MOE_API moe_status_t moe_shared_experts_workspace_size(moe_shared_experts_t shared,
                                                       int64_t max_tokens,
                                                       int32_t device_type, size_t* bytes);

/*
 * output = shared(hidden) (accumulate = 0) or output + shared(hidden)
 * (accumulate = 1), summed in f32 and rounded once to output's dtype.
 * hidden [T, H] and output [T, H] of one float dtype, on the weights' device
 * (the CUDA backend needs the weights' dtype too). num_valid_tokens: NULL or
 * int32 [1] on that device; rows at or past it are set to 0.
 */
MOE_API moe_status_t moe_shared_experts_run(moe_shared_experts_t shared, const DLTensor* hidden,
                                            const DLTensor* num_valid_tokens, DLTensor* output,
                                            int32_t accumulate, void* workspace,
                                            size_t workspace_bytes, void* stream);

/* ------------------------------------------------------------------------ */
/* The one-call block                                                        */
/* ------------------------------------------------------------------------ */

/* Workspace bytes of moe_block_forward for up to max_tokens tokens; shared
 * may be NULL. */
MOE_API moe_status_t moe_block_workspace_size(moe_router_t router, moe_dispatcher_t dispatcher,
                                              moe_runner_t runner, moe_shared_experts_t shared,
                                              int64_t max_tokens, int32_t device_type,
                                              size_t* bytes);

/*
 * output = routed(hidden) + shared(hidden): gate -> route -> dispatch ->
 * routed experts (moe_layer_forward) -> shared experts -> sum. shared may be
 * NULL (no shared experts). Every intermediate lives in the workspace; with
 * a caller workspace the CUDA path neither allocates nor synchronises, so
 * the block can be captured in a CUDA graph (run it once eagerly first so
 * that cuBLASLt's per-shape algorithm choice is made outside the capture).
 * On CUDA the shared experts run on a second stream forked from and joined
 * back into `stream`; the result does not depend on the overlap. Rows at or
 * past num_valid_tokens are set to 0.
 */
MOE_API moe_status_t moe_block_forward(moe_router_t router, moe_dispatcher_t dispatcher,
                                       moe_runner_t runner, moe_shared_experts_t shared,
                                       const DLTensor* hidden, const DLTensor* gate_weight,
                                       const DLTensor* correction_bias,
                                       const DLTensor* num_valid_tokens, DLTensor* output,
                                       void* workspace, size_t workspace_bytes, void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* MOE_MOE_BLOCK_H_ */
