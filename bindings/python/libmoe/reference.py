"""A NumPy float64 reference of the MoE layer (docs/semantics.md), written
independently of the library, plus bf16 <-> f32 helpers for NumPy without
ml_dtypes. Used by the tests and the example; slow, for checking only.

Decisions below the contract follow the library's (src/cpu/router.cpp):
an expert is selectable iff its logit and its selection score are neither
NaN nor -inf; softmax runs over the selectable logits only; a DeepSeek-V3
group scores the sum of its top-2 selectable scores, groups with fewer than
two selectable experts rank below those with two, groups with none are never
kept; ties go to the lower index (expert and group); output slots are ordered
best first; slots past the selectable experts get id -1 and weight 0.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

SOFTMAX_TOPK, TOPK_SOFTMAX, SIGMOID_TOPK, DEEPSEEK_V3, GROUPED_SOFTMAX, LLAMA4 = range(6)
SILU, GELU, GELU_TANH, RELU2, IDENTITY = range(5)


# ---------------------------------------------------------------------------
# bf16 as uint16 bits
# ---------------------------------------------------------------------------


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even into bf16 bits (uint16); NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)


def bf16_to_f32(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives NaN (never passes)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    den = np.linalg.norm(ref)
    num = np.linalg.norm(out - ref)
    return float(num / den) if den > 0 else float(num)


# ---------------------------------------------------------------------------
# Router
# ---------------------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def _ok(x: np.ndarray) -> np.ndarray:
    return ~np.isnan(x) & (x != -np.inf)


def _rank(keys: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Indices of cand ordered by key descending, ties to the lower index."""
    cand = np.asarray(cand, dtype=np.int64)
    order = np.lexsort((cand, -keys[cand]))
    return cand[order]


