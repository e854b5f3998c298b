#!/usr/bin/env python3
"""Summarize the source page of an Nsight Compute report (CSV, SASS view).

    ncu -i REPORT.ncu-rep --page source --csv --print-source sass > src.csv
    python3 scripts/ncu_source_top.py src.csv[.gz] [N]
    python3 scripts/ncu_source_top.py src.csv[.gz] --regions K LO:HI:NAME...

For each kernel in the file: the column names, the sum of every numeric
column, and the N (default 60) instructions with the most warp stall
samples, each with its address, SASS text and the non-zero sample and
stall columns. Used by scripts/profile_gpu.sh (MOE_PROFILE_SOURCE=1).
--regions: for kernel K (0: the first in the file) the samples of each
address range LO..HI (hex, the low 20 bits of the address, both included)
and its five largest stall reasons, as shares of the kernel's samples.
Run 95's reports (two kernels each) printed the same table, the first
kernel's, under every kernel name: read only the first kernel's table.
The column set differs between ncu versions, so columns are found by name:
the ranking column is the first whose name holds "Warp Stall Sampling (All".
"""
import csv
import gzip
import sys


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def blocks(rows):
    """Splits the rows at each header row (one naming an address and source)."""
    header, body, title = None, [], ""
    for row in rows:
        lowered = [c.lower() for c in row]
        if any("address" in c for c in lowered) and any("source" in c for c in lowered):
            if header is not None:
                yield title, header, body
            header, body = row, []
        elif header is None:
            title = " ".join(row)[:200]
        elif len(row) == len(header):
            body.append(row)
        else:
            title = " ".join(row)[:200]
    if header is not None:
        yield title, header, body


def regions(tables, kernel, specs):
    title, header, body = tables[kernel]
    addr = next(i for i, h in enumerate(header) if "address" in h.lower())
    samples = header.index("# Samples")
    reasons = [i for i, h in enumerate(header) if h.startswith("stall_") and "Not Issued" not in h]
    total = sum(number(r[samples]) or 0.0 for r in body) or 1.0
    print(f"== {title}")
    print(f"   {total:.0f} samples")
    for spec in specs:
        lo, hi, name = spec.split(":")
        sel = [r for r in body if int(lo, 16) <= int(r[addr], 16) & 0xFFFFF <= int(hi, 16)]
        got = sum(number(r[samples]) or 0.0 for r in sel)
        by = sorted(((sum(number(r[i]) or 0.0 for r in sel), header[i][6:]) for i in reasons), reverse=True)[:5]
        print(f"   {name:14s} {got:8.0f} {100 * got / total:5.1f}%  " + ", ".join(f"{k}={v:.0f}" for v, k in by))


def main():
    path = sys.argv[1]
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    if len(sys.argv) > 3 and sys.argv[2] == "--regions":
        regions(list(blocks(rows)), int(sys.argv[3]), sys.argv[4:])
        return
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 60
    found = False
    for title, header, body in blocks(rows):
        found = True
        print(f"== {title}")
        print(f"   {len(body)} instructions; columns: {header}")
        numeric = [i for i in range(len(header)) if any(number(r[i]) is not None and r[i] != "" for r in body[:50])]
        totals = {header[i]: sum(number(r[i]) or 0.0 for r in body) for i in numeric}
        print("   totals: " + "; ".join(f"{k}={v:.0f}" for k, v in totals.items() if v))
        rank = next((i for i, h in enumerate(header) if "Warp Stall Sampling (All" in h), None)
        if rank is None:
            rank = next((i for i in numeric if "stall" in header[i].lower()), None)
        if rank is None:
            print("   no stall sampling column")
            continue
        addr = next(i for i, h in enumerate(header) if "address" in h.lower())
        src = next(i for i, h in enumerate(header) if "source" in h.lower())
        total = totals.get(header[rank], 0.0) or 1.0
        ordered = sorted(body, key=lambda r: -(number(r[rank]) or 0.0))
        print(f"   top {top} by {header[rank]} (total {total:.0f}):")
        for r in ordered[:top]:
            v = number(r[rank]) or 0.0
            if v <= 0:
                break
            extra = ", ".join(f"{header[i]}={r[i]}" for i in numeric
                              if i != rank and (number(r[i]) or 0) and
                              ("stall" in header[i].lower() or "sampl" in header[i].lower()))
            print(f"   {100 * v / total:5.1f}% {r[addr]:>8} {r[src][:70]:<70} {extra}")
    if not found:
        print("no source table found; the first lines were:")
        for row in rows[:10]:
            print("  ", row)


if __name__ == "__main__":
    main()
