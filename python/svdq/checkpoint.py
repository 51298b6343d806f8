"""`svdq.save` / `svdq.load`: one `.safetensors` file per quantized model (never pickle).

The file holds the model's whole state dict — quantized layers in the canonical layout of
docs/numerics.md §3, every other parameter and buffer as is — and string metadata:

    format          "svdq"
    format_version  "1"
    svdq_version    the writer's version
    rank            the config's low-rank rank
    group_size      "64"
    quantized_layers  JSON list of {"name", "in_features", "out_features", "rank", "bias"}
    weight_only_layers  JSON list of {"name", "in_features", "out_features", "bias"}: W4A16 layers
                    (`SVDQWeightOnlyLinear`, spec §7); absent in files written before them = none
    config          JSON of the QuantizeConfig (when the model was quantized by svdq.quantize)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .linear import STORED_TENSORS, SVDQLinear
from .ops.reference import GROUP_SIZE, padded_k
from .quantize import QuantizeConfig, _set_submodule, quantized_layers
from .weight_only import SVDQWeightOnlyLinear, weight_only_layers
from .version import __version__

FORMAT = "svdq"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the given model; the message names file, key and cause."""


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `model` (quantized by `svdq.quantize`) to one `.safetensors` file, atomically."""
    path = Path(path)
    tensors, meta = contents(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename: an interrupted save never leaves a truncated checkpoint behind.
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def contents(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(CPU tensors, string metadata) of `model` as `save` writes them; diffusers' ``save_pretrained`` writes
    the same through the svdquant quantizer (`svdq.integrations.diffusers_quantizer`)."""
    from .lora import list_loras

    adapters = list_loras(model)
    if adapters:
        # The checkpoint format stores the base branch only; adapters' strengths live in lora_scales, not saved.
        raise ValueError(
            f"cannot save while LoRA adapters are loaded ({sorted(adapters)}): svdq.unload_lora them first and "
            "keep the LoRA files next to the checkpoint"
        )
    layers = quantized_layers(model)
    config = getattr(model, "svdq_config", None)
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "svdq_version": __version__,
        "rank": str(config.rank if config is not None else max((m.rank for m in layers.values()), default=0)),
        "group_size": str(GROUP_SIZE),
        "quantized_layers": json.dumps(
            [
                {
                    "name": name,
                    "in_features": m.in_features,
                    "out_features": m.out_features,
                    "rank": m.rank,
                    "bias": m.bias is not None,
                }
                for name, m in layers.items()
            ]
        ),
        "weight_only_layers": json.dumps(
            [
                {"name": name, "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
                for name, m in weight_only_layers(model).items()
            ]
        ),
    }
    if config is not None:
        meta["config"] = json.dumps(config.to_dict())
    tensors, seen = {}, {}
    for key, t in model.state_dict().items():
        t = t.detach()
        # safetensors refuses tensors that share storage (tied weights): store an independent copy.
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        tensors[key] = t.contiguous().cpu().clone() if ptr in seen else t.contiguous().cpu()
        if ptr is not None:
            seen[ptr] = key
    return tensors, meta


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's metadata, validated (format and version); raises CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"svdq checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated / garbage files
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an svdq checkpoint (metadata format={meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path} has svdq format version {meta.get('format_version')!r}; this svdq {__version__} reads "
            f"version {FORMAT_VERSION}"
        )
    if meta.get("group_size") != str(GROUP_SIZE):
        raise CheckpointError(f"{path} uses group size {meta.get('group_size')}, svdq supports {GROUP_SIZE}")
    try:
        meta["quantized_layers"] = json.loads(meta["quantized_layers"])
        meta["weight_only_layers"] = json.loads(meta.get("weight_only_layers", "[]"))
        if "config" in meta:
            meta["config"] = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt svdq metadata ({e})") from e
    return meta


