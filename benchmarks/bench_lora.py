"""LoRA hot-swap cost at FLUX.1 size: load_lora / set_lora_strength / unload_lora.

The full FLUX.1 transformer costs ~48 GB in fp32 to build on a CPU, and the LoRA operations only touch the
low-rank branch, so this builds just the quantized layers as `SVDQLinear` skeletons (rank 32, bf16) with
FLUX.1's names, shapes and svdq's shared-input fusion (svdq.models): 19 double blocks (to_qkv, to_added_qkv,
to_out.0, to_add_out, ff / ff_context in and out) and 38 single blocks (to_qkv_mlp, proj_out); hidden 3072,
MLP 12288. The 4-bit tensors (qweight, wscales) live on the meta device — the LoRA code never reads them
(the test suite asserts that) — and the low-rank branch is real memory on the target device.

The adapter: rank 16 on every attention and MLP projection under its diffusers name (to_q, to_k, to_v,
add_*_proj, to_out.0, to_add_out, ff.net.*, ff_context.net.*, proj_mlp, proj_out), bf16, as a PEFT state dict
already in memory (file reading is disk-bound and not what is measured).

    python benchmarks/bench_lora.py [--device cuda] [--repeats 5] [--out benchmarks/results/lora_cpu.json]

Prints a markdown table and writes JSON (device, torch, date, git commit, medians in ms).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import svdq  # noqa: E402
from svdq.linear import SVDQLinear  # noqa: E402
from svdq.models import ProjectionSlice, SharedInputLinear  # noqa: E402

HIDDEN, MLP, DOUBLE, SINGLE = 3072, 12288, 19, 38
BASE_RANK, LORA_RANK = 32, 16
DTYPE = torch.bfloat16


def skeleton_layer(k: int, n: int, device) -> SVDQLinear:
    layer = SVDQLinear(k, n, rank=0, bias=True, dtype=DTYPE, device="meta")
    # the branch (and smooth / bias) are real; the 4-bit tensors stay on meta
    layer.set_lowrank(
        torch.randn(k, BASE_RANK, dtype=DTYPE, device=device) * 0.01,
        torch.randn(n, BASE_RANK, dtype=DTYPE, device=device) * 0.01,
        torch.ones(BASE_RANK, device=device),
    )
    return layer


def fused(owner: nn.Module, fused_name: str, parts: list[tuple[nn.Module, str, int]], device) -> None:
    """owner.<fused_name> = SharedInputLinear over one SVDQLinear; parts become ProjectionSlice stand-ins."""
    sizes = tuple(n for _, _, n in parts)
    group = SharedInputLinear(skeleton_layer(HIDDEN, sum(sizes), device), tuple(a for _, a, _ in parts), sizes)
    owner.add_module(fused_name, group)
    for i, (parent, attr, _) in enumerate(parts):
        setattr(parent, attr, ProjectionSlice(group, i, HIDDEN))


def flux_skeleton(device) -> nn.Module:
    root = nn.Module()
    root.transformer_blocks = nn.ModuleList()
    for _ in range(DOUBLE):
        b = nn.Module()
        b.attn = a = nn.Module()
        fused(a, "to_qkv", [(a, "to_q", HIDDEN), (a, "to_k", HIDDEN), (a, "to_v", HIDDEN)], device)
        fused(a, "to_added_qkv", [(a, "add_q_proj", HIDDEN), (a, "add_k_proj", HIDDEN), (a, "add_v_proj", HIDDEN)], device)
        a.to_out = nn.ModuleList([skeleton_layer(HIDDEN, HIDDEN, device)])
        a.to_add_out = skeleton_layer(HIDDEN, HIDDEN, device)
        for ff in ("ff", "ff_context"):
            m = nn.Module()
            m.net = nn.ModuleList([nn.Module(), nn.Identity(), skeleton_layer(MLP, HIDDEN, device)])
            m.net[0].proj = skeleton_layer(HIDDEN, MLP, device)
            setattr(b, ff, m)
        root.transformer_blocks.append(b)
    root.single_transformer_blocks = nn.ModuleList()
    for _ in range(SINGLE):
        b = nn.Module()
        b.attn = a = nn.Module()
        fused(b, "to_qkv_mlp", [(a, "to_q", HIDDEN), (a, "to_k", HIDDEN), (a, "to_v", HIDDEN), (b, "proj_mlp", MLP)], device)
        b.proj_out = skeleton_layer(HIDDEN + MLP, HIDDEN, device)
        root.single_transformer_blocks.append(b)
    return root


def flux_lora(seed: int, device) -> dict[str, torch.Tensor]:
    """Rank-16 PEFT adapter on every attention / MLP projection (diffusers names, unfused)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    for i in range(DOUBLE):
        p = f"transformer_blocks.{i}"
        for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            shapes[f"{p}.attn.{n}"] = (HIDDEN, HIDDEN)
        for ff in ("ff", "ff_context"):
            shapes[f"{p}.{ff}.net.0.proj"] = (HIDDEN, MLP)
            shapes[f"{p}.{ff}.net.2"] = (MLP, HIDDEN)
    for i in range(SINGLE):
        p = f"single_transformer_blocks.{i}"
        for n in ("attn.to_q", "attn.to_k", "attn.to_v"):
            shapes[f"{p}.{n}"] = (HIDDEN, HIDDEN)
        shapes[f"{p}.proj_mlp"] = (HIDDEN, MLP)
        shapes[f"{p}.proj_out"] = (HIDDEN + MLP, HIDDEN)
    sd = {}
    for name, (k, n) in shapes.items():
        sd[f"transformer.{name}.lora_A.weight"] = (torch.randn(LORA_RANK, k, generator=g) * 0.01).to(DTYPE).to(device)
        sd[f"transformer.{name}.lora_B.weight"] = (torch.randn(n, LORA_RANK, generator=g) * 0.01).to(DTYPE).to(device)
    return sd


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t) * 1e3


