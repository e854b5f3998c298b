"""The MoE block (moe/moe_block.h) on CUDA from torch: Block against the NumPy
float64 reference (DeepSeek-V3-like and Qwen2-MoE-like configs, per dtype),
the gate projection's f32 logits, and CUDA graph capture of the whole block.
Skipped without torch, a GPU, or a libmoe built with CUDA."""

import numpy as np
import pytest

import libmoe
from libmoe import reference as ref

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and libmoe.has_cuda()),
    reason="needs a CUDA GPU and a libmoe built with the CUDA backend")

DTYPES = {"bf16": (torch.bfloat16, 1e-2), "f16": (torch.float16, 1e-2), "f32": (torch.float32, 1e-5)}
E, K, H, I, I_S = 32, 4, 256, 128, 192

CONFIGS = {
    "deepseek_v3": dict(method="deepseek_v3", ref_method=ref.DEEPSEEK_V3, bias=True, shared_gate=False,
                        options=dict(n_group=8, topk_group=4, renormalize=True, routed_scaling_factor=2.5)),
    "qwen2_moe": dict(method="softmax_topk", ref_method=ref.SOFTMAX_TOPK, bias=False, shared_gate=True,
                      options=dict(renormalize=False)),
}


@pytest.fixture
def gen():
    seed = int(np.random.SeedSequence().entropy % (2 ** 31))
    print("libmoe GPU test seed:", seed)
    return torch.Generator(device="cuda").manual_seed(seed)


def randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)


def dyadic(gen, *shape, den, dtype=torch.float32):
    """k / den, |k| <= 32: dot products over H = 256 are exact in f32 and every
    dtype holds the values, so the library's f32 logits equal the float64 ones."""
    return (torch.randint(-32, 33, shape, generator=gen, device="cuda").float() / den).to(dtype)


def f64(t):
    return None if t is None else t.double().cpu().numpy()


def make_block(gen, cfg, tdt):
    w = dict(
        w13=randn(gen, E, 2 * I, H, dtype=tdt, scale=H ** -0.5),
        w2=randn(gen, E, H, I, dtype=tdt, scale=I ** -0.5),
        s13=randn(gen, 1, 2 * I_S, H, dtype=tdt, scale=H ** -0.5),
        s2=randn(gen, 1, H, I_S, dtype=tdt, scale=I_S ** -0.5),
        sg=randn(gen, 1, H, dtype=tdt, scale=H ** -0.5) if cfg["shared_gate"] else None,
    )
    block = libmoe.Block.create(w["w13"], w["w2"], method=cfg["method"], num_experts=E, top_k=K,
                                shared_w13=w["s13"], shared_w2=w["s2"], shared_gate_weight=w["sg"],
                                router_options=cfg["options"])
    return block, w


def reference(cfg, x, wg, bias, w, valid):
    x, wg = f64(x), f64(wg)
    ids, wts, margin = ref.route(x @ wg.T, cfg["ref_method"], K, correction_bias=f64(bias),
                                 num_valid_tokens=valid, **cfg["options"])
    y = ref.experts(x, ids, wts, f64(w["w13"]), f64(w["w2"]))
    y += ref.shared_experts(x, f64(w["s13"]), f64(w["s2"]), f64(w["sg"]))
    y[valid:] = 0.0
    return y, margin


def compare(out, want, margin, valid, tol):
    got = out.double().cpu().numpy()
    T = got.shape[0]
    rows = [r for r in range(T) if r >= valid or margin[r] == 0 or margin[r] > 1e-4]
    assert len(rows) * 4 >= T * 3
    assert not np.isnan(got).any()
    err = ref.rel_error(got[rows], want[rows])
    assert err < tol, "relative error %.3e" % err
    assert (got[valid:] == 0).all()


@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_block_cuda_matches_reference(name, dtype, T, gen):
    cfg = CONFIGS[name]
    tdt, tol = DTYPES[dtype]
    block, w = make_block(gen, cfg, tdt)
    with block:
        x = dyadic(gen, T, H, den=32, dtype=tdt)
        wg = dyadic(gen, E, H, den=64, dtype=tdt)
        bias = dyadic(gen, E, den=64) if cfg["bias"] else None
        out = torch.full((T, H), float("nan"), dtype=tdt, device="cuda")
        assert block(x, wg, bias, output=out) is out
        y = block(x, wg, bias)  # allocated by the binding: torch, same device and dtype
        torch.cuda.synchronize()
    assert y.is_cuda and y.dtype == tdt and y.shape == (T, H)
    assert torch.equal(out, y)  # deterministic
    want, margin = reference(cfg, x, wg, bias, w, T)
    compare(out, want, margin, T, tol)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_route_hidden_cuda_logits_are_exact(dtype, gen):
    tdt, _ = DTYPES[dtype]
    T = 77
    x = dyadic(gen, T, H, den=32, dtype=tdt)
    wg = dyadic(gen, E, H, den=64, dtype=tdt)
    with libmoe.Router("deepseek_v3", E, K, **CONFIGS["deepseek_v3"]["options"]) as router:
        bias = dyadic(gen, E, den=64)
        ws = libmoe.empty_workspace(router.hidden_workspace_size(H, T, "cuda"), like=x)
        ids, w, z = router.route_hidden(x, wg, bias, return_logits=True, workspace=ws)
        ids2, w2 = router(z, bias)
        torch.cuda.synchronize()
    assert z.dtype == torch.float32 and z.is_cuda
    assert np.array_equal(z.double().cpu().numpy(), f64(x) @ f64(wg).T)
    assert torch.equal(ids, ids2) and torch.equal(w, w2)


def test_block_cuda_graph_capture_with_padding(gen):
    cfg = CONFIGS["deepseek_v3"]
    T = 32
    block, w = make_block(gen, cfg, torch.bfloat16)
    with block:
        x = dyadic(gen, T, H, den=32, dtype=torch.bfloat16)
        wg = dyadic(gen, E, H, den=64, dtype=torch.bfloat16)
        bias = dyadic(gen, E, den=64)
        n_valid = torch.tensor([T], dtype=torch.int32, device="cuda")
        out = torch.empty(T, H, dtype=torch.bfloat16, device="cuda")
        ws = libmoe.empty_workspace(block.workspace_size(T, "cuda"), like=x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (cuBLASLt plans)
            block(x, wg, bias, n_valid, output=out, workspace=ws)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            block(x, wg, bias, n_valid, output=out, workspace=ws)
        for valid in (T, 11, 1):
            x.copy_(dyadic(gen, T, H, den=32, dtype=torch.bfloat16))
            n_valid.fill_(valid)
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            want, margin = reference(cfg, x, wg, bias, w, valid)
            compare(out, want, margin, valid, 1e-2)
            eager = block(x, wg, bias, valid)
            torch.cuda.synchronize()
            assert torch.equal(eager, out)


def test_block_cuda_errors_name_the_argument(gen):
    block, _ = make_block(gen, CONFIGS["qwen2_moe"], torch.bfloat16)
    with block:
        x = randn(gen, 4, H, dtype=torch.bfloat16)
        with pytest.raises(libmoe.MoeError, match="gate_weight"):
            block(x, randn(gen, E + 1, H, dtype=torch.bfloat16))
        with pytest.raises(libmoe.MoeError):
            block(x, randn(gen, E, H).cpu())  # gate on the CPU, hidden on the GPU
