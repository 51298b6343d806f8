"""`svdq bench`: what 16-bit, FP8, weight-only 4-bit and svdq W4A4 cost on this machine, in one run.

--layers: FLUX.1 linear shapes (M = 1536 / 4608 tokens for 512² / 1024², hidden 3072, MLP 12288): bf16
cuBLAS, fp8 (sm_89+), svdq fused, svdq with the low-rank branch unfused (the ablation), svdq r = 0.

--model NAME: one denoising step of the full-size architecture (synthetic weights, no download, built on the
meta device and materialized on the GPU in bf16) at 512² and 1024², batch 1 — FLUX.1-dev / -schnell, SDXL,
PixArt-Σ, and through the generic family (layer plan from one traced forward) Qwen-Image, Wan 2.1 14B (17
frames), SD3.5-large, Z-Image-Turbo, FLUX.2-dev, Chroma1, SANA-1600M, HiDream-I1: bf16 diffusers, dynamic FP8,
NF4 (bitsandbytes) / int4 (torchao) weight-only when installed, svdq quantized data-free (quantization time
reported) — each eager and under torch.compile. Per row: median latency (CUDA events), peak and weight
memory, speedup vs bf16, and the step's GPU time split into GEMM / attention / other (torch.profiler).

Writes <out>/bench_<device>_<layers|model>.{json,md,png}. Without a GPU it runs a scaled-down CPU
configuration, labelled "CPU mode" everywhere (docs/bench.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

EXAMPLES = """examples:
  svdq bench --layers                           # GPU: FLUX.1 shapes; CPU: scaled-down shapes
  svdq bench --model flux-dev --out benchmarks/results
  svdq bench --model sdxl --res 1024 --no-compile
  svdq bench --model qwen-image --variants bf16,fp8,svdq --compile-res 1024
  svdq bench --model flux-dev --device cpu --res 128 --repeats 2 --threads 1
