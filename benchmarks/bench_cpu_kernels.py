"""CPU kernels (svdq._C) vs the reference backend vs torch.nn.functional.linear, on FLUX-like layer shapes
scaled down for a 2-core CI machine.

    python benchmarks/bench_cpu_kernels.py [--repeats 10] [--isa avx512] [--out benchmarks/results/cpu_kernels.json]

For each shape and dtype (fp32, bf16) it times, median of `--repeats` runs after warm-up:
  * svdq quantize_act (smoothing + INT4 quantization + rank-32 down projection, one pass),
  * svdq w4a4_gemm (INT4 x INT4 per-group GEMM + low-rank up + bias),
  * the whole layer (both ops) with the CPU backend and with the reference backend,
  * F.linear(x, W, b) with the dense weight in the same dtype,
and prints a markdown table; the JSON records the machine, torch / svdq versions, git commit and date.

Prediction, written before optimizing (M = 256 tokens, K 768 -> N 2304, 2 Zen 4 cores, AVX-512):
  * work: 256 * 768 * 2304 = 453 M MACs. F.linear fp32 (oneDNN/MKL) ~ 80 % of 2 x 32 FLOP/cycle x ~3 GHz
    = ~150 GFLOP/s -> ~6 ms; bf16 with avx512_bf16 maybe 2x faster, ~3 ms.
  * w4a4_gemm, int16 lanes (generic vector-extension kernel): per k, 4 rows x 32 columns = 128 MACs cost
    one load, 4 broadcasts, 4 multiplies and 4 adds of 512 bits, double-pumped on Zen 4 -> ~16 MAC/cycle/core
    -> ~5 ms: about F.linear fp32, not faster. Bytes are no issue (weights 0.9 MB packed, activations 0.1 MB).
  * with VNNI (vpdpbusd: 64 u8 x s8 MACs per instruction, one per cycle) -> ~4x fewer instructions ->
    ~1.5 ms, i.e. faster than F.linear in either dtype.
  * quantize_act: 256 x 768 elements, ~10 ops each + rank-32 down projection (6.3 M FMAs): ~0.2 ms.
  * reference backend: unpacks to int32 and does G float64 matmuls: 10-50x slower than the kernels.
What happened: see docs/building.md ("CPU kernel performance").
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import svdq
from svdq import _native
from svdq.bench.env import cpu_name, git_commit
from svdq.ops import reference

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [  # (M tokens, K in, N out): FLUX.1 projections at 1/4 width, 256 tokens
    (256, 768, 2304),  # qkv
    (256, 768, 3072),  # mlp up
    (256, 3072, 768),  # mlp down
]
RANK = 32


def bench(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_layer(m, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-1, 1, k)).to(dtype)
    w = torch.randn(n, k, generator=g) / k**0.5
    smooth = torch.ones(k, dtype=dtype)
    lora_down = (torch.randn(k, RANK, generator=g) / k**0.5).to(dtype)
    lora_up = (torch.randn(n, RANK, generator=g) * 0.1).to(dtype)
    qweight, wscales = reference.quantize_weight(w, dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return x, w.to(dtype), smooth, lora_down, lora_up, qweight, wscales, bias


def run(args) -> dict:
    if args.isa:
        _native.set_cpu_isa(args.isa)
    ops = torch.ops.svdq
    rows = []
    for m, k, n in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            x, w, smooth, ld, lu, qw, ws, b = make_layer(m, k, n, dtype)
            pqw, pws = ops.prepare_weight(qw, ws)
            qact, ascales, lora_act = ops.quantize_act(x, smooth, ld, None)
            t_q = bench(lambda: ops.quantize_act(x, smooth, ld, None), args.repeats)
            t_g = bench(lambda: ops.w4a4_gemm(qact, ascales, pqw, pws, lora_act, lu, b, dtype), args.repeats)
            t_layer = bench(
                lambda: svdq.ops.svdq_linear(x, pqw, pws, smooth, ld, lu, b, backend="cpu"), args.repeats
            )
            t_ref = bench(
                lambda: svdq.ops.svdq_linear(x, qw, ws, smooth, ld, lu, b, backend="reference"),
                max(3, args.repeats // 3),
                warmup=1,
            )
            t_lin = bench(lambda: F.linear(x, w, b), args.repeats)
            macs = m * k * n
            rows.append(
                dict(
                    M=m, K=k, N=n, rank=RANK, dtype=str(dtype).replace("torch.", ""),
                    quantize_act_ms=t_q, w4a4_gemm_ms=t_g, svdq_layer_ms=t_layer, reference_layer_ms=t_ref,
                    linear_ms=t_lin,
                    gemm_gops=2 * macs / t_g / 1e6, linear_gflops=2 * macs / t_lin / 1e6,
                    layer_vs_linear=t_lin / t_layer, layer_vs_reference=t_ref / t_layer,
                )
            )
            print(f"  {m}x{k}->{n} {dtype}: layer {t_layer:.2f} ms, linear {t_lin:.2f} ms", file=sys.stderr)
    info = svdq.build_info()
    return dict(
        load_average=" ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "",
        device=f"cpu: {cpu_name()}",
        threads=torch.get_num_threads(),
        cpu_isa=info.get("cpu_isa"),
        torch_version=torch.__version__,
        svdq_version=svdq.__version__,
        git_commit=git_commit(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        repeats=args.repeats,
        rows=rows,
    )


def markdown(result: dict) -> str:
    lines = [
        f"CPU kernels on {result['device']} ({result['threads']} threads, ISA {result['cpu_isa']}), "
        f"torch {result['torch_version']}, svdq {result['svdq_version']} @ {result['git_commit'][:10]}, "
        f"load average {result['load_average']}",
        "",
        "| M×K→N | dtype | quantize_act ms | w4a4_gemm ms (GOPS) | svdq layer ms | F.linear ms (GFLOP/s) "
        "| layer vs linear | layer vs reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['M']}×{r['K']}→{r['N']} | {r['dtype']} | {r['quantize_act_ms']:.3f} | "
            f"{r['w4a4_gemm_ms']:.3f} ({r['gemm_gops']:.0f}) | {r['svdq_layer_ms']:.3f} | "
            f"{r['linear_ms']:.3f} ({r['linear_gflops']:.0f}) | {r['layer_vs_linear']:.2f}× | "
            f"{r['layer_vs_reference']:.1f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--isa", default=None, help="CPU kernel variant (base, avx2, avx512); default: best")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_kernels.json"))
    args = p.parse_args()
    _native.require_native()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(markdown(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
