"""Timing and checking helpers shared by the Python benchmarks (moe_bench.py,
fp8_bench.py, dispatch_bench.py): event-timed medians, CUDA-graph capture,
the copy-bandwidth ceiling, the relative error the accuracy contract uses,
and the router/dispatcher output buffers of rotated input sets."""
import statistics

import torch


def events_median(fn, reps, inner=1):
    """Median milliseconds of fn() over reps timed runs (after a warm-up), / inner."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def graph_of(fn):
    """Captures fn() (after one eager warm-up on a side stream) into a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def copy_gbs():
    """Device-to-device copy bandwidth of 1 GiB, counting bytes read + written (GB/s)."""
    n = 1 << 30
    src = torch.randn(n // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = events_median(lambda: dst.copy_(src), 20)
    return 2 * n / (ms * 1e-3) / 1e9


def rel_err(got, ref):
    """||got - ref|| / ||ref||; NaN in got gives inf."""
    got = got.float()
    if torch.isnan(got).any():
        return float("inf")
    return float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


def routing_buffers(T, k, E_loc, sets):
    """`sets` sets of router and dispatcher outputs on the GPU for T tokens, k
    slots per token and E_loc local experts: (ids, weights, local ids, expert
    counts, expert offsets, sorted slots), each a list of `sets` tensors."""
    def make(shape, dtype):
        return [torch.empty(shape, device="cuda", dtype=dtype) for _ in range(sets)]
    i32 = torch.int32
    return (make((T, k), i32), make((T, k), torch.float32), make((T, k), i32), make((E_loc,), i32),
            make((E_loc + 1,), i32), make((T * k,), i32))
