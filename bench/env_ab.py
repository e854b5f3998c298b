#!/usr/bin/env python3
"""In-process A/B of a run-time kernel switch on one MoE layer.

For each shape:T case it builds the layer of bench/layer_timeline.py (the
shapes of bench/moe_bench.py, one random input set, dispatch + runner),
captures it in one CUDA graph per setting of an environment variable that the
library reads at each launch (so each graph holds that setting's kernels),
checks that every setting gives bitwise the same output, then times the
graphs in alternating rounds (median of --reps replays per graph and round,
after a warm-up). Interleaving the settings in one process on the same
buffers removes the run-to-run spread between benchmark invocations (clocks,
where the weights landed in memory) that separate runs mix into an A/B.

  PYTHONPATH=bindings/python MOE_LIB_PATH=build python3 bench/env_ab.py \\
      --var MOE_RUNNER_DIRECT_TILES --values "0 1" qwen3:1 deepseek:8

Prints, per case and setting, the median over rounds and the spread of the
rounds, and each setting's median ratio to the first one's.
"""
import argparse
import os
import statistics
import sys

import torch

from layer_timeline import build_layer
from moe_bench import SHAPES
from timing import events_median, graph_of


def describe_difference(values, graphs, outputs, y):
    """Which settings differ from the first, where, and whether each graph repeats itself."""
    ref = outputs[0].float()
    for v, g, o in zip(values, graphs, outputs):
        diff = (o.view(torch.int16) != outputs[0].view(torch.int16))
        rows = diff.any(dim=1).nonzero().flatten().tolist()
        repeats = []
        for _ in range(3):
            y.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            repeats.append(torch.equal(y.view(torch.int16), o.view(torch.int16)))
        print(f"  {v}: {int(diff.sum())} elements differ from {values[0]} in rows {rows[:12]}"
              f"{'...' if len(rows) > 12 else ''}, max |diff| {float((o.float() - ref).abs().max()):.3g}, "
              f"NaN {int(o.isnan().sum())}; replays equal to its first: {repeats}")


def ab_case(name, T, var, values, rounds, reps):
    layer, handles, keep = build_layer(SHAPES[name], T)
    y = keep[11]  # the layer's output (build_layer's keep tuple)
    old = os.environ.get(var)
    graphs, outputs = [], []
    try:
        for v in values:
            if v == "unset":
                os.environ.pop(var, None)
            else:
                os.environ[var] = v
            g = graph_of(layer)  # graph_of runs the layer once eagerly, then captures it
            y.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            graphs.append(g)
            outputs.append(y.clone())
    finally:
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old
    same = all(torch.equal(o.view(torch.int16), outputs[0].view(torch.int16)) for o in outputs[1:])
    if not same:
        describe_difference(values, graphs, outputs, y)
    times = [[] for _ in values]
    for _ in range(rounds):
        for i, g in enumerate(graphs):
            times[i].append(events_median(g.replay, reps) * 1e3)
    base = statistics.median(times[0])
    print(f"{name} T={T} ({build_layer.valid_slots} local slots, {build_layer.experts_hit} experts), {var}: outputs "
          f"{'bitwise equal' if same else 'DIFFER'}; {rounds} rounds of {reps} replays")
    rows = []
    for v, ts in zip(values, times):
        med = statistics.median(ts)
        rows.append(dict(value=v, median_us=med, min_us=min(ts), max_us=max(ts), ratio=med / base))
        print(f"  {var}={v:8s} median {med:8.2f} us  rounds {min(ts):8.2f}-{max(ts):8.2f} us  "
              f"ratio {med / base:.3f}")
    for h in handles:
        h.close()
    del keep, graphs
    torch.cuda.empty_cache()
    return same, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="+", help="shape:T, e.g. qwen3:1")
    ap.add_argument("--var", required=True, help="environment variable read at each launch")
    ap.add_argument("--values", required=True,
                    help="space-separated settings ('unset': the variable removed); the first is the baseline")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    torch.manual_seed(0)
    values = args.values.split()
    ok = True
    for c in args.cases:
        name, T = c.split(":")
        same, _ = ab_case(name, int(T), args.var, values, args.rounds, args.reps)
        ok &= same
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
