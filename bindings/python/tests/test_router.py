"""Router: every routing method against the NumPy float64 reference."""

import numpy as np
import pytest

import libmoe
from libmoe import reference as ref
from conftest import poisoned, to_dtype

# (method, router options, E); each one exercises a different part of section 1.
CASES = {
    "softmax_topk": ("softmax_topk", dict(top_k=6), 64),
    "softmax_topk.renormalize.scaled": (
        "softmax_topk", dict(top_k=6, renormalize=True, routed_scaling_factor=2.5), 64),
    "topk_softmax": ("topk_softmax", dict(top_k=4), 32),
    "sigmoid_topk": ("sigmoid_topk", dict(top_k=4), 64),
    "sigmoid_topk.bias.renormalize": ("sigmoid_topk", dict(top_k=4, renormalize=True, bias=True), 64),
    "deepseek_v3": ("deepseek_v3", dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                                        bias=True), 64),
    "deepseek_v3.no_bias.ungrouped": ("deepseek_v3", dict(top_k=4, n_group=1, topk_group=1), 32),
    "grouped_softmax": ("grouped_softmax", dict(top_k=6, n_group=8, topk_group=3, renormalize=True,
                                                routed_scaling_factor=16.0), 64),
    "grouped_softmax.no_renormalize": ("grouped_softmax", dict(top_k=4, n_group=4, topk_group=2), 32),
    "llama4": ("llama4", dict(top_k=1), 16),
}


def _method_id(name):
    return int(libmoe.RoutingMethod[name.upper()])


def run_router(method, E, opts, logits, dtype=None, bias=None, num_valid=None):
    opts = dict(opts)
    opts.pop("bias", None)
    k = opts.pop("top_k")
    with libmoe.Router(method, E, k, **opts) as r:
        T = logits.shape[0]
        ids = poisoned((T, r.columns), np.int32)
        w = poisoned((T, r.columns), np.float32)
        out = r.route(logits, bias, num_valid, topk_ids=ids, topk_weights=w, dtype=dtype)
        assert out.topk_ids is ids and out.topk_weights is w
        return ids, w


def reference(method, E, opts, z64, bias=None, num_valid=None):
    opts = dict(opts)
    opts.pop("bias", None)
    k = opts.pop("top_k")
    return ref.route(z64, _method_id(method), k, correction_bias=bias, num_valid_tokens=num_valid,
                     **opts)


def sort_slots(ids, w, k):
    """Routed slots ordered by id (-1 last): set equality, whatever the order."""
    key = np.where(ids[:, :k] < 0, np.iinfo(np.int32).max, ids[:, :k])
    order = np.argsort(key, axis=1, kind="stable")
    ids2, w2 = ids.copy(), np.asarray(w, dtype=np.float64).copy()
    ids2[:, :k] = np.take_along_axis(ids[:, :k], order, 1)
    w2[:, :k] = np.take_along_axis(w2[:, :k], order, 1)
    return ids2, w2


