"""W4A8 (FP8 e4m3 per-token activations) vs W4A4 vs 16-bit: output errors on CPU, reference numerics.

Two measurements (docs/numerics.md §8.4 quotes them):
  layers   synthetic FLUX-like layers (K = 3072, outlier input channels ×30 as svdq.testing.tiny plants them), quantized
           data-free ("naive" and rank 32) and calibrated ("svdquant"); relative output error ‖y − y16‖/‖y16‖
           of the same quantized layer run with act_format "int4" and "fp8".
  pipeline the tiny FLUX transformer (svdq.testing.tiny), calibrated through its pipeline as tests/test_flux_tiny.py
           does; relative error of one denoising step's output and of 3-step final latents vs the 16-bit model.
Usage: python benchmarks/quality/w4a8_quality.py --out benchmarks/results/w4a8_quality_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch import nn

import svdq
from svdq import ops
from svdq.testing.tiny import synthetic_prompts, tiny_flux_pipeline, tiny_flux_transformer

ROWS = 256


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def layer_inputs(k: int, rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    idx = torch.randperm(k, generator=g)[:8]
    x[:, idx] *= 30.0  # outlier channels, as in real FLUX activations (svdq.testing.tiny.plant_outliers)
    return x


def measure_layers() -> list[dict]:
    out = []
    for k, n in ((3072, 3072), (3072, 1024), (1024, 3072)):
        g = torch.Generator().manual_seed(k + n)
        lin = nn.Linear(k, n)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=g) * k**-0.5)
            lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
        calib, test = layer_inputs(k, ROWS, 1), layer_inputs(k, ROWS, 1)[torch.randperm(ROWS)]
        test = test + 0.1 * torch.randn_like(test)
        with torch.no_grad():
            y16 = lin(test)
        for method, calibrated in (("naive", False), ("svdquant", False), ("svdquant", True)):
            model = nn.Sequential(nn.Linear(k, n))
            model[0].load_state_dict(lin.state_dict())
            cal = (lambda m: m(calib)) if calibrated else None
            svdq.quantize(model, calibration=cal, method=method, rank=32, exclude=(), progress=False)
            row = {"shape": f"{k}->{n}", "method": method, "calibrated": calibrated}
            with torch.no_grad():
                for fmt in ops.ACT_FORMATS:
                    with ops.use_act_format(fmt), ops.use_backend("reference"):
                        row[f"rel_err_{fmt}"] = rel(model(test), y16)
            out.append(row)
            print(row, flush=True)
    return out


def transformer_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = 64
    prompt = synthetic_prompts(1, seed)[0]
    return dict(
        hidden_states=torch.randn(1, tokens, 16, generator=g),
        encoder_hidden_states=prompt["prompt_embeds"],
        pooled_projections=prompt["pooled_prompt_embeds"],
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(prompt["prompt_embeds"].shape[1], 3),
        return_dict=False,
    )


def measure_pipeline() -> list[dict]:
    out = []
    size = 32
    for method in ("naive", "svdquant"):
        pipe = tiny_flux_pipeline(0)
        prompts = synthetic_prompts(3, seed=10)

        def calibration(_model):
            for p in prompts:
                pipe(**p, height=size, width=size, num_inference_steps=3, guidance_scale=1.0, output_type="latent")

        full = tiny_flux_transformer(0)
        svdq.quantize(pipe.transformer, calibration=calibration if method == "svdquant" else None, method=method,
                      progress=False)
        row = {"model": "tiny-flux", "method": method}
        test_prompt = synthetic_prompts(1, seed=99)[0]
        with torch.no_grad():
            inputs = transformer_inputs(1)
            y16 = full(**inputs)[0]
            ref_pipe = tiny_flux_pipeline(0, transformer=full)
            lat16 = ref_pipe(**test_prompt, height=size, width=size, num_inference_steps=3, guidance_scale=1.0,
                             output_type="latent", generator=torch.Generator().manual_seed(5)).images
            for fmt in ops.ACT_FORMATS:
                with ops.use_act_format(fmt):
                    row[f"step_rel_err_{fmt}"] = rel(pipe.transformer(**inputs)[0], y16)
                    lat = pipe(**test_prompt, height=size, width=size, num_inference_steps=3, guidance_scale=1.0,
                               output_type="latent", generator=torch.Generator().manual_seed(5)).images
                    row[f"latents_rel_err_{fmt}"] = rel(lat, lat16)
        out.append(row)
        print(row, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    result = {
        "what": "relative output error vs the fp32 model, act_format int4 (W4A4) vs fp8 (W4A8), CPU",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "layers": measure_layers(),
        "pipeline": measure_pipeline(),
    }
    result["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
