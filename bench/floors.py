#!/usr/bin/env python3
"""Roofline floors of the benchmark cases, before any measurement.

Expected work under uniform random routing: an expert is hit unless all T
tokens avoid it, P = (1 - k/E)^T; valid local slots = T * k * E_loc / E.
bytes = experts hit * 3*I*H*2 (bf16 gated weights) + T*H*2 (x) + T*H*2 (y);
flops = 2 * slots * 3*I*H. Floor = max(bytes / copy BW, flops / matmul peak).
Defaults are the ceilings the issue quotes for the H100 (copy 3.0 TB/s read +
write, bf16 matmul 730 TFLOP/s); bench/moe_bench.py measures its own.

  python3 bench/floors.py [--copy-gbs 3000] [--tflops 730]
"""
import argparse

SHAPES = {
    "mixtral": dict(E=8, E_loc=8, k=2, H=4096, I=14336),
    "qwen3": dict(E=128, E_loc=128, k=8, H=2048, I=768),
    "deepseek": dict(E=256, E_loc=32, k=8, H=7168, I=2048),
}
TOKENS = [1, 8, 64, 256, 1024, 4096, 16384]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--copy-gbs", type=float, default=3000.0)
    ap.add_argument("--tflops", type=float, default=730.0)
    a = ap.parse_args()
    print(f"| shape | T | experts hit | weight MB | GFLOP | bytes floor us | flops floor us | floor us | bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in SHAPES.items():
        for T in TOKENS:
            hit = s["E_loc"] * (1 - (1 - s["k"] / s["E"]) ** T)
            slots = T * s["k"] * s["E_loc"] / s["E"]
            wbytes = hit * 3 * s["I"] * s["H"] * 2
            nbytes = wbytes + 4 * T * s["H"]
            flops = 2 * slots * 3 * s["I"] * s["H"]
            tb = nbytes / (a.copy_gbs * 1e9) * 1e6
            tf = flops / (a.tflops * 1e12) * 1e6
            print(f"| {name} | {T} | {hit:.1f} | {wbytes / 1e6:.0f} | {flops / 1e9:.1f} | {tb:.1f} | "
                  f"{tf:.1f} | {max(tb, tf):.1f} | {'memory' if tb >= tf else 'compute'} |")


if __name__ == "__main__":
    main()
