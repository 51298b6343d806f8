"""FLUX.1 linear layers on one GPU: cuBLAS bf16 / fp8 against svdq W4A4 (fused low-rank branch).

    python benchmarks/bench_cuda_layers.py [--m 4608] [--rank 32] [--out benchmarks/results/x.json]
    python benchmarks/bench_cuda_layers.py --dry-run      # no GPU needed: prints the plan, checks arguments

For each shape (M tokens, K -> N) it times, as medians of CUDA-event timings after warm-up, every variant on
the same inputs (random data, never zeros):

    bf16            F.linear (cuBLAS)                                        the baseline
    fp8             torch._scaled_mm e4m3 (rowwise scales when supported, else tensorwise), GEMM only
    svdq_r32        quantize_act + w4a4_gemm, rank-32 branch fused            the exact W4A4 layer as it runs
                    (on sm_90 with the sm_90a kernels: quantize_act_e4m3 + w4a4_gemm_sm90, backend "cuda-sm90")
    svdq_r0         the same without the low-rank branch
    gemm_only       its GEMM alone (r = 32, pre-quantized input)
    svdq_mma_r32, gemm_only_mma   sm_90 only: the int8 mma.sync path (backend "cuda", SVDQ_SM90_FP8=0)
    svdq_w4a8_r32   sm_90 only: quantize_act_fp8 + w4a8_gemm (W4A8, spec §8), and gemm_only_w4a8
    qact_only       quantize_act alone (r = 32), with GB/s against a D2D copy measured in this run
    lowrank_unfused (x @ down) @ up + y: what the fused branch replaces
    qact_e4m3       quantize_act_e4m3 alone (r = 32): the codes as e4m3 bytes (Hopper FP8 path's operand)
    gemm_only_int4  w4a4_gemm with SVDQ_FORCE_INT4_MMA=1 (--int4-path; emulated and slow on sm_90)

--compare OLD.json prints each variant's speed-up over an earlier result file (same shapes).

and reports TFLOP/s (2·M·N·K), ratios against bf16 and the fused branch's overhead over r = 0.
Writes JSON (device, torch, CUDA, driver, date, git commit, all numbers) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLUX_SHAPES = [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072)]  # (K, N)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=4608, help="tokens (rows of x); FLUX.1 1024² = 4096 + 512")
    p.add_argument("--rank", type=int, default=32, help="low-rank branch rank of the fused variant")
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in FLUX_SHAPES),
                   help="comma-separated KxN list (default: the FLUX.1 shapes)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50, help="timed repetitions per variant (median reported)")
    p.add_argument("--ksplit-sweep", default="", help="e.g. '1,2,3,4,6,8': also time quantize_act per K-split")
    p.add_argument("--out", default="", help="JSON path (default benchmarks/results/cuda_layers_<gpu>_<date>.json)")
    p.add_argument("--dry-run", action="store_true", help="no GPU: print the plan and exit")
    p.add_argument("--int4-path", action="store_true", help="also time the GEMM forced onto the int4 mma path")
    p.add_argument("--compare", default="", help="earlier result JSON: report speed-ups per variant and shape")
    args = p.parse_args(argv)
    try:
        args.shape_list = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    except ValueError:
        p.error(f"--shapes must look like 3072x9216,12288x3072, got {args.shapes!r}")
    if any(len(s) != 2 or min(s) < 1 for s in args.shape_list):
        p.error(f"--shapes: bad entry in {args.shapes!r}")
    if args.rank < 0 or args.rank % 16:
        p.error("--rank must be a non-negative multiple of 16")
    args.ksplits = [int(v) for v in args.ksplit_sweep.split(",") if v.strip()]
    return args


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else "unknown"
    except Exception:
        return "unknown"


# The timing and the fp8 baseline live in the package (svdq.bench.cuda_timing), shared with `svdq bench --layers`.
from svdq.bench.cuda_timing import INNER, TIMING  # noqa: E402


def time_fn(torch, fn, warmup: int, iters: int) -> float:
    from svdq.bench.cuda_timing import time_fn as _time_fn

    return _time_fn(fn, warmup, iters)


def fp8_variant(torch, x, w):
    from svdq.bench.cuda_timing import fp8_variant as _fp8_variant

    return _fp8_variant(x, w)


def run(args) -> dict:
    import torch
    import torch.nn.functional as F

    import svdq  # registers the ops and backends
    from svdq.ops import reference

    dev = torch.device("cuda")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    props = torch.cuda.get_device_properties(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    m, r = args.m, args.rank
    ops = torch.ops.svdq
    # sm_90 with the sm_90a kernels built and SVDQ_SM90_FP8=1 (the device script sets it): the layer runs backend
    # "cuda-sm90" (svdq.ops); the svdq_mma_* rows time the default int8 mma.sync path
    sm90 = "cuda-sm90" in svdq.ops.available_backends()

    # No L2 flush between calls: FLUX layers run back to back; x (28-113 MB) exceeds L2 (50-60 MB) mostly,
    # and the copy ceiling is measured the same way (1 GiB, far past L2).
    copy_bytes = 1 << 30
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=dev).random_(generator=g)
    dst = torch.empty_like(src)
    copy_ms = time_fn(torch, lambda: dst.copy_(src), args.warmup, args.iters)
    copy_gbs = 2 * copy_bytes / copy_ms / 1e6
    del src, dst

    result = {
        "device": torch.cuda.get_device_name(dev),
        "sm": f"{props.major}{props.minor}",
        "num_sms": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": driver_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "mma_path_env": os.environ.get("SVDQ_FORCE_INT4_MMA", ""),
        "w4a4_path": "sm90 fp8-wgmma" if sm90 else "mma.sync",
        "dtype": args.dtype,
        "m": m,
        "rank": r,
        "warmup": args.warmup,
        "iters": args.iters,
        "copy_GBps": round(copy_gbs, 1),
        "shapes": [],
        "timing": TIMING,
    }
    print(f"# {result['device']} (sm_{result['sm']}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"driver {result['driver']}; D2D copy {copy_gbs:.0f} GB/s", flush=True)

    for k, n in args.shape_list:
        row = {"K": k, "N": n, "ms": {}, "notes": {}}
        flops = 2.0 * m * n * k
        x = torch.randn(m, k, device=dev, dtype=dtype, generator=g)
        w = torch.randn(n, k, device=dev, dtype=dtype, generator=g) / k**0.5
        bias = torch.randn(n, device=dev, dtype=dtype, generator=g)
        smooth = (torch.rand(k, device=dev, generator=g) + 0.5).to(dtype)
        down = (torch.randn(k, r, device=dev, generator=g) / k**0.5).to(dtype)
        up = (torch.randn(n, r, device=dev, generator=g) * 0.1).to(dtype)
        down0 = down[:, :0].contiguous()
        up0 = up[:, :0].contiguous()
        qw, ws = reference.quantize_weight(w.float(), dtype)
        pq, ps = ops.prepare_weight(qw, ws)
        del qw, ws

        row["ms"]["bf16"] = time_fn(torch, lambda: F.linear(x, w, bias), args.warmup, args.iters)
        fn, how = fp8_variant(torch, x, w)
        row["notes"]["fp8"] = how
        if fn is not None:
            row["ms"]["fp8"] = time_fn(torch, fn, args.warmup, args.iters)

        def fused(d=down, u=up):
            qa, sa, la = ops.quantize_act(x, smooth, d, None)
            return ops.w4a4_gemm(qa, sa, pq, ps, la, u, bias, dtype)

        qa, sa, la = ops.quantize_act(x, smooth, down, None)
        if sm90:  # the layer runs the sm_90a FP8-wgmma kernels: those are svdq_r*, the mma.sync path is *_mma
            row["ms"][f"svdq_mma_r{r}"] = time_fn(torch, fused, args.warmup, args.iters)
            row["ms"]["gemm_only_mma"] = time_fn(
                torch, lambda: ops.w4a4_gemm(qa, sa, pq, ps, la, up, bias, dtype), args.warmup, args.iters)
            hq, hs = ops.prepare_weight_sm90(*reference.quantize_weight(w.float(), dtype))

            def fused_sm90(d=down, u=up, quant=ops.quantize_act_e4m3, gemm=ops.w4a4_gemm_sm90):
                qa_, sa_, la_ = quant(x, smooth, d, None)
                return gemm(qa_, sa_, hq, hs, la_, u, bias, dtype)

            row["ms"][f"svdq_r{r}"] = time_fn(torch, fused_sm90, args.warmup, args.iters)
            row["ms"]["svdq_r0"] = time_fn(torch, lambda: fused_sm90(down0, up0), args.warmup, args.iters)
            row["ms"][f"svdq_w4a8_r{r}"] = time_fn(
                torch, lambda: fused_sm90(quant=ops.quantize_act_fp8, gemm=ops.w4a8_gemm), args.warmup, args.iters)
            ea, es, el = ops.quantize_act_e4m3(x, smooth, down, None)
            row["ms"]["gemm_only"] = time_fn(
                torch, lambda: ops.w4a4_gemm_sm90(ea, es, hq, hs, el, up, bias, dtype), args.warmup, args.iters)
            fa, fs, fl = ops.quantize_act_fp8(x, smooth, down, None)
            row["ms"]["gemm_only_w4a8"] = time_fn(
                torch, lambda: ops.w4a8_gemm(fa, fs, hq, hs, fl, up, bias, dtype), args.warmup, args.iters)
            row["ms"]["qact_fp8"] = time_fn(torch, lambda: ops.quantize_act_fp8(x, smooth, down, None),
                                            args.warmup, args.iters)
            del hq, hs, ea, es, el, fa, fs, fl
        else:
            row["ms"][f"svdq_r{r}"] = time_fn(torch, fused, args.warmup, args.iters)
            row["ms"]["svdq_r0"] = time_fn(torch, lambda: fused(down0, up0), args.warmup, args.iters)
            row["ms"]["gemm_only"] = time_fn(
                torch, lambda: ops.w4a4_gemm(qa, sa, pq, ps, la, up, bias, dtype), args.warmup, args.iters)
        row["ms"]["qact_only"] = time_fn(torch, lambda: ops.quantize_act(x, smooth, down, None),
                                         args.warmup, args.iters)
        row["ms"]["qact_only_r0"] = time_fn(torch, lambda: ops.quantize_act(x, smooth, down0, None),
                                            args.warmup, args.iters)
        if hasattr(ops, "quantize_act_e4m3"):
            row["ms"]["qact_e4m3"] = time_fn(torch, lambda: ops.quantize_act_e4m3(x, smooth, down, None),
                                             args.warmup, args.iters)
        if args.int4_path:
            old = os.environ.get("SVDQ_FORCE_INT4_MMA")
            os.environ["SVDQ_FORCE_INT4_MMA"] = "1"
            try:
                row["ms"]["gemm_only_int4"] = time_fn(
                    torch, lambda: ops.w4a4_gemm(qa, sa, pq, ps, la, up, bias, dtype), 2, max(3, args.iters // 5))
            finally:
                if old is None:
                    os.environ.pop("SVDQ_FORCE_INT4_MMA", None)
                else:
                    os.environ["SVDQ_FORCE_INT4_MMA"] = old
        y = F.linear(x, w, bias)
        row["ms"]["lowrank_unfused"] = time_fn(torch, lambda: torch.addmm(y, x @ down, up.t()),
                                               args.warmup, args.iters)
        # quantize_act bytes: read x + lora_down, write qact + ascales + lora_act
        kp = -(-k // 64) * 64
        qbytes = m * k * 2 + k * r * 2 + m * kp // 2 + m * kp // 64 * 4 + m * r * 4
        row["qact_bytes"] = qbytes
        row["qact_GBps"] = round(qbytes / row["ms"]["qact_only"] / 1e6, 1)
        row["qact_pct_copy"] = round(100 * row["qact_GBps"] / copy_gbs, 1)
        row["qact_r0_GBps"] = round((qbytes - k * r * 2 - m * r * 4) / row["ms"]["qact_only_r0"] / 1e6, 1)
        if args.ksplits:
            row["qact_ksplit_ms"] = {}
            for ks in args.ksplits:
                os.environ["SVDQ_QACT_KSPLIT"] = str(ks)
                try:
                    row["qact_ksplit_ms"][str(ks)] = round(time_fn(
                        torch, lambda: ops.quantize_act(x, smooth, down, None), args.warmup, args.iters), 5)
                finally:
                    os.environ.pop("SVDQ_QACT_KSPLIT", None)
        row["tflops"] = {v: round(flops / ms / 1e9, 1) for v, ms in row["ms"].items()
                         if v in ("bf16", "fp8", f"svdq_r{r}", "svdq_r0", "gemm_only", "gemm_only_int4",
                                  f"svdq_mma_r{r}", "gemm_only_mma", f"svdq_w4a8_r{r}", "gemm_only_w4a8")}
        base = row["ms"]["bf16"]
        row["speedup_vs_bf16"] = {v: round(base / ms, 3) for v, ms in row["ms"].items()}
        row["lowrank_fused_overhead_pct"] = round(
            100 * (row["ms"][f"svdq_r{r}"] / row["ms"]["svdq_r0"] - 1), 1)
        row["lowrank_unfused_pct_of_bf16"] = round(100 * row["ms"]["lowrank_unfused"] / base, 1)
        row["ms"] = {v: round(ms, 5) for v, ms in row["ms"].items()}
        result["shapes"].append(row)
        print(f"  K={k} N={n}: " + ", ".join(f"{v} {ms * 1e3:.1f} us" for v, ms in row["ms"].items()), flush=True)
        del x, w, pq, ps, qa, sa, la, y
        torch.cuda.empty_cache()
    return result


def markdown(res: dict) -> str:
    r = res["rank"]
    lines = [
        f"{res['device']} (sm_{res['sm']}), M = {res['m']}, {res['dtype']}, rank {r}; medians of {res['iters']} "
        f"runs; D2D copy {res['copy_GBps']:.0f} GB/s; commit {res['git_commit'][:10]}",
        "",
        "| K→N | bf16 µs (TFLOP/s) | fp8 µs | svdq r{0} µs (× bf16) | svdq r0 µs | GEMM only µs | quantize_act µs "
        "(GB/s, % copy) | low-rank fused overhead | unfused low-rank µs (% bf16) |".format(r),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in res["shapes"]:
        ms = s["ms"]
        fp8 = f"{ms['fp8'] * 1e3:.1f}" if "fp8" in ms else s["notes"].get("fp8", "–")
        lines.append(
            f"| {s['K']}→{s['N']} | {ms['bf16'] * 1e3:.1f} ({s['tflops']['bf16']}) | {fp8} | "
            f"{ms[f'svdq_r{r}'] * 1e3:.1f} ({s['speedup_vs_bf16'][f'svdq_r{r}']:.2f}×) | {ms['svdq_r0'] * 1e3:.1f} | "
            f"{ms['gemm_only'] * 1e3:.1f} | {ms['qact_only'] * 1e3:.1f} ({s['qact_GBps']:.0f}, {s['qact_pct_copy']}%) | "
            f"{s['lowrank_fused_overhead_pct']}% | {ms['lowrank_unfused'] * 1e3:.1f} "
            f"({s['lowrank_unfused_pct_of_bf16']}%) |")
    return "\n".join(lines)


def compare(res: dict, old_path: str) -> tuple[dict, str]:
    """Speed-up (old ms / new ms) per shape and variant present in both result files."""
    old = json.loads(Path(old_path).read_text())
    by_shape = {(s["K"], s["N"]): s for s in old.get("shapes", [])}
    out, lines = {}, [f"Speed-up over {Path(old_path).name} (commit {old.get('git_commit', '?')[:10]}, "
                      f"{old.get('device', '?')}): old µs / new µs", "",
                      "| K→N | variant | old µs | new µs | × |", "|---|---|---|---|---|"]
    for s in res["shapes"]:
        o = by_shape.get((s["K"], s["N"]))
        if not o:
            continue
        key = f"{s['K']}x{s['N']}"
        out[key] = {}
        for v, ms in s["ms"].items():
            if v in o.get("ms", {}):
                out[key][v] = round(o["ms"][v] / ms, 3)
                lines.append(f"| {s['K']}→{s['N']} | {v} | {o['ms'][v] * 1e3:.1f} | {ms * 1e3:.1f} | {out[key][v]:.2f} |")
        if "lowrank_fused_overhead_pct" in o:
            lines.append(f"| {s['K']}→{s['N']} | low-rank fused overhead | {o['lowrank_fused_overhead_pct']}% | "
                         f"{s['lowrank_fused_overhead_pct']}% | |")
    return out, "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        print(f"dry run: M={args.m}, rank={args.rank}, dtype={args.dtype}, shapes={args.shape_list}, "
              f"warmup={args.warmup}, iters={args.iters}, ksplit sweep={args.ksplits or 'none'}")
        for k, n in args.shape_list:
            kp = -(-k // 64) * 64
            qbytes = args.m * k * 2 + k * args.rank * 2 + args.m * kp // 2 + args.m * kp // 16 + args.m * args.rank * 4
            print(f"  K={k} N={n}: {2 * args.m * n * k / 1e9:.1f} GFLOP; quantize_act moves {qbytes / 1e6:.1f} MB "
                  f"(at 4.19 TB/s: {qbytes / 4.19e6:.1f} us)")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark (use --dry-run to check arguments)", file=sys.stderr)
        return 2
    res = run(args)
    out = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" /
        f"cuda_layers_{res['device'].replace(' ', '_')}_{res['date'][:10]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    if args.compare:
        res["speedup_vs"] = {"file": args.compare}
        res["speedup_vs"]["x"], cmp_md = compare(res, args.compare)
        out.write_text(json.dumps(res, indent=2) + "\n")
        md += "\n\n" + cmp_md
    out.with_suffix(".md").write_text(md + "\n")
    print()
    print(md)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
