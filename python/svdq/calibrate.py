"""`svdq.calibrate_pipeline`: the calibration callable for `svdq.quantize`, built from a diffusers pipeline.

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-schnell", torch_dtype=torch.bfloat16)
    svdq.quantize(pipe.transformer, calibration=svdq.calibrate_pipeline(pipe, num_inference_steps=4))

The callable runs the pipeline on the prompts, through every sampling step (so every timestep's activations
are seen) and — with classifier-free guidance — both branches (diffusers batches them together). Latents
are returned undecoded (no VAE pass). Memory stays bounded: prompts run `batch_size` at a time and
`svdq.quantize` keeps per layer only a channel-wise max and a fixed-size row sample (`calib_tokens`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import call_defaults, family_of, generic, pipeline_model, prepare


def default_prompts() -> list[str]:
    """The prompts shipped in ``svdq/data/prompts.txt`` (20 varied subjects and styles)."""
    return read_prompts(resources.files("svdq").joinpath("data/prompts.txt"))


def read_prompts(path) -> list[str]:
    """Non-empty lines of a text file, skipping ``#`` comments."""
    p = Path(str(path))
    if not p.is_file():
        raise FileNotFoundError(f"prompt file not found: {p}")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {p} holds no prompts")
    return prompts


def calibrate_pipeline(
    pipe,
    prompts: Iterable[str] | None = None,
    *,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
    component: str | None = None,
    **pipe_kwargs,
) -> Callable[[nn.Module], None]:
    """The ``calibration`` argument of `svdq.quantize` for the denoiser of ``pipe`` (transformer / UNet), or
    for its denoiser ``component`` (``"transformer_2"``: Wan 2.2 A14B's low-noise expert).

    prompts: the texts to run (default: `default_prompts()`); num_inference_steps / guidance_scale: passed to
    the pipeline when given (else its defaults: calibrate with the settings you will sample with);
    batch_size prompts per pipeline call; seed: the latents of call i use ``seed + i``. Extra keyword
    arguments (``height``, ``width``, ``max_sequence_length``, ...) go to every pipeline call.
    The returned callable must be given the pipeline's own denoiser (it runs ``pipe``, not the module).
    With two experts (Wan 2.2 A14B: ``transformer`` at timesteps >= ``boundary_ratio``, ``transformer_2`` below)
    each is calibrated by its own callable: the pipeline runs all steps, and only the forwards of the module
    being quantized are recorded, i.e. its own timesteps; ValueError when that component never runs (too few
    steps for both experts).
    For FLUX.1 / SDXL / PixArt-Σ the denoiser's shared-input projections are fused now (`svdq.models.prepare`;
    the function is unchanged); any other diffusers denoiser first gets its generic plan from its first
    forward in a pipeline call (`svdq.models.generic.analyze_pipeline`), so that `svdq.quantize` sees, calibrates and quantizes each group as one layer.
    """
    prompts = list(default_prompts() if prompts is None else prompts)
    if not prompts:
        raise ValueError("calibrate_pipeline needs at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    denoiser = pipeline_model(pipe, component)
    steps = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}
    if family_of(denoiser) is None and generic.is_diffusers_model(denoiser):
        # Any other diffusers denoiser: its first forward (at the calibration's steps: a second expert runs only
        # after the first one's timesteps) decides its layer plan (svdq.models.generic).
        generic.analyze_pipeline(pipe, prompts[0], component=component, **{**call_defaults(pipe), **pipe_kwargs, **steps})
    prepare(denoiser)  # shared-input projections become one nn.Linear: calibrated and quantized as one layer
    kwargs = {**call_defaults(pipe), **pipe_kwargs, "output_type": "latent"}
    if num_inference_steps is not None:
        kwargs["num_inference_steps"] = num_inference_steps
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]

    def calibration(model: nn.Module) -> None:
        if model is not denoiser:
            raise ValueError(
                f"this calibration runs the pipeline's {type(denoiser).__name__}; quantize that module "
                f"(got a {type(model).__name__})"
            )
        previous = dict(getattr(pipe, "_progress_bar_config", {}))
        pipe.set_progress_bar_config(disable=True)  # one bar for the whole calibration instead of one per call
        forwards = []
        counter = denoiser.register_forward_pre_hook(lambda *_: forwards.append(None))
        try:
            bar = tqdm(total=len(prompts), desc="svdq calibrate", unit="prompt", disable=not progress)
            with bar, torch.no_grad():
                for i, batch in enumerate(batches):
                    gen = torch.Generator(device="cpu").manual_seed(seed + i)
                    pipe(prompt=batch, generator=gen, **kwargs)
                    bar.update(len(batch))
        finally:
            counter.remove()
            pipe._progress_bar_config = previous
        if not forwards:  # nothing recorded: svdq.quantize would quantize data-free without saying so
            raise ValueError(generic.never_ran_message(pipe, component or "denoiser", num_inference_steps))

    return calibration
