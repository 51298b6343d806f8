"""`svdq generate`: one image (or video) from a base pipeline, with its denoiser replaced by an svdq-quantized
model.

Prints the time per denoising step and the peak memory (CUDA: peak allocated; CPU: peak resident set).
Without --quantized the 16-bit pipeline runs (a baseline with the same seed). Video pipelines (Wan) write an
animated .gif (PIL) or an .mp4 (diffusers' export_to_video: needs imageio + imageio-ffmpeg or OpenCV).
"""

from __future__ import annotations

import argparse
import time

from .quantize import add_common_pipeline_args, call_kwargs, check_output_file, check_positive, device_and_dtype

EXAMPLES = """examples:
  svdq generate --model black-forest-labs/FLUX.1-schnell --quantized flux-schnell-svdq \\
      --prompt "a red fox in the snow" --steps 4 --seed 0 --out fox.png
  svdq generate --model ./tiny-sdxl --prompt "a cat" --steps 8 --out cat-16bit.png   # 16-bit baseline
  torchrun --nproc-per-node 2 -m svdq generate --model black-forest-labs/FLUX.1-dev --quantized flux-dev-svdq \
      --prompt "a lighthouse at dusk" --ulysses 2 --out lighthouse.png          # 2 GPUs, context parallel
  svdq generate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --quantized wan-svdq --prompt "a cat surfing" \
      --num-frames 33 --out cat.gif                                                  # video: .gif or .mp4
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate an image with an svdq-quantized denoiser",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="base diffusers pipeline: hub id or local directory")
    p.add_argument("--quantized", default=None, help="svdq model directory or hub id (omit: 16-bit)")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (pipelines with CFG)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--out", default=None,
                   help="output path: an image (.png/.jpg/.webp; default svdq.png) or, for a video pipeline, "
                        ".gif/.mp4 (default svdq.gif)")
    p.add_argument("--act-format", choices=("int4", "fp8"), default=None,
                   help="activation format of the quantized layers: int4 (W4A4) or fp8 (W4A8, docs/numerics.md §8) "
                        "(default: what the checkpoint's config records, else int4)")
    p.add_argument("--ulysses", type=int, default=1,
                   help="context parallelism: Ulysses degree (launch with torchrun --nproc-per-node ulysses×ring; "
                        "docs/parallel.md)")
    p.add_argument("--ring", type=int, default=1, help="context parallelism: ring-attention degree (docs/parallel.md)")
    add_common_pipeline_args(p)
    p.set_defaults(func=run)


class StepTimer:
    """A diffusers ``callback_on_step_end`` recording the wall time of each denoising step."""

    def __init__(self, device):
        self.device = str(device)
        self.times: list[float] = []
        self._last = None

    def start(self) -> None:
        self._sync()
        self._last = time.perf_counter()

    def _sync(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def __call__(self, pipe, step, timestep, callback_kwargs):
        self._sync()
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now
        return callback_kwargs


def peak_memory(device) -> tuple[str, float]:
    """(what, MiB): CUDA peak allocated memory, else the process's peak resident set size."""
    import torch

    if str(device).startswith("cuda"):
        return "peak GPU memory allocated", torch.cuda.max_memory_allocated() / 2**20
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return "peak resident memory (process)", rss / (2**20 if sys.platform == "darwin" else 2**10)


def generate_frames(pipe, prompt: str, seed: int, steps: int | None, kwargs: dict, device, negative_prompt=None):
    """(PIL frames, per-step seconds) for one prompt with a fixed seed (CPU generator: same noise anywhere): one
    frame from an image pipeline, the video's frames from a video pipeline (its output has ``frames``)."""
    import inspect

    import torch

    timer = StepTimer(device)
    kw = dict(kwargs)
    if steps is not None:
        kw["num_inference_steps"] = steps
    if negative_prompt is not None:
        kw["negative_prompt"] = negative_prompt
    params = inspect.signature(pipe.__call__).parameters
    if "callback_on_step_end" in params:
        kw["callback_on_step_end"] = timer
    elif "callback" in params:  # older pipeline API (PixArt): callback(step, timestep, latents)
        kw.update(callback=lambda step, t, latents: timer(pipe, step, t, {}), callback_steps=1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    timer.start()
    with torch.no_grad():
        out = pipe(prompt=prompt, generator=gen, output_type="pil", **kw)
    frames = [out.images[0]] if hasattr(out, "images") else list(out.frames[0])
    return frames, timer.times


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".gif", ".mp4")


