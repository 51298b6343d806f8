"""A whole FLUX.1 model from a Nunchaku INT4 checkpoint: diffusers' `FluxTransformer2DModel` with every
quantized layer converted exactly (`svdq.formats.nunchaku`: `svdq_layer`, `adanorm_layer`).

Where Nunchaku's model differs from the one svdq quantizes itself (docs/formats.md):

- double blocks: ``qkv_proj`` / ``qkv_proj_context`` are fused layers, as svdq's own ``attn.to_qkv`` /
  ``attn.to_added_qkv`` (`SharedInputLinear`; diffusers' fused-projection path runs them);
- single blocks: ``qkv_proj`` and ``mlp_fc1`` share the block's input but were quantized separately (their own
  smoothing and low rank), so they stay two layers: ``attn.to_qkv`` (fused q/k/v) and ``proj_mlp``; and
  ``proj_out`` is two layers on the two halves of its input (``out_proj`` on the attention output, the shifted
  ``mlp_fc2`` on the MLP's) whose outputs are added: `SplitInputLinear`;
- AdaNorm layers: float-offset W4A16 (spec §7.2) with the scale chunks' +1 taken out of the bias.

The model is built on the meta device and every tensor comes from the file, so a failure leaves nothing
half-built. `svdq.save_pretrained` writes it as an svdq model directory (the split ``proj_out`` as its parts).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError
from ..models.split_input import SplitInputLinear
from . import nunchaku as nk

# Nunchaku layer (under the block) → where it goes in the assembled diffusers model; "qkv" targets are the
# `.linear` of a fused group.
_DOUBLE_TARGETS = {
    "qkv_proj": "attn.to_qkv.linear",
    "qkv_proj_context": "attn.to_added_qkv.linear",
    "out_proj": "attn.to_out.0",
    "out_proj_context": "attn.to_add_out",
    "mlp_fc1": "ff.net.0.proj",
    "mlp_context_fc1": "ff_context.net.0.proj",
    "mlp_fc2": "ff.net.2",
    "mlp_context_fc2": "ff_context.net.2",
    "norm1.linear": "norm1.linear",
    "norm1_context.linear": "norm1_context.linear",
}
_SINGLE_TARGETS = {"qkv_proj": "attn.to_qkv.linear", "mlp_fc1": "proj_mlp", "norm.linear": "norm.linear"}
_ATTN_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")  # under the block in the file, under attn here


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _skeleton(config: dict, dtype: torch.dtype) -> nn.Module:
    """diffusers' FluxTransformer2DModel for ``config`` on the meta device, projections fused as Nunchaku's are."""
    from diffusers import FluxTransformer2DModel

    from ..models import fuse_flux

    known = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            model = FluxTransformer2DModel.from_config(known).to(dtype)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the file's FLUX.1 config does not build a FluxTransformer2DModel: {e}") from e
    fuse_flux(model, single_with_mlp=False)
    return model


def load_flux(path: str | os.PathLike) -> nn.Module:
    """Build the FLUX.1 model a Nunchaku INT4 file describes (checked by `nunchaku.check_layers` and for
    completeness first); CheckpointError naming the file and the layer or key otherwise."""
    from safetensors import safe_open

    path = Path(path)
    _, config = nk.model_config(path, "FLUX.1")
    layers = nk.check_layers(path)
    expected = nk.flux_layer_names(int(config.get("num_layers", 19)), int(config.get("num_single_layers", 38)))
    missing = sorted(set(expected) - {name for name, _, _ in layers})
    if missing:
        raise CheckpointError(
            f"{path}: incomplete Nunchaku FLUX.1 checkpoint: missing quantized layer(s) "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)"
        )
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        dtype = f.get_tensor(next(k for k in keys if k.endswith(".wscales"))).dtype

        def tensors(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) + 1 :]: f.get_tensor(k) for k in keys if k.startswith(prefix + ".")}

        model = _skeleton(config, dtype)
        quantized = {name for name, _, _ in layers}
        for name, kind, _ in layers:
            block, index, layer = name.split(".", 2)
            if block == "single_transformer_blocks" and layer in ("out_proj", "mlp_fc2"):
                continue  # proj_out: both halves together, below
            target = f"{block}.{index}." + (_DOUBLE_TARGETS if block == "transformer_blocks" else _SINGLE_TARGETS)[layer]
            stand_in = model.get_submodule(target)
            k, n = stand_in.in_features, stand_in.out_features
            if kind == "awq":
                module = nk.adanorm_layer(tensors(name), k, n, 6 if block == "transformer_blocks" else 3, where=name)
            else:
                module = nk.svdq_layer(tensors(name), k, n, nk.act_shift_of(kind), where=name)
            _set(model, target, module)
        for i, single in enumerate(model.single_transformer_blocks):
            prefix = f"single_transformer_blocks.{i}"
            inner = single.proj_out.in_features - single.mlp_hidden_dim
            n = single.proj_out.out_features
            attn_half = nk.svdq_layer(tensors(f"{prefix}.out_proj"), inner, n, 0.0, where=f"{prefix}.out_proj")
            mlp_half = nk.svdq_layer(tensors(f"{prefix}.mlp_fc2"), single.mlp_hidden_dim, n, nk.SHIFT_GELU,
                                     where=f"{prefix}.mlp_fc2")
            single.proj_out = SplitInputLinear([attn_half, mlp_half])
        # everything else: diffusers names, the attention norms moved under attn
        rest = {}
        for key in keys:
            if any(key.startswith(q + ".") for q in quantized):
                continue
            parts = key.split(".")
            if len(parts) == 4 and parts[0].endswith("transformer_blocks") and parts[2] in _ATTN_NORMS:
                rest[f"{parts[0]}.{parts[1]}.attn.{parts[2]}.{parts[3]}"] = f.get_tensor(key)
            else:
                rest[key] = f.get_tensor(key)
    from .nunchaku_models import finish

    return finish(model, rest, path, "FLUX.1")
