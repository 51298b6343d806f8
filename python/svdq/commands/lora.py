"""`svdq lora inspect`: what a LoRA file would do to a model, without loading any weights.

Prints the file's format, the adapter ranks, and per layer of the model: which LoRA modules land on it (fused
projections: which rows), how many low-rank columns it would gain (padded to 16), and whether the layer is
quantized (W4A4: the columns join its low-rank branch) or kept 16-bit (a low-rank side branch). Keys that
match no layer and text-encoder keys (applied only when a pipeline is given) are listed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES = """examples:
  svdq lora inspect style.safetensors --model tiny            # the tiny FLUX model of svdq.testing.tiny
  svdq lora inspect style.safetensors --model tiny:sdxl       # tiny:flux, tiny:sdxl, tiny:pixart
  svdq lora inspect style.safetensors --model ./flux-svdq     # a directory from svdq.save_pretrained
  svdq lora inspect style.safetensors --model ./FLUX.1-dev/transformer --json   # a diffusers model config
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "lora",
        help="inspect LoRA files against a model",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lsub = p.add_subparsers(dest="lora_command", metavar="<lora command>")
    i = lsub.add_parser(
        "inspect",
        help="matched / unmatched keys, ranks, quantized vs 16-bit target layers",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument("file", help="LoRA .safetensors file (diffusers/PEFT or kohya format)")
    i.add_argument(
        "--model",
        required=True,
        help="tiny[:flux|sdxl|pixart], an svdq model directory (save_pretrained), a diffusers model directory "
        "(config.json) or a pipeline directory (model_index.json)",
    )
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(func=run_inspect)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def skeleton(spec: str):
    """(denoiser with fused projections, set of quantized layer names, description) for ``--model``."""
    import torch

    from ..models import prepare
    from ..quantize import QuantizeConfig, select_linears

    if spec == "tiny" or spec.startswith("tiny:"):
        from ..testing import tiny

        family = spec.partition(":")[2] or "flux"
        builders = {"flux": "tiny_flux_transformer", "sdxl": "tiny_sdxl_unet", "pixart": "tiny_pixart_transformer"}
        if family not in builders or not hasattr(tiny, builders[family]):
            raise ValueError(f"unknown tiny model {spec!r}; use tiny, tiny:flux, tiny:sdxl or tiny:pixart")
        model = getattr(tiny, builders[family])(0)
        quantized = None
        desc = f"svdq.testing.tiny {family}"
    else:
        import diffusers

        from ..checkpoint import read_metadata

        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(f"--model {spec}: not 'tiny' and not a directory")
        if (path / "model_index.json").is_file():  # a pipeline: its denoiser
            path = next((path / c for c in ("transformer", "unet") if (path / c / "config.json").is_file()), path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"--model {spec}: no config.json (nor transformer/ or unet/ with one)")
        config = json.loads(config_file.read_text())
        cls = getattr(diffusers, str(config.get("_class_name")), None)
        if cls is None:
            raise ValueError(f"{config_file}: unknown diffusers class {config.get('_class_name')!r}")
        with torch.device("meta"):  # structure only: no weights are allocated or read
            model = cls.from_config(config)
        quantized = None
        from ..pretrained import LEGACY_WEIGHTS_NAME, weights_path

        ckpt = weights_path(path)
        svdq_dir = ckpt.name == LEGACY_WEIGHTS_NAME or (
            (config.get("quantization_config") or {}).get("quant_method") == "svdquant"
        )
        if ckpt.is_file() and svdq_dir:  # a 16-bit diffusers directory has the same weights name
            quantized = {e["name"] for e in read_metadata(ckpt)["quantized_layers"]}
        desc = f"{cls.__name__} from {path}" + (" (svdq checkpoint)" if quantized is not None else "")
    family = prepare(model)
    if quantized is None:  # what svdq.quantize would quantize by default
        config = QuantizeConfig(**({"exclude": family.exclude} if family else {}))
        quantized = set(select_linears(model, config))
        desc += ", default quantization"
    return model, quantized, desc


def inspect(file: str, model_spec: str) -> dict:
    from ..lora import plan_lora

    model, quantized, desc = skeleton(model_spec)
    plan = plan_lora(model, file)
    layers = {}
    for (comp, path), t in sorted(plan.matched.items(), key=lambda kv: kv[1].path):
        entry = layers.setdefault(
            t.path,
            {
                "layer": t.path,
                "kind": "W4A4" if t.path in quantized else "16-bit",
                "parts": [],
                "columns": 0,
            },
        )
        entry["parts"].append({"lora": path, "rows": list(t.rows), "rank": plan.ranks[(comp, path)]})
    for key, (t, block) in plan.blocks.items():
        layers[t.path]["columns"] = block.down.shape[1]
    return {
        "file": str(file),
        "model": desc,
        "format": plan.format,
        "ranks": sorted(set(plan.ranks.values())),
        "matched_modules": len(plan.matched),
        "layers": list(layers.values()),
        "unmatched": plan.unmatched,
        "text_encoder": plan.text_encoder_skipped,
    }


def run_inspect(args) -> int:
    report = inspect(args.file, args.model)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    layers = report["layers"]
    n_q = sum(e["kind"] == "W4A4" for e in layers)
    print(f"LoRA {report['file']}  format={report['format']}  ranks={report['ranks']}")
    print(f"model: {report['model']}")
    print(
        f"{report['matched_modules']} LoRA modules -> {len(layers)} layers ({n_q} W4A4, {len(layers) - n_q} 16-bit); "
        f"{len(report['unmatched'])} unmatched; {len(report['text_encoder'])} text-encoder modules"
    )
    print()
    print("| layer | kind | LoRA modules (rows) | added columns |")
    print("|---|---|---|---|")
    for e in layers:
        parts = ", ".join(
            _relative(p["lora"], e["layer"]) + (f" [{p['rows'][0]}:{p['rows'][1]}]" if len(e["parts"]) > 1 else "")
            + f" r{p['rank']}"
            for p in sorted(e["parts"], key=lambda p: p["rows"])
        )
        print(f"| {e['layer']} | {e['kind']} | {parts} | {e['columns']} |")
    if report["unmatched"]:
        print("\nunmatched (no layer of this model; load_lora(strict=True) refuses the file):")
        for k in report["unmatched"]:
            print(f"  {k}")
    if report["text_encoder"]:
        print("\ntext encoder (applied when load_lora is given the pipeline):")
        for k in report["text_encoder"]:
            print(f"  {k}")
    return 0


def _relative(lora_path: str, layer: str) -> str:
    """``transformer_blocks.0.attn.to_q`` next to ``transformer_blocks.0.attn.to_qkv.linear`` → ``to_q``."""
    if lora_path == layer:
        return "(all)"
    a, b = lora_path.split("."), layer.split(".")
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return ".".join(a[i:]) or lora_path
