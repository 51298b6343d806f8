"""Does the low-rank refit after GPTQ (svdq.gptq.refit_low_rank) carry its per-layer gain end to end?

Per tiny family (quality_table's prompts, seeds, steps, α grid): final latents of the held-out prompts from the
16-bit pipeline vs the pipeline quantized with round to nearest, GPTQ + refit (the default) and GPTQ with the
plain SVD branch (the refit switched off for this run by patching svdq.decompose's two calls); relative error
‖latents_q − latents‖ / ‖latents‖ over all held-out prompts.

    .venv/bin/python benchmarks/quality/gptq_refit_e2e.py --out benchmarks/results/gptq_refit_e2e_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quality_table as qt  # noqa: E402
import svdq  # noqa: E402
import svdq.decompose as dm  # noqa: E402
from svdq.models import FAMILIES, pipeline_model, prepare  # noqa: E402


def final_latents(pipe) -> torch.Tensor:
    out = []
    for i, p in enumerate(qt.EVAL_PROMPTS):
        g = torch.Generator().manual_seed(qt.EVAL_SEED + i)
        out.append(pipe(prompt=p, generator=g, output_type="latent", **qt.call_kwargs(pipe)).images)
    return torch.cat(out)


def evaluate(family: str) -> dict:
    pipe = qt.tiny.tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    model = pipeline_model(pipe)
    prepare(model)
    base = copy.deepcopy(model)
    component = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    ref = final_latents(pipe)
    real = (dm.dequantize, dm.refit_low_rank)
    res = {}
    for name, rounding, refit in (("nearest", "nearest", True), ("gptq + refit", "gptq", True),
                                  ("gptq, no refit", "gptq", False)):
        dm.dequantize, dm.refit_low_rank = real
        if not refit:  # refit target Ŵ − 0, plain SVD: the branch decompose chose before GPTQ
            dm.dequantize = lambda q, s, k: torch.zeros(q.shape[0], k, device=q.device)
            dm.refit_low_rank = lambda target, h, r: dm.top_singular(target, r)
        q = copy.deepcopy(base)
        setattr(pipe, component, q)
        calib = svdq.calibrate_pipeline(pipe, qt.CALIB_PROMPTS, progress=False, **qt.call_kwargs(pipe))
        config = svdq.QuantizeConfig(exclude=FAMILIES[family].exclude, alphas=qt.ALPHAS, rounding=rounding)
        svdq.quantize(q, calibration=calib, config=config, progress=False)
        res[name] = float((final_latents(pipe) - ref).norm() / ref.norm())
        print(f"{family:7s} {name:16s} final-latent rel. error {res[name]:.5f}", flush=True)
    dm.dequantize, dm.refit_low_rank = real
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(qt.FAMILY_NAMES), choices=qt.FAMILY_NAMES)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    results = {f: evaluate(f) for f in args.families}
    if args.out:
        from svdq.bench.env import write_results

        write_results(args.out, results, torch.device("cpu"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
