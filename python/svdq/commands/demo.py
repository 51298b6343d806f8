"""`svdq demo`: the whole job on an embedded model — quantize, save, reload, generate, report.

Builds a small FLUX-architecture transformer (FLUX.1's block structure at reduced width, seeded synthetic
weights with planted activation outliers, no download), quantizes it with calibration through diffusers'
`FluxPipeline`, saves and reloads the checkpoint, runs the same denoising loop in 16-bit and 4-bit, and
writes a side-by-side PNG plus a JSON/markdown report.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

EXAMPLES = """examples:
  svdq demo                       # writes svdq-demo/ in the current directory
  svdq demo --out /tmp/demo --steps 8 --size 128
"""

# FLUX.1 block structure (double + single stream blocks, AdaLN, RoPE) at width 256 instead of 3072, so
# calibration + quantization + two generations take about a minute on 2 CPU cores.
DEMO_FLUX_CONFIG = dict(
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=64,
    num_attention_heads=4,
    joint_attention_dim=128,
    pooled_projection_dim=64,
    axes_dims_rope=(8, 28, 28),
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="quantize, save, reload and run a small FLUX-architecture model (no download)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="svdq-demo", help="output directory (default: ./svdq-demo)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default: 4)")
    p.add_argument("--size", type=int, default=64, help="image height and width in pixels (default: 64)")
    p.add_argument("--rank", type=int, default=32, help="low-rank branch rank (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, prompts and noise (default: 0)")
    p.add_argument("--calib-prompts", type=int, default=4, help="synthetic prompts used for calibration")
    p.set_defaults(func=run)


def build_demo_pipeline(seed: int):
    from ..testing import tiny

    transformer = tiny.tiny_flux_transformer(seed, **DEMO_FLUX_CONFIG)
    return tiny.tiny_flux_pipeline(seed, transformer=transformer), dict(transformer.config)


def prompts_for(config: dict, n: int, seed: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed + 1000)
    return [
        {
            "prompt_embeds": torch.randn(1, 16, config["joint_attention_dim"], generator=g),
            "pooled_prompt_embeds": torch.randn(1, config["pooled_projection_dim"], generator=g),
        }
        for _ in range(n)
    ]


def run(args) -> int:
    import numpy as np
    import torch
    from diffusers.utils import logging as diffusers_logging
    from PIL import Image

    import svdq

    if args.size % 16 or args.size < 16:
        raise ValueError(f"--size must be a positive multiple of 16, got {args.size}")
    from .quantize import check_output_dir, check_positive

    check_positive(args, "--steps", "--calib-prompts")
    if args.rank < 0:
        raise ValueError(f"--rank must be >= 0, got {args.rank}")
    diffusers_logging.set_verbosity_error()
    out = check_output_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    pipe, config = build_demo_pipeline(args.seed)
    bytes16 = sum(t.numel() * t.element_size() for t in pipe.transformer.state_dict().values())
    gen_args = dict(height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=1.0)
    prompt = prompts_for(config, 1, args.seed + 1)[0]

    def generate(p):
        t0 = time.perf_counter()
        image = p(**prompt, **gen_args, generator=torch.Generator().manual_seed(args.seed), output_type="np").images[0]
        return image, time.perf_counter() - t0

    print(f"[1/4] 16-bit baseline: {args.steps} steps at {args.size}x{args.size}")
    image16, timings["generate_16bit_s"] = generate(pipe)

    print(f"[2/4] quantizing with calibration ({args.calib_prompts} synthetic prompts)")
    calib = prompts_for(config, args.calib_prompts, args.seed)

    def calibration(_model):
        for q in calib:
            pipe(**q, **gen_args, output_type="latent")

    t0 = time.perf_counter()
    svdq.models.prepare(pipe.transformer)  # one wide GEMM per shared input (docs/models.md), before calibration
    svdq.quantize(pipe.transformer, calibration=calibration, rank=args.rank)
    timings["quantize_s"] = time.perf_counter() - t0

    print("[3/4] saving and reloading the checkpoint")
    ckpt = svdq.save(pipe.transformer, out / "transformer.safetensors")
    layer_report = pipe.transformer.svdq_report  # per-layer errors measured at quantization time
    skeleton, _ = build_demo_pipeline(args.seed + 1)  # different random weights: everything must come from disk
    pipe.transformer = svdq.load(skeleton.transformer, ckpt)

    print(f"[4/4] 4-bit generation (backend: {svdq.ops.select_backend(torch.device('cpu')).name})")
    image4, timings["generate_4bit_s"] = generate(pipe)

    layers = svdq.quantized_layers(pipe.transformer)
    bytes4 = sum(t.numel() * t.element_size() for t in pipe.transformer.state_dict().values())
    # What the replaced weights would take in bf16 (the demo runs in fp32 on the CPU; FLUX ships in bf16).
    linear16 = sum(m.in_features * m.out_features * 2 for m in layers.values())
    linear4 = sum(m.weight_bytes() - (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
                  for m in layers.values())
    mse = float(np.mean((image16.astype(np.float64) - image4.astype(np.float64)) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)

    side = np.concatenate([image16, image4], axis=1)
    png = out / "demo.png"
    Image.fromarray((side.clip(0, 1) * 255).round().astype(np.uint8)).save(png)
    report = {
        "svdq_version": svdq.__version__,
        "backend": svdq.ops.select_backend(torch.device("cpu")).name,
        "model": {"architecture": "FluxTransformer2DModel", "config": config, "dtype": "float32"},
        "steps": args.steps,
        "size": args.size,
        "rank": args.rank,
        "psnr_4bit_vs_16bit_db": psnr,
        "weight_bytes": {"transformer_16bit": bytes16, "transformer_4bit": bytes4,
                         "quantized_linears_16bit": linear16, "quantized_linears_4bit": linear4},
        "timings_s": timings,
        "layers": layer_report,
        "checkpoint": str(ckpt),
        "image": str(png),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(markdown_report(report))
    print(f"image:      {png}  (left 16-bit, right 4-bit; PSNR {psnr:.1f} dB)")
    print(f"report:     {out / 'report.md'}  and {out / 'report.json'}")
    print(f"checkpoint: {ckpt}")
    print(f"weights of the quantized linears: {linear16 / 2**20:.2f} MiB in bf16 -> {linear4 / 2**20:.2f} MiB "
          f"({linear16 / max(linear4, 1):.1f}x smaller)")
    return 0


def markdown_report(r: dict) -> str:
    w = r["weight_bytes"]
    lines = [
        "# svdq demo report",
        "",
        f"svdq {r['svdq_version']}, backend `{r['backend']}`, {r['model']['architecture']} "
        f"(hidden {r['model']['config']['num_attention_heads'] * r['model']['config']['attention_head_dim']}), "
        f"{r['steps']} steps at {r['size']}², rank {r['rank']}.",
        "",
        f"- PSNR 4-bit vs 16-bit image: **{r['psnr_4bit_vs_16bit_db']:.1f} dB**",
        f"- quantized linears: {w['quantized_linears_16bit'] / 2**20:.2f} MiB (bf16) → "
        f"{w['quantized_linears_4bit'] / 2**20:.2f} MiB (4-bit + scales + low-rank)",
        f"- whole transformer (fp32 here, 16-bit layers stay fp32): {w['transformer_16bit'] / 2**20:.2f} MiB → "
        f"{w['transformer_4bit'] / 2**20:.2f} MiB",
        "- time: " + ", ".join(f"{k} {v:.2f}" for k, v in r["timings_s"].items()),
        "",
        "| layer | in → out | rank | α | rel. output error (calibration sample) |",
        "|---|---|---|---|---|",
    ]
    for name, info in r["layers"].items():
        alpha = "–" if info.get("alpha") is None else f"{info['alpha']:.1f}"
        err = info.get("rel_error")
        lines.append(f"| `{name}` | {info['in_features']} → {info['out_features']} | {info['rank']} | {alpha} | "
                     f"{'–' if err is None else f'{err:.4f}'} |")
    return "\n".join(lines) + "\n"
