"""Quantizing for Nunchaku's runtime: ``svdq.quantize(model, ..., target="nunchaku")`` / ``svdq quantize --target
nunchaku``.

svdq's own model is free to differ from Nunchaku's where svdq measures better (which layers are 4-bit, signed or
shifted activations per layer, 16-bit AdaNorm, one fused single-block ``proj_out``). Exporting such a model
(`svdq export --format nunchaku`) then has to recompute a few values (docs/formats.md: a signed ``mlp_fc2``'s
folded bias, the AdaNorm bias + 1), so the file computes nearly, not exactly, what svdq's model does. With
``target="nunchaku"`` the model is quantized in Nunchaku's own form instead, layer for layer:

- exactly the layers the model class's Nunchaku file holds are W4A4 (`Rules.w4a4`), the AdaNorm modulations W4A16
  (`Rules.adanorm`), every other layer 16-bit;
- the layers Nunchaku's runtime runs on shifted unsigned activations (after GELU) are quantized shifted by
  ``SHIFT_GELU`` (docs/numerics.md §10), all others signed;
- FLUX.1's single-block ``proj_out`` is two layers on the two halves of its input (`SplitInputLinear`: attention
  half signed, MLP half shifted), as Nunchaku quantizes it;
- the AdaNorm scale chunks' bias is rounded to a value b with b + 1 exact in the model dtype (`snap_plus_one`):
  Nunchaku stores b + 1, and the file then holds it without rounding.

Every exported tensor is then a copy or an exact permutation, and the file loads back (`svdq.from_pretrained`)
computing the same output bit for bit (tests/test_nunchaku_target.py). The rules are read off the layouts the
loaders and exporters use (`nunchaku`'s FLUX.1 tables, `nunchaku_models.Layout`), so the three cannot disagree.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import nunchaku as nk

TARGETS = ("nunchaku",)


@dataclass(frozen=True)
class Rules:
    """Which layers a model class's Nunchaku file quantizes and how (fnmatch patterns on svdq's layer names)."""

    label: str
    w4a4: tuple[str, ...]  # every pattern must match (`required`), unless it is one of a group's alternatives
    shifted: tuple[str, ...]  # among w4a4: shifted unsigned activations, δ = SHIFT_GELU
    adanorm: dict[str, int]  # W4A16 AdaNorm pattern → its number of chunks (scale chunks: ADANORM_SCALE_CHUNKS)
    # layers split on their input columns (name → part sizes), made before calibration
    splits: Callable[[nn.Module], dict[str, list[int]]] = field(default=lambda model: {})
    # W4A4 layers fused from several linears: the names svdq may give the group (its parts in any order; the
    # exporter moves rows into the file's order exactly) — one of each tuple must match
    alternatives: tuple[tuple[str, ...], ...] = ()
    # ValueError for a model whose 16-bit layers the runtime cannot compute (checked before any work)
    check: Callable[[nn.Module], None] = field(default=lambda model: None)

    def required(self) -> list[tuple[str, ...]]:
        """Each entry: patterns of which at least one must match a linear of the model."""
        grouped = {p for alt in self.alternatives for p in alt}
        return [(p,) for p in self.w4a4 + tuple(self.adanorm) if p not in grouped] + list(self.alternatives)


def _flux_splits(model: nn.Module) -> dict[str, list[int]]:
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    return {f"single_transformer_blocks.{i}.proj_out": [inner, block.proj_out.in_features - inner]
            for i, block in enumerate(model.single_transformer_blocks)}


def _flux() -> Rules:
    double = [f"transformer_blocks.*.{ours}" for ours in nk._EXPORT_DOUBLE]
    single = ["single_transformer_blocks.*.to_qkv_mlp.linear", "single_transformer_blocks.*.proj_out.parts.0",
              "single_transformer_blocks.*.proj_out.parts.1"]
    shifted = [f"transformer_blocks.*.{ours}" for ours, theirs in nk._EXPORT_DOUBLE.items() if theirs in nk._SHIFTED]
    adanorm = {f"transformer_blocks.*.{ours}": splits for ours, (_, splits) in nk._EXPORT_ADANORM.items()}
    adanorm.update({f"single_transformer_blocks.*.{ours}": s for ours, (_, s) in nk._EXPORT_ADANORM_SINGLE.items()})
    return Rules("FLUX.1", tuple(double + single), tuple(shifted + ["single_transformer_blocks.*.proj_out.parts.1"]),
                 adanorm, _flux_splits)


def _from_layout(layout, blocks: str = "*") -> Rules:
    """Rules of a table-driven layout (`nunchaku_models.Layout`): its layer kinds under svdq's names (fused groups
    named as `svdq.models.generic.group_name` names them, which is what the loader builds), in the blocks the
    fnmatch pattern ``blocks`` names."""
    from itertools import permutations

    from ..models.generic import group_name

    w4a4, shifted, adanorm, alternatives = [], [], {}, []
    for layer, (kind, target) in layout.layers.items():
        if isinstance(target, tuple):
            names = dict.fromkeys(group_name([f"B.{p}" for p in order])[0][len("B.") :] + ".linear"
                                  for order in permutations(target))
            if len(names) > 1:
                alternatives.append(tuple(f"{blocks}.{n}" for n in names))
        else:
            names = [target or layer]
        patterns = [f"{blocks}.{n}" for n in names]
        if kind == "awq":
            adanorm.update({p: 6 for p in patterns})  # the Layout loader's AWQ layers are 6-chunk modulations
        else:
            w4a4 += patterns
            if kind == "shifted":
                shifted += patterns
    return Rules(layout.label, tuple(w4a4), tuple(shifted), adanorm, alternatives=tuple(alternatives))


def _sana() -> Rules:
    """SANA (`nunchaku_sana.LAYERS`): the fused self-attention q/k/v, its out projection, the cross-attention q /
    out, the GLUMBConv's two 1×1 convolutions (quantized as `svdq.conv.SVDQConv1x1`, `svdq.quantize.select_convs`);
    all signed (Nunchaku's SANA quantizers set is_unsigned = false), no AdaNorm layer (SANA modulates with its
    scale_shift_table)."""
    from . import nunchaku_sana as ns

    def check(model: nn.Module) -> None:
        for i, block in enumerate(model.transformer_blocks):
            bias = block.attn1.to_out[0].bias
            if bias is not None and bool(bias.detach().any()):
                raise ValueError(f"target='nunchaku': transformer_blocks.{i}.attn1.to_out.0 has a non-zero bias; "
                                 f"Nunchaku's SANA runtime builds attn.out_proj without one (export_sana refuses it), "
                                 f"so this model has no exact Nunchaku file")

    return Rules("SANA", tuple(f"transformer_blocks.*.{ours}" for ours in ns.LAYERS.values()), (), {}, check=check)


def rules_for(model: nn.Module) -> Rules:
    """The `Rules` of ``model``'s class; ValueError naming the class and the supported ones otherwise."""
    from . import nunchaku_models as nm

    name = type(model).__name__
    if name == "FluxTransformer2DModel":
        return _flux()
    if name == "SanaTransformer2DModel":
        return _sana()
    if name == "ZImageTransformer2DModel":
        # the main blocks only: a Nunchaku Z-Image file quantizes the refiners all or none (skip_refiners), and
        # svdq measured its noise refiner costly in 4 bits (svdq.models.generic.KEEP_16BIT)
        return _from_layout(nm.ZIMAGE, "layers.*")
    if name in nm.LAYOUTS:
        return _from_layout(nm.LAYOUTS[name])
    raise ValueError(f"target='nunchaku': no Nunchaku layout for {name}; svdq knows {nm.LOADABLE}")