"""

# = svdq.bench.model.MODELS (kept literal: parsing arguments must not import torch; tests check they agree).
# The hand-written families, then the generic family's models (their plan comes from one traced forward).
MODEL_CHOICES = ("flux-dev", "flux-schnell", "sdxl", "pixart-sigma",
                 "qwen-image", "wan2.1-14b", "sd3.5-large", "z-image-turbo", "flux2-dev", "chroma1", "sana-1600m",
                 "hidream-i1")


def _int_list(s: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return vals


def _shape_list(s: str) -> tuple[tuple[int, int], ...]:
    try:
        shapes = tuple(tuple(int(v) for v in item.lower().split("x")) for item in s.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes must look like 3072x9216,12288x3072, got {s!r}") from None
    if not shapes or any(len(t) != 2 or min(t) < 1 for t in shapes):
        raise argparse.ArgumentTypeError(f"--shapes must look like 3072x9216,12288x3072, got {s!r}")
    return shapes


def _name_list(s: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in s.split(",") if v.strip())


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark 16-bit / FP8 / weight-only 4-bit / svdq W4A4: FLUX.1 layers or a full model step",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--layers", action="store_true", help="FLUX.1 linear-layer shapes")
    what.add_argument("--model", choices=MODEL_CHOICES, help="one denoising step of this architecture")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: cuda when a GPU is present, else CPU mode (default: auto)")
    p.add_argument("--out", default="svdq-bench", help="output directory (default: ./svdq-bench)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs, median reported (GPU default: 30 "
                   "layers / 5 model; CPU: 10 / 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (GPU: 5 / 2; CPU: 2 / 1)")
    p.add_argument("--rank", type=int, default=32, help="svdq low-rank branch rank, multiple of 16 (default 32)")
    p.add_argument("--backends", type=_name_list, default=None,
                   help="svdq backends to time, comma-separated (GPU: cuda; CPU: cpu for --layers, "
                   "cpu,reference for --model)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g = p.add_argument_group("--layers options")
    g.add_argument("--tokens", type=_int_list, default=None,
                   help="M values, comma-separated (GPU default 1536,4608 = FLUX 512², 1024²; CPU 256)")
    g.add_argument("--shapes", type=_shape_list, default=None,
                   help="KxN list (GPU default 3072x9216,3072x3072,3072x12288,12288x3072; CPU the same ÷4)")
    g = p.add_argument_group("--model options")
    g.add_argument("--res", type=_int_list, default=None,
                   help="image sizes in pixels, comma-separated multiples of 16 (SANA: 32; GPU default 512,1024; "
                   "CPU 256,512, generic families 64,128)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile (default: on for GPU, off in CPU mode)")
    g.add_argument("--compile-mode", choices=("auto", "regional", "full"), default=None,
                   help="regional: compile each repeated block once (diffusers' compile_repeated_blocks; FLUX, "
                   "SDXL), full: torch.compile the whole model; auto (default): regional where possible")
    g.add_argument("--compile-res", type=_int_list, default=None,
                   help="resolutions timed compiled (default: the largest --res only; compilation takes minutes)")
    g.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="GPU time split per row with torch.profiler (GPU only; default on)")
    g.add_argument("--adaln", choices=("16bit", "w4a16"), default=None,
                   help="svdq variant: AdaLN modulation linears 16-bit (default) or weight-only 4-bit; the report "
                   "gives the whole-model weight memory for both")
    g.add_argument("--variants", type=_name_list, default=None,
                   help="subset of bf16,fp32,fp8,nf4,int4,svdq (default: all that apply)")
    p.set_defaults(func=run)


def _device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA GPU is visible (leave --device auto for CPU mode)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def validate(args) -> None:
    import svdq

    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.rank < 0 or args.rank % 16:
        raise ValueError(f"--rank must be a non-negative multiple of 16, got {args.rank}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.layers and (args.res or args.variants or args.compile is not None or args.profile is not None
                        or args.compile_mode or args.compile_res or args.adaln):
        raise ValueError("--res / --variants / --compile* / --profile / --adaln apply to --model, not --layers")
    if args.model and (args.tokens or args.shapes):
        raise ValueError("--tokens / --shapes apply to --layers, not --model")
    if args.tokens and min(args.tokens) < 1:
        raise ValueError(f"--tokens must be positive, got {args.tokens}")
    for opt, vals in (("--res", args.res), ("--compile-res", args.compile_res)):
        if vals and any(r < 16 or r % 16 for r in vals):
            raise ValueError(f"{opt} values must be positive multiples of 16, got {vals}")
    if args.backends:
        bad = [b for b in args.backends if b not in svdq.ops.available_backends()]
        if bad:
            raise ValueError(f"svdq backend(s) {bad} not available here; available: {svdq.ops.available_backends()}")
    if args.variants:
        known = ("bf16", "fp32", "fp8", "nf4", "int4", "svdq")
        bad = [v for v in args.variants if v not in known]
        if bad:
            raise ValueError(f"unknown --variants {bad}; choose from {list(known)}")


def run(args) -> int:
    import torch

    from ..bench import CPU_MODE_NOTE, report
    from ..bench.env import device_slug, environment

    validate(args)
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    if device.type == "cpu":
        print(f"{CPU_MODE_NOTE} (no GPU{' used' if torch.cuda.is_available() else ' visible'}).")
    print(f"# {env['device']}, torch {env['torch']}, svdq {env['svdq_version']}, commit {env['git_commit'][:12]}")
    t0 = time.perf_counter()
    if args.layers:
        from ..bench import layers

        cfg = layers.default_config(device, tokens=args.tokens, shapes=args.shapes, rank=args.rank,
                                    warmup=args.warmup, repeats=args.repeats, backends=args.backends)
        result = {"kind": "layers", **layers.run_layers(cfg)}
        stem = f"bench_{device_slug(env)}_layers"
    else:
        from ..bench import model

        cfg = model.default_config(args.model, device, resolutions=args.res, warmup=args.warmup,
                                   repeats=args.repeats, compile=args.compile, rank=args.rank,
                                   compile_mode=args.compile_mode, compile_resolutions=args.compile_res,
                                   backends=args.backends, variants=args.variants, adaln=args.adaln,
                                   profile=args.profile if device.type == "cuda" else False)
        result = {"kind": f"model {args.model}", **model.run_model(cfg)}
        stem = f"bench_{device_slug(env)}_{args.model}"
    result["env"] = env
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    paths = report.write(result, Path(args.out), stem)
    print()
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()) + f" ({result['wall_seconds']:.0f} s)")
    return 0
