"""`svdq eval`: quality of an svdq-quantized model against its 16-bit pipeline, prompt by prompt.

Every prompt runs twice with the same seed (prompt i uses seed + i): 16-bit, then with the quantized
denoiser. Per image: PSNR and SSIM (Gaussian-window SSIM, 11×11, σ = 1.5, on [0, 1] RGB, averaged over
channels) and LPIPS (AlexNet) when the `lpips` package and its weights are available (else reported as
skipped). Writes into --out: ref_XXX.png / svdq_XXX.png, grid.png (columns: 16-bit | quantized),
report.json and report.md. A video pipeline (Wan; --num-frames) is compared frame by frame: PSNR over all
frames' pixels, SSIM and LPIPS averaged over frames; its videos are written as ref_XXX.gif / svdq_XXX.gif and
the grid shows each video's middle frame.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from .generate import generate_frames, save_frames
from .quantize import add_common_pipeline_args, call_kwargs, check_output_dir, check_positive, device_and_dtype

EXAMPLES = """examples:
  svdq eval --model black-forest-labs/FLUX.1-schnell --quantized flux-schnell-svdq \\
      --prompts prompts.txt --steps 4 --out report/
  svdq eval --model ./tiny-pixart --quantized ./tiny-pixart-svdq --prompts p.txt --limit 2 --out r/
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="compare an svdq-quantized model with its 16-bit pipeline (PSNR, SSIM, LPIPS, image grid)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="base diffusers pipeline: hub id or local directory")
    p.add_argument("--quantized", required=True, help="svdq model directory or hub id")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (default: svdq's built-in prompts)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N prompts")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt (default: 0)")
    p.add_argument("--out", default="svdq-eval", help="report directory (default: ./svdq-eval)")
    add_common_pipeline_args(p)
    p.set_defaults(func=run)


def _to_tensor(image):
    """PIL RGB image -> float32 [3, H, W] in [0, 1]."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def psnr(a, b) -> float:
    """PSNR in dB of two [C, H, W] images (or [T, C, H, W] videos) in [0, 1] (inf when identical)."""
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a, b, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) of two [C, H, W] images in [0, 1]: Gaussian window, K1 = 0.01,
    K2 = 0.03, valid convolution (no padding), per channel, then averaged. Windows larger than the image
    shrink to the image size."""
    import torch
    import torch.nn.functional as F

    window = min(window, a.shape[-1], a.shape[-2])
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(a.shape[0], 1, window, window).contiguous()
    x, y = a[None].double(), b[None].double()

    def filt(t):
        return F.conv2d(t, kernel, groups=a.shape[0])

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


class Lpips:
    """LPIPS (AlexNet) via the `lpips` package when it and its weights load; else ``reason`` says why not."""

    def __init__(self):
        self.model, self.reason = None, None
        try:
            import lpips  # noqa: F401
        except ImportError:
            self.reason = "the lpips package is not installed (pip install lpips)"
            return
        try:
            self.model = lpips.LPIPS(net="alex", verbose=False).eval()
        except Exception as e:  # weights download failed (offline), ...
            self.reason = f"LPIPS weights could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:120]})"

    def __call__(self, a, b) -> float | None:
        if self.model is None:
            return None
        import torch

        with torch.no_grad():
            return float(self.model(a[None] * 2 - 1, b[None] * 2 - 1).flatten()[0])


def grid(pairs):
    """A PIL image: one row per prompt, columns 16-bit | quantized."""
    from PIL import Image

    w, h = pairs[0][0].size
    canvas = Image.new("RGB", (2 * w, h * len(pairs)), "white")
    for i, (ref, q) in enumerate(pairs):
        canvas.paste(ref, (0, i * h))
        canvas.paste(q.resize((w, h)), (w, i * h))
    return canvas


def _json_num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(x, 6)


def _mean(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..calibrate import default_prompts, read_prompts
    from ..models import denoiser_components
    from ..pretrained import load_pipeline, load_quantized_denoisers, read_info, resolve

    check_positive(args, "--steps", "--limit", "--height", "--width", "--max-sequence-length", "--num-frames")
    out = check_output_dir(args.out)
    device, dtype = device_and_dtype(args)
    prompts = read_prompts(args.prompts) if args.prompts else default_prompts()
    if args.limit is not None:
        prompts = prompts[: args.limit]
    resolve(args.quantized)  # fail before the slow part when the quantized model is missing
    out.mkdir(parents=True, exist_ok=True)

    pipe = load_pipeline(args.model, device=device, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    kwargs = call_kwargs(args, pipe)
    components = denoiser_components(pipe)  # Wan 2.2 A14B: transformer and transformer_2, both quantized
    index = type(getattr(pipe, components[0])).__name__
    from ..models import family_of

    family = family_of(getattr(pipe, components[0]))
    quantized = load_quantized_denoisers(args.quantized, components, device=device,
                                         expected_family=family.name if family else None,
                                         pipeline=f"base pipeline {args.model}")

    refs, qs, ref_times, q_times = [], [], [], []  # per prompt: its frames (one for an image pipeline)
    for i, prompt in enumerate(tqdm(prompts, desc="16-bit", unit="image")):
        frames, times = generate_frames(pipe, prompt, args.seed + i, args.steps, kwargs, device)
        refs.append(frames)
        ref_times += times
    for component, model in quantized.items():  # the same pipeline, text encoders, VAE and scheduler
        setattr(pipe, component, model)
    for i, prompt in enumerate(tqdm(prompts, desc="svdq W4A4", unit="image")):
        frames, times = generate_frames(pipe, prompt, args.seed + i, args.steps, kwargs, device)
        qs.append(frames)
        q_times += times

    lp = Lpips()
    rows = []
    suffix = ".gif" if len(refs[0]) > 1 else ".png"
    for i, (prompt, ref, q) in enumerate(zip(prompts, refs, qs)):
        save_frames(ref, out / f"ref_{i:03d}{suffix}")
        save_frames(q, out / f"svdq_{i:03d}{suffix}")
        a, b = [_to_tensor(f) for f in ref], [_to_tensor(f) for f in q]
        lpips_frames = [lp(x, y) for x, y in zip(a, b)]
        rows.append({"index": i, "prompt": prompt, "seed": args.seed + i,
                     "psnr": psnr(torch.stack(a), torch.stack(b)),
                     "ssim": _mean([ssim(x, y) for x, y in zip(a, b)]),
                     "lpips": None if None in lpips_frames else _mean(lpips_frames)})
    grid([(ref[len(ref) // 2], q[len(q) // 2]) for ref, q in zip(refs, qs)]).save(out / "grid.png")

    summary = {
        "base": str(args.model),
        "quantized": str(args.quantized),
        "model_class": index,
        "svdq_info": read_info(resolve(args.quantized)),
        "images": len(rows),
        "steps": args.steps,
        "call_kwargs": {k: v for k, v in kwargs.items()},
        "mean_psnr_db": _json_num(_mean([r["psnr"] for r in rows])),
        "mean_ssim": _json_num(_mean([r["ssim"] for r in rows])),
        "mean_lpips": _json_num(_mean([r["lpips"] for r in rows])),
        "lpips_skipped": lp.reason,
        "ms_per_step_16bit": _json_num(1000 * _mean(ref_times)) if ref_times else None,
        "ms_per_step_svdq": _json_num(1000 * _mean(q_times)) if q_times else None,
        "per_image": [{**r, "psnr": _json_num(r["psnr"]), "ssim": _json_num(r["ssim"]),
                       "lpips": _json_num(r["lpips"])} for r in rows],
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(summary))
    print(f"{len(rows)} images: mean PSNR {_fmt(summary['mean_psnr_db'], 2)} dB, mean SSIM "
          f"{_fmt(summary['mean_ssim'], 4)}, LPIPS {_fmt(summary['mean_lpips'], 4) if lp.model else 'skipped'}")
    print(f"wrote {out}/report.md, report.json, grid.png")
    return 0


def _fmt(x, digits):
    return "inf" if x is None else f"{x:.{digits}f}"


def _markdown(s: dict) -> str:
    lines = [
        f"# svdq eval: {s['quantized']} vs {s['base']}",
        "",
        f"{s['model_class']}, {s['images']} images, steps: {s['steps'] or 'pipeline default'}; "
        f"time per step: 16-bit {_fmt(s['ms_per_step_16bit'], 1)} ms, svdq {_fmt(s['ms_per_step_svdq'], 1)} ms.",
        "",
        f"**Mean PSNR {_fmt(s['mean_psnr_db'], 2)} dB, mean SSIM {_fmt(s['mean_ssim'], 4)}, mean LPIPS "
        f"{_fmt(s['mean_lpips'], 4) if s['lpips_skipped'] is None else 'skipped'}**"
        + (f" (LPIPS skipped: {s['lpips_skipped']})" if s["lpips_skipped"] else ""),
        "",
        "| # | seed | PSNR (dB) | SSIM | LPIPS | prompt |",
        "|---|---|---|---|---|---|",
    ]
    for r in s["per_image"]:
        lpips_cell = "—" if r["lpips"] is None else f"{r['lpips']:.4f}"
        prompt = r["prompt"].replace("|", "\\|")
        lines.append(f"| {r['index']} | {r['seed']} | {_fmt(r['psnr'], 2)} | {_fmt(r['ssim'], 4)} | {lpips_cell} | {prompt} |")
    lines += ["", "Side by side (16-bit | svdq): `grid.png`.", ""]
    return "\n".join(lines)
