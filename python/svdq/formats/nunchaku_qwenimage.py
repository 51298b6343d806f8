"""A whole Qwen-Image model from a Nunchaku INT4 checkpoint: diffusers' `QwenImageTransformer2DModel` with every
quantized layer converted exactly (`svdq.formats.nunchaku`: `svdq_layer`, `adanorm_layer`).

Nunchaku's Qwen-Image files (nunchaku/models/transformers/transformer_qwenimage.py) keep diffusers module paths
and its Python module's tensor names (``proj_down`` / ``proj_up`` / ``smooth_factor`` / ``smooth_factor_orig``
for the C++ files' ``lora_down`` / ``lora_up`` / ``smooth`` / ``smooth_orig``; same packing). Per block:
``attn.to_qkv`` (q, k, v fused) and ``attn.add_qkv_proj`` (the text stream's), ``attn.to_out.0``,
``attn.to_add_out``, ``img_mlp`` / ``txt_mlp`` (``net.2`` on shifted unsigned activations, spec §10), and the
modulation linears ``img_mod.1`` / ``txt_mod.1`` as AWQ W4A16 (6-way interleave, +1 in the scale chunks, as
FLUX.1's AdaNorm). The fused groups get svdq's own names (``attn.to_qkv``, ``attn.to_added_qkv``). Saving the
loaded model as an svdq model directory is not supported yet (`svdq.save_pretrained` says so).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError
from . import nunchaku as nk

# Nunchaku layer under ``transformer_blocks.<i>.`` → (kind, the diffusers linears it fuses or None)
QWENIMAGE_LAYERS = {
    "attn.to_qkv": ("w4a4", ("attn.to_q", "attn.to_k", "attn.to_v")),
    "attn.add_qkv_proj": ("w4a4", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    "attn.to_out.0": ("w4a4", None),
    "attn.to_add_out": ("w4a4", None),
    "img_mlp.net.0.proj": ("w4a4", None),
    "txt_mlp.net.0.proj": ("w4a4", None),
    "img_mlp.net.2": ("shifted", None),
    "txt_mlp.net.2": ("shifted", None),
    "img_mod.1": ("awq", None),
    "txt_mod.1": ("awq", None),
}
# Nunchaku's Python tensor names → the C++ files' names that `nunchaku.layer_from_nunchaku` reads
V2_NAMES = {"proj_down": "lora_down", "proj_up": "lora_up", "smooth_factor": "smooth", "smooth_factor_orig": "smooth_orig"}


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _real_rope(model: nn.Module) -> nn.Module:
    """The model's RoPE module rebuilt off the meta device: its frequency tables are plain tensor attributes made
    in __init__, which neither loading nor `to_empty` fills."""
    rope = model.pos_embed
    with torch.device("cpu"):
        return type(rope)(theta=rope.theta, axes_dim=list(rope.axes_dim), scale_rope=rope.scale_rope)


def qwenimage_layer_names(num_layers: int) -> list[str]:
    """Every quantized layer a complete Nunchaku Qwen-Image file holds for a model of this depth."""
    return [f"transformer_blocks.{i}.{n}" for i in range(num_layers) for n in QWENIMAGE_LAYERS]


def load_qwenimage(path: str | os.PathLike) -> nn.Module:
    """Build the Qwen-Image model a Nunchaku INT4 file describes; CheckpointError naming the file and the layer
    or key for anything else (an unknown layer, a missing one, a bad tensor). Built on the meta device and filled
    from the file, so nothing is half-built."""
    from diffusers import QwenImageTransformer2DModel
    from safetensors import safe_open

    from ..models.generic import fuse_groups, group_name

    path = Path(path)
    meta = nk.read_metadata(path)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else None
    if not config:
        raise CheckpointError(f"{path}: no Qwen-Image 'config' in the metadata: cannot build the model")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        names = nk.quantized_layer_names(keys)
        for name in names:
            parts = name.split(".", 2)
            if len(parts) != 3 or parts[0] != "transformer_blocks" or not parts[1].isdigit() or parts[2] not in QWENIMAGE_LAYERS:
                raise CheckpointError(f"{path}: quantized layer {name!r} is not a layer of a Nunchaku Qwen-Image file")
        expected = qwenimage_layer_names(int(config.get("num_layers", 60)))
        missing = sorted(set(expected) - set(names))
        if missing:
            raise CheckpointError(
                f"{path}: incomplete Nunchaku Qwen-Image checkpoint: missing quantized layer(s) "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)"
            )
        dtype = f.get_tensor(next(k for k in keys if k.endswith(".wscales"))).dtype
        known = {k: v for k, v in config.items() if not k.startswith("_")}
        try:
            with torch.device("meta"):
                model = QwenImageTransformer2DModel.from_config(known).to(dtype)
            # RoPE tables are plain attributes computed in __init__ (no parameters to load): build them for real
            model.pos_embed = _real_rope(model)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: the config does not build a QwenImageTransformer2DModel: {e}") from e
        targets = {}
        for name in names:
            layer = name.split(".", 2)[2]
            block = ".".join(name.split(".")[:2])
            fused = QWENIMAGE_LAYERS[layer][1]
            if fused is None:
                targets[name] = name
            else:
                fused_name, parts = group_name([f"{block}.{p}" for p in fused])
                fuse_groups(model, {fused_name: parts})
                targets[name] = fused_name + ".linear"
        for name in names:
            kind = QWENIMAGE_LAYERS[name.split(".", 2)[2]][0]
            stand_in = model.get_submodule(targets[name])
            k, n = stand_in.in_features, stand_in.out_features
            tensors = {V2_NAMES.get(key[len(name) + 1 :], key[len(name) + 1 :]): f.get_tensor(key)
                       for key in keys if key.startswith(name + ".")}
            if kind == "awq":
                module = nk.adanorm_layer(tensors, k, n, 6, where=name)
            else:
                module = nk.svdq_layer(tensors, k, n, nk.act_shift_of(kind), where=name)
            _set(model, targets[name], module)
        quantized = set(names)
        rest = {key: f.get_tensor(key) for key in keys if not any(key.startswith(q + ".") for q in quantized)}
    result = model.load_state_dict(rest, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{path}: unexpected tensor(s) {result.unexpected_keys[:5]} for a Qwen-Image model")
    still_meta = sorted(n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta)
    if still_meta:
        raise CheckpointError(f"{path}: missing tensor(s) {still_meta[:5]}{' ...' if len(still_meta) > 5 else ''}")
    model.eval()
    model.svdq_source = f"the Nunchaku checkpoint {path}"  # what svdq.save_pretrained names when it refuses
    return model
