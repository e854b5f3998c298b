"""Dispatcher, Runner and the one-call Layer against the NumPy float64 reference."""

import numpy as np
import pytest

import libmoe
from libmoe import reference as ref
from conftest import TOL, from_dtype, poisoned, to_dtype


def make_weights(rng, E, H, I, gated=True, dtype="f32"):
    rows = 2 * I if gated else I
    w13, w13_64, _ = to_dtype(rng.standard_normal((E, rows, H)) / np.sqrt(H), dtype)
    w2, w2_64, _ = to_dtype(rng.standard_normal((E, H, I)) / np.sqrt(I), dtype)
    return w13, w2, w13_64, w2_64


def random_ids(rng, T, K, E, p_skip=0.2):
    ids = rng.integers(0, E, size=(T, K)).astype(np.int32)
    ids[rng.random((T, K)) < p_skip] = -1
    return ids


# ---------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ep", [(0, 1), (2, 4), "explicit"])
def test_dispatcher_matches_reference(ep, rng):
    E, T, K = 32, 45, 6
    if ep == "explicit":
        e_loc = 10
        mapping = np.full(E, -1, np.int32)
        held = rng.choice(E, e_loc, replace=False)
        mapping[held] = rng.permutation(e_loc)
        d = libmoe.Dispatcher(E, local_expert_mapping=mapping, num_local_experts=e_loc)
    else:
        rank, size = ep
        e_loc = E // size
        mapping = ref.expert_mapping(E, rank, size)
        d = libmoe.Dispatcher(E, ep_rank=rank, ep_size=size)
    with d:
        assert d.num_local_experts == e_loc
        got_map, got_mask = d.mapping()
        np.testing.assert_array_equal(got_map, mapping)
        np.testing.assert_array_equal(got_mask, (mapping >= 0).astype(np.int32))
        ids = random_ids(rng, T, K, E)
        outs = [poisoned((T, K), np.int32), poisoned(e_loc, np.int32), poisoned(e_loc + 1, np.int32),
                poisoned(T * K, np.int32)]
        res = d.dispatch(ids, local_ids=outs[0], expert_counts=outs[1], expert_offsets=outs[2],
                         sorted_slots=outs[3])
        assert all(a is b for a, b in zip(res, outs))
    for got, want in zip(res, ref.dispatch(ids, mapping, e_loc)):
        np.testing.assert_array_equal(got, want)


def test_dispatcher_rejects_out_of_range_ids(rng):
    ids = random_ids(rng, 8, 2, 16)
    ids[5, 1] = 16
    with libmoe.Dispatcher(16) as d, pytest.raises(libmoe.MoeError) as e:
        d.dispatch(ids)
    assert e.value.status == libmoe.Status.INVALID_ARGUMENT
    assert "topk_ids" in e.value.message and "token 5" in e.value.message


# ---------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------

RUNNER_CASES = [
    dict(activation="silu"),
    dict(activation="silu", swap_gate_up=True),
    dict(activation="gelu"),
    dict(activation="gelu_tanh"),
    dict(activation="relu2", gated=False),
    dict(activation="identity", gated=False),
    dict(activation="silu", output_scale=2.5),
]


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("opts", RUNNER_CASES, ids=lambda o: ".".join("%s=%s" % kv for kv in o.items()))
def test_runner_matches_reference(opts, dtype, rng):
    E, H, I, T, K = 8, 64, 96, 37, 3
    gated = opts.get("gated", True)
    w13, w2, w13_64, w2_64 = make_weights(rng, E, H, I, gated, dtype)
    x, x64, dt = to_dtype(rng.standard_normal((T, H)), dtype)
    ids = random_ids(rng, T, K, E)
    ids[4] = -1  # a token with no expert gets exactly 0
    w = rng.random((T, K)).astype(np.float32)
    with libmoe.Dispatcher(E) as d, libmoe.Runner(E, H, I, **opts) as r:
        r.set_weights(w13, w2, dtype=dt)
        local, _, offsets, slots = d.dispatch(ids)
        y = poisoned((T, H), x.dtype)
        assert r.run(x, local, w, offsets, slots, output=y, dtype=dt) is y
    want = ref.experts(x64, ids, w, w13_64, w2_64, act=int(libmoe.Activation[opts["activation"].upper()]),
                       gated=gated, swap_gate_up=opts.get("swap_gate_up", False),
                       output_scale=opts.get("output_scale", 1.0))
    got = from_dtype(y, dtype)
    assert (got[4] == 0).all()
    assert ref.rel_error(got, want) < TOL[dtype]


