"""`svdq bench --layers`: FLUX.1 linear shapes, 16-bit against svdq W4A4, on this machine.

Variants per shape (M tokens × K → N), all on the same random inputs:

    bf16 / fp32       F.linear (cuBLAS on a GPU)                                       the baseline
    fp8               torch._scaled_mm e4m3, GEMM only (GPUs with FP8: sm_89+)
    svdq              quantize_act + w4a4_gemm, rank-r low-rank branch fused           the layer as it runs
    svdq_unfused      svdq r = 0 plus the low-rank branch as separate 16-bit GEMMs      the fusion ablation
    svdq_r0           svdq without a low-rank branch                                    the 4-bit floor

On a GPU the timings are those of benchmarks/bench_cuda_layers.py (`svdq.bench.cuda_timing.time_fn`, which
both use: CUDA-graph replays timed with CUDA events, median). On a CPU: `time.perf_counter` around each call,
median after warm-up (CPU mode: scaled-down shapes).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import CPU_MODE_NOTE, cuda_timing

# FLUX.1: hidden 3072, MLP 12288; M = image tokens + 512 text tokens at 512² (1024 + 512) and 1024² (4096 + 512).
GPU_SHAPES = ((3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072))  # (K, N): qkv, out, MLP up, MLP down
GPU_TOKENS = (1536, 4608)
# CPU mode: FLUX.1's four shape kinds scaled by 1/4 (hidden 768, MLP 3072), 256 tokens.
CPU_SHAPES = ((768, 2304), (768, 768), (768, 3072), (3072, 768))
CPU_TOKENS = (256,)
SHAPE_NAMES = {0: "qkv", 1: "attn out", 2: "MLP up", 3: "MLP down"}


@dataclass
class LayerConfig:
    device: torch.device
    tokens: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]
    rank: int = 32
    warmup: int = 5
    repeats: int = 30
    backends: tuple[str, ...] = ()  # svdq backends to time ("cuda-sm90" or "cuda"; on CPU "cpu" and "reference")
    notes: list[str] = field(default_factory=list)


def default_config(device: torch.device, **overrides) -> LayerConfig:
    import svdq

    avail = svdq.ops.available_backends()
    if device.type == "cuda":
        # the backend layers run by default: "cuda-sm90" on an H100/H200 with SVDQ_SM90_FP8=1, else "cuda"
        cfg = LayerConfig(device, GPU_TOKENS, GPU_SHAPES,
                          backends=tuple(b for b in ("cuda-sm90", "cuda") if b in avail)[:1])
    else:
        cfg = LayerConfig(device, CPU_TOKENS, CPU_SHAPES, warmup=2, repeats=10,
                          backends=("cpu",) if "cpu" in avail else ("reference",))
        cfg.notes.append(CPU_MODE_NOTE)
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg


# ---------------------------------------------------------------------------------------------- timing
def measure(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` calls of fn() after `warmup` calls: CUDA events on a GPU,
    perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _layer_time(fn, cfg: LayerConfig) -> tuple[float, str]:
    """Median ms of fn() and how it was timed."""
    if cfg.device.type == "cuda":
        ms = cuda_timing.time_fn(fn, cfg.warmup, cfg.repeats)
        return ms, f"cuda_timing.time_fn ({cuda_timing.TIMING['method']}, {cuda_timing.INNER} calls per sample)"
    return statistics.median(measure(fn, cfg.device, cfg.warmup, cfg.repeats)), "perf_counter, eager"


def _fp8(x, w):
    """(fn, note): bench_cuda_layers' fp8 variant on GPUs with FP8 tensor cores; (None, why) elsewhere."""
    if x.device.type != "cuda":
        return None, "GPU only (torch._scaled_mm e4m3 needs an sm_89+ GPU)"
    major, minor = torch.cuda.get_device_capability(x.device)
    if (major, minor) < (8, 9):
        return None, f"no FP8 tensor cores on sm_{major}{minor}"
    return cuda_timing.fp8_variant(x, w)


