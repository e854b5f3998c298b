/*
 * libmoe all-to-all dispatcher: expert parallelism across ranks over NCCL.
 *
 * A separate header so that moe/moe.h stays free of NCCL. It needs no NCCL
 * header itself: the communicator crosses as `void*` (an ncclComm_t), streams
 * as `void*` (a cudaStream_t). Compiles as C99 and as C++. The moe_a2a_*
 * symbols exist only in a libmoe built with NCCL (CMake: MOE_WITH_NCCL).
 *
 * One step of an expert-parallel layer, on every rank of the communicator:
 *
 *   moe_a2a_dispatch(hidden [T, H], topk_ids [T, k] global, topk_weights [T, k])
 *     -> recv_hidden    [R, H]  R = ep_size * max_tokens_per_rank rows;
 *                               rows [s*M, s*M + recv_counts[s]) came from
 *                               rank s (M = max_tokens_per_rank)
 *        recv_local_ids [R, k]  int32, local ids of this rank's experts, -1
 *                               for slots whose expert lives elsewhere
 *        recv_weights   [R, k]  f32, 0 wherever the id is -1
 *        recv_counts    [ep_size] int32 rows received from each rank
 *   moe_dispatcher_dispatch (a standard dispatcher with num_experts = E_loc,
 *     ep_size = 1) on recv_local_ids -> expert_offsets, sorted_slots
 *   moe_runner_run(recv_hidden, recv_local_ids, recv_weights, ...) -> expert_output [R, H]
 *   moe_a2a_combine(expert_output [R, H]) -> output [T, H]
 *
 * Guarantees:
 *  - Sanitized padding, always: every receive row at or past recv_counts[s]
 *    of its source rank gets ids -1 and weights 0 before dispatch returns on
 *    the stream. The hidden values of such rows are left as they were and
 *    are never read (the runner skips -1 slots; combine reads only rows that
 *    carry a token). No parameter turns this off.
 *  - A token goes at most once to each destination rank, carrying all k of
 *    its slots (remapped to that rank's local ids, -1 for the others).
 *  - Weighting: the runner multiplies by the weights (per receive row it
 *    produces the weighted sum over the slots held on this rank). Combine
 *    adds the per-rank partial rows of a token in f32, in ascending rank
 *    order, and rounds once: deterministic, bit-identical across runs.
 *  - Fixed geometry: every message has a size fixed at creation
 *    (max_tokens_per_rank rows per peer), so dispatch and combine do no host
 *    synchronisation and no allocation, and can be captured in a CUDA graph.
 *    The price: each call moves whole slabs of max_tokens_per_rank rows.
 *
 * Rules:
 *  - moe_a2a_create is collective over the communicator (every rank calls
 *    it); it compares the configs of all ranks and fails on every rank, with
 *    the same message, when they differ. It synchronises the host.
 *  - dispatch and combine are collective too: every rank calls them in the
 *    same order, also a rank with T = 0 or whose tokens all go elsewhere.
 *    An argument error is reported before anything is enqueued; the other
 *    ranks then wait in the collective, so treat it as fatal for the step.
 *  - One handle holds the state of one step (dispatch, then combine): use it
 *    from one thread (or process) per rank, in stream order; a single thread
 *    driving several ranks must use one thread per rank, since each call
 *    issues its own NCCL group.
 */
#ifndef MOE_MOE_NCCL_H_
#define MOE_MOE_NCCL_H_

#include "moe/moe.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_a2a_s* moe_a2a_t;

