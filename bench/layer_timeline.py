#!/usr/bin/env python3
"""Kernel timeline of one MoE layer (dispatch + runner) in a CUDA graph replay.

For each shape:T case it builds the layer of bench/moe_bench.py (same shapes,
same random inputs, one input set), captures dispatch + runner in a graph,
replays it under torch.profiler (CUPTI) and prints, per kernel of the replay
in launch order: the mean duration, the mean gap since the previous kernel
ended (launch latency and drain), and the mean time of the whole replay from
the first kernel's start to the last kernel's end. This splits a small-T layer
into GEMM time and fixed costs, which the benchmark's single number cannot.

  PYTHONPATH=bindings/python MOE_LIB_PATH=build-bench python3 bench/layer_timeline.py qwen3:1 deepseek:1
  ... --json bench/results/layer_timeline.json
  ... --quant block deepseek:8192 mixtral:64     (FP8 runner, weights of bench/fp8_bench.py)
"""
import argparse
import json
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import fp8_bench
import libmoe
from moe_bench import SHAPES
from timing import graph_of


def build_layer(cfg, T, quant=None):
    E, E_loc, k, H, I = cfg["E"], cfg["E_loc"], cfg["k"], cfg["H"], cfg["I"]
    dev = torch.device("cuda")
    bf16 = torch.bfloat16
    router = libmoe.Router(cfg["method"], E, k, **cfg["router"])
    disp = libmoe.Dispatcher(E, ep_rank=0, ep_size=cfg["ep_size"], device="cuda")
    if quant:
        gen = torch.Generator(device="cuda")
        gen.manual_seed(1)
        w13, w2, s13, s2 = fp8_bench.make_weights(E_loc, H, I, quant == "block", gen)
        runner = libmoe.Runner(E_loc, H, I, quant_mode=fp8_bench.MODES[quant])
        runner.set_weights(w13, w2, s13, s2)
    else:
        w13 = (torch.randn(E_loc, 2 * I, H, device=dev) / H ** 0.5).to(bf16)
        w2 = (torch.randn(E_loc, H, I, device=dev) / I ** 0.5).to(bf16)
        runner = libmoe.Runner(E_loc, H, I)
        runner.set_weights(w13, w2)
    x = torch.randn(T, H, device=dev).to(bf16)
    logits = torch.randn(T, E, device=dev)
    bias = (0.1 * torch.randn(E, device=dev)) if cfg["method"] == "deepseek_v3" else None
    ids = torch.empty(T, k, device=dev, dtype=torch.int32)
    wts = torch.empty(T, k, device=dev, dtype=torch.float32)
    local = torch.empty(T, k, device=dev, dtype=torch.int32)
    counts = torch.empty(E_loc, device=dev, dtype=torch.int32)
    offsets = torch.empty(E_loc + 1, device=dev, dtype=torch.int32)
    slots = torch.empty(T * k, device=dev, dtype=torch.int32)
    y = torch.empty(T, H, device=dev, dtype=bf16)
    ws_d = libmoe.empty_workspace(max(disp.workspace_size(T, k), 256), like=x)
    ws_r = libmoe.empty_workspace(max(runner.workspace_size(T, k, "cuda"), 256), like=x)
    router.route(logits, bias, topk_ids=ids, topk_weights=wts)

    def layer():
        disp.dispatch(ids, local_ids=local, expert_counts=counts, expert_offsets=offsets,
                      sorted_slots=slots, workspace=ws_d)
        runner.run(x, local, wts, offsets, slots, output=y, workspace=ws_r)

    layer()
    torch.cuda.synchronize()
    build_layer.valid_slots = int((local >= 0).sum())  # printed with the timeline
    build_layer.experts_hit = int((counts > 0).sum())
    keep = (w13, w2, x, logits, bias, ids, wts, local, counts, offsets, slots, y, ws_d, ws_r)
    return layer, (router, disp, runner), keep


def timeline(name, T, reps, quant=None):
    layer, handles, keep = build_layer(SHAPES[name], T, quant)
    g = graph_of(layer)
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            g.replay()
            torch.cuda.synchronize()  # one replay per window: gaps are within a replay
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
              and not e.name.startswith(("Memcpy", "Memset", "cudaGraph"))]
    events.sort(key=lambda e: e.time_range.start)
    # Split into replays: a new replay starts after a gap longer than any in-replay gap
    # (the host synchronises between replays, tens of microseconds).
    replays, cur, last_end = [], [], None
    for e in events:
        if last_end is not None and e.time_range.start - last_end > 20.0 and cur:
            replays.append(cur)
            cur = []
        cur.append(e)
        last_end = e.time_range.end
    if cur:
        replays.append(cur)
    n = statistics.mode(len(r) for r in replays)
    replays = [r for r in replays if len(r) == n]
    rows = []
    for i in range(n):
        durs = [r[i].time_range.end - r[i].time_range.start for r in replays]
        gaps = [r[i].time_range.start - r[i - 1].time_range.end for r in replays] if i else [0.0]
        rows.append(dict(kernel=replays[0][i].name[:90], us=statistics.median(durs),
                         gap_before_us=statistics.median(gaps)))
    span = statistics.median(r[-1].time_range.end - r[0].time_range.start for r in replays)
    slots = build_layer.valid_slots
    print(f"{name}{' fp8 ' + quant if quant else ''} T={T} ({slots} local slots, "
          f"{build_layer.experts_hit} experts, GEMM1+GEMM2 "
          f"{2.0 * slots * 3 * SHAPES[name]['I'] * SHAPES[name]['H'] / 1e9:.1f} GFLOP): "
          f"{len(replays)} replays, {n} kernels, first start to last end {span:.1f} us "
          f"(kernels {sum(r['us'] for r in rows):.1f} us, gaps {sum(r['gap_before_us'] for r in rows):.1f} us)")
    for r in rows:
        print(f"  {r['us']:8.1f} us  gap {r['gap_before_us']:6.1f} us  {r['kernel']}")
    for h in handles:
        h.close()
    del keep
    return dict(shape=name, T=T, quant=quant or "bf16", valid_slots=slots,
                experts_hit=build_layer.experts_hit, span_us=span, kernels=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", default=["qwen3:1", "deepseek:1", "mixtral:1"])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json")
    ap.add_argument("--quant", choices=sorted(fp8_bench.MODES), help="FP8 runner (default: bf16)")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = []
    for c in args.cases:
        name, T = c.split(":")
        out.append(timeline(name, int(T), args.reps, args.quant))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), results=out), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
