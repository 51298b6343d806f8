"""Whole models from Nunchaku INT4 checkpoints that keep diffusers module paths (Qwen-Image, Z-Image, SDXL's
UNet): one table-driven loader; FLUX.1 (C++ names, a two-layer proj_out) has its own, `nunchaku_flux`, and SANA
(C++ names, a linear attention and 4-bit 1×1 convolutions) its own, `nunchaku_sana`. `export_sdxl` writes
an svdq-quantized SDXL UNet in Nunchaku's SDXL layout.

These files use Nunchaku's Python module tensor names (``proj_down`` / ``proj_up`` / ``smooth_factor`` /
``smooth_factor_orig`` for the C++ files' ``lora_down`` / ``lora_up`` / ``smooth`` / ``smooth_orig``; the same
packing, `svdq.formats.nunchaku.layer_from_nunchaku`). Each model is built on the meta device from the file's
config, its shared-input projections fused under svdq's own group names (`svdq.models.generic.group_name`) where
Nunchaku fused them, every quantized layer converted exactly, and the rest copied; a failure leaves nothing
half-built. `svdq.save_pretrained` writes such a model as an svdq model directory (`svdq.pretrained.imported_config`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..checkpoint import CheckpointError
from . import nunchaku as nk

# Nunchaku's Python tensor names → the C++ files' names that `nunchaku.layer_from_nunchaku` reads
V2_NAMES = {"proj_down": "lora_down", "proj_up": "lora_up", "smooth_factor": "smooth", "smooth_factor_orig": "smooth_orig"}


@dataclass(frozen=True)
class Layout:
    """How one model class's Nunchaku file maps onto diffusers' model."""

    class_name: str
    label: str  # for messages
    # Nunchaku layer under a block → (kind, target): kind "w4a4" / "shifted" / "awq"; target a tuple of the
    # diffusers linears it fuses (in the file's row order), or one linear's path (a rename), or None (same path)
    layers: dict[str, tuple[str, tuple[str, ...] | str | None]]
    # (config, quantization_config) → block prefixes holding those layers (or `model_blocks`, below)
    blocks: Callable[[dict, dict], list[str]] | None = None
    # 16-bit tensors under a block whose diffusers form differs (file key suffix → [(diffusers suffix, rows)]):
    # rows (start, stop) of the file tensor, None for all of it
    renames: dict[str, list[tuple[str, tuple[int, int] | None]]] = field(default_factory=dict)
    # the model after building on the meta device (rebuild what is computed in __init__, not loaded; fuse what
    # svdq fuses that the file keeps 16-bit)
    fix_up: Callable[[nn.Module], None] = lambda model: None
    # 16-bit tensors the model holds as one that the file keeps apart (diffusers suffix under a block → file
    # suffixes, concatenated along rows in this order), e.g. SDXL's cross-attention to_k / to_v → svdq's to_kv
    joins: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # block prefixes read off the meta-built model instead of the config (instead of `blocks`): for models whose
    # block list the config describes only through diffusers' own construction rules (a UNet)
    model_blocks: Callable[[nn.Module], list[str]] | None = None
    # what the export writes (`export_layout`; the loader reads either): Nunchaku's class (metadata model_class),
    # whether its files use the Python module's tensor names (`V2_NAMES`) rather than the C++ ones, the
    # quantization_config fields its files may carry (the export picks the one whose `blocks` are what svdq
    # quantized) and, per fnmatch pattern of an svdq layer name, the hint a refusal of that layer adds
    model_class: str = ""
    python_names: bool = True
    export_options: tuple[dict, ...] = ({},)
    export_hints: tuple[tuple[str, str], ...] = ()


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load(path: str | os.PathLike, layout: Layout) -> nn.Module:
    """The model ``layout`` describes, from the Nunchaku INT4 file ``path``; CheckpointError naming the file and
    the layer or key for anything unexpected (an unknown or missing layer, a bad tensor)."""
    import diffusers
    from safetensors import safe_open

    from ..models.generic import fuse_groups, group_name

    path = Path(path)
    meta, known = nk.model_config(path, layout.label)

    def build(dtype: torch.dtype) -> nn.Module:
        try:
            with torch.device("meta"):
                model = getattr(diffusers, layout.class_name).from_config(known).to(dtype)
            layout.fix_up(model)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: the config does not build a {layout.class_name}: {e}") from e
        return model

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        if not any(k.endswith(".wscales") for k in keys):
            raise CheckpointError(f"{path}: no quantized layer (no '*.wscales' tensor): not a Nunchaku {layout.label} checkpoint")
        dtype = f.get_tensor(next(k for k in keys if k.endswith(".wscales"))).dtype
        model = None
        if layout.model_blocks is not None:
            model = build(dtype)
            blocks = layout.model_blocks(model)
        else:
            blocks = layout.blocks(known, meta.get("quantization_config") or {})
        expected = {f"{b}.{layer}": layer for b in blocks for layer in layout.layers}
        names = nk.quantized_layer_names(keys)
        unknown = [n for n in names if n not in expected]
        if unknown:
            raise CheckpointError(f"{path}: quantized layer {unknown[0]!r} is not a layer of a Nunchaku {layout.label} file")
        missing = sorted(set(expected) - set(names))
        if missing:
            raise CheckpointError(
                f"{path}: incomplete Nunchaku {layout.label} checkpoint: missing quantized layer(s) "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)"
            )
        if model is None:
            model = build(dtype)
        targets = {}
        for name, layer in expected.items():
            block = name[: -len(layer) - 1]
            target = layout.layers[layer][1]
            if isinstance(target, tuple):
                fused_name, parts = group_name([f"{block}.{p}" for p in target])
                fuse_groups(model, {fused_name: parts})
                targets[name] = fused_name + ".linear"
            else:
                targets[name] = f"{block}.{target}" if target else name
        for name, layer in expected.items():
            kind = layout.layers[layer][0]
            stand_in = model.get_submodule(targets[name])
            k, n = stand_in.in_features, stand_in.out_features
            tensors = {V2_NAMES.get(key[len(name) + 1 :], key[len(name) + 1 :]): f.get_tensor(key)
                       for key in keys if key.startswith(name + ".")}
            if kind == "awq":
                module = nk.adanorm_layer(tensors, k, n, 6, where=f"{path}: {name}")
            else:
                module = nk.svdq_layer(tensors, k, n, nk.act_shift_of(kind), where=f"{path}: {name}")
            _set(model, targets[name], module)
        rest = {}
        for key in keys:
            if any(key.startswith(q + ".") for q in names):
                continue
            suffix = next((s for s in layout.renames if key.endswith("." + s)), None)
            if suffix is None:
                rest[key] = f.get_tensor(key)
                continue
            t, stem = f.get_tensor(key), key[: -len(suffix)]
            for new, rows in layout.renames[suffix]:
                rest[stem + new] = t if rows is None else t[rows[0] * t.shape[0] // 2 : rows[1] * t.shape[0] // 2]
    for target, parts in layout.joins.items():
        stems = sorted({k[: -len(p)] for k in rest for p in parts if k.endswith("." + p)})
        for stem in stems:
            missing = [stem + p for p in parts if stem + p not in rest]
            if missing:
                raise CheckpointError(
                    f"{path}: missing tensor {missing[0]!r} (a {layout.label} file holds "
                    f"{' and '.join(repr(stem + p) for p in parts)} together)"
                )
            tensors = [rest.pop(stem + p) for p in parts]
            if len({t.shape[1:] for t in tensors}) != 1:
                raise CheckpointError(
                    f"{path}: {', '.join(f'{stem + p!r} {tuple(t.shape)}' for p, t in zip(parts, tensors))}: "
                    f"expected the same shape after the first dimension (they are stacked into {stem + target!r})"
                )
            rest[stem + target] = torch.cat(tensors)
    return finish(model, rest, path, layout.label)


def finish(model: nn.Module, rest: dict[str, torch.Tensor], path: Path, label: str) -> nn.Module:
    """Load the unquantized tensors ``rest`` into the meta-built ``model`` (assigned, not copied) and check that
    nothing is left on the meta device; CheckpointError naming the file and the keys otherwise."""
    wanted = model.state_dict()  # meta tensors: shapes only
    for key, t in rest.items():
        if key in wanted and tuple(t.shape) != tuple(wanted[key].shape):
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(wanted[key].shape)} for the "
                f"{label} model its config describes"
            )
    result = model.load_state_dict(rest, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{path}: unexpected tensor(s) {result.unexpected_keys[:5]} for a {label} model")
    still_meta = sorted(n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta)
    if still_meta:
        raise CheckpointError(f"{path}: missing tensor(s) {still_meta[:5]}{' ...' if len(still_meta) > 5 else ''}")
    model.eval()
    model.svdq_source = f"the Nunchaku checkpoint {path}"  # recorded by svdq.save_pretrained (svdq.json converted_from)
    return model


# ---- Qwen-Image (nunchaku/models/transformers/transformer_qwenimage.py) ----------------------------------------------


def _qwen_rope(model: nn.Module) -> None:
    # RoPE tables are plain tensor attributes made in __init__: neither loading nor to_empty fills them
    rope = model.pos_embed
    with torch.device("cpu"):
        model.pos_embed = type(rope)(theta=rope.theta, axes_dim=list(rope.axes_dim), scale_rope=rope.scale_rope)


QWENIMAGE = Layout(
    class_name="QwenImageTransformer2DModel",
    label="Qwen-Image",
    layers={
        "attn.to_qkv": ("w4a4", ("attn.to_q", "attn.to_k", "attn.to_v")),
        "attn.add_qkv_proj": ("w4a4", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
        "attn.to_out.0": ("w4a4", None),
        "attn.to_add_out": ("w4a4", None),
        "img_mlp.net.0.proj": ("w4a4", None),
        "txt_mlp.net.0.proj": ("w4a4", None),
        "img_mlp.net.2": ("shifted", None),  # NunchakuFeedForward: act_unsigned on net.2 (int4)
        "txt_mlp.net.2": ("shifted", None),
        "img_mod.1": ("awq", None),  # 6-way interleave, +1 in the scale chunks (scale_shift = 0 at run time)
        "txt_mod.1": ("awq", None),
    },
    blocks=lambda config, qc: [f"transformer_blocks.{i}" for i in range(int(config.get("num_layers", 60)))],
    fix_up=_qwen_rope,
    model_class="NunchakuQwenImageTransformer2DModel",
)


# ---- Z-Image (nunchaku/models/transformers/transformer_zimage.py) ---------------------------------------------------
# Nunchaku turns each block's FeedForward (w2(silu(w1 x) · w3 x)) into diffusers' SwiGLU FeedForward: net.0.proj
# = [w3; w1] (SwiGLU's value half first, its gate second), net.2 = w2 (signed: no shift after SwiGLU). The
# refiner blocks are quantized unless quantization_config["skip_refiners"]; then they stay 16-bit in that form.

ZIMAGE = Layout(
    class_name="ZImageTransformer2DModel",
    label="Z-Image",
    layers={
        "attention.to_qkv": ("w4a4", ("attention.to_q", "attention.to_k", "attention.to_v")),
        "attention.to_out.0": ("w4a4", None),
        "feed_forward.net.0.proj": ("w4a4", ("feed_forward.w3", "feed_forward.w1")),
        "feed_forward.net.2": ("w4a4", "feed_forward.w2"),
    },
    blocks=lambda config, qc: [
        f"{group}.{i}"
        for group, n in (("layers", config.get("n_layers", 30)), ("noise_refiner", config.get("n_refiner_layers", 2)),
                         ("context_refiner", config.get("n_refiner_layers", 2)))
        if group == "layers" or not qc.get("skip_refiners", False)
        for i in range(int(n))
    ],
    renames={
        "feed_forward.net.0.proj.weight": [("feed_forward.w3.weight", (0, 1)), ("feed_forward.w1.weight", (1, 2))],
        "feed_forward.net.2.weight": [("feed_forward.w2.weight", None)],
    },
    model_class="NunchakuZImageTransformer2DModel",
    # Nunchaku's own merge tool (nunchaku/merge_safetensors.py) always writes skip_refiners, True or False
    export_options=({"skip_refiners": False}, {"skip_refiners": True}),
    export_hints=(("*refiner.*", " (Nunchaku's Z-Image quantizes the refiner blocks all or none, quantization_config "
                                 "skip_refiners: quantize both noise_refiner and context_refiner, or only the main "
                                 "blocks, include=['layers.*'])"),),
)


# ---- SDXL (nunchaku/models/unets/unet_sdxl.py) -------------------------------------------------------------------
# Nunchaku patches every BasicTransformerBlock of the UNet (down, mid and up blocks; the ResNets' convolutions stay
# 16-bit — its shifted-conv patch is unused): self-attention q/k/v fused into attn1.to_qkv (rows [q; k; v], no bias
# when diffusers' q/k/v have none), attn1.to_out.0, cross-attention attn2.to_q (image tokens) and attn2.to_out.0,
# and both feed-forward linears (GEGLU's ff.net.0.proj, rows as diffusers' [value; gate], and ff.net.2). The
# cross-attention's to_k / to_v read the text features and stay 16-bit. ff.net.2 is *signed*: unlike
# NunchakuFeedForward, NunchakuSDXLFeedForward sets no act_unsigned (a GEGLU output is not bounded below). Its
# published file (svdq-int4_r32-sdxl.safetensors) keeps the C++ tensor names (lora_down / lora_up / smooth /
# smooth_orig; its convert_sdxl_state_dict renames them at load), diffusers names for everything else.
# The model is fused as svdq's own SDXL family is (`svdq.models.prepare`: attn1.to_qkv, attn2.to_kv with
# diffusers' fused attention processor), so the file's separate 16-bit to_k / to_v become svdq's to_kv.


def _sdxl_fuse(model: nn.Module) -> None:
    from ..models import prepare

    prepare(model)


def _transformer_blocks(model: nn.Module) -> list[str]:
    from diffusers.models.attention import BasicTransformerBlock

    return [name for name, m in model.named_modules() if isinstance(m, BasicTransformerBlock)]


SDXL = Layout(
    class_name="UNet2DConditionModel",
    label="SDXL",
    layers={
        "attn1.to_qkv": ("w4a4", "attn1.to_qkv.linear"),  # svdq's fused group, rows [q; k; v] as the file's
        "attn1.to_out.0": ("w4a4", None),
        "attn2.to_q": ("w4a4", None),
        "attn2.to_out.0": ("w4a4", None),
        "ff.net.0.proj": ("w4a4", None),
        "ff.net.2": ("w4a4", None),  # signed (no act_unsigned in NunchakuSDXLFeedForward)
    },
    fix_up=_sdxl_fuse,
    joins={"attn2.to_kv.linear.weight": ("attn2.to_k.weight", "attn2.to_v.weight"),
           "attn2.to_kv.linear.bias": ("attn2.to_k.bias", "attn2.to_v.bias")},
    model_blocks=_transformer_blocks,
    model_class="NunchakuSDXLUNet2DConditionModel",
    python_names=False,  # the published file keeps the C++ names (Nunchaku's convert_sdxl_state_dict renames them)
    export_hints=(("*.attn2.to_kv*", " (Nunchaku keeps the cross-attention to_k / to_v 16-bit: quantize with "
                                     "exclude=svdq.models.FAMILIES['sdxl'].exclude + ('*attn2.to_kv*',))"),),
)

LAYOUTS = {layout.class_name: layout for layout in (QWENIMAGE, ZIMAGE, SDXL)}
LOADABLE = (
    "FluxTransformer2DModel (FLUX.1), QwenImageTransformer2DModel (Qwen-Image), ZImageTransformer2DModel (Z-Image), "
    "SanaTransformer2DModel (SANA) and UNet2DConditionModel (SDXL)"
)


# ---- export: an svdq-quantized model → one Nunchaku INT4 file (the inverse of `load`) ----------------------------

WHAT = "export --format nunchaku"
# Nunchaku's AdaNorm modulation layers of these layouts hold 6 chunks (shift, scale, gate × 2), as `load` reads them
_ADANORM_SPLITS = 6
# svdq layer → (the file's layer, kind, fused group: (svdq's part order, sizes, the file's part order) or None)
_Plan = dict[str, tuple[str, str, tuple[list[str], list[int], list[str]] | None]]


def _fused_group(model: nn.Module, parts: list[str]):
    """(name, `SharedInputLinear`) of svdq's fused group of exactly the linears ``parts``, in whichever order svdq
    fused them (its own prepare names a group from the traced order, `load` from the file's), or None."""
    from itertools import permutations

    from ..models import SharedInputLinear
    from ..models.generic import group_name

    for perm in permutations(parts):
        name, _ = group_name(list(perm))
        try:
            group = model.get_submodule(name)
        except AttributeError:
            continue
        owner = name.rpartition(".")[0]
        if isinstance(group, SharedInputLinear) and {f"{owner}.{n}" if owner else n for n in group.names} == set(parts):
            return name, group
    return None


def _plan(model: nn.Module, layout: Layout, blocks: list[str]) -> tuple[_Plan, list[tuple[list[str], str]]]:
    """The layout's layers of ``blocks`` as svdq layer names, and the fused layers whose parts svdq did not fuse
    ((parts, file layer))."""
    plan, unfused = {}, []
    for b in blocks:
        for layer, (kind, target) in layout.layers.items():
            theirs = f"{b}.{layer}"
            if isinstance(target, tuple):
                parts = [f"{b}.{p}" for p in target]
                found = _fused_group(model, parts)
                if found is None:
                    unfused.append((parts, theirs))
                    continue
                name, group = found
                owner = name.rpartition(".")[0]
                order = [f"{owner}.{n}" if owner else n for n in group.names]
                plan[f"{name}.linear"] = (theirs, kind, (order, list(group.sizes), parts))
            else:
                plan[f"{b}.{target}" if target else theirs] = (theirs, kind, None)
    return plan, unfused


def _hint(layout: Layout, name: str) -> str:
    import fnmatch

    return next((h for pattern, h in layout.export_hints if fnmatch.fnmatchcase(name, pattern)), "")


def _split_16bit_groups(model: nn.Module, out: dict[str, torch.Tensor]) -> None:
    """svdq's fused 16-bit groups (SDXL's cross-attention to_kv, …) → their parts' diffusers tensors, as Nunchaku's
    model holds them (the inverse of `Layout.joins` / the fusing `Layout.fix_up` does): rows split, exact; a part
    gets a bias only when its linear had one."""
    from ..models import SharedInputLinear

    for name, group in model.named_modules():
        if not isinstance(group, SharedInputLinear) or type(group.linear) is not nn.Linear:
            continue
        owner = name.rpartition(".")[0]
        origin = getattr(group, "_origin", None)  # set by svdq.models.fuse_linears: which parts had a bias
        had_bias = origin[3] if origin is not None else [group.linear.bias is not None] * len(group.names)
        for suffix in ("weight", "bias"):
            t = out.pop(f"{name}.linear.{suffix}", None)
            if t is None:
                continue
            for part, chunk, bias in zip(group.names, torch.split(t, list(group.sizes)), had_bias):
                if suffix == "weight" or bias:
                    out[f"{owner}.{part}.{suffix}" if owner else f"{part}.{suffix}"] = chunk.contiguous()


def _unrename(layout: Layout, out: dict[str, torch.Tensor]) -> None:
    """The inverse of `Layout.renames`: diffusers' 16-bit tensors → the file's (Z-Image's w3 / w1 → the rows of
    net.0.proj, w2 → net.2), checked to read back exactly as `load` splits them."""
    for file_suffix, targets in layout.renames.items():
        first = targets[0][0]
        for stem in [k[: -len(first)] for k in out if k.endswith("." + first)]:
            keys = [stem + new for new, _ in targets]
            missing = [k for k in keys if k not in out]
            if missing:
                raise ValueError(f"{WHAT}: tensor {missing[0]!r} missing: Nunchaku's {layout.label} file holds "
                                 f"{' and '.join(map(repr, keys))} together as {stem + file_suffix!r}")
            ordered = sorted(zip(targets, keys), key=lambda tk: (tk[0][1] or (0, 1))[0])
            t = torch.cat([out[k] for _, k in ordered]) if len(ordered) > 1 else out[ordered[0][1]]
            for (_, rows), k in ordered:
                back = t if rows is None else t[rows[0] * t.shape[0] // 2 : rows[1] * t.shape[0] // 2]
                if back.shape != out[k].shape:
                    raise ValueError(f"{WHAT}: {k!r} {tuple(out[k].shape)} does not fill its rows {rows} of "
                                     f"{stem + file_suffix!r} {tuple(t.shape)} in Nunchaku's {layout.label} file")
            for k in keys:
                del out[k]
            out[stem + file_suffix] = t.contiguous()


def export_layout(model: nn.Module, path: str | os.PathLike, layout: Layout) -> Path:
    """Write an svdq-quantized model of ``layout``'s class as one Nunchaku INT4 file that `load` (and Nunchaku's
    ``layout.model_class``) reads, atomically: the inverse of `load`. svdq's fused groups become the file's
    fused layers with their rows in the layout's order (re-ordered exactly where svdq fused them in another
    order), each W4A4 layer packed by `nunchaku.layer_to_nunchaku` (its rank zero-padded to the file's one rank),
    AdaNorm layers through `nunchaku.adanorm_export_tensors`, 16-bit tensors copied — split back out of svdq's
    16-bit fused groups and renamed into the file's form (``renames``) —, the metadata's quantization_config the
    ``export_options`` entry whose blocks are the ones svdq quantized. Not copies: a "shifted" layer svdq
    quantized signed (`nunchaku.fold_shift_into_bias`) and the AdaNorm biases (+1); everything else is exact.
    Refuses (ValueError naming the layer) what the layout cannot express: another class, a layer quantized that
    the file keeps 16-bit or the reverse, parts svdq did not fuse that the file fuses, a shifted layer the
    runtime runs signed, a 16-bit or W4A4 AdaNorm layer, and what `nunchaku.exportable_layers` /
    `nunchaku.check_exportable_layer` refuse."""
    if type(model).__name__ != layout.class_name:
        raise ValueError(f"{WHAT}: {type(model).__name__} is not a {layout.label} {layout.class_name}")
    qlayers, wo = nk.exportable_layers(model, WHAT)
    quantized = set(qlayers) | set(wo)
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    best = None
    for option in layout.export_options:
        blocks = layout.model_blocks(model) if layout.model_blocks is not None else layout.blocks(config, option)
        plan, unfused = _plan(model, layout, blocks)
        extra = sorted(quantized - set(plan))
        missing = sorted(n for n, (_, kind, _) in plan.items() if kind != "awq" and n not in qlayers)
        score = len(extra) + len(missing) + len(unfused)
        if best is None or score < best[0]:
            best = (score, option, plan, unfused, extra, missing)
    _, option, plan, unfused, extra, missing = best
    # parts quantized one by one where the file has one fused layer: say that (not "quantized but 16-bit there")
    unfused = sorted(unfused, key=lambda u: not set(u[0]) & quantized)
    if unfused and set(unfused[0][0]) & quantized:
        extra = []
    if extra:
        name = extra[0]
        kind = "weight-only 4-bit (W4A16)" if name in wo else "quantized"
        raise ValueError(f"{WHAT}: {kind} layer {name!r} is 16-bit in Nunchaku's {layout.label} layout{_hint(layout, name)}")
    for name, m in qlayers.items():
        nk.check_exportable_layer(WHAT, name, m)
    if unfused:
        parts, theirs = unfused[0]
        raise ValueError(f"{WHAT}: {', '.join(parts)} are not one fused W4A4 layer of this model; Nunchaku's "
                         f"{layout.label} layout quantizes them as one, {theirs!r}{_hint(layout, parts[0])}")
    if missing:
        raise ValueError(f"{WHAT}: {missing[0]!r} is not a W4A4 layer; Nunchaku's {layout.label} layout quantizes it "
                         f"(quantize it with svdq){_hint(layout, missing[0])}")
    rank = nk.export_rank(qlayers)
    shifts = " / ".join(layer for layer, (kind, _) in layout.layers.items() if kind == "shifted")
    names = {v: k for k, v in V2_NAMES.items()} if layout.python_names else {}
    out: dict[str, torch.Tensor] = {}
    for ours, (theirs, kind, group) in plan.items():
        if kind == "awq":
            t = nk.adanorm_export_tensors(WHAT, ours, model.get_submodule(ours), _ADANORM_SPLITS)
        else:
            m = qlayers[ours]
            t = nk.w4a4_export_tensors(WHAT, ours, m, rank, kind == "shifted", shifts)
            if group is not None and group[0] != group[2]:  # svdq fused the parts in another order: rows moved
                order, sizes, parts = group
                pieces = dict(zip(order, nk.split_rows(t, sizes)))
                t = nk.merge_rows([pieces[p] for p in parts])
            t = nk.layer_to_nunchaku(t, m.in_features, m.out_features)
        out.update({f"{theirs}.{names.get(k, k)}": v.contiguous() for k, v in t.items()})
    owned = tuple(f"{name}." for name in plan)
    out.update({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(owned)})
    _split_16bit_groups(model, out)
    _unrename(layout, out)
    return nk.write_checkpoint(out, path, model, layout.class_name, layout.model_class, rank, option)


def export_sdxl(model, path: str | os.PathLike) -> Path:
    """Write an svdq-quantized SDXL ``UNet2DConditionModel`` as one Nunchaku INT4 checkpoint (the layout
    NunchakuSDXLUNet2DConditionModel.from_pretrained loads: diffusers paths, C++ tensor names): `export_layout`
    with `SDXL`. Every tensor is a copy or an exact permutation (the 16-bit cross-attention to_kv split back into
    to_k / to_v); nothing is recomputed: SDXL's Nunchaku runtime runs every layer signed, as svdq does. Refused
    besides: W4A16 layers, a quantized to_kv (quantize with ``exclude=family.exclude + ("*attn2.to_kv*",)``)."""
    if type(model).__name__ != "UNet2DConditionModel":
        raise ValueError(f"{WHAT}: {type(model).__name__} is not an SDXL UNet2DConditionModel")
    return export_layout(model, path, SDXL)


EXPORTABLE = (
    "FluxTransformer2DModel (FLUX.1), QwenImageTransformer2DModel (Qwen-Image), ZImageTransformer2DModel (Z-Image), "
    "UNet2DConditionModel (SDXL) and SanaTransformer2DModel (SANA)"
)


def export(model: nn.Module, path: str | os.PathLike) -> Path:
    """`svdq export --format nunchaku`: the exporter of ``model``'s class (FLUX.1: `nunchaku.export_flux`; SANA:
    `nunchaku_sana.export_sana`; the layouts: `export_layout`); ValueError listing the classes it exports for any
    other."""
    name = type(model).__name__
    if name == "FluxTransformer2DModel":
        return nk.export_flux(model, path)
    if name == "SanaTransformer2DModel":
        from .nunchaku_sana import export_sana

        return export_sana(model, path)
    layout = {layout.class_name: layout for layout in (QWENIMAGE, ZIMAGE, SDXL)}.get(name)
    if layout is None:
        raise ValueError(f"{WHAT}: cannot export a {name}; svdq writes Nunchaku files of {EXPORTABLE}")
    return export_layout(model, path, layout)
