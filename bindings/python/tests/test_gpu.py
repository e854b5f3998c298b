"""The CUDA backend from torch: the layer on CUDA tensors against plain PyTorch
(float64), routing against the CPU backend, streams, and CUDA graph capture.
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


@pytest.fixture
def gen():
    seed = int(np.random.SeedSequence().entropy % (2 ** 31))
    print("libmoe GPU test seed:", seed)
    return torch.Generator(device="cuda").manual_seed(seed)


def randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)


def torch_moe(x, logits, w13, w2, k, renormalize):
    """Plain PyTorch, float64: softmax -> top-k -> SwiGLU experts."""
    E, I = w2.shape[0], w2.shape[2]
    p = torch.softmax(logits.double(), dim=-1)
    w, ids = torch.topk(p, k, dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    xd = x.double()
    y = torch.zeros_like(xd)
    for e in range(E):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = xd[tok] @ w13[e].double().T
        a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        y.index_add_(0, tok, (a @ w2[e].double().T) * w[tok, slot, None])
    return y


def rel_error(out, want):
    return ((out.double() - want).norm() / want.norm()).item()


def make_layer(gen, E, k, H, I, dtype, renormalize=True):
    w13 = randn(gen, E, 2 * I, H, dtype=dtype, scale=H ** -0.5)
    w2 = randn(gen, E, H, I, dtype=dtype, scale=I ** -0.5)
    layer = libmoe.Layer.create(w13, w2, method="softmax_topk", num_experts=E, top_k=k,
                                router_options=dict(renormalize=renormalize))
    return layer, w13, w2


@pytest.mark.parametrize("T", [1, 7, 128])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_layer_cuda_matches_torch(dtype, T, gen):
    tdt, tol = DTYPES[dtype]
    E, k, H, I = 8, 2, 512, 256
    layer, w13, w2 = make_layer(gen, E, k, H, I, tdt)
    with layer:
        x = randn(gen, T, H, dtype=tdt)
        z = randn(gen, T, E, scale=2.0)
        out = torch.full((T, H), float("nan"), dtype=tdt, device="cuda")
        assert layer(x, z, output=out) is out
        y = layer(x, z)  # allocated by the binding: torch, same device and dtype
        torch.cuda.synchronize()
    assert y.is_cuda and y.dtype == tdt and y.shape == (T, H)
    want = torch_moe(x, z, w13, w2, k, True)
    assert not out.isnan().any()
    assert rel_error(out, want) < tol
    assert torch.equal(out, y)  # deterministic


@pytest.mark.parametrize("method,opts", [
    ("softmax_topk", dict(renormalize=True)),
    ("topk_softmax", {}),
    ("sigmoid_topk", dict(renormalize=True)),
    ("deepseek_v3", dict(n_group=8, topk_group=4, routed_scaling_factor=2.5)),
    ("grouped_softmax", dict(n_group=8, topk_group=3)),
])
def test_router_cuda_matches_cpu_backend(method, opts, gen):
    E, k, T = 64, 8 if method == "deepseek_v3" else 4, 300
    z = randn(gen, T, E, scale=2.0)
    bias = randn(gen, E, scale=0.3) if method in ("deepseek_v3", "sigmoid_topk") else None
    with libmoe.Router(method, E, k, **opts) as r:
        ids, w = r(z, bias)
        cpu_ids, cpu_w = r(z.cpu().numpy(), None if bias is None else bias.cpu().numpy())
        torch.cuda.synchronize()
    assert ids.is_cuda and ids.dtype == torch.int32
    ids_np, w_np = ids.cpu().numpy(), w.cpu().numpy()
    _, _, margin = ref.route(z.double().cpu().numpy(), int(libmoe.RoutingMethod[method.upper()]), k,
                             correction_bias=None if bias is None else bias.cpu().numpy(), **opts)
    rows = (margin == 0) | (margin > 1e-5)
    assert rows.mean() > 0.9
    np.testing.assert_array_equal(np.sort(ids_np[rows], 1), np.sort(cpu_ids[rows], 1))
    np.testing.assert_allclose(np.sort(w_np[rows], 1), np.sort(cpu_w[rows], 1), rtol=1e-5, atol=1e-7)


def test_layer_runs_on_the_given_stream(gen):
    E, k, H, I, T = 8, 2, 256, 256, 33
    layer, w13, w2 = make_layer(gen, E, k, H, I, torch.bfloat16)
    x = randn(gen, T, H, dtype=torch.bfloat16)
    z = randn(gen, T, E)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with layer:
        with torch.cuda.stream(side):  # the current stream: picked up by the binding
            y1 = layer(x, z)
        y2 = layer(x, z, stream=side)  # an explicit torch stream
        y3 = layer(x, z, stream=side.cuda_stream)  # a raw cudaStream_t
        side.synchronize()
    want = torch_moe(x, z, w13, w2, k, True)
    for y in (y1, y2, y3):
        assert rel_error(y, want) < 1e-2


def test_layer_cuda_graph_capture_with_padding(gen):
    E, k, H, I, T = 8, 2, 512, 256, 16
    layer, w13, w2 = make_layer(gen, E, k, H, I, torch.bfloat16)
    with layer:
        x = randn(gen, T, H, dtype=torch.bfloat16)
        z = randn(gen, T, E)
        n_valid = torch.tensor([T], dtype=torch.int32, device="cuda")
        out = torch.empty(T, H, dtype=torch.bfloat16, device="cuda")
        ws = libmoe.empty_workspace(layer.workspace_size(T, "cuda"), like=x)
        assert ws.data_ptr() % 256 == 0
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture
            layer(x, z, num_valid_tokens=n_valid, output=out, workspace=ws)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layer(x, z, num_valid_tokens=n_valid, output=out, workspace=ws)
        for valid in (T, 11, 1):
            x.copy_(randn(gen, T, H, dtype=torch.bfloat16))
            z.copy_(randn(gen, T, E))
            n_valid.fill_(valid)
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert not out.isnan().any()
            assert (out[valid:] == 0).all()
            want = torch_moe(x[:valid], z[:valid], w13, w2, k, True)
            assert rel_error(out[:valid], want) < 1e-2


def test_dispatcher_and_runner_on_cuda_match_cpu(gen):
    E, k, H, I, T = 16, 4, 256, 128, 50
    w13 = randn(gen, E, 2 * I, H, dtype=torch.bfloat16, scale=H ** -0.5)
    w2 = randn(gen, E, H, I, dtype=torch.bfloat16, scale=I ** -0.5)
    x = randn(gen, T, H, dtype=torch.bfloat16)
    ids = torch.randint(-1, E, (T, k), device="cuda", dtype=torch.int32, generator=gen)
    w = torch.rand(T, k, device="cuda", generator=gen)
    with libmoe.Dispatcher(E, device="cuda") as d, libmoe.Runner(E, H, I) as r:
        r.set_weights(w13, w2)
        local, counts, offsets, slots = d(ids)
        y = r(x, local, w, offsets, slots)
        torch.cuda.synchronize()
    mapping = np.arange(E, dtype=np.int32)
    for got, want in zip((local, counts, offsets, slots), ref.dispatch(ids.cpu().numpy(), mapping, E)):
        np.testing.assert_array_equal(got.cpu().numpy(), want)
    want = ref.experts(x.double().cpu().numpy(), ids.cpu().numpy(), w.double().cpu().numpy(),
                       w13.double().cpu().numpy(), w2.double().cpu().numpy())
    assert ref.rel_error(y.double().cpu().numpy(), want) < 1e-2


def test_mixed_devices_are_rejected(gen):
    E, k, H, I = 4, 2, 64, 64
    layer, _, _ = make_layer(gen, E, k, H, I, torch.float32)
    with layer, pytest.raises(libmoe.MoeError):
        layer(torch.zeros(3, H, device="cuda"), torch.zeros(3, E))  # logits on the CPU


class DLPackOnly:
    """A CUDA array that only speaks DLPack (as a JAX array does)."""

    def __init__(self, t):
        self._t = t

    def __dlpack__(self, stream=None):
        return self._t.__dlpack__(stream=stream)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


def test_layer_cuda_dlpack_producer(gen):
    E, k, H, I, T = 8, 2, 256, 256, 20
    layer, w13, w2 = make_layer(gen, E, k, H, I, torch.bfloat16)
    x = randn(gen, T, H, dtype=torch.bfloat16)
    z = randn(gen, T, E)
    out = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    with layer:
        # No framework to allocate in: the output is given; the stream is explicit.
        layer(DLPackOnly(x), DLPackOnly(z), output=out, stream=stream)
        with pytest.raises(TypeError, match="output"):
            layer(DLPackOnly(x), DLPackOnly(z))
    torch.cuda.synchronize()
    assert rel_error(out, torch_moe(x, z, w13, w2, k, True)) < 1e-2


def test_layer_cupy_arrays(gen):
    cupy = pytest.importorskip("cupy")
    E, k, H, I, T = 8, 2, 256, 256, 20
    w13 = randn(gen, E, 2 * I, H, scale=H ** -0.5)
    w2 = randn(gen, E, H, I, scale=I ** -0.5)
    x = randn(gen, T, H)
    z = randn(gen, T, E)
    torch.cuda.synchronize()
    as_cupy = lambda t: cupy.asarray(t)  # noqa: E731  (zero-copy through __cuda_array_interface__)
    with libmoe.Layer.create(as_cupy(w13), as_cupy(w2), method="softmax_topk", num_experts=E,
                             top_k=k, router_options=dict(renormalize=True)) as layer:
        y = layer(as_cupy(x), as_cupy(z))  # allocated by CuPy, run on CuPy's current stream
        cupy.cuda.get_current_stream().synchronize()
    assert isinstance(y, cupy.ndarray) and y.dtype == np.float32
    assert rel_error(torch.as_tensor(y, device="cuda"), torch_moe(x, z, w13, w2, k, True)) < 1e-5
