#!/usr/bin/env python3
"""Summarize the source page of an Nsight Compute report (CSV, SASS view).

    ncu -i REPORT.ncu-rep --page source --csv --print-source sass > src.csv
    python3 scripts/ncu_source_top.py src.csv [N]

For each kernel in the file: the column names, the sum of every numeric
column, and the N (default 60) instructions with the most warp stall
samples, each with its address, SASS text and the non-zero sample and
stall columns. Used by scripts/profile_gpu.sh (MOE_PROFILE_SOURCE=1).
The column set differs between ncu versions, so columns are found by name:
the ranking column is the first whose name holds "Warp Stall Sampling (All".
"""
import csv
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


def main():
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 60
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
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
