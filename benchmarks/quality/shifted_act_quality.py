"""Shifted unsigned activations (docs/numerics.md §10) vs signed ones in svdq's quantizer: which layers the
per-layer choice (`svdq.quantize(act_shift=0.171875)`) shifts on the tiny FLUX pipeline, their calibration-sample
errors, and the end-to-end error of one denoising step and of 3-step final latents vs the fp32 model — each with
the same calibration, quantizer settings and reference numerics, only ``act_shift`` differs.

Usage: python benchmarks/quality/shifted_act_quality.py --out benchmarks/results/shifted_act_quality_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import svdq
from svdq import ops
from svdq.testing.tiny import synthetic_prompts, tiny_flux_pipeline, tiny_flux_transformer

SHIFT = 0.171875
SIZE = 32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def transformer_inputs(seed: int = 0) -> dict:
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


def run(act_shift: float, rounding: str, seed: int) -> dict:
    pipe = tiny_flux_pipeline(seed)
    prompts = synthetic_prompts(3, seed=10 + seed)

    def calibration(_model):
        for p in prompts:
            pipe(**p, height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=1.0, output_type="latent")

    with ops.use_backend("reference"):
        svdq.quantize(pipe.transformer, calibration=calibration, rounding=rounding, act_shift=act_shift,
                      progress=False)
        full = tiny_flux_transformer(seed)
        test_prompt = synthetic_prompts(1, seed=99)[0]
        with torch.no_grad():
            inputs = transformer_inputs(1)
            step = rel(pipe.transformer(**inputs)[0], full(**inputs)[0])
            kw = dict(height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=1.0, output_type="latent")
            lat = pipe(**test_prompt, **kw, generator=torch.Generator().manual_seed(5)).images
            lat16 = tiny_flux_pipeline(seed, transformer=full)(**test_prompt, **kw,
                                                               generator=torch.Generator().manual_seed(5)).images
    report = pipe.transformer.svdq_report
    shifted = {n: {k: round(v, 5) for k, v in r.items() if k.startswith("rel_error_")}
               for n, r in report.items() if r.get("act_shift")}
    candidates = {n: {k: round(v, 5) for k, v in r.items() if k.startswith("rel_error_")}
                  for n, r in report.items() if "rel_error_shifted" in r}
    return {"act_shift": act_shift, "rounding": rounding, "seed": seed, "step_rel_err": step,
            "latents_rel_err": rel(lat, lat16), "layers_shifted": sorted(shifted), "candidates": candidates}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--rounding", default="gptq")
    args = ap.parse_args()
    t0 = time.time()
    rows = []
    for seed in range(args.seeds):
        for shift in (0.0, SHIFT):
            row = run(shift, args.rounding, seed)
            print({k: v for k, v in row.items() if k != "candidates"}, flush=True)
            rows.append(row)
    result = {"what": "tiny FLUX pipeline, svdq.quantize calibrated, act_shift 0 vs 0.171875; reference numerics, CPU",
              "torch": torch.__version__, "machine": platform.machine(), "rows": rows,
              "seconds": round(time.time() - t0, 1)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