def test_runner_allocates_output_and_uses_caller_workspace(rng):
    E, H, I, T, K = 4, 32, 48, 9, 2
    w13, w2, w13_64, w2_64 = make_weights(rng, E, H, I)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = random_ids(rng, T, K, E)
    w = rng.random((T, K)).astype(np.float32)
    with libmoe.Dispatcher(E) as d, libmoe.Runner(E, H, I) as r:
        r.set_weights(w13, w2)
        ws = libmoe.empty_workspace(r.workspace_size(T, K, "cpu"))
        assert ws.ctypes.data % 256 == 0
        local, _, offsets, slots = d(ids)
        y = r(x, local, w, offsets, slots, workspace=ws)
    assert y.dtype == np.float32 and y.shape == (T, H)
    assert ref.rel_error(y, ref.experts(x, ids, w, w13_64, w2_64)) < 1e-5


# ---------------------------------------------------------------------------
# Layer
# ---------------------------------------------------------------------------

LAYER_CASES = {
    "softmax_topk.renormalize": ("softmax_topk", 2, dict(renormalize=True), {}),
    "deepseek_v3.bias.scaling_on_output": (
        "deepseek_v3", 4, dict(n_group=4, topk_group=2, routed_scaling_factor=2.5,
                               scaling_on_output=True), {}),
    "grouped_softmax.scaled": ("grouped_softmax", 4, dict(n_group=4, topk_group=2,
                                                          routed_scaling_factor=1.5), {}),
    "sigmoid_topk.shared_expert": ("sigmoid_topk", 2, dict(num_fused_shared_experts=1,
                                                           renormalize=True), {}),
    "llama4.weight_on_input": ("llama4", 1, {}, {}),
    "topk_softmax.gelu": ("topk_softmax", 2, {}, dict(activation="gelu_tanh")),
}


def layer_reference(method, k, ropts, runner_opts, x64, z64, w13_64, w2_64, E, bias=None,
                    num_valid=None):
    mid = int(libmoe.RoutingMethod[method.upper()])
    ids, weights, margin = ref.route(z64, mid, k, correction_bias=bias, num_valid_tokens=num_valid,
                                     **ropts)
    rsf = ropts.get("routed_scaling_factor", 1.0)
    y = ref.experts(x64, ids, weights, w13_64, w2_64,
                    act=int(libmoe.Activation[runner_opts.get("activation", "silu").upper()]),
                    weight_on_input=method == "llama4",
                    output_scale=rsf if ropts.get("scaling_on_output") else 1.0)
    return y, margin


def check_layer(got, want, margin, tol):
    rows = (margin == 0) | (margin > 1e-5)  # a near-tie may pick another expert in f32
    assert rows.mean() > 0.9
    assert not np.isnan(got).any()
    assert ref.rel_error(got[rows], want[rows]) < tol


@pytest.mark.parametrize("dtype,logits_dtype", [("f32", "f32"), ("bf16", "f32"), ("bf16", "bf16")])
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_matches_reference(case, dtype, logits_dtype, rng):
    method, k, ropts, runner_opts = LAYER_CASES[case]
    E, H, I, T = 16, 64, 80, 41
    ns = ropts.get("num_fused_shared_experts", 0)
    w13, w2, w13_64, w2_64 = make_weights(rng, E + ns, H, I, dtype=dtype)
    x, x64, dt = to_dtype(rng.standard_normal((T, H)), dtype)
    z, z64, _ = to_dtype(rng.standard_normal((T, E)) * 2.0, logits_dtype)
    bias = rng.standard_normal(E).astype(np.float32) * 0.3 if method == "deepseek_v3" else None
    with libmoe.Layer.create(w13, w2, method=method, num_experts=E, top_k=k, dtype=dt,
                             router_options=ropts, runner_options=runner_opts) as layer:
        y = poisoned((T, H), x.dtype)
        assert layer(x, z, bias, output=y, dtype=dt) is y
    want, margin = layer_reference(method, k, ropts, runner_opts, x64, z64, w13_64, w2_64, E, bias)
    check_layer(from_dtype(y, dtype), want, margin, TOL[dtype])