typedef struct moe_a2a_config_t {
  uint32_t struct_size;          /* sizeof(moe_a2a_config_t) of the caller */
  int32_t num_experts;           /* E global experts; topk_ids hold ids in [-1, E) */
  int32_t ep_size;               /* ranks; must equal the communicator's size */
  int32_t ep_rank;               /* this rank; must equal the communicator's rank */
  const int32_t* expert_rank;    /* NULL (contiguous: expert e on rank e / (E / ep_size)),
                                    or host [E]: the rank holding expert e (copied at create) */
  const int32_t* expert_local_id; /* NULL (e's position among its rank's experts, by global
                                    id), or host [E]: e's local id on its rank; the local ids
                                    of each rank must be exactly 0..n_r-1 */
  int32_t hidden_size;           /* H */
  DLDataType hidden_dtype;       /* f32, f16 or bf16 (default bf16) */
  int32_t max_tokens_per_rank;   /* M: the most tokens one rank dispatches in a call */
  int32_t top_k;                 /* k: columns of topk_ids and topk_weights */
} moe_a2a_config_t;

/* config->struct_size must be set (to sizeof(moe_a2a_config_t)) first, as
 * for every config of moe.h. Defaults: E, H, M and k are 0 (must be set),
 * ep_size 1, ep_rank 0, contiguous mapping, bf16. */
MOE_API moe_status_t moe_a2a_config_default(moe_a2a_config_t* config);

/*
 * Collective. nccl_comm: a blocking ncclComm_t (NCCL's default) whose
 * device is the one this handle uses (buffers are allocated there once,
 * here). Checks the config, then
 * all-gathers it and compares it across ranks (every rank returns
 * INVALID_ARGUMENT naming the first field that differs), then sets up the
 * peer connections with one exchange of the fixed-size messages, so that
 * the first dispatch can already be captured in a CUDA graph.
 */
MOE_API moe_status_t moe_a2a_create(const moe_a2a_config_t* config, void* nccl_comm,
                                    moe_a2a_t* a2a);
/* Not collective. Waits for the handle's device work. NULL is fine. */
MOE_API moe_status_t moe_a2a_destroy(moe_a2a_t a2a);

/* Sizes the caller needs for its receive buffers (any pointer may be NULL):
 * recv_rows = ep_size * max_tokens_per_rank; num_local_experts = E_loc of
 * this rank (the runner's num_experts); device_bytes = device memory the
 * handle holds (its send and receive slabs). */
MOE_API moe_status_t moe_a2a_buffer_sizes(moe_a2a_t a2a, int64_t* recv_rows,
                                          int32_t* num_local_experts, size_t* device_bytes);

/* Host copies of the mapping, [E] each; either pointer may be NULL. len = E. */
MOE_API moe_status_t moe_a2a_get_mapping(moe_a2a_t a2a, int32_t* expert_rank,
                                         int32_t* expert_local_id, int64_t len);

/*
 * Collective. All tensors contiguous on the handle's device:
 *   hidden         [T, H]        hidden_dtype, T <= max_tokens_per_rank (T = 0 is fine)
 *   topk_ids       [T, k]        int32 global ids; -1 and ids outside [0, E) go nowhere
 *   topk_weights   [T, k]        f32
 *   recv_hidden    [R, H]        out, hidden_dtype
 *   recv_local_ids [R, k]        out, int32 in [-1, E_loc)
 *   recv_weights   [R, k]        out, f32
 *   recv_counts    [ep_size]     out, int32
 */
MOE_API moe_status_t moe_a2a_dispatch(moe_a2a_t a2a, const DLTensor* hidden,
                                      const DLTensor* topk_ids, const DLTensor* topk_weights,
                                      DLTensor* recv_hidden, DLTensor* recv_local_ids,
                                      DLTensor* recv_weights, DLTensor* recv_counts,
                                      void* stream);

/*
 * Collective. Sends each row of expert_output back to the rank its token came
 * from (as recorded by the last dispatch on this handle) and sums there:
 *   expert_output  [R, H]   hidden_dtype (the runner's output on the dispatch's receive rows)
 *   output         [T, H]   out, hidden_dtype, T of the last dispatch; fully written
 *                           (a token that went nowhere gets 0)
 */
MOE_API moe_status_t moe_a2a_combine(moe_a2a_t a2a, const DLTensor* expert_output,
                                     DLTensor* output, void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* MOE_MOE_NCCL_H_ */
