"""The MoE block (moe/moe_block.h) on the CPU: the gate projection
(Router.route_hidden), SharedExperts and the one-call Block against a NumPy
float64 reference for a DeepSeek-V3-like config (sigmoid grouped routing,
bias, routed_scaling_factor 2.5, one shared expert) and a Qwen2-MoE-like one
(softmax top-k, a shared expert with a sigmoid gate), per dtype; error paths;
and the all-to-all dispatcher's creation without a communicator."""

import numpy as np
import pytest

import libmoe
from libmoe import reference as ref
from conftest import TOL, from_dtype, poisoned, to_dtype

DTYPES = ["f32", "bf16", "f16"]
H, I, I_S, E, K = 64, 32, 48, 16, 4

DEEPSEEK = dict(method="deepseek_v3", ref_method=ref.DEEPSEEK_V3, n_group=4, topk_group=2,
                renormalize=True, routed_scaling_factor=2.5, bias=True, shared_gate=False)
QWEN2 = dict(method="softmax_topk", ref_method=ref.SOFTMAX_TOPK, n_group=1, topk_group=1,
             renormalize=False, routed_scaling_factor=1.0, bias=False, shared_gate=True)


def dyadic(rng, shape, den):
    """k / den with |k| <= 32: dot products over H = 64 are exact in f32 and the
    16-bit dtypes hold the values exactly, so the library's f32 logits equal
    the float64 ones."""
    return rng.integers(-32, 33, size=shape).astype(np.float64) / den


def normal(rng, shape, fan_in):
    return rng.standard_normal(shape) / np.sqrt(fan_in)


def make_block(rng, cfg, dtype):
    """(block, inputs for forward as given to libmoe, float64 reference pieces)."""
    w13, w13_x, kw = to_dtype(normal(rng, (E, 2 * I, H), H), dtype)
    w2, w2_x, _ = to_dtype(normal(rng, (E, H, I), I), dtype)
    s13, s13_x, _ = to_dtype(normal(rng, (1, 2 * I_S, H), H), dtype)
    s2, s2_x, _ = to_dtype(normal(rng, (1, H, I_S), I_S), dtype)
    sg, sg_x, _ = to_dtype(normal(rng, (1, H), H), dtype) if cfg["shared_gate"] else (None, None, None)
    block = libmoe.Block.create(
        w13, w2, method=cfg["method"], num_experts=E, top_k=K, shared_w13=s13, shared_w2=s2,
        shared_gate_weight=sg, dtype=kw,
        router_options=dict(n_group=cfg["n_group"], topk_group=cfg["topk_group"],
                            renormalize=cfg["renormalize"],
                            routed_scaling_factor=cfg["routed_scaling_factor"]))
    return block, (w13_x, w2_x, s13_x, s2_x, sg_x)


def block_reference(cfg, x, wg, bias, weights, num_valid=None):
    w13, w2, s13, s2, sg = weights
    z = x @ wg.T
    ids, w, margin = ref.route(z, cfg["ref_method"], K, n_group=cfg["n_group"], topk_group=cfg["topk_group"],
                               renormalize=cfg["renormalize"],
                               routed_scaling_factor=cfg["routed_scaling_factor"],
                               correction_bias=bias, num_valid_tokens=num_valid)
    y = ref.experts(x, ids, w, w13, w2) + ref.shared_experts(x, s13, s2, sg)
    valid = x.shape[0] if num_valid is None else num_valid
    y[valid:] = 0.0
    return y, z, margin


def check_block(rng, cfg, dtype, T, num_valid=None):
    block, weights = make_block(rng, cfg, dtype)
    with block:
        x, x_x, kw = to_dtype(dyadic(rng, (T, H), 32), dtype)
        wg, wg_x, _ = to_dtype(dyadic(rng, (E, H), 64), dtype)
        bias = (dyadic(rng, (E,), 64).astype(np.float32)) if cfg["bias"] else None
        want, _, margin = block_reference(cfg, x_x, wg_x, bias, weights, num_valid)
        out = block(x, wg, bias, num_valid, output=poisoned((T, H), x.dtype), dtype=kw)
        ws = libmoe.empty_workspace(block.workspace_size(T))
        out2 = block(x, wg, bias, num_valid, output=poisoned((T, H), x.dtype), workspace=ws, dtype=kw)
        assert np.array_equal(np.asarray(out).view(np.uint8), np.asarray(out2).view(np.uint8)), \
            "a caller workspace changed the result"
        got = from_dtype(out, dtype)
        valid = T if num_valid is None else num_valid
        # Rows whose routing float64 decides by a hair may differ in f32: leave them out.
        rows = [r for r in range(T) if r >= valid or margin[r] == 0 or margin[r] > 1e-4]
        assert len(rows) * 4 >= T * 3, "only %d of %d rows have a clear routing" % (len(rows), T)
        err = ref.rel_error(got[rows], want[rows])
        assert err < TOL[dtype], "block %s T=%d: relative error %.3e" % (dtype, T, err)
        assert np.all(got[valid:] == 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 37])
