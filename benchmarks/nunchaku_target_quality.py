"""What quantizing in Nunchaku's form costs (`svdq.quantize(target="nunchaku")`, docs/formats.md): the tiny FLUX.1
and SDXL pipelines of benchmarks/quality_table.py (same calibration and held-out prompts, same smoothing grid),
each quantized svdq's way and in Nunchaku's form, compared end to end with the 16-bit pipeline (PSNR / SSIM of the
held-out prompts' images) and by the bytes of their quantized layers.

    .venv/bin/python benchmarks/nunchaku_target_quality.py      # → benchmarks/results/nunchaku_target_quality_cpu.json

Variants (all GPTQ rounding, rank 32): svdq's defaults (FLUX.1: AdaNorm W4A16 as the Nunchaku form has it, so the
bytes compare), the same with shifted activations chosen per layer (`act_shift`), and `target="nunchaku"`.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import svdq  # noqa: E402
from quality_table import ALPHAS, CALIB_PROMPTS, EVAL_PROMPTS, EVAL_SEED, call_kwargs, generate  # noqa: E402
from svdq.bench.env import write_results  # noqa: E402
from svdq.commands.eval import psnr, ssim  # noqa: E402
from svdq.models import FAMILIES, pipeline_model, prepare  # noqa: E402
from svdq.testing import tiny  # noqa: E402

VARIANTS = {
    "flux": {
        "svdq (AdaNorm W4A16)": dict(exclude=FAMILIES["flux"].exclude, weight_only=FAMILIES["flux"].adaln),
        "svdq (AdaNorm W4A16) + act_shift": dict(exclude=FAMILIES["flux"].exclude, weight_only=FAMILIES["flux"].adaln,
                                                 act_shift=0.171875),
        "target nunchaku": dict(target="nunchaku"),
    },
    "sdxl": {
        "svdq": dict(exclude=FAMILIES["sdxl"].exclude),
        "target nunchaku": dict(target="nunchaku"),
    },
}


def quantized_bytes(model) -> int:
    """Stored bytes of every quantized layer (4-bit weights, scales, smoothing, low rank, bias)."""
    layers = {**svdq.quantized_layers(model), **svdq.weight_only_layers(model)}
    return sum(sum(t.numel() * t.element_size() for t in m.state_dict().values()) for m in layers.values())


def run_family(family: str) -> dict:
    pipe = tiny.tiny_pipeline(family)
    base = copy.deepcopy(pipeline_model(pipe))
    prepare(base)
    component = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    setattr(pipe, component, base)
    reference = generate(pipe, EVAL_PROMPTS, EVAL_SEED)
    out = {}
    for name, kwargs in VARIANTS[family].items():
        model = copy.deepcopy(base)
        setattr(pipe, component, model)
        calib = svdq.calibrate_pipeline(pipe, CALIB_PROMPTS, progress=False, **call_kwargs(pipe))
        t0 = time.perf_counter()
        config = svdq.QuantizeConfig(rank=32, alphas=ALPHAS, rounding="gptq", **kwargs)
        svdq.quantize(model, calibration=calib, config=config, progress=False)
        seconds = time.perf_counter() - t0
        images = generate(pipe, EVAL_PROMPTS, EVAL_SEED)
        p = [psnr(a, b) for a, b in zip(reference, images)]
        s = [ssim(a, b) for a, b in zip(reference, images)]
        shifted = sum(1 for m in svdq.quantized_layers(model).values() if m.act_shift)
        out[name] = {"kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
                     "psnr_db": sum(p) / len(p), "ssim": sum(s) / len(s),
                     "w4a4_layers": len(svdq.quantized_layers(model)), "shifted_layers": shifted,
                     "w4a16_layers": len(svdq.weight_only_layers(model)), "quantized_bytes": quantized_bytes(model),
                     "quantize_seconds": round(seconds, 1)}
        print(f"{family:5s} {name:34s} PSNR {out[name]['psnr_db']:6.2f} dB  SSIM {out[name]['ssim']:.4f}  "
              f"{out[name]['w4a4_layers']} W4A4 ({shifted} shifted) + {out[name]['w4a16_layers']} W4A16, "
              f"{out[name]['quantized_bytes'] / 2**20:.2f} MiB, {seconds:.0f} s", flush=True)
    return out


def main() -> int:
    torch.manual_seed(0)
    results = {family: run_family(family) for family in VARIANTS}
    path = write_results(ROOT / "benchmarks" / "results" / "nunchaku_target_quality_cpu.json", results,
                         torch.device("cpu"), what=__doc__.split("\n\n")[0])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
