"""Whole models from Nunchaku INT4 checkpoints that keep diffusers module paths (Qwen-Image, Z-Image): one
table-driven loader; FLUX.1 (C++ names, a two-layer proj_out) has its own, `nunchaku_flux`.

These files use Nunchaku's Python module tensor names (``proj_down`` / ``proj_up`` / ``smooth_factor`` /
``smooth_factor_orig`` for the C++ files' ``lora_down`` / ``lora_up`` / ``smooth`` / ``smooth_orig``; the same
packing, `svdq.formats.nunchaku.layer_from_nunchaku`). Each model is built on the meta device from the file's
config, its shared-input projections fused under svdq's own group names (`svdq.models.generic.group_name`) where
Nunchaku fused them, every quantized layer converted exactly, and the rest copied; a failure leaves nothing
half-built. Saving such a model as an svdq model directory is not supported yet (`svdq.save_pretrained` says so).
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
    blocks: Callable[[dict, dict], list[str]]  # (config, quantization_config) → block prefixes holding those layers
    # 16-bit tensors under a block whose diffusers form differs (file key suffix → [(diffusers suffix, rows)]):
    # rows (start, stop) of the file tensor, None for all of it
    renames: dict[str, list[tuple[str, tuple[int, int] | None]]] = field(default_factory=dict)
    # the model after building on the meta device (rebuild what is computed in __init__, not loaded)
    fix_up: Callable[[nn.Module], None] = lambda model: None


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
    meta = nk.read_metadata(path)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else None
    if not config:
        raise CheckpointError(f"{path}: no {layout.label} 'config' in the metadata: cannot build the model")
    blocks = layout.blocks(config, meta.get("quantization_config") or {})
    expected = {f"{b}.{layer}": layer for b in blocks for layer in layout.layers}
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
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
        dtype = f.get_tensor(next(k for k in keys if k.endswith(".wscales"))).dtype
        known = {k: v for k, v in config.items() if not k.startswith("_")}
        try:
            with torch.device("meta"):
                model = getattr(diffusers, layout.class_name).from_config(known).to(dtype)
            layout.fix_up(model)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: the config does not build a {layout.class_name}: {e}") from e
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
                module = nk.adanorm_layer(tensors, k, n, 6, where=name)
            else:
                module = nk.svdq_layer(tensors, k, n, nk.act_shift_of(kind), where=name)
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
    return finish(model, rest, path, layout.label)


def finish(model: nn.Module, rest: dict[str, torch.Tensor], path: Path, label: str) -> nn.Module:
    """Load the unquantized tensors ``rest`` into the meta-built ``model`` (assigned, not copied) and check that
    nothing is left on the meta device; CheckpointError naming the file and the keys otherwise."""
    result = model.load_state_dict(rest, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{path}: unexpected tensor(s) {result.unexpected_keys[:5]} for a {label} model")
    still_meta = sorted(n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta)
    if still_meta:
        raise CheckpointError(f"{path}: missing tensor(s) {still_meta[:5]}{' ...' if len(still_meta) > 5 else ''}")
    model.eval()
    model.svdq_source = f"the Nunchaku checkpoint {path}"  # what svdq.save_pretrained names when it refuses
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
)

LAYOUTS = {layout.class_name: layout for layout in (QWENIMAGE, ZIMAGE)}