def test_block_deepseek_v3_like(rng, dtype, T):
    check_block(rng, DEEPSEEK, dtype, T)


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_qwen2_moe_like(rng, dtype):
    check_block(rng, QWEN2, dtype, 29)


def test_block_padded_rows_are_zero(rng):
    check_block(rng, DEEPSEEK, "f32", 20, num_valid=13)
    check_block(rng, QWEN2, "bf16", 9, num_valid=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_route_hidden_returns_exact_f32_logits(rng, dtype):
    T = 23
    with libmoe.Router("deepseek_v3", E, K, n_group=4, topk_group=2, routed_scaling_factor=2.5) as router:
        x, x_x, kw = to_dtype(dyadic(rng, (T, H), 32), dtype)
        wg, wg_x, _ = to_dtype(dyadic(rng, (E, H), 64), dtype)
        bias = dyadic(rng, (E,), 64).astype(np.float32)
        ws = libmoe.empty_workspace(router.hidden_workspace_size(H, T))
        ids, w, z = router.route_hidden(x, wg, bias, logits=poisoned((T, E), np.float32), workspace=ws,
                                        dtype=kw)
        assert np.array_equal(z.astype(np.float64), x_x @ wg_x.T)
        ids2, w2 = router(z, bias)
        assert np.array_equal(ids, ids2) and np.array_equal(w.view(np.uint32), w2.view(np.uint32))
        # Without a logits output: same routing, logits None.
        r = router.route_hidden(x, wg, bias, dtype=kw)
        assert r.logits is None and np.array_equal(r.topk_ids, ids)
        assert router.route_hidden(x, wg, bias, return_logits=True, dtype=kw).logits.shape == (T, E)


@pytest.mark.parametrize("dtype", DTYPES)
def test_shared_experts_run_and_accumulate(rng, dtype):
    T, n, inter = 11, 2, 24
    x, x_x, kw = to_dtype(rng.standard_normal((T, H)), dtype)
    w13, w13_x, _ = to_dtype(normal(rng, (n, 2 * inter, H), H), dtype)
    w2, w2_x, _ = to_dtype(normal(rng, (n, H, inter), inter), dtype)
    g, g_x, _ = to_dtype(normal(rng, (1, H), H), dtype)
    with libmoe.SharedExperts(n, H, inter) as shared:
        shared.set_weights(w13, w2, g, dtype=kw)
        want = ref.shared_experts(x_x, w13_x, w2_x, g_x)
        y = shared(x, output=poisoned((T, H), x.dtype), dtype=kw)
        assert ref.rel_error(from_dtype(y, dtype), want) < TOL[dtype]
        base, base_x, _ = to_dtype(rng.standard_normal((T, H)), dtype)
        ws = libmoe.empty_workspace(shared.workspace_size(T))
        acc = shared(x, output=base.copy(), accumulate=True, workspace=ws, dtype=kw)
        assert ref.rel_error(from_dtype(acc, dtype), want + base_x) < TOL[dtype]
        with pytest.raises(ValueError, match="accumulate"):
            shared(x, accumulate=True, dtype=kw)


def test_shared_experts_non_gated_gelu(rng):
    T, n, inter = 7, 1, 16
    x = rng.standard_normal((T, H)).astype(np.float32)
    w13 = normal(rng, (n, inter, H), H).astype(np.float32)
    w2 = normal(rng, (n, H, inter), inter).astype(np.float32)
    with libmoe.SharedExperts(n, H, inter, activation="gelu", gated=False) as shared:
        shared.set_weights(w13, w2)
        y = shared(x)
    want = ref.shared_experts(x, w13, w2, act=ref.GELU, gated=False)
    assert ref.rel_error(y, want) < 1e-5


def test_block_without_shared_experts_is_the_layer_on_gate_logits(rng):
    T = 13
    w13 = normal(rng, (E, 2 * I, H), H).astype(np.float32)
    w2 = normal(rng, (E, H, I), I).astype(np.float32)
    x = dyadic(rng, (T, H), 32).astype(np.float32)
    wg = dyadic(rng, (E, H), 64).astype(np.float32)
    with libmoe.Block.create(w13, w2, method="softmax_topk", num_experts=E, top_k=K) as block:
        assert block.shared is None
        y = block(x, wg)
        parts = (block.router, block.dispatcher, block.runner)
        layer = libmoe.Layer(*parts)
        y2 = layer(x, (x.astype(np.float64) @ wg.T.astype(np.float64)).astype(np.float32))
    assert np.array_equal(y, y2)
    assert block.closed and all(p.closed for p in parts)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def small_block(rng):
    w13 = normal(rng, (4, 16, 8), 8).astype(np.float32)
    w2 = normal(rng, (4, 8, 8), 8).astype(np.float32)
    s13 = normal(rng, (1, 8, 8), 8).astype(np.float32)
    s2 = normal(rng, (1, 8, 4), 4).astype(np.float32)
    return libmoe.Block.create(w13, w2, method="softmax_topk", num_experts=4, top_k=2,
                               shared_w13=s13, shared_w2=s2)


@pytest.mark.parametrize("bad,arg", [
    (dict(gate_weight=np.zeros((5, 8), np.float32)), "gate_weight"),
    (dict(hidden=np.zeros((3, 9), np.float32)), "hidden"),
    (dict(output=np.zeros((3, 7), np.float32)), "output"),
    (dict(correction_bias=np.zeros(3, np.float32)), "correction_bias"),
    (dict(workspace=np.zeros(64, np.uint8)), "workspace"),
])
def test_block_errors_name_the_argument(rng, bad, arg):
    args = dict(hidden=np.zeros((3, 8), np.float32), gate_weight=np.zeros((4, 8), np.float32))
    args.update(bad)
    with small_block(rng) as block:
        with pytest.raises(libmoe.MoeError) as e:
            block.forward(**args)
    assert e.value.status == libmoe.Status.INVALID_ARGUMENT
    assert arg in e.value.message and e.value.function == "moe_block_forward"


def test_shared_experts_errors(rng):
    with pytest.raises(libmoe.MoeError, match="num_shared_experts"):
        libmoe.SharedExperts(0, 8, 4)
    with libmoe.SharedExperts(1, 8, 4) as shared:
        with pytest.raises(libmoe.MoeError, match="w2"):
            shared.set_weights(np.zeros((1, 8, 8), np.float32), np.zeros((1, 4, 8), np.float32))
        with pytest.raises(libmoe.MoeError) as e:  # no weights yet
            shared(np.zeros((1, 8), np.float32))
        assert e.value.function == "moe_shared_experts_run"
    with pytest.raises(ValueError, match="closed"):
        shared.set_weights(np.zeros((1, 8, 8), np.float32), np.zeros((1, 8, 4), np.float32))
    with pytest.raises(ValueError, match="both"):
        libmoe.Block.create(np.zeros((4, 16, 8), np.float32), np.zeros((4, 8, 8), np.float32),
                            method="softmax_topk", num_experts=4, top_k=2,
                            shared_w13=np.zeros((1, 8, 8), np.float32))


def test_route_hidden_errors(rng):
    with libmoe.Router("softmax_topk", 4, 2) as router:
        with pytest.raises(libmoe.MoeError, match="gate_weight") as e:
            router.route_hidden(np.zeros((3, 8), np.float32), np.zeros((5, 8), np.float32))
        assert e.value.status == libmoe.Status.INVALID_ARGUMENT
        with pytest.raises(libmoe.MoeError, match="logits"):
            router.route_hidden(np.zeros((3, 8), np.float32), np.zeros((4, 8), np.float32),
                                logits=np.zeros((3, 5), np.float32))


# ---------------------------------------------------------------------------
# The all-to-all dispatcher (no GPU here: only creation without a communicator)
# ---------------------------------------------------------------------------


def test_a2a_without_a_communicator_raises_moe_error():
    with pytest.raises(libmoe.MoeError) as e:
        libmoe.A2aDispatcher(16, 64, 8, 2, None, hidden_dtype="f32")
    assert e.value.function == "moe_a2a_create"
    if libmoe.has_nccl():
        assert e.value.status == libmoe.Status.INVALID_ARGUMENT
        assert "nccl_comm" in e.value.message
    else:
        assert e.value.status == libmoe.Status.NOT_AVAILABLE
        assert "NCCL" in e.value.message


@pytest.mark.skipif(not libmoe.has_nccl(), reason="needs a libmoe built with NCCL")
def test_a2a_config_default_and_bad_dtype():
    from libmoe import _lib
    import ctypes
    cfg = _lib.A2aConfig()
    assert libmoe._core.lib.moe_a2a_config_default(ctypes.byref(cfg)) == 0
    assert cfg.struct_size == ctypes.sizeof(_lib.A2aConfig) and (cfg.ep_size, cfg.ep_rank) == (1, 0)
    with pytest.raises(ValueError, match="hidden_dtype"):
        libmoe.A2aDispatcher(16, 64, 8, 2, None, hidden_dtype="int8")