def git_commit() -> str:
    if os.environ.get("SVDQ_GIT_COMMIT"):  # set when the tree was copied without .git (the GPU machine)
        return os.environ["SVDQ_GIT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/lora_<cpu|cuda>.json)")
    args = ap.parse_args(argv)
    device = args.device

    t0 = time.perf_counter()
    model = flux_skeleton(device)
    a, b = flux_lora(1, device), flux_lora(2, device)
    build_s = time.perf_counter() - t0
    layers = svdq.quantized_layers(model)
    lora_params = sum(t.numel() for t in a.values())

    times = {k: [] for k in ("load_lora", "set_lora_strength", "load_lora (2nd adapter)", "unload_lora (1st of 2)", "unload_lora (last)")}
    for rep in range(args.repeats + 1):  # the first round is warm-up
        r = {}
        r["load_lora"] = timed(lambda: svdq.load_lora(model, a, name="a", strength=0.8), device)
        r["set_lora_strength"] = timed(lambda: svdq.set_lora_strength(model, "a", 0.5), device)
        r["load_lora (2nd adapter)"] = timed(lambda: svdq.load_lora(model, b, name="b", strength=-0.3), device)
        r["unload_lora (1st of 2)"] = timed(lambda: svdq.unload_lora(model, "a"), device)
        r["unload_lora (last)"] = timed(lambda: svdq.unload_lora(model, "b"), device)
        if rep:
            for k, v in r.items():
                times[k].append(v)
    ranks = sorted({m.rank for m in layers.values()})
    assert ranks == [BASE_RANK], ranks  # everything unloaded

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
    result = {
        "benchmark": "lora_hot_swap",
        "device": device,
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        # other jobs on the machine inflate CPU timings: record how busy it was (1-min load average at the end)
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "svdq": svdq.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "model": f"FLUX.1 quantized-layer skeleton: {DOUBLE} double + {SINGLE} single blocks, hidden {HIDDEN}, "
        f"MLP {MLP}, {len(layers)} SVDQLinear (fused q/k/v), base rank {BASE_RANK}, {DTYPE}",
        "adapter": f"PEFT rank {LORA_RANK} on {len(a) // 2} modules ({lora_params / 1e6:.1f} M params, bf16)",
        "repeats": args.repeats,
        "build_s": round(build_s, 2),
        "median_ms": {k: round(statistics.median(v), 2) for k, v in times.items()},
        "min_ms": {k: round(min(v), 2) for k, v in times.items()},
        "target_ms": 1000,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"lora_{torch.device(device).type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{result['model']}\n{result['adapter']}\ndevice: {device} ({name}), torch {torch.__version__}\n")
    print("| operation | median ms | min ms | target |")
    print("|---|---|---|---|")
    for k in times:
        print(f"| {k} | {result['median_ms'][k]:.1f} | {result['min_ms'][k]:.1f} | ≤ 1000 |")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
