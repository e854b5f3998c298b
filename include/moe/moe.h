/*
 * libmoe: a Mixture-of-Experts layer library with a stable C ABI.
 *
 * This header compiles as C99 and as C++. It holds no CUDA, NCCL or C++
 * types: CUDA streams cross it as `void*` (a cudaStream_t), tensors as
 * DLPack `DLTensor` (dlpack/dlpack.h).
 *
 * Conventions (see docs/semantics.md for the math):
 *  - Every function returns moe_status_t. On failure moe_last_error() gives a
 *    thread-local message naming the argument, what was expected and what
 *    was received. No C++ exception ever crosses this boundary.
 *  - Config structs begin with `uint32_t struct_size`. Set struct_size to
 *    sizeof(the struct) first, then fill the struct with the matching
 *    *_default() function (which writes only struct_size bytes), then change
 *    fields. The library reads only the first struct_size bytes, so a caller
 *    built against an older header keeps working when fields are appended.
 *  - Enums are append-only; values are never renumbered or reused. Config
 *    fields that hold enum values are int32_t, so their size is fixed.
 *  - The backend follows the tensors: kDLCPU tensors run on the CPU backend,
 *    kDLCUDA tensors on the CUDA backend. Mixing devices in one call is an
 *    error.
 *  - Expert id -1 means "not here": it is skipped by every consumer.
 *
 * Thread safety: handles are immutable after creation, except
 * moe_runner_set_weights(), which must not run concurrently with any other
 * call on the same runner. Any number of threads may call the run/dispatch
 * functions of one handle at once when each call passes its own workspace;
 * calls that pass no workspace use the handle's internal one and are
 * serialized on it by the library (on CUDA also on the device: a call's
 * stream waits, through an event, for the previous call's work on that
 * workspace, whatever stream it ran on).
 */
#ifndef MOE_MOE_H_
#define MOE_MOE_H_

#include <stddef.h>
#include <stdint.h>

#include <dlpack/dlpack.h>

#include "moe/version.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define MOE_API
#elif defined(MOE_BUILDING_LIBRARY)
#define MOE_API __attribute__((visibility("default")))
#else
#define MOE_API
#endif

/* ------------------------------------------------------------------------ */
/* Status and errors                                                         */
/* ------------------------------------------------------------------------ */

typedef enum moe_status_t {
  MOE_STATUS_SUCCESS = 0,
  MOE_STATUS_INVALID_ARGUMENT = 1, /* bad input; moe_last_error() says which */
  MOE_STATUS_UNSUPPORTED = 2,      /* valid, but not implemented for this case */
  MOE_STATUS_OUT_OF_MEMORY = 3,    /* host or device allocation failed */
  MOE_STATUS_CUDA_ERROR = 4,       /* a CUDA runtime or cuBLASLt call failed */
  MOE_STATUS_NCCL_ERROR = 5,       /* an NCCL call failed */
  MOE_STATUS_INTERNAL_ERROR = 6,   /* a bug in libmoe; please report it */
  MOE_STATUS_NOT_AVAILABLE = 7,    /* backend not built in (e.g. no CUDA) */
  MOE_STATUS_NUM_STATUSES          /* count sentinel; grows when values are appended */
} moe_status_t;

/* Static text for a status; never NULL ("unknown status" for unknown values). */
MOE_API const char* moe_status_string(moe_status_t status);

/* The message of the last failed call on this thread ("" if none). Valid
 * until the next libmoe call on the same thread. Never NULL. */
MOE_API const char* moe_last_error(void);

/* ------------------------------------------------------------------------ */
/* Version                                                                   */
/* ------------------------------------------------------------------------ */

/* MOE_VERSION_NUMBER of the library actually loaded:
 * major * 10000 + minor * 100 + patch. Bindings compare it with the
 * MOE_VERSION_NUMBER they were built against (same major required). */
MOE_API uint32_t moe_version(void);

