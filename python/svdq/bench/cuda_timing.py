"""GPU timing and the FP8 baseline, shared by `svdq bench --layers` and benchmarks/bench_cuda_layers.py.

Part of the package (not loaded from the repository by path) so an installed wheel's `svdq bench --layers`
times exactly as the benchmark script does.
"""

from __future__ import annotations

import statistics

import torch

INNER = 10  # calls per timed sample (one CUDA graph replay), so launch gaps do not enter the numbers
TIMING = {"method": "unset"}  # how the last `time_fn` call timed: "cuda_graph" or "eager (<why>)"


def time_fn(fn, warmup: int, iters: int) -> float:
    """Median milliseconds per call of fn(): `iters` samples, each one replay of a CUDA graph holding INNER
    calls, timed with CUDA events after `warmup` eager calls and one warm replay. Falls back to eager
    back-to-back calls (events around INNER calls) when graph capture fails."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    graph = None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()  # allocations for the capture happen outside it
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(INNER):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        TIMING["method"] = "cuda_graph"
    except Exception as e:  # noqa: BLE001  (capture unsupported by some op: time eagerly, and say so)
        graph = None
        TIMING["method"] = f"eager ({type(e).__name__})"
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if graph is not None:
            graph.replay()
        else:
            for _ in range(INNER):
                fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / INNER)
    del graph
    return statistics.median(times)


def fp8_variant(x: torch.Tensor, w: torch.Tensor):
    """(fn, how): torch._scaled_mm e4m3 with rowwise scales if this torch/GPU supports it, else tensorwise;
    (None, why) when neither runs."""
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return None, "no torch._scaled_mm"
    m, n = x.shape[0], w.shape[0]
    xf = x.to(torch.float8_e4m3fn)
    wf = w.to(torch.float8_e4m3fn).t()  # column-major [K, N]
    try:
        sa = torch.ones(m, 1, device=x.device, dtype=torch.float32)
        sb = torch.ones(1, n, device=x.device, dtype=torch.float32)
        torch._scaled_mm(xf, wf, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        return (lambda: torch._scaled_mm(xf, wf, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)), "rowwise"
    except Exception:  # noqa: BLE001  (rowwise scales need a newer torch / GPU: try tensorwise)
        pass
    try:
        one = torch.ones((), device=x.device, dtype=torch.float32)
        torch._scaled_mm(xf, wf, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        return (lambda: torch._scaled_mm(xf, wf, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)), "tensorwise"
    except Exception as e:  # noqa: BLE001
        return None, f"unsupported: {type(e).__name__}: {str(e)[:120]}"
