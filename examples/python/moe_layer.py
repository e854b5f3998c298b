#!/usr/bin/env python3
"""A MoE layer through libmoe from Python: route -> dispatch -> run in one
call, timed, and checked against a float64 NumPy reference.

Runs on torch CUDA tensors when torch, a GPU and a CUDA-enabled libmoe are
there; on torch CPU tensors when only torch is; on NumPy arrays otherwise.

    MOE_LIB_PATH=build python3 examples/python/moe_layer.py
    MOE_LIB_PATH=build python3 examples/python/moe_layer.py --framework numpy --dtype f32
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    import libmoe
except ImportError:  # not pip-installed: use the package of this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bindings" / "python"))
    import libmoe
from libmoe import reference as ref

TOLERANCE = {"f32": 1e-5, "bf16": 1e-2, "f16": 1e-2}


def pick_framework(choice):
    if choice in ("auto", "torch"):
        try:
            import torch
        except ImportError:
            if choice == "torch":
                raise
            return "numpy", "cpu"
        gpu = torch.cuda.is_available() and libmoe.has_cuda()
        return "torch", "cuda" if gpu else "cpu"
    return "numpy", "cpu"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--dtype", choices=sorted(TOLERANCE), default="bf16")
    ap.add_argument("--framework", choices=["auto", "torch", "numpy"], default="auto")
    ap.add_argument("--iters", type=int, default=None, help="timed calls (default: 20 on a GPU, 3 on the CPU)")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()

    T, E, k, H, I = a.tokens, a.experts, a.top_k, a.hidden, a.intermediate
    rng = np.random.default_rng(a.seed)
    # float32 masters; the layer sees them rounded to --dtype, the reference sees
    # exactly the rounded values in float64.
    x32 = rng.standard_normal((T, H), dtype=np.float32)
    z32 = rng.standard_normal((T, E), dtype=np.float32) * 2
    w13_32 = rng.standard_normal((E, 2 * I, H), dtype=np.float32) / np.sqrt(H)
    w2_32 = rng.standard_normal((E, H, I), dtype=np.float32) / np.sqrt(I)

    framework, device = pick_framework(a.framework)
    iters = a.iters or (20 if device == "cuda" else 3)
    dtype_kw = None
    if framework == "torch":
        import torch

        tdt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
        put = lambda arr: torch.from_numpy(arr).to(device=device, dtype=tdt)  # noqa: E731
        x, w13, w2 = put(x32), put(w13_32), put(w2_32)
        z = torch.from_numpy(z32).to(device)
        to64 = lambda t: t.double().cpu().numpy()  # noqa: E731
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    else:
        if a.dtype == "bf16":  # NumPy has no bf16: uint16 bits, said explicitly
            put, to64, dtype_kw = ref.f32_to_bf16, lambda b: ref.bf16_to_f32(b).astype(np.float64), "bf16"
        else:
            npdt = {"f32": np.float32, "f16": np.float16}[a.dtype]
            put, to64 = (lambda arr: arr.astype(npdt)), (lambda arr: arr.astype(np.float64))
        x, w13, w2, z = put(x32), put(w13_32), put(w2_32), z32
        sync = lambda: None  # noqa: E731

    with libmoe.Layer.create(w13, w2, method="softmax_topk", num_experts=E, top_k=k, dtype=dtype_kw,
                             router_options=dict(renormalize=True)) as layer:
        ws = libmoe.empty_workspace(layer.workspace_size(T, device), like=x)
        y = layer(x, z, output=None, workspace=ws, dtype=dtype_kw)  # warm-up, allocates y
        times = []
        for _ in range(iters):
            sync()
            t0 = time.perf_counter()
            layer(x, z, output=y, workspace=ws, dtype=dtype_kw)
            sync()
            times.append(time.perf_counter() - t0)

    ids, weights, _ = ref.route(z32.astype(np.float64), ref.SOFTMAX_TOPK, k, renormalize=True)
    want = ref.experts(to64(x), ids, weights, to64(w13), to64(w2))
    err = ref.rel_error(to64(y), want)
    ok = err < TOLERANCE[a.dtype]
    print("libmoe %s (%s): %s on %s, %s, T=%d E=%d k=%d H=%d I=%d"
          % (libmoe.version_string(), libmoe.library_path(), framework, device, a.dtype, T, E, k, H, I))
    print("time: median %.3f ms over %d calls" % (statistics.median(times) * 1e3, iters))
    print("rel error vs float64 reference: %.3e (tolerance %.0e): %s"
          % (err, TOLERANCE[a.dtype], "OK" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