def check_config(config) -> None:
    """ValueError for QuantizeConfig settings a Nunchaku file cannot hold (one rank for every layer, int4
    activations, smoothing + low rank)."""
    if config.method != "svdquant" or config.rank <= 0:
        raise ValueError(f"target='nunchaku' needs method 'svdquant' with rank > 0 (Nunchaku's layers all have a "
                         f"low-rank branch), got method {config.method!r}, rank {config.rank}")
    if config.rank % nk.LOWRANK_TILE:
        raise ValueError(f"target='nunchaku' needs a rank that is a multiple of {nk.LOWRANK_TILE}, got {config.rank}")
    if config.rank_budget is not None:
        raise ValueError("target='nunchaku' needs one rank for every layer (Nunchaku's runtime builds all layers "
                         "with one rank): drop rank_budget")
    if config.act_format != "int4":
        raise ValueError(f"target='nunchaku' needs act_format 'int4', got {config.act_format!r}")
    if config.act_shift:
        raise ValueError("target='nunchaku' decides which layers are shifted (Nunchaku's): drop act_shift")


def snap_plus_one(bias: torch.Tensor, chunks: int, where: str) -> torch.Tensor:
    """``bias`` with its scale chunks (`nunchaku.ADANORM_SCALE_CHUNKS`) rounded to D(D(b + 1) − 1), a value whose
    + 1 is exact in the bias dtype D (the export stores b + 1, the loader takes 1 off again: both exact then);
    the other chunks unchanged. The change is at most half a unit in the last place of b + 1 (2^-9 for bf16 b
    in [−0.5, 1)), the rounding diffusers' ``x·(1 + scale)`` applies in D anyway. ValueError naming ``where`` for a
    value that has no such neighbour (|b| ≥ 2^k for large k, not an AdaNorm bias)."""
    out = bias.detach().clone()
    n = out.shape[0]
    if n % chunks:
        raise ValueError(f"{where}: {n} outputs do not split into {chunks} AdaNorm chunks")
    size = n // chunks
    for c in nk.ADANORM_SCALE_CHUNKS[chunks]:
        b = out[c * size : (c + 1) * size]
        snapped = ((b.float() + 1).to(b.dtype).float() - 1).to(b.dtype)
        again = ((snapped.float() + 1).to(b.dtype).float() - 1).to(b.dtype)
        if not torch.equal(again, snapped):
            bad = int((again != snapped).nonzero()[0])
            raise ValueError(f"{where}: bias {float(b[bad])} (chunk {c}) has no value b with b + 1 exact in {b.dtype}")
        out[c * size : (c + 1) * size] = snapped
    return out


def matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def layer_adjuster(rules: Rules) -> Callable:
    """The per-layer step `svdq.quantize.build_layers` runs on each new layer: shifted layers rebuilt shifted from
    their decomposition, AdaNorm biases snapped (`snap_plus_one`)."""
    from ..linear import SVDQLinear
    from ..weight_only import SVDQWeightOnlyLinear

    def adjust(name: str, layer: nn.Module, dec, linear: nn.Linear, info: dict) -> nn.Module:
        if isinstance(layer, SVDQLinear) and matches(name, rules.shifted):
            layer = SVDQLinear.from_decomposition(dec, linear.bias, act_shift=nk.SHIFT_GELU)
            info["act_shift"] = nk.SHIFT_GELU
        elif isinstance(layer, SVDQWeightOnlyLinear):
            chunks = next((c for p, c in rules.adanorm.items() if fnmatch.fnmatchcase(name, p)), None)
            if chunks is not None and layer.bias is not None:
                with torch.no_grad():
                    layer.bias.copy_(snap_plus_one(layer.bias, chunks, name))
        return layer

    return adjust