/* "major.minor.patch" of the library actually loaded. */
MOE_API const char* moe_version_string(void);

/* Whether the library was built with the CUDA backend (1) or not (0). */
MOE_API int32_t moe_has_cuda(void);

/* ------------------------------------------------------------------------ */
/* Enums (append-only)                                                       */
/* ------------------------------------------------------------------------ */

typedef enum moe_routing_method_t {
  MOE_ROUTING_SOFTMAX_TOPK = 0,    /* p = softmax(z); topk(p); optional renormalize */
  MOE_ROUTING_TOPK_SOFTMAX = 1,    /* topk(z); softmax over the selected logits */
  MOE_ROUTING_SIGMOID_TOPK = 2,    /* s = sigmoid(z); topk(s + bias) */
  MOE_ROUTING_DEEPSEEK_V3 = 3,     /* grouped noaux_tc (sigmoid, bias, groups) */
  MOE_ROUTING_GROUPED_SOFTMAX = 4, /* DeepSeek-V2 group-limited softmax */
  MOE_ROUTING_LLAMA4 = 5,          /* top-1, sigmoid weight applied on input */
  MOE_ROUTING_NUM_METHODS
} moe_routing_method_t;

typedef enum moe_activation_t {
  MOE_ACTIVATION_SILU = 0,
  MOE_ACTIVATION_GELU = 1,      /* erf form */
  MOE_ACTIVATION_GELU_TANH = 2, /* tanh approximation */
  MOE_ACTIVATION_RELU2 = 3,     /* relu(x)^2 */
  MOE_ACTIVATION_IDENTITY = 4,
  MOE_ACTIVATION_NUM_ACTIVATIONS
} moe_activation_t;

typedef enum moe_quant_mode_t {
  MOE_QUANT_NONE = 0,             /* weights in f32, f16 or bf16 */
  MOE_QUANT_FP8_PER_TENSOR = 1,   /* E4M3 weights, one f32 scale per expert per matrix */
  MOE_QUANT_FP8_BLOCK_128 = 2,    /* E4M3 weights, f32 scales per 128x128 block */
  MOE_QUANT_NUM_MODES
} moe_quant_mode_t;

typedef enum moe_act_scale_mode_t {
  MOE_ACT_SCALE_DYNAMIC = 0, /* activation scales computed on the fly (per token; per 128 columns for BLOCK_128) */
  MOE_ACT_SCALE_STATIC = 1,  /* caller-given per-tensor activation scales (FP8_PER_TENSOR only) */
  MOE_ACT_SCALE_NUM_MODES
} moe_act_scale_mode_t;

/* DLPack >= 1.0 type code of float8 E4M3 (fn variant). dlpack.h 0.x lacks it;
 * libmoe also accepts {kDLUInt, 8, 1} holding E4M3FN bits for FP8 weights. */
#define MOE_DLPACK_CODE_FLOAT8_E4M3FN 10

/* ------------------------------------------------------------------------ */
/* Router: logits [T, E] -> topk_ids [T, k + n_shared] int32,                 */
/*                          topk_weights [T, k + n_shared] f32                */
/* ------------------------------------------------------------------------ */

typedef struct moe_router_s* moe_router_t;

typedef struct moe_router_config_t {
  uint32_t struct_size;          /* sizeof(moe_router_config_t) of the caller */
  int32_t method;                /* moe_routing_method_t */
  int32_t num_experts;           /* E, routed experts (1..65535, ids must fit in int16 for packing) */
  int32_t top_k;                 /* k, 1 <= k <= E */
  int32_t n_group;               /* groups for DEEPSEEK_V3 / GROUPED_SOFTMAX (E % n_group == 0); 1 otherwise */
  int32_t topk_group;            /* groups kept, 1 <= topk_group <= n_group */
  int32_t renormalize;           /* 1: weights of the selected experts are renormalized (default per method) */
  float routed_scaling_factor;   /* multiplies the routed weights (default 1.0) */
  int32_t scaling_on_output;     /* 1: do not scale the weights; the runner applies the factor to its output */
  int32_t num_fused_shared_experts; /* n_shared extra columns with ids E..E+n_shared-1 */
} moe_router_config_t;

