#!/usr/bin/env python3
"""Replays one MoE layer many times and checks that every replay gives bitwise
the same output (a race shows up as replays that differ), and, with --ref-dir,
that the output equals the one an earlier invocation saved there (the first
invocation saves it): a kernel switch that must not change results, checked
across processes (switches read once per process, such as MOE_PDL).

  PYTHONPATH=bindings/python MOE_LIB_PATH=build python3 bench/replay_check.py \\
      --replays 50 --ref-dir /tmp/ref deepseek:64 mixtral:64

Exit status 1 when any replay or any comparison differs.
"""
import argparse
import os
import sys

import torch

from layer_timeline import build_layer
from moe_bench import SHAPES
from timing import graph_of


def align256(v):
    return (v + 255) // 256 * 256


def runner_regions(cfg, T):
    """The bf16 runner workspace's regions (kernels/moe_runner.cu layout()): name -> (offset, row bytes)."""
    n, E_loc, H, I = T * cfg["k"], cfg["E_loc"], cfg["H"], cfg["I"]
    off = align256((E_loc + 1) * 4)
    regions = dict(tile_map=(0, 4), bad_rows_counters=(off, 4))
    off += 256
    regions["h"] = (off, I * 2)
    off += align256(n * I * 2)
    regions["out2"] = (off, H * 2)
    off += align256(n * H * 4)
    regions["end"] = (off, 1)
    return regions


def describe(cfg, T, keep, snap, first_snap):
    """Where a replay's intermediates differ from the first replay's."""
    parts = []
    for key in ("offsets", "slots"):
        if not torch.equal(snap[key], first_snap[key]):
            parts.append(f"{key} differ")
    ws, ws0 = snap["ws"], first_snap["ws"]
    regions = sorted(runner_regions(cfg, T).items(), key=lambda kv: kv[1][0])
    for (name, (off, row)), (_, (end, _)) in zip(regions, regions[1:]):
        d = (ws[off:end] != ws0[off:end]).nonzero().flatten()
        if d.numel():
            rws = sorted(set((d // row).tolist()))
            where = ""
            if name == "h":  # (row, column) of the differing elements
                els = sorted(set((d // 2).tolist()))
                where = " at " + str([(e // (row // 2), e % (row // 2)) for e in els[:10]])
            parts.append(f"{name}: {d.numel()} bytes in rows {rws[:8]}{'...' if len(rws) > 8 else ''}{where}")
    return "; ".join(parts) or "intermediates equal"


def check_case(name, T, replays, ref_dir, quant=None):
    cfg = SHAPES[name]
    layer, handles, keep = build_layer(cfg, T, quant)
    y = keep[11]  # the layer's output (build_layer's keep tuple)
    g = graph_of(layer)
    outs, snaps = [], []
    for _ in range(replays):
        y.fill_(float("nan"))  # a bf16 output in both runners
        g.replay()
        torch.cuda.synchronize()
        outs.append(y.view(torch.int16).clone())
        snaps.append(dict(offsets=keep[9].clone(), slots=keep[10].clone(), ws=keep[13].clone()))
        if len(snaps) > 1 and torch.equal(outs[-1], outs[0]):
            snaps[-1] = None  # keep only the replays that differ
    first = outs[0]
    bad = [i for i, o in enumerate(outs) if not torch.equal(o, first)]
    rows = sorted({r for i in bad for r in (outs[i] != first).any(dim=1).nonzero().flatten().tolist()})
    ok = not bad and not bool(first.view(torch.bfloat16).isnan().any())
    msg = (f"{name}{' fp8 ' + quant if quant else ''} T={T} ({build_layer.valid_slots} local slots, {build_layer.experts_hit} experts): "
           f"{len(bad)} of {replays} replays differ from the first (rows {rows[:12]})")
    for i in bad[:3] if not quant else []:  # the FP8 runner's workspace has another layout
        yd = (outs[i].view(torch.bfloat16).float() - first.view(torch.bfloat16).float()).abs().max()
        msg += f"\n    replay {i}: max |y diff| {float(yd):.3g}; {describe(cfg, T, keep, snaps[i], snaps[0])}"
    if ref_dir:
        path = os.path.join(ref_dir, f"{name}_{T}{'_' + quant if quant else ''}.pt")
        if os.path.exists(path):
            ref = torch.load(path).to(first.device)
            same = torch.equal(ref, first)
            ok = ok and same
            msg += f"; {'equal to' if same else 'DIFFERENT from'} {path}"
            if not same:
                msg += f" in {int((ref != first).sum())} elements"
        else:
            os.makedirs(ref_dir, exist_ok=True)
            torch.save(first.cpu(), path)
            msg += f"; saved {path}"
    print(msg, flush=True)
    for h in handles:
        h.close()
    del keep, g
    torch.cuda.empty_cache()
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="+", help="shape:T, e.g. deepseek:64")
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--ref-dir")
    ap.add_argument("--quant", choices=["block", "per_tensor"], help="FP8 runner (weights of bench/fp8_bench.py)")
    args = ap.parse_args()
    torch.manual_seed(0)
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MOE_"))
    print(f"== {env or 'defaults'}")
    ok = True
    for c in args.cases:
        name, T = c.split(":")
        ok = check_case(name, int(T), args.replays, args.ref_dir, args.quant) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