def _softmax_over(z: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """softmax of z[idx] (all selectable); the +inf limit shares the mass."""
    v = z[idx]
    if v.size == 0:
        return v
    if np.isposinf(v).any():
        inf = np.isposinf(v)
        return inf / inf.sum()
    e = np.exp(v - v.max())
    return e / e.sum()


def _route_row(z: np.ndarray, bias: Optional[np.ndarray], method: int, k: int, n_group: int,
               topk_group: int, renormalize: bool) -> Tuple[np.ndarray, np.ndarray, float]:
    E = z.size
    if method == DEEPSEEK_V3 or (method == SIGMOID_TOPK and bias is not None):
        key = _sigmoid(z) + (bias if bias is not None else 0.0)
    elif method == SIGMOID_TOPK:
        key = _sigmoid(z)
    else:
        key = z.copy()
    ok = _ok(z) & _ok(key)
    margin = math.inf
    allowed = ok.copy()
    if method in (DEEPSEEK_V3, GROUPED_SOFTMAX) and n_group > 1:
        gsize = E // n_group
        gcount = np.zeros(n_group)
        gscore = np.full(n_group, -np.inf)
        for g in range(n_group):
            members = np.arange(g * gsize, (g + 1) * gsize)
            vals = np.sort(key[members[ok[members]]])[::-1]
            take = 2 if method == DEEPSEEK_V3 else 1
            gcount[g] = min(vals.size, take)
            if vals.size:
                gscore[g] = vals[:take].sum()
        live = np.flatnonzero(gcount > 0)
        # More selectable members first, then the score, then the lower index.
        order = live[np.lexsort((live, -gscore[live], -gcount[live]))]
        kept = order[:topk_group]
        if order.size > topk_group and gcount[order[topk_group - 1]] == gcount[order[topk_group]]:
            margin = gscore[order[topk_group - 1]] - gscore[order[topk_group]]
        allowed &= np.isin(np.arange(E) // gsize, kept)
    ranked = _rank(key, np.flatnonzero(allowed))
    S = ranked[:k]
    if ranked.size > k:
        margin = min(margin, key[ranked[k - 1]] - key[ranked[k]])

    if method in (SOFTMAX_TOPK, GROUPED_SOFTMAX):
        sel = np.flatnonzero(ok)
        p = np.zeros(E)
        p[sel] = _softmax_over(z, sel)
        w = p[S]
        if renormalize and S.size:
            w = w / w.sum()
    elif method == TOPK_SOFTMAX:
        w = _softmax_over(z, S)
    elif method in (SIGMOID_TOPK, DEEPSEEK_V3):
        w = _sigmoid(z[S])
        if renormalize:
            w = w / (w.sum() + 1e-20)
    elif method == LLAMA4:
        w = _sigmoid(z[S])
    else:
        raise ValueError("unknown routing method %d" % method)
    return S, w, margin


def route(logits: np.ndarray, method: int, top_k: int, *, n_group: int = 1, topk_group: int = 1,
          renormalize: Optional[bool] = None, routed_scaling_factor: float = 1.0,
          scaling_on_output: bool = False, num_fused_shared_experts: int = 0,
          correction_bias: Optional[np.ndarray] = None, num_valid_tokens: Optional[int] = None):
    """Reference routing in float64.

    Returns (ids int32 [T, k + n_shared], weights float64 [T, k + n_shared],
    margin float64 [T]): margin is the gap between the last selected and the
    first rejected score (experts, and groups for grouped methods): rows with a
    tiny nonzero margin may legitimately select differently in f32 (0 is an
    exact tie of equal inputs, which f32 resolves the same way)."""
    z = np.asarray(logits, dtype=np.float64)
    T, E = z.shape
    if renormalize is None:
        renormalize = method == DEEPSEEK_V3
    bias = None if correction_bias is None else np.asarray(correction_bias, dtype=np.float64)
    ns = num_fused_shared_experts
    cols = top_k + ns
    ids = np.full((T, cols), -1, dtype=np.int32)
    weights = np.zeros((T, cols))
    margin = np.full(T, math.inf)
    valid = T if num_valid_tokens is None else max(0, min(int(num_valid_tokens), T))
    scale = 1.0 if scaling_on_output else routed_scaling_factor
    for t in range(valid):
        S, w, margin[t] = _route_row(z[t], bias, method, top_k, n_group, topk_group, renormalize)
        ids[t, :S.size] = S
        weights[t, :S.size] = w * scale
        ids[t, top_k:] = np.arange(E, E + ns)
        weights[t, top_k:] = 1.0 / routed_scaling_factor if scaling_on_output else 1.0
    return ids, weights, margin


def pack_topk(ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(id << 16) | bf16 bits of the weight, as int32."""
    hi = (np.asarray(ids).astype(np.int64) & 0xFFFF) << 16
    lo = f32_to_bf16(np.asarray(weights, dtype=np.float32)).astype(np.int64)
    return (hi | lo).astype(np.uint32).view(np.int32)


# ---------------------------------------------------------------------------
# Dispatcher and runner
# ---------------------------------------------------------------------------


def expert_mapping(num_experts: int, ep_rank: int = 0, ep_size: int = 1) -> np.ndarray:
    """Contiguous expert-parallel ranges: global id -> local id or -1."""
    e_loc = num_experts // ep_size
    g = np.arange(num_experts)
    return np.where(g // e_loc == ep_rank, g - ep_rank * e_loc, -1).astype(np.int32)


def dispatch(topk_ids: np.ndarray, mapping: np.ndarray, num_local_experts: int):
    """(local_ids, counts, offsets, sorted_slots) exactly as the dispatcher defines them."""
    ids = np.asarray(topk_ids)
    local = np.full(ids.shape, -1, dtype=np.int32)
    valid = ids >= 0
    local[valid] = mapping[ids[valid]]  # never index with -1
    flat = local.reshape(-1)
    counts = np.array([(flat == e).sum() for e in range(num_local_experts)], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    slots = np.full(flat.size, -1, dtype=np.int32)
    order = [s for e in range(num_local_experts) for s in np.flatnonzero(flat == e)]
    slots[:len(order)] = order
    return local, counts, offsets, slots


def activation(h: np.ndarray, act: int) -> np.ndarray:
    if act == SILU:
        return h / (1.0 + np.exp(-h))
    if act == GELU:
        erf = np.vectorize(math.erf)
        return 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
    if act == GELU_TANH:
        return 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))
    if act == RELU2:
        return np.maximum(h, 0.0) ** 2
    if act == IDENTITY:
        return h
    raise ValueError("unknown activation %d" % act)


def experts(hidden: np.ndarray, local_ids: np.ndarray, weights: np.ndarray, w13: np.ndarray,
            w2: np.ndarray, *, act: int = SILU, gated: bool = True, swap_gate_up: bool = False,
            weight_on_input: bool = False, output_scale: float = 1.0) -> np.ndarray:
    """y[t] = output_scale * sum_{j: id != -1} w[t,j] * W2[id] . act(W13[id] . x[t]), float64."""
    x = np.asarray(hidden, dtype=np.float64)
    w13 = np.asarray(w13, dtype=np.float64)
    w2 = np.asarray(w2, dtype=np.float64)
    ids = np.asarray(local_ids)
    wts = np.asarray(weights, dtype=np.float64)
    inter = w2.shape[2]
    y = np.zeros_like(x)
    for e in np.unique(ids[ids >= 0]):  # never index with -1
        tok, slot = np.nonzero(ids == e)
        wt = wts[tok, slot][:, None]
        h = (x[tok] * wt if weight_on_input else x[tok]) @ w13[e].T
        if gated:
            gate, up = (h[:, inter:], h[:, :inter]) if swap_gate_up else (h[:, :inter], h[:, inter:])
            a = activation(gate, act) * up
        else:
            a = activation(h, act)
        np.add.at(y, tok, (a @ w2[e].T) * (1.0 if weight_on_input else wt))
    return output_scale * y


# ---------------------------------------------------------------------------
# Shared experts (moe/moe_block.h)
# ---------------------------------------------------------------------------


def shared_experts(hidden: np.ndarray, w13: np.ndarray, w2: np.ndarray,
                   gate_weight: Optional[np.ndarray] = None, *, act: int = SILU, gated: bool = True,
                   swap_gate_up: bool = False) -> np.ndarray:
    """g(x) * sum_s W2_s . act(W13_s . x) in float64: every token through every
    shared expert at weight 1; g = sigmoid(x . gate_weight) with a gate, else 1."""
    x = np.asarray(hidden, dtype=np.float64)
    n = np.asarray(w13).shape[0]
    ids = np.tile(np.arange(n, dtype=np.int32), (x.shape[0], 1))
    y = experts(x, ids, np.ones(ids.shape), w13, w2, act=act, gated=gated, swap_gate_up=swap_gate_up)
    if gate_weight is not None:
        y *= _sigmoid(x @ np.asarray(gate_weight, dtype=np.float64).reshape(-1))[:, None]
    return y