/* Defaults for a method: E=0, k=0 (must be set), n_group=topk_group=1,
 * renormalize = 1 for DEEPSEEK_V3 and 0 otherwise, scaling 1.0.
 * config->struct_size must be set (to sizeof(moe_router_config_t)) first. */
MOE_API moe_status_t moe_router_config_default(moe_router_config_t* config,
                                               int32_t method);

MOE_API moe_status_t moe_router_create(const moe_router_config_t* config,
                                       moe_router_t* router);
/* NULL is fine. */
MOE_API moe_status_t moe_router_destroy(moe_router_t router);

/* Columns of topk_ids / topk_weights: top_k + num_fused_shared_experts. */
MOE_API moe_status_t moe_router_output_columns(moe_router_t router,
                                               int32_t* columns);

/*
 * Route. logits [T, E] f32/bf16/f16, row-major contiguous. correction_bias:
 * NULL or [E] f32 (SIGMOID_TOPK and DEEPSEEK_V3 only: it selects, never
 * weights). num_valid_tokens: NULL or an int32 tensor of shape [1] on the
 * logits' device; rows at or past its value get ids -1 and weights 0 (read
 * on the device, so a padded CUDA-graph batch needs no host sync).
 * Fused shared-expert columns get weight 1.0, or 1/routed_scaling_factor
 * when scaling_on_output is set (so the output scale leaves them at 1).
 */
MOE_API moe_status_t moe_router_run(moe_router_t router, const DLTensor* logits,
                                    const DLTensor* correction_bias,
                                    const DLTensor* num_valid_tokens,
                                    DLTensor* topk_ids, DLTensor* topk_weights,
                                    void* stream);

/*
 * Pack to the FlashInfer / TRT-LLM "routed" format: one int32 per slot,
 * (id << 16) | (bits(bf16(weight)) & 0xFFFF). Id -1 stays -1 in the high
 * half so consumers skip it. Ids must lie in [-1, 32767].
 */
MOE_API moe_status_t moe_pack_topk(const DLTensor* topk_ids,
                                   const DLTensor* topk_weights,
                                   DLTensor* packed, void* stream);

/* ------------------------------------------------------------------------ */
/* Standard dispatcher: global ids -> local ids + routing metadata            */
/* ------------------------------------------------------------------------ */

typedef struct moe_dispatcher_s* moe_dispatcher_t;

typedef struct moe_dispatcher_config_t {
  uint32_t struct_size;
  int32_t num_experts;          /* E global routed experts (+ fused shared columns, see below) */
  int32_t ep_rank;              /* 0 <= ep_rank < ep_size */
  int32_t ep_size;              /* >= 1; E % ep_size == 0 when no explicit mapping */
  const int32_t* local_expert_mapping; /* NULL, or host array [num_experts]: global -> local id or -1 (copied at create) */
  int32_t num_local_experts;    /* E_loc; required with an explicit mapping, else 0 (derived: E / ep_size) */
  int32_t device_type;          /* DLDeviceType the dispatcher runs on (kDLCPU or kDLCUDA) */
  int32_t device_id;            /* device ordinal for kDLCUDA */
} moe_dispatcher_config_t;

/* config->struct_size must be set first; the defaults: CPU, ep_size 1. */
MOE_API moe_status_t moe_dispatcher_config_default(moe_dispatcher_config_t* config);
MOE_API moe_status_t moe_dispatcher_create(const moe_dispatcher_config_t* config,
                                           moe_dispatcher_t* dispatcher);
MOE_API moe_status_t moe_dispatcher_destroy(moe_dispatcher_t dispatcher);