def load(model: nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Turn the 16-bit skeleton `model` into the quantized model stored at `path`, in place.

    The skeleton's `nn.Linear` layers named in the checkpoint are replaced by `SVDQLinear`; then every
    tensor of the file is loaded (tensors take the file's dtype). Missing or unexpected keys, wrong shapes
    or dtypes raise `CheckpointError` naming them, before the model is modified. Checkpoints with fused
    shared-input projections (svdq/models) fuse the skeleton first (undone if loading fails).
    """
    from .models import fused_for_checkpoint

    with fused_for_checkpoint(model, [e["name"] for e in read_metadata(path)["quantized_layers"]]):
        return _load(model, path, device)


def _load(model: nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    path = Path(path)
    meta = read_metadata(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            state = {k: _aligned(f.get_tensor(k)) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensors ({type(e).__name__}: {e})") from e

    replacements = {}
    entries = [(e, "quantized", _layer_from_state) for e in meta["quantized_layers"]]
    entries += [(e, "weight-only", _weight_only_from_state) for e in meta["weight_only_layers"]]
    for entry, kind, build in entries:
        name = entry["name"]
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: {kind} layer {name!r} does not exist in {type(model).__name__}") from None
        if not isinstance(target, (nn.Linear, SVDQLinear, SVDQWeightOnlyLinear)):
            raise CheckpointError(f"{path}: {name!r} is a {type(target).__name__} in the model, not a Linear")
        if (target.in_features, target.out_features) != (entry["in_features"], entry["out_features"]):
            raise CheckpointError(
                f"{path}: layer {name!r} is [{entry['in_features']} -> {entry['out_features']}] in the checkpoint "
                f"but [{target.in_features} -> {target.out_features}] in the model"
            )
        if name in replacements:
            raise CheckpointError(f"{path}: layer {name!r} is listed twice in the checkpoint metadata")
        replacements[name] = build(path, name, entry, state, device)

    expected = _expected_keys(model, replacements)
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match {type(model).__name__}: "
            + (f"missing keys {_few(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected keys {_few(unexpected)}" if unexpected else "")
        )
    own_state = model.state_dict()
    for key, t in state.items():
        if key in own_state and own_state[key].shape != t.shape:
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(t.shape)} in the checkpoint, "
                f"{tuple(own_state[key].shape)} in the model"
            )

    for name, layer in replacements.items():
        _set_submodule(model, name, layer)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device)
    if "config" in meta:
        model.svdq_config = QuantizeConfig.from_dict(meta["config"])
    from .integrations.diffusers_quantizer import attach

    attach(model)  # diffusers' save_pretrained / LoRA API work on it (no-op for non-diffusers models)
    return model


def _aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """A copy in a fresh allocation when `t` sits at an unaligned address (safetensors can hand out views at
    the file's offsets): CPU BLAS picks its code path by alignment, and the loaded model must reproduce the
    saved one bit for bit."""
    return t.clone() if t.numel() and t.data_ptr() % alignment else t


def _layer_from_state(path: Path, name: str, entry: dict, state: dict, device) -> SVDQLinear:
    n, k, r = entry["out_features"], entry["in_features"], entry["rank"]
    shapes = {"smooth": (k,), "lora_down": (k, r), "lora_up": (n, r)}
    dtype = _check_layer_tensors(path, name, "quantized", entry, state, shapes)
    return SVDQLinear(k, n, r, entry["bias"], dtype, device)


def _weight_only_from_state(path: Path, name: str, entry: dict, state: dict, device) -> SVDQWeightOnlyLinear:
    n, k = entry["out_features"], entry["in_features"]
    dtype = _check_layer_tensors(path, name, "weight-only", entry, state, {})
    return SVDQWeightOnlyLinear(k, n, entry["bias"], dtype, device)


def _check_layer_tensors(path: Path, name: str, kind: str, entry: dict, state: dict, extra: dict) -> torch.dtype:
    """Check one layer's tensors in `state` (presence, shape, dtype) before anything is modified; returns
    the layer's model dtype D (that of ``wscales``). `extra`: {tensor name: shape} besides the 4-bit ones."""
    n, k = entry["out_features"], entry["in_features"]
    kp = padded_k(k)
    expected = {"qweight": (n, kp // 2), "wscales": (n, kp // GROUP_SIZE), **extra}
    if entry["bias"]:
        expected["bias"] = (n,)
    for t_name, shape in expected.items():
        key = f"{name}.{t_name}"
        if key not in state:
            raise CheckpointError(f"{path}: missing key {key!r} of {kind} layer {name!r}")
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"{path}: {key!r} has shape {tuple(state[key].shape)}, expected {shape}")
    qweight = state[f"{name}.qweight"]
    if qweight.dtype != torch.int8:
        raise CheckpointError(f"{path}: {name}.qweight has dtype {qweight.dtype}, expected torch.int8")
    dtype = state[f"{name}.wscales"].dtype
    if not dtype.is_floating_point:
        raise CheckpointError(f"{path}: {name}.wscales has dtype {dtype}, expected a floating dtype")
    for t_name in expected.keys() - {"qweight", "wscales"}:
        t = state[f"{name}.{t_name}"]
        if t.dtype != dtype:
            raise CheckpointError(
                f"{path}: {name}.{t_name} has dtype {t.dtype}, but {name}.wscales has {dtype} (all must match)"
            )
    return dtype


def _expected_keys(model: nn.Module, replacements: dict[str, nn.Module]) -> set[str]:
    keys = set()
    for key in model.state_dict():
        owner = key.rpartition(".")[0]
        if owner not in replacements:
            keys.add(key)
    for name, layer in replacements.items():
        keys.update(f"{name}.{k}" for k in layer.state_dict())
    return keys


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} in all)"
