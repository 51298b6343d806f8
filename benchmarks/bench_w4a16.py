"""W4A16 (`SVDQWeightOnlyLinear`): PyTorch's int4 weight-only kernels vs the per-call dequantize path vs the
16-bit GEMM, at batch 1 (AdaLN GEMV, one text token) and M = 512 (a T5 prompt), on FLUX.1 / T5-XXL shapes.

    python benchmarks/bench_w4a16.py [--device cpu|cuda] [--repeats 5] [--out benchmarks/results/w4a16_cpu.json]

Variants, median of ``--repeats`` timed calls after warm-up (CUDA: CUDA events, 50 calls per timing):
  * kernel   — the layer's forward: torch.ops.aten._weight_int4pack_mm_for_cpu (CPU) / tinygemm (CUDA, bf16),
               weights resident in the kernel's layout (repacked once, before timing);
  * kernel_zp — the same with per-group zero points (AWQ-style codes);
  * dequant  — what the layer did before: build Ŵ from the canonical tensors, then F.linear (per call);
  * dense    — F.linear with the 16-bit weight (the model before quantization).
It also records each layer's resident bytes (after repacking) against the canonical (saved) bytes, and the
kernel's relative error against x·Ŵᵀ in fp64.

Prediction (before measuring): at batch 1 the work is reading the weight. CPU, 2 cores: F.linear bf16 reads
2 B/weight, the int4 op 0.56 B (codes + scale/offset pairs), so ≤ 3.5x faster if bandwidth-bound, less if its
unpack is compute-bound; dequantize-then-GEMM writes and re-reads a 16-bit copy: slower than dense. H200
(4.8 TB/s): bf16 GEMV of 3072 → 18432 reads 113 MB, ~30 µs; tinygemm reads 32 MB, ~10 µs at 70 % of peak:
~3x (the goal is ≥ 2.5x). At M = 512 both are compute-bound; tinygemm (built for small M) may lose to cuBLAS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from svdq.bench.env import device_slug, environment
from svdq.weight_only import SVDQWeightOnlyLinear, dequantize_weight

# (name, in_features, out_features, M values, dtypes)
CASES_CPU = [
    ("flux_adaln_3072x18432", 3072, 18432, (1,), (torch.bfloat16, torch.float32)),
    ("t5xxl_wi_4096x10240", 4096, 10240, (1, 512), (torch.bfloat16,)),
    ("t5xxl_wo_10240x4096", 10240, 4096, (1,), (torch.bfloat16, torch.float32)),
]
CASES_CUDA = [
    ("flux_adaln_3072x18432", 3072, 18432, (1, 16), (torch.bfloat16,)),
    ("flux_adaln_3072x9216", 3072, 9216, (1,), (torch.bfloat16,)),
    ("t5xxl_wi_4096x10240", 4096, 10240, (1, 512, 4096), (torch.bfloat16,)),
    ("t5xxl_wo_10240x4096", 10240, 4096, (1, 512, 4096), (torch.bfloat16,)),
]


def _time_cpu(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _time_cuda(fn, repeats: int, inner: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def run_case(name, k, n, ms, dtypes, device, repeats) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    w32 = torch.randn(n, k, generator=g) * 0.02
    for dtype in dtypes:
        lin = nn.Linear(k, n, bias=True, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w32)
            lin.bias.normal_(generator=g)
        lin = lin.to(device)
        layers = {zp: SVDQWeightOnlyLinear.from_linear(lin, zero_point=zp) for zp in (False, True)}
        canon = {zp: {k_: v.clone() for k_, v in layer.state_dict().items()} for zp, layer in layers.items()}
        w16 = lin.weight.detach()
        for zp, layer in layers.items():
            with torch.no_grad():
                layer(torch.zeros(1, k, dtype=dtype, device=device))  # repack once, before timing
        for m in ms:
            x = torch.randn(m, k, generator=g).to(device, dtype)
            timer = (lambda f: _time_cuda(f, repeats)) if device.type == "cuda" else (lambda f: _time_cpu(f, repeats))
            c = canon[False]
            with torch.no_grad():
                ms_kernel = timer(lambda: layers[False](x))
                # The op alone, without the layer's Python (checks, bias add): at batch 1 on a GPU the forward's
                # launch overhead can exceed a ~10 µs kernel; under torch.compile / CUDA graphs it is gone.
                op = torch.ops.aten._weight_int4pack_mm if device.type == "cuda" else torch.ops.aten._weight_int4pack_mm_for_cpu
                lq, ls = layers[False].qweight, layers[False].wscales
                ms_op = timer(lambda: op(x, lq, 64, ls)) if layers[False].layout != "canonical" else float("nan")
                ms_kernel_zp = timer(lambda: layers[True](x))
                ms_dense = timer(lambda: F.linear(x, w16, lin.bias))
                ms_dequant = timer(lambda: F.linear(x, dequantize_weight(c["qweight"], c["wscales"], k, dtype), c["bias"]))
                ref = F.linear(x.double(), layers[False].dequantize(torch.float64), c["bias"].double())
                err = float((layers[False](x).double() - ref).norm() / ref.norm())
            row = {
                "case": name, "in_features": k, "out_features": n, "m": m, "dtype": str(dtype).replace("torch.", ""),
                "kernel": layers[False].layout, "ms_kernel": ms_kernel, "ms_op": ms_op, "ms_kernel_zero_point": ms_kernel_zp,
                "ms_dequant": ms_dequant, "ms_dense": ms_dense,
                "speedup_vs_dense": ms_dense / ms_kernel, "speedup_vs_dequant": ms_dequant / ms_kernel,
                "op_speedup_vs_dense": ms_dense / ms_op,
                "kernel_rel_error": err,
                "resident_bytes": layers[False].resident_bytes(), "saved_bytes": layers[False].weight_bytes(),
                "resident_bytes_zero_point": layers[True].resident_bytes(),
                "saved_bytes_zero_point": layers[True].weight_bytes(),
                "dense_bytes": w16.numel() * w16.element_size() + lin.bias.numel() * lin.bias.element_size(),
            }
            rows.append(row)
            print(f"{name:24s} M={m:<5d} {row['dtype']:9s} {row['kernel']:14s} kernel {ms_kernel:9.3f} ms "
                  f"(op {ms_op:9.3f}, zp {ms_kernel_zp:9.3f})  dequant {ms_dequant:9.3f}  dense {ms_dense:9.3f}  "
                  f"x{row['speedup_vs_dense']:.2f} vs dense  x{row['speedup_vs_dequant']:.1f} vs dequant  "
                  f"err {err:.1e}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/w4a16_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    info = environment(device)
    rows = []
    for case in CASES_CUDA if device.type == "cuda" else CASES_CPU:
        rows += run_case(*case, device, args.repeats)
    out = Path(args.out or Path(__file__).parent / "results" / f"w4a16_{device_slug(info)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Other jobs on the machine inflate CPU timings: the load average says how busy it was while this ran.
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out.write_text(json.dumps({"environment": info, "repeats": args.repeats, "load_average_1_5_15min_at_end": load,
                               "rows": rows}, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