def test_layer_from_handles_with_workspace_and_num_valid(rng):
    E, k, H, I, T, valid = 8, 2, 32, 64, 30, 21
    w13, w2, w13_64, w2_64 = make_weights(rng, E, H, I)
    x = rng.standard_normal((T, H)).astype(np.float32)
    z = rng.standard_normal((T, E)).astype(np.float32)
    with libmoe.Router("softmax_topk", E, k) as router, libmoe.Dispatcher(E) as disp, \
            libmoe.Runner(E, H, I) as runner:
        runner.set_weights(w13, w2)
        layer = libmoe.Layer(router, disp, runner)
        ws = libmoe.empty_workspace(layer.workspace_size(T, "cpu"))
        y = poisoned((T, H), np.float32)
        layer.forward(x, z, num_valid_tokens=np.array([valid], np.int32), output=y, workspace=ws)
        layer.close()
        assert not router.closed  # a Layer built from handles borrows them
        ids, w = router(z, num_valid_tokens=valid)
    assert (y[valid:] == 0).all()
    want, margin = layer_reference("softmax_topk", k, {}, {}, x, z, w13_64, w2_64, E,
                                   num_valid=valid)
    check_layer(y, want, margin, 1e-5)
    # The one-call layer equals route -> dispatch -> run step by step.
    assert ref.rel_error(y, ref.experts(x, ids, w, w13_64, w2_64)) < 1e-5


def test_layer_ml_dtypes_bfloat16(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    E, k, H, I, T = 8, 2, 32, 64, 12
    w13, w2, w13_64, w2_64 = make_weights(rng, E, H, I, dtype="bf16")
    as_bf16 = lambda a: a.view(ml_dtypes.bfloat16)  # noqa: E731
    x, x64, _ = to_dtype(rng.standard_normal((T, H)), "bf16")
    z = rng.standard_normal((T, E)).astype(np.float32)
    with libmoe.Layer.create(as_bf16(w13), as_bf16(w2), method="softmax_topk", num_experts=E,
                             top_k=k) as layer:
        y = layer(as_bf16(x), z)
    assert y.dtype == ml_dtypes.bfloat16
    want, margin = layer_reference("softmax_topk", k, {}, {}, x64, z, w13_64, w2_64, E)
    check_layer(from_dtype(y.view(np.uint16), "bf16"), want, margin, 1e-2)


class DLPackOnly:
    """An array that only speaks the DLPack protocol (like a JAX array)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, stream=None):
        return self._a.__dlpack__()

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_layer_accepts_dlpack_producers(rng):
    E, k, H, I, T = 8, 2, 32, 48, 10
    w13, w2, w13_64, w2_64 = make_weights(rng, E, H, I)
    x = rng.standard_normal((T, H)).astype(np.float32)
    z = rng.standard_normal((T, E)).astype(np.float32)
    with libmoe.Layer.create(DLPackOnly(w13), DLPackOnly(w2), method="softmax_topk",
                             num_experts=E, top_k=k) as layer:
        y = layer(DLPackOnly(x), DLPackOnly(z))  # output: NumPy, as the producer is on the CPU
    want, margin = layer_reference("softmax_topk", k, {}, {}, x, z, w13_64, w2_64, E)
    check_layer(y, want, margin, 1e-5)


def test_layer_torch_cpu(rng):
    torch = pytest.importorskip("torch")
    E, k, H, I, T = 8, 2, 32, 48, 10
    w13, w2, w13_64, w2_64 = make_weights(rng, E, H, I)
    x = rng.standard_normal((T, H)).astype(np.float32)
    z = rng.standard_normal((T, E)).astype(np.float32)
    tw13, tw2 = torch.from_numpy(w13).bfloat16(), torch.from_numpy(w2).bfloat16()
    with libmoe.Layer.create(tw13, tw2, method="softmax_topk", num_experts=E, top_k=k) as layer:
        y = layer(torch.from_numpy(x).bfloat16(), torch.from_numpy(z))
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and y.device.type == "cpu"
    want, margin = layer_reference("softmax_topk", k, {}, {}, torch.from_numpy(x).bfloat16().double().numpy(),
                                   z, tw13.double().numpy(), tw2.double().numpy(), E)
    check_layer(y.double().numpy(), want, margin, 1e-2)
