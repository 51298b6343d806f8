"""Quality table: naive, SmoothQuant, SVDQuant and SVDQuant + GPTQ on the tiny FLUX.1 / SDXL / PixArt-Σ
pipelines (CPU, seeded synthetic weights with planted activation outliers, svdq.testing.tiny) → docs/quality.md.

Per family: the 16-bit pipeline is calibrated on CALIB_PROMPTS; every quantized layer's relative output error
‖y_q − y‖ / ‖y‖ is measured on inputs recorded from *held-out* prompts (EVAL_PROMPTS, other seeds), so the
calibration sample GPTQ fits is not the one it is scored on; end to end, images of the EVAL_PROMPTS are
compared with the 16-bit pipeline's (same seeds) by PSNR and SSIM (`svdq eval`'s functions).

    .venv/bin/python benchmarks/quality_table.py                  # all families → docs/quality.md (+ .json)
    .venv/bin/python benchmarks/quality_table.py --families flux --out /tmp/q.md
    .venv/bin/python benchmarks/quality_table.py --append --families sdxl --variants naive   # add / redo rows

Variants are configured in VARIANTS; SVDQuant rows use rank 32 and the default α grid.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import svdq  # noqa: E402
from svdq.testing import tiny  # noqa: E402
from svdq.commands.eval import psnr, ssim  # noqa: E402
from svdq.models import FAMILIES, call_defaults, pipeline_model, prepare  # noqa: E402
from svdq.quantize import quantized_layers, select_linears  # noqa: E402

FAMILY_NAMES = ("flux", "sdxl", "pixart")
STEPS = 4
CALIB_PROMPTS = [
    "a lighthouse in a storm, watercolor",
    "portrait of an old man, studio light",
    "a bowl of ramen on a wooden table",
    "a futuristic city skyline at night",
]
EVAL_PROMPTS = [
    "a red fox sitting in the snow",
    "an astronaut riding a horse on mars",
    "a cup of coffee with latte art, macro",
    "a medieval castle on a hill at sunset",
]
EVAL_SEED = 100  # images and held-out inputs use seeds EVAL_SEED + i (calibration uses 0 + i)
HELD_OUT_ROWS = 1024  # input rows kept per layer for the per-layer error
# A short smoothing-exponent grid (the library default has 11 points): the table must regenerate on a shared
# 2-core CPU; every variant uses the same grid, so the comparison between them is unaffected.
ALPHAS = (0.3, 0.5, 0.7)

# name → svdq.quantize keyword arguments
VARIANTS = {
    "naive": dict(method="naive"),
    "SmoothQuant": dict(method="smoothquant", rounding="nearest"),
    "SVDQuant (r32)": dict(method="svdquant", rank=32, rounding="nearest"),
    # GPTQ rounding of the residual, then the low-rank branch refit to the codes (svdq.gptq)
    "SVDQuant + GPTQ (r32)": dict(method="svdquant", rank=32, rounding="gptq"),
    # per-layer ranks under the byte budget of uniform rank 32 (rank_budget=UNIFORM_32 is resolved per model)
    "SVDQuant + GPTQ, per-layer rank (r32 bytes)": dict(method="svdquant", rank=32, rounding="gptq",
                                                     rank_budget="UNIFORM_32"),
    # shifted unsigned activations (docs/numerics.md §10) where they measure lower on the calibration sample
    "SVDQuant + GPTQ + shifted act. (r32)": dict(method="svdquant", rank=32, rounding="gptq", act_shift=0.171875),
}


def uniform_budget(layers: dict, rank: int) -> int:
    """Bytes of the low-rank branches if every layer had `rank` (the budget per-layer ranks must match)."""
    from svdq.decompose import branch_bytes, padded_rank

    return sum(branch_bytes(m.out_features, m.in_features, padded_rank(min(rank, m.out_features, m.in_features)),
                            m.weight.dtype) for m in layers.values())


def call_kwargs(pipe) -> dict:
    kw = dict(num_inference_steps=STEPS, height=tiny.TINY_IMAGE_SIZE, width=tiny.TINY_IMAGE_SIZE, **call_defaults(pipe))
    if type(pipeline_model(pipe)).__name__.startswith("Flux"):
        kw["max_sequence_length"] = 32
    return kw


def generate(pipe, prompts, seed0: int):
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i, p in enumerate(prompts):
        gen = torch.Generator().manual_seed(seed0 + i)
        img = pipe(prompt=p, generator=gen, output_type="np", **call_kwargs(pipe)).images[0]
        out.append(torch.from_numpy(img).permute(2, 0, 1).to(torch.float32))
    return out


def held_out_inputs(pipe, model, layers) -> dict[str, torch.Tensor]:
    """HELD_OUT_ROWS input rows of every selected layer, drawn uniformly (seeded) from *all* the rows it sees
    while the 16-bit pipeline runs the EVAL_PROMPTS — every occurrence counts, as in the layer's real use.

    Not the calibration sampler (`collect_input_stats`): that one keeps distinct rows, by content key. Before it
    did, repeated rows shared a key and its sample was all-or-nothing copies: on the tiny SDXL the held-out
    rows of the 16 cross-attention k/v and output layers were all zero rows (the empty negative prompt's
    embedding), so those layers scored error 0 under every method."""
    gen = torch.Generator().manual_seed(EVAL_SEED)
    return {name: x[torch.randperm(x.shape[0], generator=gen)[:HELD_OUT_ROWS]]
            for name, x in all_rows(pipe, model, layers, EVAL_PROMPTS, EVAL_SEED).items()}


def all_rows(pipe, model, layers, prompts, seed) -> dict[str, torch.Tensor]:
    """Every input row each of ``layers`` sees while the pipeline runs ``prompts`` (seeds ``seed``…), by name
    (layers that saw none are left out)."""
    calib = svdq.calibrate_pipeline(pipe, prompts, seed=seed, progress=False, **call_kwargs(pipe))
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [layer.register_forward_pre_hook(
        lambda _m, args, _n=name: rows[_n].append(args[0].detach().reshape(-1, args[0].shape[-1]).clone()))
        for name, layer in layers.items()]
    try:
        with torch.no_grad():
            calib(model)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(chunks) for name, chunks in rows.items() if chunks}


def layer_errors(model, originals: dict, inputs: dict) -> dict[str, float]:
    """Relative output error of each quantized layer vs its 16-bit original on the held-out rows."""
    errs = {}
    with torch.no_grad():
        for name, layer in quantized_layers(model).items():
            if name not in inputs:
                continue
            x = inputs[name]
            ref = originals[name](x).to(torch.float32)
            errs[name] = float((layer(x).to(torch.float32) - ref).norm() / ref.norm().clamp_min(1e-30))
    return errs


def evaluate_family(family: str, variants: dict, log=print) -> dict:
    pipe = tiny.tiny_pipeline(family)
    model = pipeline_model(pipe)
    prepare(model)
    base_state = copy.deepcopy(model)  # the 16-bit model, restored before every variant
    layers = select_linears(model, svdq.QuantizeConfig(exclude=FAMILIES[family].exclude))
    originals = {name: copy.deepcopy(m) for name, m in layers.items()}
    inputs = held_out_inputs(pipe, model, layers)
    reference = generate(pipe, EVAL_PROMPTS, EVAL_SEED)
    result = {"layers": len(layers), "variants": {}}
    for vname, kwargs in variants.items():
        if kwargs.get("rank_budget") == "UNIFORM_32":
            kwargs = {**kwargs, "rank_budget": uniform_budget(layers, 32)}
        qmodel = copy.deepcopy(base_state)
        component = "transformer" if hasattr(pipe, "transformer") and pipe.transformer is not None else "unet"
        setattr(pipe, component, qmodel)
        calib = svdq.calibrate_pipeline(pipe, CALIB_PROMPTS, progress=False, **call_kwargs(pipe))
        t0 = time.perf_counter()
        config = svdq.QuantizeConfig(exclude=FAMILIES[family].exclude, alphas=ALPHAS, **kwargs)
        svdq.quantize(qmodel, calibration=calib, config=config, progress=False)
        seconds = time.perf_counter() - t0
        errs = layer_errors(qmodel, originals, inputs)
        images = generate(pipe, EVAL_PROMPTS, EVAL_SEED)
        p = [psnr(a, b) for a, b in zip(reference, images)]
        s = [ssim(a, b) for a, b in zip(reference, images)]
        kept = [r.get("rounding") for r in qmodel.svdq_report.values() if "rounding" in r]
        ranks = [r["rank"] for r in qmodel.svdq_report.values() if "rank" in r]
        result["variants"][vname] = {
            "kwargs": kwargs,
            "quantize_seconds": round(seconds, 2),
            "mean_layer_error": sum(errs.values()) / len(errs),
            "layer_errors": errs,
            "psnr_db": sum(p) / len(p),
            "ssim": sum(s) / len(s),
            "gptq_layers": f"{kept.count('gptq')}/{len(kept)}" if kept else None,
            "ranks": ranks,
        }
        log(f"{family:7s} {vname:24s} mean layer err {result['variants'][vname]['mean_layer_error']:.4f}  "
            f"PSNR {sum(p) / len(p):6.2f} dB  SSIM {sum(s) / len(s):.4f}  quantize {seconds:.1f} s")
        setattr(pipe, component, model)
    return result


def markdown(results: dict, meta: dict) -> str:
    lines = [
        "# Quantization quality on the tiny pipelines",
        "",
        "Generated by `benchmarks/quality_table.py` (do not edit by hand); raw numbers in `docs/quality.json`.",
        "",
        f"Tiny FLUX.1 / SDXL / PixArt-Σ pipelines from `svdq.testing.tiny` (seeded synthetic weights with planted "
        f"activation outliers, fp32, CPU), {STEPS} steps, 32×32 images. Calibration: {len(CALIB_PROMPTS)} prompts "
        f"(seeds 0…), smoothing grid α ∈ {ALPHAS} for every method. Per-layer error: relative output error ‖y_q − y‖/‖y‖ of every quantized layer on inputs "
        f"recorded from {len(EVAL_PROMPTS)} *held-out* prompts (seeds {EVAL_SEED}…; {HELD_OUT_ROWS} rows per layer drawn "
        f"uniformly from all the rows it sees), averaged over layers. End to end: PSNR / SSIM of the held-out prompts' images against the 16-bit "
        f"pipeline (same seeds). LPIPS: not computed (needs AlexNet weights, not available offline). These are "
        f"toy models: the numbers rank the methods; they do not predict FLUX.1-dev image quality.",
        "",
        "| family | method | ranks | mean layer error | vs SVDQuant | worst layer ratio | PSNR (dB) | SSIM | quantize (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for family, r in sorted(results.items(), key=lambda kv: FAMILY_NAMES.index(kv[0])):
        base = r["variants"].get("SVDQuant (r32)")
        for vname, v in r["variants"].items():
            rel = worst = "—"
            if base and vname != "SVDQuant (r32)":
                rel = f"{100 * (v['mean_layer_error'] / base['mean_layer_error'] - 1):+.1f} %"
                ratios = [v["layer_errors"][n] / base["layer_errors"][n] for n in v["layer_errors"]
                          if base["layer_errors"].get(n)]
                worst = f"{max(ratios):.3f}"
            ranks = v.get("ranks") or [v["kwargs"].get("rank", 0)]
            rank_cell = (str(ranks[0]) if min(ranks) == max(ranks)
                         else f"{min(ranks)}–{max(ranks)} (mean {sum(ranks) / len(ranks):.1f})")
            lines.append(
                f"| {family} ({r['layers']} layers) | {vname} | {rank_cell} | {v['mean_layer_error']:.4f} | {rel} | "
                f"{worst} | "
                f"{v['psnr_db']:.2f} | {v['ssim']:.4f} | {v['quantize_seconds']:.1f} |"
            )
    lines += [
        "",
        "*vs SVDQuant*: change of the mean per-layer error against SVDQuant with round-to-nearest (negative is "
        "better). *worst layer ratio*: the largest per-layer error ratio against it (> 1: that layer got worse). "
        "*quantize (s)*: wall time of `svdq.quantize` (calibration run included) on the machine below.",
        "",
        f"Environment: torch {meta['torch']}, Python {meta['python']}, {meta['machine']}; total {meta['seconds']:.0f} s."
        + (f" {meta['note']}" if meta.get("note") else ""),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(FAMILY_NAMES), choices=FAMILY_NAMES)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default=str(ROOT / "docs" / "quality.md"), help="markdown output (JSON next to it)")
    ap.add_argument("--append", action="store_true",
                    help="add the variants run now to the JSON already next to --out (same families) and rewrite both")
    ap.add_argument("--render", action="store_true", help="only rewrite --out from the JSON next to it (no runs)")
    ap.add_argument("--note", help="a sentence about how this run was made, printed under the table (kept in the JSON)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.render:
        old = json.loads(out.with_suffix(".json").read_text())
        if args.note is not None:
            old["meta"]["note"] = args.note
            out.with_suffix(".json").write_text(json.dumps(old, indent=1) + "\n")
        out.write_text(markdown(old["results"], old["meta"]))
        return 0
    torch.manual_seed(0)
    t0 = time.perf_counter()
    results, seconds = {}, 0.0
    if args.append:
        old = json.loads(out.with_suffix(".json").read_text())
        results, seconds = old["results"], old["meta"]["seconds"]
    for f in args.families:  # files rewritten after every family: an interrupted run keeps what it measured
        new = evaluate_family(f, {v: VARIANTS[v] for v in args.variants})
        if f in results:
            results[f]["variants"].update(new["variants"])
        else:
            results[f] = new
        meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "seconds": seconds + time.perf_counter() - t0}
        if args.note:
            meta["note"] = args.note
        out.write_text(markdown(results, meta))
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