/* E_loc of this dispatcher. */
MOE_API moe_status_t moe_dispatcher_num_local_experts(moe_dispatcher_t dispatcher,
                                                      int32_t* num_local_experts);

/* Host copies of the mapping ([E] global -> local or -1) and the expert mask
 * ([E], 1 iff the expert is held here). Either pointer may be NULL; len must
 * equal E. */
MOE_API moe_status_t moe_dispatcher_get_mapping(moe_dispatcher_t dispatcher,
                                                int32_t* mapping, int32_t* mask,
                                                int64_t len);

/*
 * Dispatch (metadata only: the token rows are read by the runner through the
 * permutation, no copy). All tensors int32, contiguous, on the dispatcher's
 * device:
 *   topk_ids       [T, K]   global ids in [-1, E)
 *   local_ids      [T, K]   out: local ids in [-1, E_loc)
 *   expert_counts  [E_loc]  out: slots per local expert
 *   expert_offsets [E_loc+1] out: exclusive prefix sum, offsets[0] = 0
 *   sorted_slots   [T*K]    out: flat slot indices t*K+j grouped by local
 *                  expert (ascending), in (t, j) order within an expert;
 *                  entries at or past offsets[E_loc] are -1.
 * workspace: as in moe_runner_run (NULL/0 = the dispatcher's own). With a
 * caller workspace the CUDA path does no host synchronisation and no
 * allocation (graph-capturable).
 */
MOE_API moe_status_t moe_dispatcher_dispatch(moe_dispatcher_t dispatcher,
                                             const DLTensor* topk_ids,
                                             DLTensor* local_ids,
                                             DLTensor* expert_counts,
                                             DLTensor* expert_offsets,
                                             DLTensor* sorted_slots,
                                             void* workspace,
                                             size_t workspace_bytes,
                                             void* stream);

/* Workspace bytes a dispatch of up to max_tokens tokens with `columns` slots
 * per token needs on the dispatcher's device (0 is a valid answer). */
MOE_API moe_status_t moe_dispatcher_workspace_size(moe_dispatcher_t dispatcher,
                                                   int64_t max_tokens,
                                                   int32_t columns,
                                                   size_t* bytes);

/* ------------------------------------------------------------------------ */
/* Runner: fused MoE over the local experts                                  */
/* ------------------------------------------------------------------------ */

typedef struct moe_runner_s* moe_runner_t;

typedef struct moe_runner_config_t {
  uint32_t struct_size;
  int32_t num_experts;          /* E_loc, experts whose weights this runner holds */
  int32_t hidden_size;          /* H */
  int32_t intermediate_size;    /* I */
  int32_t activation;           /* moe_activation_t (default SILU) */
  int32_t gated;                /* 1: w13 is [E, 2I, H] and h = act(gate) * up (default 1) */
  int32_t swap_gate_up;         /* 1: w13 rows are [up; gate] (FlashInfer order) instead of [gate; up] */
  int32_t apply_router_weight_on_input; /* 1: x * w before W13, weight 1 at the end (top-1 only) */
  int32_t quant_mode;           /* moe_quant_mode_t (default NONE) */
  int32_t act_scale_mode;       /* moe_act_scale_mode_t, FP8 only (default DYNAMIC) */
  float output_scale;           /* multiplies the routed output (routed_scaling_factor when scaling_on_output) */
  int32_t deterministic;        /* 1 (default): no float atomics; y[t] independent of the batch */
  int32_t validate_ids;         /* CUDA only: 1 = check ids on the device and report bad ones (one sync per call) */
} moe_runner_config_t;

/* config->struct_size must be set first; the defaults: SILU, gated,
 * [gate; up], no quantization, output_scale 1, deterministic. */
MOE_API moe_status_t moe_runner_config_default(moe_runner_config_t* config);
MOE_API moe_status_t moe_runner_create(const moe_runner_config_t* config,
                                       moe_runner_t* runner);
