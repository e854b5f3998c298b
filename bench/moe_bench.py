#!/usr/bin/env python3
"""libmoe benchmark: the fused MoE layer on the GPU beside PyTorch peers.

For the three shapes of docs (Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V3 EP-of-8
slice) and T in {1, 8, 64, 256, 1024, 4096, 16384} it reports, per case:
  - the median time of the whole layer (dispatch + runner, one CUDA graph
    replay), of the router alone, and of the dispatch metadata alone;
  - achieved HBM GB/s on the weight bytes really read (experts with tokens);
  - achieved TFLOP/s (2 * valid slots * 3 * I * H for gated experts);
  - the fraction of the roofline floor max(bytes / copy BW, flops / matmul
    peak), with both ceilings measured in this run;
  - the same for a PyTorch per-expert loop and torch._grouped_mm (with its
    permutation and weighted reduction), on the same inputs, checked the same
    way (relative error against a float32 PyTorch reference on sampled tokens).

Inputs are random (never zeros); NROT input sets with different routing are
captured in one graph and the replay time divided by NROT, so small cases do
not time the L2 cache. Writes bench/results/moe_bench.json (or --out) and, with
--plots, PNG plots next to it.

  PYTHONPATH=bindings/python MOE_LIB_PATH=build python3 bench/moe_bench.py --plots
  python3 bench/moe_bench.py --table bench/results/moe_bench.json   # markdown table
  python3 bench/moe_bench.py --plots-of bench/results/moe_bench.json  # PNGs again (matplotlib)
"""
import argparse
import json
import math
import os
import sys
import time

try:
    import torch

    import libmoe
    from timing import copy_gbs, events_median, graph_of, rel_err, routing_buffers
except ImportError:  # --table needs neither
    torch = libmoe = None

SHAPES = {
    # name: (E global, E local, k, H, I, ep_size, routing method, router options)
    "mixtral": dict(E=8, E_loc=8, k=2, H=4096, I=14336, ep_size=1, method="softmax_topk",
                    router=dict(renormalize=True)),
    "qwen3": dict(E=128, E_loc=128, k=8, H=2048, I=768, ep_size=1, method="softmax_topk",
                  router=dict(renormalize=True)),
    "deepseek": dict(E=256, E_loc=32, k=8, H=7168, I=2048, ep_size=8, method="deepseek_v3",
                     router=dict(n_group=8, topk_group=4, routed_scaling_factor=2.5)),
}
TOKENS = [1, 8, 64, 256, 1024, 4096, 16384]
NROT = 4


def measure_ceilings():
    copy = copy_gbs()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = events_median(lambda: torch.matmul(a, b), 20)
    peak = 2 * 8192 ** 3 / (ms * 1e-3) / 1e12
    return copy, peak


def act_silu_gated(h, I):
    return torch.nn.functional.silu(h[:, :I]) * h[:, I:]


def torch_reference(x, ids, w, w13, w2, I, rows):
    """float32 reference for the sampled rows (ids are local, -1 skipped)."""
    out = torch.zeros(len(rows), x.shape[1], device=x.device, dtype=torch.float32)
    for n, t in enumerate(rows):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            h = w13[e].float() @ x[t].float()
            h = torch.nn.functional.silu(h[:I]) * h[I:]
            out[n] += float(w[t, j]) * (w2[e].float() @ h)
    return out


