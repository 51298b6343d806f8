"""`svdq export`: write an svdq-quantized model in another project's checkpoint format.

`--format nunchaku`: a FLUX.1 or Qwen-Image model quantized by svdq (with 4-bit AdaNorm layers: `svdq quantize
--adaln w4a16`) becomes one Nunchaku INT4 `.safetensors` file for Nunchaku's runtime on RTX GPUs (docs/formats.md);
so does a Z-Image (its main blocks only: `include=["layers.*"]`, Nunchaku's skip_refiners; or every block) and
an SDXL UNet quantized as Nunchaku's is (the cross-attention to_k / to_v kept 16-bit: from Python,
`svdq.quantize(unet, exclude=svdq.models.FAMILIES["sdxl"].exclude + ("*attn2.to_kv*",))`), and a SANA quantized
as Nunchaku's is (`svdq.quantize(transformer, target="nunchaku")` once its self-attention q/k/v are fused: the
GLUMBConv's 1×1 convolutions 4-bit; copies, permutations and inert padding only). The exporter is chosen by the
model's class; any other class is an error listing the others.
Every W4A4 tensor is a permutation of svdq's; two kinds of value are recomputed because Nunchaku's runtime
computes differently: the biases of FLUX.1's `mlp_fc2` / Qwen-Image's `net.2` layers that svdq quantized signed
(Nunchaku runs them on shifted unsigned activations; a layer svdq quantized shifted, `--act-shift`, is copied)
and the AdaNorm scale-chunk biases (+1); a model quantized with `svdq quantize --target nunchaku` needs neither (its
file loads back computing the same bits). Z-Image and SDXL files are copies and permutations only. Refused with
a message naming the layer: fp32, W4A8, loaded LoRAs, layers whose K or N is not a multiple of 128, 16-bit
AdaNorm layers, layers quantized that the layout keeps 16-bit or the reverse. The file is written atomically.

`--format nunchaku-lite`: any svdq-quantized diffusers model becomes a diffusers `nunchaku_lite` model
directory (config.json with the compact quantization_config + diffusion_pytorch_model.safetensors), the
packaging diffusers' own NunchakuLite loader reads: W4A4 layers as `svdq_w4a4` targets, W4A16 layers as
`awq_w4a16` targets, svdq's fused projections split back to diffusers' module paths; only permutations and
padding (svdq loads it back bit for bit). Refused, naming the layer: shifted activations, W4A8, fp32, loaded
LoRAs, K / N the layout cannot hold (W4A4: multiples of 128), W4A16 zero points that do not convert exactly.
The directory is written atomically; put it as the `transformer/` of a pipeline for diffusers.
"""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  svdq quantize --model black-forest-labs/FLUX.1-dev --out flux-dev-svdq --adaln w4a16 --dtype bf16
  svdq export --format nunchaku flux-dev-svdq svdq-int4_r32-flux.1-dev.safetensors
  svdq export --format nunchaku-lite flux-dev-svdq flux-dev-nunchaku-lite
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write an svdq-quantized model in another format (nunchaku: Nunchaku's INT4 FLUX.1 / Qwen-Image / "
             "Z-Image / SDXL / SANA files; "
             "nunchaku-lite: diffusers' nunchaku_lite directories)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("quantized", help="svdq model directory (svdq quantize / save_pretrained) or hub id")
    p.add_argument("out", help="output .safetensors file (nunchaku) or directory (nunchaku-lite)")
    p.add_argument("--format", choices=("nunchaku", "nunchaku-lite"), required=True, help="target format")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import svdq

    out = Path(args.out)
    if args.format == "nunchaku-lite":
        from svdq.formats import nunchaku_lite

        path = nunchaku_lite.export(svdq.from_pretrained(args.quantized), out)
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        print(f"wrote {path} ({size:.1f} MiB, diffusers nunchaku_lite directory; docs/formats.md says what is exact)")
        return 0
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: Nunchaku checkpoints are .safetensors files")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name")
    from svdq.formats.nunchaku_models import export

    path = export(svdq.from_pretrained(args.quantized), out)  # by the model's class; any other: an error
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB, Nunchaku INT4 layout; docs/formats.md says what is exact)")
    return 0
