#!/usr/bin/env python3
"""Router and dispatch-metadata times on the GPU, per dispatch algorithm.

For the shapes of moe_bench.py and each T, the median of NROT routings and of
NROT dispatches (counts, offsets, permutation) captured in one CUDA graph,
divided by NROT; the dispatch once per MOE_DISPATCH_ALGO value of --algos
(kernels/dispatch.cu reads it at each launch, so every graph is captured with
its own value). Every algorithm's outputs must equal the first one's. No
weights and no runner: the issue-4 targets for the router (DeepSeek-V3 method,
T=4096) and the dispatch metadata (T=4096) are read here and in moe_bench.

  PYTHONPATH=bindings/python MOE_LIB_PATH=build python3 bench/dispatch_bench.py \\
      --tokens 256,1024,4096,16384 --algos 1,0,2 --out bench/results/dispatch_bench.json
"""
import argparse
import json
import os

import torch

import libmoe
from moe_bench import NROT, SHAPES
from timing import events_median, graph_of, routing_buffers


def bench(name, cfg, T, algos, reps):
    dev = "cuda"
    E, E_loc, k = cfg["E"], cfg["E_loc"], cfg["k"]
    router = libmoe.Router(cfg["method"], E, k, **cfg["router"])
    disp = libmoe.Dispatcher(E, ep_rank=0, ep_size=cfg["ep_size"], device=dev)
    bias = (0.1 * torch.randn(E, device=dev)) if cfg["method"] == "deepseek_v3" else None
    logits = [torch.randn(T, E, device=dev) for _ in range(NROT)]
    ids, wts, local, counts, offsets, slots = routing_buffers(T, k, E_loc, NROT)
    ws = libmoe.empty_workspace(max(disp.workspace_size(T, k), 256), like=logits[0])

    def route(r):
        router.route(logits[r], bias, topk_ids=ids[r], topk_weights=wts[r])

    def dispatch(r):
        disp.dispatch(ids[r], local_ids=local[r], expert_counts=counts[r],
                      expert_offsets=offsets[r], sorted_slots=slots[r], workspace=ws)

    for r in range(NROT):
        route(r)
    g_route = graph_of(lambda: [route(r) for r in range(NROT)])
    row = dict(shape=name, T=T, E=E, E_loc=E_loc, k=k,
               router_us=events_median(g_route.replay, reps, NROT) * 1e3, dispatch_us={})
    first = None
    for algo in algos:
        os.environ["MOE_DISPATCH_ALGO"] = algo
        for r in range(NROT):
            slots[r].fill_(-7)
        g = graph_of(lambda: [dispatch(r) for r in range(NROT)])
        row["dispatch_us"][algo] = events_median(g.replay, reps, NROT) * 1e3
        got = [torch.cat([local[r].flatten(), counts[r], offsets[r], slots[r]]) for r in range(NROT)]
        if first is None:
            first = got
        elif not all(torch.equal(a, b) for a, b in zip(first, got)):
            raise SystemExit(f"{name} T={T}: MOE_DISPATCH_ALGO={algo} differs from {algos[0]}")
    os.environ.pop("MOE_DISPATCH_ALGO", None)
    times = "  ".join(f"algo {a} {t:6.1f} us" for a, t in row["dispatch_us"].items())
    print(f"{name:9s} T={T:6d}  router {row['router_us']:6.1f} us  dispatch {times}", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="mixtral,qwen3,deepseek")
    ap.add_argument("--tokens", default="1,64,256,1024,4096,16384")
    ap.add_argument("--algos", default="1", help="MOE_DISPATCH_ALGO values, the first the reference")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    algos = args.algos.split(",")
    rows = [bench(name, SHAPES[name], int(T), algos, args.reps)
            for name in args.shapes.split(",") for T in args.tokens.split(",")]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), algos=algos, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