def is_video_pipeline(pipe) -> bool:
    """Whether the pipeline makes videos (its call takes ``num_frames``: Wan, and diffusers' other video pipelines)."""
    import inspect

    return "num_frames" in inspect.signature(pipe.__call__).parameters


def save_frames(frames, out, fps: int = 16) -> None:
    """One frame → an image file; several → an animated GIF (PIL) or an MP4 (diffusers' export_to_video)."""
    if out.suffix.lower() in IMAGE_SUFFIXES:
        frames[0].save(out)
    elif out.suffix.lower() == ".gif":
        from diffusers.utils import export_to_gif

        export_to_gif(frames, str(out), fps=fps)
    else:
        from diffusers.utils import export_to_video

        export_to_video(frames, str(out), fps=fps)


def check_video_writer(out) -> None:
    """Before generating: an .mp4 needs imageio + imageio-ffmpeg or OpenCV (diffusers' export_to_video)."""
    import importlib.util

    has = lambda m: importlib.util.find_spec(m) is not None  # noqa: E731
    if out.suffix.lower() == ".mp4" and not ((has("imageio") and has("imageio_ffmpeg")) or has("cv2")):
        raise ValueError(f"--out {out}: writing .mp4 needs `pip install imageio imageio-ffmpeg` (or OpenCV); "
                         "or write an animated .gif")


def run(args) -> int:
    import contextlib

    from ..parallel import distributed_session

    check_positive(args, "--steps", "--height", "--width", "--max-sequence-length", "--num-frames", "--ulysses",
                   "--ring")
    device, dtype = device_and_dtype(args)
    if args.ulysses * args.ring == 1:
        return _generate(args, device, dtype, rank=0)
    with distributed_session(device) as rank:  # one process per rank (torchrun); rank 0 writes the image
        return _generate(args, device, dtype, rank)


def _generate(args, device, dtype, rank: int) -> int:
    from pathlib import Path

    import torch

    from ..pretrained import load_pipeline

    out = Path(args.out) if args.out else None
    if out is not None:
        if out.suffix.lower() not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
            raise ValueError(f"--out must be an image (.png/.jpg/.webp) or, for a video pipeline, a .gif/.mp4 "
                             f"path; got {out}")
        check_output_file(out)
        check_video_writer(out)
    if args.act_format and not args.quantized:  # before the (slow) pipeline load
        raise ValueError("--act-format applies to a quantized model: pass --quantized too")
    pipe = load_pipeline(args.model, args.quantized, device=device, torch_dtype=dtype)
    video = is_video_pipeline(pipe)
    if out is None:
        out = Path("svdq.gif" if video else "svdq.png")
        check_output_file(out)
    elif (out.suffix.lower() in VIDEO_SUFFIXES) != video:
        raise ValueError(f"--out {out}: {type(pipe).__name__} makes " + (
            "videos; write a .gif or .mp4" if video else "images; write a .png/.jpg/.webp"))
    fmt = None
    if args.quantized:
        import svdq

        from ..models import denoiser_components, pipeline_model

        model = pipeline_model(pipe)
        fmt = args.act_format or getattr(getattr(model, "svdq_config", None), "act_format", "int4")
        for component in denoiser_components(pipe):  # Wan 2.2 A14B: both experts
            svdq.set_act_format(pipeline_model(pipe, component), fmt)
    if args.ulysses * args.ring > 1:
        import svdq.parallel

        from ..models import denoiser_components, pipeline_model

        for component in denoiser_components(pipe):  # Wan 2.2 A14B: both experts
            svdq.parallel.enable_context_parallel(pipeline_model(pipe, component), ulysses=args.ulysses, ring=args.ring)
    pipe.set_progress_bar_config(desc="denoising", disable=rank != 0)
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    frames, times = generate_frames(pipe, args.prompt, args.seed, args.steps, call_kwargs(args, pipe), device,
                                    args.negative_prompt)
    if rank != 0:  # every rank computed the same image
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    save_frames(frames, out)
    what, mib = peak_memory(device)
    kind = f"W4A{8 if fmt == 'fp8' else 4} (svdq)" if args.quantized else "16-bit"
    if times:
        steady = times[1:] or times
        print(f"{kind}: {len(times)} steps, {1000 * sum(steady) / len(steady):.1f} ms/step "
              f"(first step {1000 * times[0]:.1f} ms)")
    print(f"{what}: {mib:.0f} MiB")
    w, h = frames[0].size
    print(f"wrote {out} ({w}x{h}" + (f", {len(frames)} frames)" if video else ")"))
    return 0
