"""`svdq quantize`: quantize a diffusers pipeline's transformer / UNet to W4A4 and save it.

Loads the 16-bit pipeline (hub id or local directory), runs it on calibration prompts across all sampling
steps while recording each layer's inputs, quantizes the denoiser (FLUX.1, SDXL, PixArt-Σ: shared-input
projections fused, see docs/models.md) and writes a directory loadable with `svdq.from_pretrained` or
`svdq generate --quantized`.
"""

from __future__ import annotations

import argparse
import os
import time

EXAMPLES = """examples:
  svdq quantize --model black-forest-labs/FLUX.1-schnell --out flux-schnell-svdq --steps 4 --guidance-scale 0
  svdq quantize --model stabilityai/stable-diffusion-xl-base-1.0 --out sdxl-svdq --calib-prompts my_prompts.txt
  svdq quantize --model ./my-pipeline --out ./my-pipeline-svdq --data-free        # no calibration run
  svdq quantize --model black-forest-labs/FLUX.1-dev --out flux-dev-svdq --adaln w4a16   # smaller: ~1/3.5 of bf16
  svdq quantize --model black-forest-labs/FLUX.1-dev --out flux-dev-svdq --text-encoder w4a16   # + 4-bit T5-XXL
  svdq quantize --model black-forest-labs/FLUX.1-dev --out flux-dev-nk --target nunchaku --dtype bf16
  svdq export --format nunchaku flux-dev-nk svdq-int4_r32-flux.1-dev.safetensors   # exact: Nunchaku's own form
"""

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_common_pipeline_args(p: argparse.ArgumentParser) -> None:
    """Options shared by quantize / generate / eval: device, dtype, image size, video length."""
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="16-bit pipeline dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the pipeline's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the pipeline's)")
    p.add_argument("--guidance-scale", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 text tokens (FLUX / PixArt pipelines; default: the pipeline's)")
    p.add_argument("--num-frames", type=int, default=None,
                   help="frames per video (video pipelines such as Wan; default: the pipeline's)")


def check_positive(args, *options: str) -> None:
    """ValueError naming the option when a given count (steps, sizes, …) is < 1: before any work starts."""
    for opt in options:
        value = getattr(args, opt.lstrip("-").replace("-", "_"), None)
        if value is not None and value < 1:
            raise ValueError(f"{opt} must be >= 1, got {value}")


def check_output_dir(path, option: str = "--out"):
    """Fail before the work starts when directory ``path`` cannot be written (an existing file, a file on
    the way, a read-only parent). Returns it as a Path; nothing is created."""
    from pathlib import Path

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path}: exists and is not a directory")
    _check_writable_ancestor(path if path.exists() else path.parent, option, path)
    return path


def check_output_file(path, option: str = "--out"):
    """As `check_output_dir`, for a file to be written (it may exist; it must not be a directory)."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a directory, expected a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{option} {path}: exists and is not writable")
    _check_writable_ancestor(path.parent, option, path)
    return path


def _check_writable_ancestor(directory, option: str, path) -> None:
    d = directory
    while not d.exists():  # the nearest existing ancestor must be a writable directory
        d = d.parent
    if not d.is_dir():
        raise ValueError(f"{option} {path}: {d} is a file, not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: directory {d} is not writable")


def device_and_dtype(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype:
        dtype = getattr(torch, DTYPES[args.dtype])
    else:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return device, dtype


def call_kwargs(args, pipe) -> dict:
    """Pipeline call keyword arguments from the shared options (only the ones given)."""
    import inspect

    from ..models import call_defaults

    kw = dict(call_defaults(pipe))
    for opt in ("height", "width", "guidance_scale", "max_sequence_length", "num_frames"):
        value = getattr(args, opt, None)
        if value is not None:
            kw[opt] = value
    accepted = inspect.signature(pipe.__call__).parameters
    for opt in ("max_sequence_length", "num_frames"):
        if opt in kw and opt not in accepted:
            raise ValueError(f"--{opt.replace('_', '-')} does not apply to {type(pipe).__name__}")
    return kw


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a FLUX.1 / SDXL / PixArt-Σ pipeline's denoiser to W4A4 and save it",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="base diffusers pipeline: hub id or local directory")
    p.add_argument("--out", required=True, help="output directory for the quantized model")
    p.add_argument("--rank", type=int, default=32, help="low-rank branch rank (default: 32)")
    p.add_argument("--method", choices=("svdquant", "smoothquant", "naive"), default="svdquant",
                   help="quantization method (default: svdquant)")
    p.add_argument("--rounding", choices=("gptq", "nearest"), default="gptq",
                   help="how the residual's 4-bit codes are chosen: gptq (against the calibration inputs' Hessian; "
                        "data-free layers round to nearest) or nearest (default: gptq)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--calib-prompts", default=None,
                   help="text file, one calibration prompt per line (default: svdq's 20 built-in prompts)")
    g.add_argument("--data-free", action="store_true", help="skip calibration (no smoothing; low-rank + INT4 only)")
    p.add_argument("--act-format", choices=("int4", "fp8"), default="int4",
                   help="activation format the layers run with and the checkpoint records: int4 (W4A4) or fp8 "
                        "(W4A8, docs/numerics.md §8; same 4-bit weights) (default: int4)")
    p.add_argument("--act-shift", type=float, default=0.0,
                   help="shifted unsigned activations (docs/numerics.md §10) for the layers whose calibration inputs "
                        "are >= -SHIFT (after GELU: 0.171875, Nunchaku's mlp_fc2), kept per layer where they lower "
                        "the error; 0 = off (default: 0)")
    p.add_argument("--adaln", choices=("16bit", "w4a16"), default="16bit",
                   help="AdaLN modulation linears: keep 16-bit (default) or weight-only 4-bit (W4A16; FLUX.1-dev "
                        "weights 2.1x -> 3.6x smaller than bf16, see docs/models.md)")
    p.add_argument("--text-encoder", choices=("16bit", "w4a16"), default="16bit",
                   help="large text encoders (T5: FLUX.1's text_encoder_2, PixArt's, SD3's; others >= 0.3 B "
                        "parameters): keep 16-bit (default) or weight-only 4-bit (W4A16), saved under "
                        "OUT/text_encoders/ (svdq.load_text_encoders)")
    p.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                   help="keep the linears matching this fnmatch pattern 16-bit, besides the family's defaults "
                        "(repeatable; e.g. '*attn2.to_kv' for a Nunchaku-exportable SDXL)")
    p.add_argument("--target", choices=("nunchaku",), default=None,
                   help="quantize in this runtime's own form, layer for layer, so that `svdq export --format nunchaku` "
                        "writes an exact file (FLUX.1, Qwen-Image, Z-Image, SDXL, SANA; svdq.formats.nunchaku_target): it chooses "
                        "the 4-bit layers (AdaNorm W4A16: no --adaln needed) and the shifted ones itself, so not "
                        "with --exclude / --act-shift / --act-format fp8")
    p.add_argument("--num-calib-prompts", type=int, default=None, help="use only the first N calibration prompts")
    p.add_argument("--steps", type=int, default=None, help="sampling steps during calibration (default: the pipeline's)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per calibration pipeline call (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="calibration noise seed (default: 0)")
    p.add_argument("--streaming", action="store_true",
                   help="quantize block by block (svdq.streaming): one block's calibration statistics in memory at a "
                        "time, progress and ETA per block, resumable: rerun the same command after an interruption")
    p.add_argument("--state-dir", default=None,
                   help="with --streaming: where finished blocks are kept until the model is saved (default: "
                        "OUT.svdq-state next to --out; removed after a successful save)")
    p.add_argument("--offload-blocks", action="store_true",
                   help="with --streaming: load the pipeline in CPU memory and keep the denoiser's repeated blocks "
                        "there, each visiting --device only for its turn; the rest goes to --device (for denoisers "
                        "that do not fit the GPU beside the calibration activations)")
    p.add_argument("--propagate", choices=("quantized", "16bit"), default="quantized",
                   help="with --streaming: which block outputs calibrate the next block: the quantized ones (GPTQ's "
                        "order, default) or the 16-bit ones (same result as without --streaming)")
    add_common_pipeline_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import svdq

    from ..calibrate import default_prompts, read_prompts
    from ..models import denoiser_components
    from ..pretrained import load_pipeline

    # Arguments and the output directory are checked before the (slow) pipeline load and calibration.
    check_positive(args, "--steps", "--num-calib-prompts", "--batch-size", "--height", "--width", "--num-frames",
                   "--max-sequence-length")
    if args.rank < 0:
        raise ValueError(f"--rank must be >= 0, got {args.rank}")
    check_output_dir(args.out)
    if getattr(args, "target", None):
        clash = [opt for opt, on in (("--exclude", getattr(args, "exclude", None)),
                                     ("--act-shift", getattr(args, "act_shift", 0.0)),
                                     ("--act-format fp8", getattr(args, "act_format", "int4") != "int4"),
                                     ("--method " + args.method, args.method != "svdquant")) if on]
        if clash:
            raise ValueError(f"--target {args.target} chooses the quantized layers and their formats itself: drop "
                             f"{', '.join(clash)}")
        if args.rank <= 0 or args.rank % 16:
            raise ValueError(f"--target {args.target}: --rank must be a positive multiple of 16, got {args.rank}")
    streaming = getattr(args, "streaming", False)
    if streaming and args.data_free:
        raise ValueError("--streaming needs calibration (it streams the calibration activations): drop --data-free")
    offload = getattr(args, "offload_blocks", False)
    if offload and not streaming:
        raise ValueError("--offload-blocks needs --streaming (only the streaming quantizer moves blocks)")
    state_dir = None
    if streaming:
        out_path = Path(args.out)
        state_dir = check_output_dir(args.state_dir or out_path.with_name(out_path.name + ".svdq-state"),
                                     "--state-dir")
    device, dtype = device_and_dtype(args)
    adaln = getattr(args, "adaln", "16bit")
    text_encoder = getattr(args, "text_encoder", "16bit")
    prompts = None
    if not args.data_free:  # read the prompts before the (slow) pipeline load: a bad path fails fast
        prompts = read_prompts(args.calib_prompts) if args.calib_prompts else default_prompts()
        if args.num_calib_prompts is not None:
            prompts = prompts[: args.num_calib_prompts]
    if streaming and (Path(args.model) / "model_index.json").is_file():  # a local pipeline: refuse before loading
        from ..pretrained import _model_index, _pipeline_denoisers

        _refuse_streaming(_pipeline_denoisers(_model_index(args.model)), _model_index(args.model).get("_class_name"))
    print(f"loading {args.model} ({dtype}, {device}) ...")
    pipe = load_pipeline(args.model, device="cpu" if offload else device, torch_dtype=dtype)
    components = denoiser_components(pipe)  # Wan 2.2 A14B: ["transformer", "transformer_2"]
    if len(components) > 1:
        if streaming:
            _refuse_streaming(components, type(pipe).__name__)
    elif (Path(args.out) / "transformer_2").exists():
        raise ValueError(f"--out {args.out} holds a transformer_2/ from an earlier two-expert save, but "
                         f"{type(pipe).__name__} has one denoiser: remove it or choose another --out")
    steps = {} if args.steps is None else {"num_inference_steps": args.steps}
    models, layers, wo = {}, 0, 0
    t0 = time.perf_counter()
    for name in components:
        model = _quantize_component(args, pipe, name, prompts, device, offload, streaming, state_dir, adaln,
                                    text_encoder, steps)
        models[name] = model
        layers += len(svdq.quantized_layers(model))
        wo += len(svdq.weight_only_layers(model))
    extra, encoders = None, []
    if text_encoder == "w4a16":
        # After the calibration runs (they need the 16-bit encoders' embeddings); written into the new output
        # directory before its atomic swap (all or nothing, with the denoisers).
        from ..weight_only import quantize_pipeline_text_encoders, save_text_encoders

        encoders = quantize_pipeline_text_encoders(pipe)
        extra = lambda tmp: save_text_encoders(pipe, tmp, encoders)  # noqa: E731
    out = svdq.save_pretrained(models[components[0]], args.out, base=str(args.model),
                               transformer_2=models.get("transformer_2"), extra=extra)
    if streaming:
        import shutil

        shutil.rmtree(state_dir)  # the saved model is complete: the per-block state is not needed any more
    if encoders:
        print(f"text encoder(s) W4A16: {', '.join(encoders)} -> {out}")
    what = (" + ".join(f"{n} ({type(m).__name__})" for n, m in models.items()) if len(models) > 1
            else type(models[components[0]]).__name__)
    print(
        f"quantized {layers} layers of {what}" + (f" (+ {wo} AdaLN layers W4A16)" if wo else "") + " "
        f"({'data-free' if prompts is None else f'{len(prompts)} calibration prompts'}) in "
        f"{time.perf_counter() - t0:.1f} s -> {out}"
    )
    return 0


def _refuse_streaming(components: list[str], pipeline: str) -> None:
    if len(components) > 1:
        raise ValueError(f"--streaming: {pipeline} has two denoisers ({', '.join(components)}); the streaming "
                         "quantizer (and --offload-blocks) handles one model: run without --streaming")


def _quantize_component(args, pipe, name, prompts, device, offload, streaming, state_dir, adaln, text_encoder,
                        steps):
    """Plan, fuse, calibrate and quantize the pipeline's denoiser ``name`` in place; returns it. With two experts
    (Wan 2.2 A14B) this runs per expert, in pipeline order: each is calibrated on the timesteps it runs at, the
    second on the latents the already quantized first one hands it (as at inference)."""
    import svdq

    from ..calibrate import default_prompts
    from ..models import family_of, generic, pipeline_model, prepare

    model = pipeline_model(pipe, name)
    label = type(model).__name__ if name in ("transformer", "unet") else f"{name} ({type(model).__name__})"
    if family_of(model) is None and generic.is_diffusers_model(model):
        # no hand-written family: its first forward in a pipeline call plans the layers (svdq.models.generic,
        # docs/models.md); a second expert is reached after the first one's timesteps
        generic.analyze_pipeline(pipe, (prompts or default_prompts())[0], component=name,
                                 **{**call_kwargs(args, pipe), **steps})
        print(f"note: {label}: generic family (layer plan from one traced step)")
    family = prepare(model)  # fuse shared-input projections (also when data-free)
    if offload:
        from torch import nn

        from ..streaming import place_offloaded

        for component in pipe.components.values():
            if isinstance(component, nn.Module) and component is not model:
                component.to(device)
        blocks = place_offloaded(model, device)
        print(f"{len(blocks)} blocks of {type(model).__name__} stay in CPU memory; the rest is on {device}")
    if family is None:
        print(f"note: {label} is not a diffusers model svdq can plan: default layer selection")
    weight_only = None
    target = getattr(args, "target", None)
    if adaln == "w4a16" and not target:  # a target makes its own AdaNorm layers W4A16
        if family is None or not family.adaln:
            raise ValueError(f"--adaln w4a16: no AdaLN layer patterns known for {type(model).__name__}")
        weight_only = family.adaln
    if text_encoder == "w4a16":
        from ..weight_only import large_text_encoders

        if not large_text_encoders(pipe):  # before the (slow) calibration and quantization
            raise ValueError(f"--text-encoder w4a16: {type(pipe).__name__} has no T5 text encoder and none of "
                             ">= 0.3 B parameters")
    calibration = None
    if prompts is not None:
        calibration = svdq.calibrate_pipeline(
            pipe, prompts, num_inference_steps=args.steps, batch_size=args.batch_size, seed=args.seed,
            component=name, **call_kwargs(args, pipe),
        )
    stream = {} if not streaming else dict(streaming=True, state_dir=state_dir, device=device,
                                           propagate=getattr(args, "propagate", "quantized"))
    if streaming:
        print(f"streaming block by block; finished blocks are kept in {state_dir} (rerun to resume)")
    exclude = None
    if getattr(args, "exclude", None):
        from ..quantize import DEFAULT_EXCLUDE

        exclude = tuple(family.exclude if family else DEFAULT_EXCLUDE) + tuple(args.exclude)
    svdq.quantize(model, calibration=calibration, rank=args.rank, method=args.method, weight_only=weight_only,
                  exclude=exclude, target=target,
                  act_format=getattr(args, "act_format", "int4"), rounding=getattr(args, "rounding", "gptq"),
                  act_shift=getattr(args, "act_shift", 0.0), **stream)
    return model