# ---------------------------------------------------------------------------------------------- the benchmark
def run_layers(cfg: LayerConfig, log=print) -> dict:
    """Time every variant on every (M, K, N); returns {"config", "rows", "notes"} (rows: one per variant)."""
    from svdq import ops
    from svdq.ops import reference

    dev = cfg.device
    gpu = dev.type == "cuda"
    base_dtypes = (("bf16", torch.bfloat16),) if gpu else (("fp32", torch.float32), ("bf16", torch.bfloat16))
    act_dtype = torch.bfloat16 if gpu else torch.float32
    r = cfg.rank
    g = torch.Generator(device=dev).manual_seed(0)
    rows, timing = [], set()
    for m in cfg.tokens:
        for i, (k, n) in enumerate(cfg.shapes):
            flops = 2.0 * m * n * k
            shape = {"M": m, "K": k, "N": n, "layer": SHAPE_NAMES.get(i, f"{k}x{n}") if len(cfg.shapes) == 4 else f"{k}x{n}"}
            x = torch.randn(m, k, device=dev, generator=g).to(act_dtype)
            w = (torch.randn(n, k, device=dev, generator=g) / k**0.5).to(act_dtype)
            bias = torch.randn(n, device=dev, generator=g).to(act_dtype)
            smooth = (torch.rand(k, device=dev, generator=g) + 0.5).to(act_dtype)
            down = (torch.randn(k, r, device=dev, generator=g) / k**0.5).to(act_dtype)
            up = (torch.randn(n, r, device=dev, generator=g) * 0.1).to(act_dtype)
            down0, up0 = down[:, :0].contiguous(), up[:, :0].contiguous()
            qw, ws = reference.quantize_weight(w.float(), act_dtype)

            def add(variant, fn, note="", status="ok", dtype=None):
                row = {**shape, "variant": variant, "status": status, "note": note,
                       "dtype": str(dtype or act_dtype).replace("torch.", "")}
                if fn is not None:
                    ms, how = _layer_time(fn, cfg)
                    timing.add(how)
                    row.update(median_ms=round(ms, 5), tflops=round(flops / ms / 1e9, 3))
                rows.append(row)
                return row

            for name, dt in base_dtypes:
                xb, wb, bb = x.to(dt), w.to(dt), bias.to(dt)
                add(name, lambda xb=xb, wb=wb, bb=bb: F.linear(xb, wb, bb), dtype=dt)
            fn, how = _fp8(x, w)
            add("fp8", fn, how, "ok" if fn is not None else "skipped")
            for be in cfg.backends:
                pq, ps = ops.prepare_weight(qw, ws, backend=be)
                tag = "" if len(cfg.backends) == 1 else f"[{be}]"

                def ours(d=down, u=up, be=be, pq=pq, ps=ps):
                    qa, sa, la = ops.quantize_act(x, smooth, d, None, backend=be)
                    return ops.w4a4_gemm(qa, sa, pq, ps, la, u, bias, act_dtype, backend=be)

                def unfused(be=be, pq=pq, ps=ps):
                    y = ours(down0, up0, be, pq, ps)
                    return torch.addmm(y, x @ down, up.t())  # the low-rank branch as two separate 16-bit GEMMs

                add(f"svdq{tag}", ours, f"rank {r}, low-rank branch fused, backend {be}")
                add(f"svdq_unfused{tag}", unfused, f"rank {r}, low-rank branch as separate GEMMs, backend {be}")
                add(f"svdq_r0{tag}", lambda be=be, pq=pq, ps=ps: ours(down0, up0, be, pq, ps),
                    f"no low-rank branch, backend {be}")
            base = next(rw for rw in rows if rw["M"] == m and rw["K"] == k and rw["N"] == n and rw["status"] == "ok")
            for rw in rows:
                if (rw["M"], rw["K"], rw["N"]) == (m, k, n) and "median_ms" in rw:
                    rw["speedup_vs_baseline"] = round(base["median_ms"] / rw["median_ms"], 3)
                    rw["baseline"] = base["variant"]
            done = [rw for rw in rows if (rw["M"], rw["K"], rw["N"]) == (m, k, n)]
            log(f"  M={m} K={k} N={n}: " + ", ".join(
                f"{rw['variant']} {rw['median_ms']:.3f} ms" if "median_ms" in rw else f"{rw['variant']} skipped"
                for rw in done))
            del x, w, qw, ws
            if gpu:
                torch.cuda.empty_cache()
    return {
        "config": {"tokens": list(cfg.tokens), "shapes": [list(s) for s in cfg.shapes], "rank": r,
                   "warmup": cfg.warmup, "repeats": cfg.repeats, "backends": list(cfg.backends),
                   "activation_dtype": str(act_dtype).replace("torch.", ""), "timing": sorted(timing)},
        "rows": rows,
        "notes": list(cfg.notes),
    }