def peer_loop(x, ids, w, w13, w2, I, y):
    """PyTorch per-expert loop (eager; host syncs through nonzero)."""
    y.zero_()
    for e in range(w13.shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w13[e].t()
        h = act_silu_gated(h, I)
        o = (h @ w2[e].t()) * w[tok, slot].unsqueeze(1).to(h.dtype)
        y.index_add_(0, tok, o)
    return y


def peer_grouped_mm(x, ids, w, w13t, w2t, I, E_loc, y):
    """torch._grouped_mm with the permutation and the weighted reduction."""
    T, K = ids.shape
    flat = ids.reshape(-1)
    key = torch.where(flat < 0, torch.full_like(flat, E_loc), flat)
    order = torch.argsort(key, stable=True)
    # scatter_add, not bincount: bincount reads its size back to the host (no graph capture).
    counts = torch.zeros(E_loc + 1, device=x.device, dtype=torch.int64).scatter_add_(
        0, key.long(), torch.ones_like(key, dtype=torch.int64))[:E_loc]
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x[order // K]
    h = torch._grouped_mm(xs, w13t, offs=offs)
    h = act_silu_gated(h, I)
    o = torch._grouped_mm(h, w2t, offs=offs)
    valid = (key[order] < E_loc).unsqueeze(1)
    o = torch.where(valid, o * w.reshape(-1)[order].unsqueeze(1).to(o.dtype), torch.zeros_like(o))
    y.zero_()
    y.index_add_(0, order // K, o)
    return y


def time_grouped_mm(name, T, xs, local, wts, w13t, w2t, I, E_loc, reps, rows, ref):
    """(median us, rel error, how it was timed) of the torch._grouped_mm peer."""
    y_gm = torch.empty(T, xs[0].shape[1], device=xs[0].device, dtype=xs[0].dtype)
    gm = lambda: [peer_grouped_mm(xs[r], local[r], wts[r], w13t, w2t, I, E_loc, y_gm)  # noqa: E731
                  for r in range(NROT)]
    try:
        try:
            mode = "graph"
            t = events_median(graph_of(gm).replay, reps, NROT) * 1e3
        except RuntimeError as exc:  # not capturable: time it eagerly, and say so
            print(f"  torch._grouped_mm not capturable at {name} T={T} ({exc}); eager", file=sys.stderr)
            torch.cuda.synchronize()
            mode = "eager"
            t = events_median(gm, reps, NROT) * 1e3
        peer_grouped_mm(xs[0], local[0], wts[0], w13t, w2t, I, E_loc, y_gm)
        return t, rel_err(y_gm[rows], ref), mode
    except Exception as exc:  # a peer that cannot run this case is reported, not fatal
        print(f"  torch._grouped_mm failed at {name} T={T}: {exc}", file=sys.stderr)
        return float("nan"), float("nan"), "failed"


def bench_shape(name, cfg, tokens, ceilings, reps, check_rows, skip_loop_above, peers=True):
    copy_gbs, peak = ceilings
    E, E_loc, k, H, I = cfg["E"], cfg["E_loc"], cfg["k"], cfg["H"], cfg["I"]
    dev = torch.device("cuda")
    bf16 = torch.bfloat16
    w13 = (torch.randn(E_loc, 2 * I, H, device=dev) / math.sqrt(H)).to(bf16)
    w2 = (torch.randn(E_loc, H, I, device=dev) / math.sqrt(I)).to(bf16)
    w13t, w2t = w13.transpose(1, 2), w2.transpose(1, 2)
    router = libmoe.Router(cfg["method"], E, k, **cfg["router"])
    disp = libmoe.Dispatcher(E, ep_rank=0, ep_size=cfg["ep_size"], device="cuda")
    runner = libmoe.Runner(E_loc, H, I)
    runner.set_weights(w13, w2)
    bias = (0.1 * torch.randn(E, device=dev)) if cfg["method"] == "deepseek_v3" else None
    rows_out = []
    for T in tokens:
        C = k
        xs = [torch.randn(T, H, device=dev).to(bf16) for _ in range(NROT)]
        logits = [torch.randn(T, E, device=dev) for _ in range(NROT)]
        ids, wts, local, counts, offsets, slots = routing_buffers(T, C, E_loc, NROT)
        ys = [torch.full((T, H), float("nan"), device=dev, dtype=bf16) for _ in range(NROT)]
        ws_d = libmoe.empty_workspace(max(disp.workspace_size(T, C), 256), like=xs[0])
        ws_r = libmoe.empty_workspace(max(runner.workspace_size(T, C, "cuda"), 256), like=xs[0])

        def route(r):
            router.route(logits[r], bias, topk_ids=ids[r], topk_weights=wts[r])

        def dispatch(r):
            disp.dispatch(ids[r], local_ids=local[r], expert_counts=counts[r],
                          expert_offsets=offsets[r], sorted_slots=slots[r], workspace=ws_d)

        def layer(r):
            dispatch(r)
            runner.run(xs[r], local[r], wts[r], offsets[r], slots[r], output=ys[r], workspace=ws_r)

        for r in range(NROT):
            route(r)
            layer(r)
        torch.cuda.synchronize()
        g_route = graph_of(lambda: [route(r) for r in range(NROT)])
        g_disp = graph_of(lambda: [dispatch(r) for r in range(NROT)])
        g_layer = graph_of(lambda: [layer(r) for r in range(NROT)])
        for y in ys:
            y.fill_(float("nan"))
        g_layer.replay()
        torch.cuda.synchronize()
        t_route = events_median(g_route.replay, reps, NROT) * 1e3
        t_disp = events_median(g_disp.replay, reps, NROT) * 1e3
        t_layer = events_median(g_layer.replay, reps, NROT) * 1e3

        # Work actually done, averaged over the rotated sets.
        valid_slots = sum(int((l >= 0).sum()) for l in local) / NROT
        experts_hit = sum(int((c > 0).sum()) for c in counts) / NROT
        w_bytes = experts_hit * 3 * I * H * 2
        bytes_total = w_bytes + 2 * T * H * 2
        flops = 2.0 * valid_slots * 3 * I * H
        floor_us = max(bytes_total / (copy_gbs * 1e9), flops / (peak * 1e12)) * 1e6

        rows = list(range(0, T, max(1, T // check_rows)))[:check_rows]
        ref = torch_reference(xs[0], local[0], wts[0], w13, w2, I, rows)
        err_ours = rel_err(ys[0][rows], ref)

        t_gm = err_gm = t_loop = err_loop = float("nan")
        gm_mode = "skipped"
        if peers:
            t_gm, err_gm, gm_mode = time_grouped_mm(name, T, xs, local, wts, w13t, w2t, I, E_loc, reps,
                                                     rows, ref)
        if peers and T <= skip_loop_above:
            y_loop = torch.empty(T, H, device=dev, dtype=bf16)
            t_loop = events_median(lambda: [peer_loop(xs[r], local[r], wts[r], w13, w2, I, y_loop)
                                            for r in range(NROT)], max(3, reps // 4), NROT) * 1e3
            peer_loop(xs[0], local[0], wts[0], w13, w2, I, y_loop)
            err_loop = rel_err(y_loop[rows], ref)

        row = dict(shape=name, T=T, E=E, E_loc=E_loc, k=k, H=H, I=I,
                   valid_slots=valid_slots, experts_hit=experts_hit,
                   weight_bytes=w_bytes, bytes=bytes_total, flops=flops, floor_us=floor_us,
                   layer_us=t_layer, router_us=t_route, dispatch_us=t_disp,
                   layer_weight_gbs=w_bytes / (t_layer * 1e-6) / 1e9,
                   layer_tflops=flops / (t_layer * 1e-6) / 1e12,
                   layer_floor_frac=floor_us / t_layer,
                   dispatch_share=t_disp / t_layer,
                   grouped_mm_us=t_gm, grouped_mm_timing=gm_mode, grouped_mm_floor_frac=floor_us / t_gm if t_gm == t_gm else None,
                   loop_us=t_loop, loop_floor_frac=floor_us / t_loop if t_loop == t_loop else None,
                   err_ours=err_ours, err_grouped_mm=err_gm, err_loop=err_loop,
                   speedup_vs_grouped_mm=t_gm / t_layer if t_gm == t_gm else None,
                   speedup_vs_loop=t_loop / t_layer if t_loop == t_loop else None)
        rows_out.append(row)
        print(f"{name:9s} T={T:6d} layer {t_layer:9.1f} us  floor {floor_us:8.1f} us  "
              f"frac {row['layer_floor_frac']:.2f}  {row['layer_tflops']:6.1f} TF/s  "
              f"{row['layer_weight_gbs']:7.0f} GB/s  router {t_route:6.1f} us  dispatch {t_disp:6.1f} us  "
              f"grouped_mm {t_gm:9.1f} us  loop {t_loop:9.1f} us  err {err_ours:.1e}/{err_gm:.1e}/{err_loop:.1e}",
              flush=True)
        del g_route, g_disp, g_layer
        torch.cuda.empty_cache()
    for h in (runner, disp, router):
        h.close()
    return rows_out


def plots(results, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = sorted({r["shape"] for r in results})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5))
    for ax, s in zip(axes, shapes):
        rs = [r for r in results if r["shape"] == s]
        T = [r["T"] for r in rs]
        for key, label in (("layer_us", "libmoe"), ("grouped_mm_us", "torch._grouped_mm"),
                           ("loop_us", "torch per-expert loop"), ("floor_us", "roofline floor")):
            ax.plot(T, [r[key] for r in rs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("time (us)")
        ax.set_title(s)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "time_vs_T.png"), dpi=110)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in shapes:
        rs = [r for r in results if r["shape"] == s]
        ax.plot([r["T"] for r in rs], [r["layer_floor_frac"] for r in rs], marker="o", label=f"libmoe {s}")
        ax.plot([r["T"] for r in rs], [r["grouped_mm_floor_frac"] or float("nan") for r in rs],
                marker="x", linestyle="--", label=f"grouped_mm {s}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens T")
    ax.set_ylabel("fraction of roofline floor")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "roofline_fraction.png"), dpi=110)


def fmt(v, spec):
    return "n/a" if v is None or v != v else format(v, spec)


def table(path):
    """Markdown table of a results JSON (the README's performance table)."""
    with open(path) as f:
        data = json.load(f)
    m = data["meta"]
    print(f"{m['device']}, copy {m['copy_gbs']:.0f} GB/s (read+write), bf16 matmul {m['matmul_tflops']:.0f} "
          f"TFLOP/s (measured in the run), torch {m['torch']}, {m['date']}\n")
    print("| shape | T | ours us | floor us | fraction | TFLOP/s | GB/s | grouped_mm us | loop us | "
          "speedup vs grouped_mm | speedup vs loop | router us | dispatch us |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in data["results"]:
        print(f"| {r['shape']} | {r['T']} | {r['layer_us']:.1f} | {r['floor_us']:.1f} | "
              f"{r['layer_floor_frac']:.2f} | {r['layer_tflops']:.1f} | {r['layer_weight_gbs']:.0f} | "
              f"{fmt(r['grouped_mm_us'], '.1f')} | {fmt(r['loop_us'], '.1f')} | "
              f"{fmt(r['speedup_vs_grouped_mm'], '.2f')} | {fmt(r['speedup_vs_loop'], '.2f')} | "
              f"{r['router_us']:.1f} | {r['dispatch_us']:.1f} |")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        return table(sys.argv[2])
    if len(sys.argv) == 3 and sys.argv[1] == "--plots-of":
        with open(sys.argv[2]) as f:
            return plots(json.load(f)["results"], os.path.dirname(os.path.abspath(sys.argv[2])))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="mixtral,qwen3,deepseek")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--check-rows", type=int, default=8)
    ap.add_argument("--loop-max-tokens", type=int, default=16384,
                    help="skip the per-expert loop peer above this T")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "moe_bench.json"))
    ap.add_argument("--plots", action="store_true")
    ap.add_argument("--no-peers", action="store_true", help="time libmoe only (sweeps)")
    args = ap.parse_args()
    torch.manual_seed(0)
    ceilings = measure_ceilings()
    print(f"device {torch.cuda.get_device_name()}: copy {ceilings[0]:.0f} GB/s (read+write), "
          f"bf16 matmul 8192^3 {ceilings[1]:.0f} TFLOP/s", flush=True)
    tokens = [int(t) for t in args.tokens.split(",")]
    results = []
    for name in args.shapes.split(","):
        results += bench_shape(name, SHAPES[name], tokens, ceilings, args.reps, args.check_rows,
                               args.loop_max_tokens, peers=not args.no_peers)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                libmoe=libmoe.version_string(), copy_gbs=ceilings[0], matmul_tflops=ceilings[1],
                date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv),
                env={k: v for k, v in os.environ.items() if k.startswith("MOE_RUNNER_")})
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    if args.plots:
        plots(results, os.path.dirname(os.path.abspath(args.out)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