MOE_API moe_status_t moe_runner_destroy(moe_runner_t runner);

/*
 * Borrow the expert weights (the caller keeps them alive and unchanged while
 * the runner uses them). Row-major [out, in] as torch Linear stores them:
 *   w13 [E_loc, 2I, H] (gated) or [E_loc, I, H], w2 [E_loc, H, I]
 * f32/f16/bf16 for MOE_QUANT_NONE; E4M3 for FP8 with
 *   per-tensor: w13_scale, w2_scale [E_loc] f32; a13_scale, a2_scale [1] f32
 *               for MOE_ACT_SCALE_STATIC, else NULL
 *   block 128:  w13_scale [E_loc, ceil(2I/128), ceil(H/128)],
 *               w2_scale [E_loc, ceil(H/128), ceil(I/128)] f32
 * Scales that are not used must be NULL.
 */
MOE_API moe_status_t moe_runner_set_weights(moe_runner_t runner,
                                            const DLTensor* w13, const DLTensor* w2,
                                            const DLTensor* w13_scale,
                                            const DLTensor* w2_scale,
                                            const DLTensor* a13_scale,
                                            const DLTensor* a2_scale);

/* Workspace bytes a run of up to max_tokens tokens with `columns` slots per
 * token needs on `device_type` (kDLCPU or kDLCUDA). */
MOE_API moe_status_t moe_runner_workspace_size(moe_runner_t runner,
                                               int64_t max_tokens, int32_t columns,
                                               int32_t device_type, size_t* bytes);

/*
 * y[t] = output_scale * sum_{j: id != -1} w[t,j] * W2[id] . act(W13[id] . x[t])
 *   hidden         [T, H]     f32/f16/bf16
 *   local_ids      [T, K]     int32 in [-1, E_loc) (from the dispatcher)
 *   topk_weights   [T, K]     f32
 *   expert_offsets [E_loc+1]  int32 (from the dispatcher)
 *   sorted_slots   [T*K]      int32 (from the dispatcher)
 *   output         [T, H]     dtype of hidden; fully written
 * workspace: NULL with workspace_bytes 0 uses a workspace the runner
 * allocates and keeps (not graph-capturable on first use); otherwise at least
 * moe_runner_workspace_size() bytes, 256-byte aligned, on the tensors' device.
 */
MOE_API moe_status_t moe_runner_run(moe_runner_t runner, const DLTensor* hidden,
                                    const DLTensor* local_ids,
                                    const DLTensor* topk_weights,
                                    const DLTensor* expert_offsets,
                                    const DLTensor* sorted_slots, DLTensor* output,
                                    void* workspace, size_t workspace_bytes,
                                    void* stream);

/* ------------------------------------------------------------------------ */
/* One-call layer: route -> dispatch -> run                                  */
/* ------------------------------------------------------------------------ */

/* Workspace for moe_layer_forward with up to max_tokens tokens. */
MOE_API moe_status_t moe_layer_workspace_size(moe_router_t router,
                                              moe_dispatcher_t dispatcher,
                                              moe_runner_t runner,
                                              int64_t max_tokens,
                                              int32_t device_type, size_t* bytes);

/*
 * output = MoE(hidden) with routing from logits. The intermediates (ids,
 * weights, routing metadata) live in the workspace. Same workspace rules as
 * moe_runner_run. correction_bias and num_valid_tokens as in moe_router_run.
 */
MOE_API moe_status_t moe_layer_forward(moe_router_t router,
                                       moe_dispatcher_t dispatcher,
                                       moe_runner_t runner, const DLTensor* hidden,
                                       const DLTensor* logits,
                                       const DLTensor* correction_bias,
                                       const DLTensor* num_valid_tokens,
                                       DLTensor* output, void* workspace,
                                       size_t workspace_bytes, void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* MOE_MOE_H_ */
