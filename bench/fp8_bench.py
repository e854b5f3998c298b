#!/usr/bin/env python3
"""libmoe FP8 runner benchmark (E4M3 weights, kernels/moe_runner_fp8.cu).

For a DeepSeek-V3 EP-of-8 slice and Mixtral-8x7B, with FP8 block-128 scales
and FP8 per-tensor scales, and T from 1 to 16384, it reports per case:
  - the median time of the FP8 runner alone (dispatch metadata precomputed),
    from one CUDA graph replaying NROT input sets with different routing, so
    small cases do not time a warm L2;
  - achieved TFLOP/s of the grouped FP8 GEMMs (2 * valid slots * 3 * I * H,
    gated SwiGLU experts) and the fraction of a measured FP8 matmul peak
    (torch._scaled_mm, 8192^3, E4M3 x E4M3 -> bf16, per-tensor scales);
  - HBM GB/s on the FP8 weight bytes really read (experts with tokens: the
    decode figure) and the fraction of the roofline floor
    max(bytes / copy bandwidth, flops / FP8 peak), both ceilings measured here;
  - the relative error against a float32 PyTorch reference of the same math
    (dequantized weights, activations quantized per token or per token per
    128 columns exactly as the library does) on sampled tokens.

  PYTHONPATH=bindings/python MOE_LIB_PATH=build python3 bench/fp8_bench.py
  ... --shapes deepseek --modes block --tokens 1,64,4096

Writes bench/results/fp8_bench.json (or --out).
  python3 bench/fp8_bench.py --table bench/results/fp8_bench.json   # markdown table
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
    # name: E global, E local (this rank), k, H, I, ep_size, router method and options
    "deepseek": dict(E=256, E_loc=32, k=8, H=7168, I=2048, ep_size=8, method="deepseek_v3",
                     router=dict(n_group=8, topk_group=4, routed_scaling_factor=2.5)),
    "mixtral": dict(E=8, E_loc=8, k=2, H=4096, I=14336, ep_size=1, method="softmax_topk",
                    router=dict(renormalize=True)),
}
MODES = {"block": "fp8_block_128", "per_tensor": "fp8_per_tensor"}
TOKENS = [1, 8, 64, 256, 1024, 4096, 16384]
NROT = 4
F8 = torch.float8_e4m3fn if torch is not None else None


def measure_ceilings():
    """Copy bandwidth (read + write bytes / s) and the FP8 matmul peak (TFLOP/s)."""
    copy = copy_gbs()
    m = 8192
    a = torch.randn(m, m, device="cuda").to(F8)
    b = torch.randn(m, m, device="cuda").to(F8)  # [N, K] row-major: b.t() is column-major
    one = torch.ones((), device="cuda")
    mm = lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    ms = events_median(mm, 20)
    peak = 2 * m ** 3 / (ms * 1e-3) / 1e12
    return copy, peak


def random_codes(shape, gen):
    """Uniform E4M3 codes over the finite range (NaN codes 0x7f / 0xff -> +-448)."""
    c = torch.randint(0, 256, shape, device="cuda", dtype=torch.int32, generator=gen)
    c = torch.where((c & 0x7F) == 0x7F, c - 1, c).to(torch.uint8)
    return c.view(F8)


def make_weights(E_loc, H, I, block, gen):
    """w13 [E, 2I, H], w2 [E, H, I] E4M3 with scales bringing them to variance ~1/fan_in
    (uniform codes have an rms near 110)."""
    w13 = random_codes((E_loc, 2 * I, H), gen)
    w2 = random_codes((E_loc, H, I), gen)
    if block:
        s13 = torch.rand(E_loc, 2 * I // 128, H // 128, device="cuda", generator=gen)
        s2 = torch.rand(E_loc, H // 128, I // 128, device="cuda", generator=gen)
    else:
        s13 = torch.rand(E_loc, device="cuda", generator=gen)
        s2 = torch.rand(E_loc, device="cuda", generator=gen)
    s13 = (0.5 + 1.5 * s13) / (110 * math.sqrt(H))
    s2 = (0.5 + 1.5 * s2) / (110 * math.sqrt(I))
    return w13, w2, s13.float().contiguous(), s2.float().contiguous()


def dequant(w, s, block):
    """f32 weights [E, R, C] from E4M3 codes and their scales."""
    wf = w.float()
    if not block:
        return wf * s.view(-1, 1, 1)
    return wf * s.repeat_interleave(128, 1).repeat_interleave(128, 2)


def fake_quant(v, group):
    """The library's activation quantization of rows v [n, C] in f32: scale =
    amax / 448 per `group` columns (NaN ignored, 0 -> 1), E4M3(v / scale) * scale."""
    n, C = v.shape
    g = v.view(n, C // group, group)
    amax = torch.nan_to_num(g.abs(), nan=0.0).amax(dim=2, keepdim=True)
    s = amax / 448.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = (g / s).clamp(-448, 448).to(F8).float() * s
    return q.view(n, C)


def torch_reference(x, ids, w, W13, W2, I, rows, block):
    """f32 reference for the sampled rows (local ids, -1 skipped), with FP8 activations."""
    H = x.shape[1]
    out = torch.zeros(len(rows), H, device=x.device, dtype=torch.float32)
    for n, t in enumerate(rows):
        xq = fake_quant(x[t:t + 1].float(), 128 if block else H)
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            h = (W13[e] @ xq[0]).view(1, -1)
            h = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
            hq = fake_quant(h, 128 if block else I)
            out[n] += float(w[t, j]) * (W2[e] @ hq[0])
    return out


def bench_case(name, cfg, mode, tokens, ceilings, reps, check_rows):
    copy_gbs, peak = ceilings
    E, E_loc, k, H, I = cfg["E"], cfg["E_loc"], cfg["k"], cfg["H"], cfg["I"]
    block = mode == "block"
    dev = torch.device("cuda")
    bf16 = torch.bfloat16
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1)
    w13, w2, s13, s2 = make_weights(E_loc, H, I, block, gen)
    W13, W2 = dequant(w13, s13, block), dequant(w2, s2, block)  # f32, for the accuracy check
    router = libmoe.Router(cfg["method"], E, k, **cfg["router"])
    disp = libmoe.Dispatcher(E, ep_rank=0, ep_size=cfg["ep_size"], device="cuda")
    runner = libmoe.Runner(E_loc, H, I, quant_mode=MODES[mode])
    runner.set_weights(w13, w2, s13, s2)
    bias = (0.1 * torch.randn(E, device=dev)) if cfg["method"] == "deepseek_v3" else None
    rows_out = []
    for T in tokens:
        xs = [torch.randn(T, H, device=dev).to(bf16) for _ in range(NROT)]
        ids, wts, local, counts, offsets, slots = routing_buffers(T, k, E_loc, NROT)
        ys = [torch.full((T, H), float("nan"), device=dev, dtype=bf16) for _ in range(NROT)]
        ws_d = libmoe.empty_workspace(max(disp.workspace_size(T, k), 256), like=xs[0])
        ws_r = libmoe.empty_workspace(max(runner.workspace_size(T, k, "cuda"), 256), like=xs[0])
        for r in range(NROT):
            router.route(torch.randn(T, E, device=dev), bias, topk_ids=ids[r], topk_weights=wts[r])
            disp.dispatch(ids[r], local_ids=local[r], expert_counts=counts[r],
                          expert_offsets=offsets[r], sorted_slots=slots[r], workspace=ws_d)

        def run(r):
            runner.run(xs[r], local[r], wts[r], offsets[r], slots[r], output=ys[r], workspace=ws_r)

        g = graph_of(lambda: [run(r) for r in range(NROT)])
        for y in ys:
            y.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        t_run = events_median(g.replay, reps, NROT) * 1e3  # us

        valid_slots = sum(int((l >= 0).sum()) for l in local) / NROT
        experts_hit = sum(int((c > 0).sum()) for c in counts) / NROT
        w_bytes = experts_hit * 3 * I * H  # E4M3: one byte per weight
        bytes_total = w_bytes + 2 * T * H * 2
        flops = 2.0 * valid_slots * 3 * I * H
        floor_us = max(bytes_total / (copy_gbs * 1e9), flops / (peak * 1e12)) * 1e6

        rows = list(range(0, T, max(1, T // check_rows)))[:check_rows]
        ref = torch_reference(xs[0], local[0], wts[0], W13, W2, I, rows, block)
        err = rel_err(ys[0][rows], ref)

        row = dict(shape=name, mode=mode, T=T, E=E, E_loc=E_loc, k=k, H=H, I=I,
                   valid_slots=valid_slots, experts_hit=experts_hit, weight_bytes=w_bytes,
                   bytes=bytes_total, flops=flops, floor_us=floor_us, runner_us=t_run,
                   tflops=flops / (t_run * 1e-6) / 1e12,
                   peak_frac=flops / (t_run * 1e-6) / 1e12 / peak,
                   weight_gbs=w_bytes / (t_run * 1e-6) / 1e9,
                   hbm_frac=w_bytes / (t_run * 1e-6) / 1e9 / copy_gbs,
                   floor_frac=floor_us / t_run, err=err)
        rows_out.append(row)
        print(f"{name:8s} {mode:10s} T={T:6d} runner {t_run:9.1f} us  floor {floor_us:8.1f} us  "
              f"frac {row['floor_frac']:.2f}  {row['tflops']:7.1f} TF/s ({row['peak_frac']:.2f} of FP8 peak)  "
              f"{row['weight_gbs']:7.0f} GB/s of FP8 weights  err {err:.1e}", flush=True)
        del g
        torch.cuda.empty_cache()
    for h in (runner, disp, router):
        h.close()
    return rows_out


def table(path):
    """Markdown table of a results JSON (the README's FP8 tables)."""
    with open(path) as f:
        data = json.load(f)
    print("| shape | mode | T | runner us | floor us | fraction | TFLOP/s | FP8 weight GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in data["results"]:
        print(f"| {r['shape']} | {r['mode']} | {r['T']} | {r['runner_us']:.1f} | {r['floor_us']:.1f} | "
              f"{r['floor_frac']:.2f} | {r['tflops']:.1f} | {r['weight_gbs']:.0f} |")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        return table(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="deepseek,mixtral")
    ap.add_argument("--modes", default="block,per_tensor")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--check-rows", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "fp8_bench.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    ceilings = measure_ceilings()
    print(f"device {torch.cuda.get_device_name()}: copy {ceilings[0]:.0f} GB/s (read+write), "
          f"FP8 _scaled_mm 8192^3 {ceilings[1]:.0f} TFLOP/s", flush=True)
    tokens = [int(t) for t in args.tokens.split(",")]
    results = []
    for name in args.shapes.split(","):
        for mode in args.modes.split(","):
            results += bench_case(name, SHAPES[name], mode, tokens, ceilings, args.reps, args.check_rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                libmoe=libmoe.version_string(), copy_gbs=ceilings[0], fp8_matmul_tflops=ceilings[1],
                date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