def check_routing(ids, w, ref_ids, ref_w, margin, k, *, min_margin=1e-5):
    assert not np.isnan(w).any(), "unwritten or NaN router weights"
    # Near-ties (not exact ones) may select differently in f32 than in f64.
    rows = (margin == 0) | (margin > min_margin)
    assert rows.mean() > 0.9, "too few rows without a near-tie: the test would check nothing"
    a_ids, a_w = sort_slots(ids[rows], w[rows], k)
    b_ids, b_w = sort_slots(ref_ids[rows], ref_w[rows], k)
    np.testing.assert_array_equal(a_ids, b_ids)
    assert ref.rel_error(a_w, b_w) < 1e-5
    np.testing.assert_allclose(a_w, b_w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_router_matches_reference(case, dtype, rng):
    method, opts, E = CASES[case]
    T = 97
    logits, z64, dt = to_dtype(rng.standard_normal((T, E)) * 2.0, dtype)
    bias = rng.standard_normal(E).astype(np.float32) * 0.5 if opts.get("bias") else None
    ids, w = run_router(method, E, opts, logits, dtype=dt, bias=bias)
    ref_ids, ref_w, margin = reference(method, E, opts, z64, bias=bias)
    check_routing(ids, w, ref_ids, ref_w, margin, opts["top_k"])


@pytest.mark.parametrize("method", ["softmax_topk", "topk_softmax", "sigmoid_topk", "llama4"])
def test_router_ties_go_to_lower_index_in_order(method, rng):
    # Logits from {0, 1, 2}: most rows tie at the top-k boundary.
    E, k = 12, 1 if method == "llama4" else 4
    z = rng.integers(0, 3, size=(64, E)).astype(np.float32)
    ids, w = run_router(method, E, dict(top_k=k), z)
    ref_ids, ref_w, _ = reference(method, E, dict(top_k=k), z.astype(np.float64))
    np.testing.assert_array_equal(ids, ref_ids)  # order included: best first, ties by index
    np.testing.assert_allclose(w, ref_w, rtol=1e-6)


def test_router_deepseek_group_ties_go_to_lower_group(rng):
    # All groups identical: the kept groups must be the lowest-numbered ones.
    E, n_group, topk_group, k = 32, 8, 2, 4
    row = np.tile(rng.standard_normal(E // n_group), n_group).astype(np.float32)
    z = np.stack([row] * 5)
    ids, _ = run_router("deepseek_v3", E, dict(top_k=k, n_group=n_group, topk_group=topk_group), z)
    assert (ids < 2 * E // n_group).all() and (ids >= 0).all()
    ref_ids, _, _ = reference("deepseek_v3", E, dict(top_k=k, n_group=n_group,
                                                     topk_group=topk_group), z.astype(np.float64))
    np.testing.assert_array_equal(ids, ref_ids)


@pytest.mark.parametrize("case", ["softmax_topk.renormalize.scaled", "topk_softmax", "sigmoid_topk",
                                  "deepseek_v3", "grouped_softmax"])
def test_router_never_selects_nan_or_neg_inf(case, rng):
    method, opts, E = CASES[case]
    k = opts["top_k"]
    T = 40
    z = (rng.standard_normal((T, E)) * 2.0).astype(np.float32)
    bad = rng.random((T, E)) < 0.4
    z[bad] = np.where(rng.random(bad.sum()) < 0.5, np.nan, -np.inf)
    # Rows with fewer finite experts than k: the rest of the slots are -1 / 0.
    z[:5, :] = np.nan
    z[5:10, 3:] = -np.inf
    bias = rng.standard_normal(E).astype(np.float32) * 0.5 if opts.get("bias") else None
    ids, w = run_router(method, E, opts, z, bias=bias)
    routed = ids[:, :k]
    picked = np.take_along_axis(z, np.maximum(routed, 0), 1)
    assert np.isfinite(picked[routed >= 0]).all()
    assert (ids[:5] == -1).all() and (w[:5] == 0).all()
    assert (w[routed < 0] == 0).all()
    ref_ids, ref_w, margin = reference(method, E, opts, z.astype(np.float64), bias=bias)
    check_routing(ids, w, ref_ids, ref_w, margin, k)


@pytest.mark.parametrize("as_array", [False, True])
def test_router_num_valid_tokens(as_array, rng):
    E, k, T, valid = 16, 3, 20, 13
    z = rng.standard_normal((T, E)).astype(np.float32)
    n = np.array([valid], dtype=np.int32) if as_array else valid
    ids, w = run_router("softmax_topk", E, dict(top_k=k), z, num_valid=n)
    assert (ids[valid:] == -1).all() and (w[valid:] == 0).all()
    ref_ids, ref_w, margin = reference("softmax_topk", E, dict(top_k=k), z.astype(np.float64),
                                       num_valid=valid)
    check_routing(ids[:valid], w[:valid], ref_ids[:valid], ref_w[:valid], margin[:valid], k)


@pytest.mark.parametrize("scaling_on_output", [False, True])
def test_router_fused_shared_experts(scaling_on_output, rng):
    E, k, ns, rsf = 32, 4, 2, 2.5
    opts = dict(top_k=k, num_fused_shared_experts=ns, routed_scaling_factor=rsf,
                scaling_on_output=scaling_on_output, renormalize=True)
    z = rng.standard_normal((50, E)).astype(np.float32)
    with libmoe.Router("sigmoid_topk", E, k, **{o: v for o, v in opts.items() if o != "top_k"}) as r:
        assert r.columns == k + ns
    ids, w = run_router("sigmoid_topk", E, opts, z)
    np.testing.assert_array_equal(ids[:, k:], np.broadcast_to([E, E + 1], (50, ns)))
    np.testing.assert_allclose(w[:, k:], 1.0 / rsf if scaling_on_output else 1.0, rtol=1e-7)
    ref_ids, ref_w, margin = reference("sigmoid_topk", E, opts, z.astype(np.float64))
    check_routing(ids, w, ref_ids, ref_w, margin, k)


def test_router_result_independent_of_batch(rng):
    E, k = 64, 8
    z = rng.standard_normal((33, E)).astype(np.float32)
    opts = dict(top_k=k, n_group=8, topk_group=4)
    ids, w = run_router("deepseek_v3", E, opts, z)
    for t in (0, 17, 32):
        ids1, w1 = run_router("deepseek_v3", E, opts, z[t:t + 1])
        np.testing.assert_array_equal(ids1[0], ids[t])
        np.testing.assert_array_equal(w1[0], w[t])


def test_router_allocates_outputs_and_call_alias(rng):
    z = rng.standard_normal((7, 8)).astype(np.float32)
    with libmoe.Router(libmoe.RoutingMethod.TOPK_SOFTMAX, 8, 2) as r:
        ids, w = r(z)
        assert r.method == libmoe.RoutingMethod.TOPK_SOFTMAX and r.num_experts == 8
    assert ids.dtype == np.int32 and ids.shape == (7, 2)
    assert w.dtype == np.float32 and w.shape == (7, 2)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)


def test_pack_topk_matches_reference(rng):
    z = rng.standard_normal((30, 16)).astype(np.float32)
    with libmoe.Router("softmax_topk", 16, 4) as r:
        ids, w = r(z, num_valid_tokens=25)
    packed = poisoned(ids.shape, np.int32)
    assert libmoe.pack_topk(ids, w, packed) is packed
    np.testing.assert_array_equal(packed, ref.pack_topk(ids, w))
    assert (packed[25:] == np.int32(-65536)).all()  # id -1 keeps 0xFFFF in the high half
    np.testing.assert_array_equal(packed >> 16, ids)


def test_router_torch_cpu_tensors(rng):
    torch = pytest.importorskip("torch")
    E, k, T = 16, 4, 23
    z = rng.standard_normal((T, E)).astype(np.float32)
    with libmoe.Router("softmax_topk", E, k, renormalize=True) as r:
        ids, w = r(torch.from_numpy(z).bfloat16(), num_valid_tokens=20)
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.int32 and w.dtype == torch.float32
    z64 = torch.from_numpy(z).bfloat16().double().numpy()
    ref_ids, ref_w, margin = reference("softmax_topk", E, dict(top_k=k, renormalize=True), z64,
                                       num_valid=20)
    check_routing(ids.numpy(), w.numpy(), ref_ids, ref_w, margin, k)
