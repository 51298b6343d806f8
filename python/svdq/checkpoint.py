"""`svdq.save` / `svdq.load`: one `.safetensors` file per quantized model (never pickle).

The file holds the model's whole state dict — quantized layers in the canonical layout of
docs/numerics.md §3, every other parameter and buffer as is — and string metadata:

    format          "svdq"
    format_version  "1"
    svdq_version    the writer's version
    rank            the config's low-rank rank
    group_size      "64"
    quantized_layers  JSON list of {"name", "in_features", "out_features", "rank", "bias"}
    weight_only_layers  JSON list of {"name", "in_features", "out_features", "bias"[, "zero_point": true|"float"]}:
                    W4A16 layers (`SVDQWeightOnlyLinear`, spec §7; zero-point layers also store ``wzeros``:
                    uint8 for true, float offsets in the scales' dtype for "float"); absent in files written
                    before them = none; no "zero_point" = symmetric
    config          JSON of the QuantizeConfig (when the model was quantized by svdq.quantize)
    checksums       JSON {tensor key: "crc32:<8 hex digits>"} of every tensor's bytes as stored; checked
                    by `load` (``verify=False`` skips it). Files written before it have none (not checked).

Structural modules are stored as their quantized layers and rebuilt on load from the names: a layer split on its
input columns (`svdq.models.split_input.SplitInputLinear`) as ``<layer>.parts.<i>``, a 4-bit 1×1 convolution
(`svdq.conv.SVDQConv1x1`) as ``<conv>.linear``, fused shared-input groups under their fused names.

`load` is all-or-nothing (docs/reliability.md): the file is read and checked completely — metadata
(format / config version, unknown config fields), tensor names, shapes, dtypes, checksums, finite scales —
before the model is touched; the model is then changed in one step that is undone on any exception and
that Ctrl-C cannot split.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ._transaction import ModuleSnapshot, deferred_interrupts, model_transaction, read_all_tensors
from .linear import STORED_TENSORS, SVDQLinear
from .models.split_input import SplitInputLinear
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
    tmp = None
    try:
        with deferred_interrupts():  # a pending Ctrl-C is raised inside the try: the cleanup below sees `tmp`
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            os.close(fd)
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        with deferred_interrupts():
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    return path


def contents(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(CPU tensors, string metadata) of `model` as `save` writes them; diffusers' ``save_pretrained`` writes
    the same through the svdquant quantizer (`svdq.integrations.diffusers_quantizer`)."""
    from .lora import list_loras

    for name, m in model.named_modules():
        why = getattr(m, "svdq_checkpoint_unsupported", None)  # a module svdq's format cannot express
        if why:
            raise ValueError(f"cannot save {name or 'the model'} ({type(m).__name__}) as an svdq checkpoint: {why}")
    for name, m in model.named_modules():
        # a split layer is stored as its parts, which must all be quantized (their names and in_features rebuild
        # the split on load: `svdq.models.split_input.split_for_checkpoint`)
        if isinstance(m, SplitInputLinear) and not all(isinstance(p, (SVDQLinear, SVDQWeightOnlyLinear)) for p in m.parts):
            raise ValueError(f"cannot save {name} as an svdq checkpoint: it is split into parts on its input columns "
                             f"({[type(p).__name__ for p in m.parts]}) and only quantized parts can be stored")
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
                # "act_shift" only for shifted layers (spec §10.3; their tensor key makes older svdq refuse them)
                | ({"act_shift": m.act_shift} if getattr(m, "act_shift", 0.0) else {})
                for name, m in layers.items()
            ]
        ),
        "weight_only_layers": json.dumps(
            [
                {"name": name, "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
                # "zero_point" only when set: files without zero-point layers stay readable by older svdq
                | ({"zero_point": True if m.zero_point_kind == "int" else "float"} if m.zero_point else {})
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
    meta["checksums"] = json.dumps(checksums(tensors))
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
    for field in ("quantized_layers", "weight_only_layers", "config", "checksums"):
        if field not in meta:
            if field == "quantized_layers":
                raise CheckpointError(f"{path}: corrupt svdq metadata (field 'quantized_layers' missing)")
            continue
        try:
            meta[field] = json.loads(meta[field])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: corrupt svdq metadata field {field!r} ({e})") from e
    meta.setdefault("weight_only_layers", [])
    for field in ("quantized_layers", "weight_only_layers"):
        for entry in meta[field]:
            missing = _LAYER_FIELDS[field] - set(entry) if isinstance(entry, dict) else _LAYER_FIELDS[field]
            if missing:
                raise CheckpointError(f"{path}: corrupt svdq metadata: an entry of {field!r} lacks {sorted(missing)}")
    if "config" in meta:
        # Parsed here, before any model is touched: a config from a newer svdq fails now, naming the field.
        try:
            meta["config"] = QuantizeConfig.from_dict(meta["config"])
        except ValueError as e:
            raise CheckpointError(f"{path}: metadata field 'config': {e} (svdq {__version__})") from e
    return meta


_LAYER_FIELDS = {
    "quantized_layers": {"name", "in_features", "out_features", "rank", "bias"},
    "weight_only_layers": {"name", "in_features", "out_features", "bias"},
}


def _crc32(t: torch.Tensor) -> str:
    """CRC-32 of a CPU tensor's bytes in memory order (as safetensors stores them)."""
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"crc32:{zlib.crc32(data):08x}"


def checksums(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """{key: "crc32:…"} for CPU tensors. zlib releases the GIL, so tensors are hashed on several threads
    (measured in docs/reliability.md: ~1 GB/s per core)."""
    keys = list(tensors)
    # Ctrl-C waits for the pool (a second or two for a 12B model): a KeyboardInterrupt raised inside
    # concurrent.futures' lock handling leaves it as "RuntimeError: cannot release un-acquired lock" instead
    # (found by tests/test_faults.py's timed SIGINTs); after the block it is raised as a KeyboardInterrupt.
    with deferred_interrupts(), ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(keys, pool.map(lambda k: _crc32(tensors[k]), keys)))


def load(
    model: nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu", *, verify: bool = True
) -> nn.Module:
    """Turn the 16-bit skeleton `model` into the quantized model stored at `path`, in place.

    The skeleton's `nn.Linear` layers named in the checkpoint are replaced by `SVDQLinear`; then every
    tensor of the file is loaded (tensors take the file's dtype). Missing or unexpected keys, wrong shapes
    or dtypes, a metadata/config version or field this svdq does not know, a tensor whose checksum does not
    match (``verify=False`` skips the checksums) and non-finite scales / smoothing raise `CheckpointError`
    naming file, key and layer, before the model is modified. Checkpoints with fused shared-input projections
    (svdq/models) fuse the skeleton first (undone if loading fails, also on Ctrl-C).
    """
    from .models import fused_for_checkpoint
    from .models.split_input import split_for_checkpoint
    from .conv import conv_for_checkpoint

    meta = read_metadata(path)
    # The skeleton's structure before fusing: on any failure (also one inside the fusion, also Ctrl-C) it is
    # put back exactly (svdq._transaction; fusing replaces modules, it writes into no tensor).
    snapshot = ModuleSnapshot(model)
    try:
        with deferred_interrupts():  # fusing is quick; a Ctrl-C inside it would leave some blocks fused
            with fused_for_checkpoint(model, [e["name"] for e in meta["quantized_layers"]] + _fused_16bit(path)):
                pass
            try:  # layers stored as parts on column ranges of their input (`SplitInputLinear`)
                split_for_checkpoint(model, _layer_inputs(meta))
                # 1×1 convolutions stored as their inner layer "<conv>.linear" (`SVDQConv1x1`)
                conv_for_checkpoint(model, [name for name, _ in _layer_inputs(meta)])
            except ValueError as e:
                raise CheckpointError(f"{path}: {e}") from None
        return _load(model, Path(path), meta, device, verify)
    except BaseException:
        with deferred_interrupts():
            snapshot.restore()
        raise


def fused_16bit_layers(keys) -> list[str]:
    """Fused groups a checkpoint with these tensor keys held 16-bit (``<group>.linear.weight`` keys of a group name
    `svdq.models.generic` decodes, e.g. a generic plan's group whose layers ``exclude`` kept 16-bit: Z-Image's
    context refiner when only the main blocks are quantized); the quantized-layer list does not name them, the
    skeleton must be fused too. Returns their ``<group>.linear`` names."""
    from .models.generic import decode_group

    stems = {k[: -len(".linear.weight")] for k in keys if k.endswith(".linear.weight")}
    return sorted(f"{s}.linear" for s in stems if decode_group(s) is not None)


def _fused_16bit(path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return fused_16bit_layers(f.keys())


def _layer_inputs(meta: dict) -> list[tuple[str, int]]:
    """(name, in_features) of every quantized and weight-only layer the metadata lists."""
    return [(e["name"], e["in_features"]) for kind in ("quantized_layers", "weight_only_layers") for e in meta[kind]]


def _load(model: nn.Module, path: Path, meta: dict, device, verify: bool) -> nn.Module:
    try:
        # Read on the CPU (memory-mapped, no copy), check, then move: the checksums hash the stored bytes.
        with safe_open(str(path), framework="pt", device="cpu") as f:
            state = read_all_tensors(f)  # Ctrl-C stays KeyboardInterrupt, never a "corrupt file"
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

    # Structure first (its messages are the most specific), then the bytes, then the values.
    if verify and "checksums" in meta:
        _verify_checksums(path, meta["checksums"], state)
    _check_finite_layers(path, meta, state)
    state = {k: _aligned(t.to(device)) for k, t in state.items()}

    with model_transaction(model):
        for name, layer in replacements.items():
            _set_submodule(model, name, layer)
        model.load_state_dict(state, strict=True, assign=True)
        model.to(device)
        if "config" in meta:
            model.svdq_config = meta["config"]
    from .integrations.diffusers_quantizer import attach

    attach(model)  # diffusers' save_pretrained / LoRA API work on it (no-op for non-diffusers models)
    return model


def _verify_checksums(path: Path, expected: dict, state: dict) -> None:
    if not isinstance(expected, dict):
        raise CheckpointError(f"{path}: corrupt svdq metadata field 'checksums' (not a JSON object)")
    unlisted = sorted(state.keys() - expected.keys())
    if unlisted:  # save() lists every tensor: one without a checksum was added to the file afterwards
        raise CheckpointError(f"{path}: tensor(s) {_few(unlisted)} have no checksum in the metadata (file modified)")
    actual = checksums(state)
    bad = sorted(k for k in state if actual[k] != expected[k])
    if bad:
        raise CheckpointError(
            f"{path}: checksum mismatch in tensor(s) {_few(bad)} (stored {expected[bad[0]]}, read "
            f"{actual[bad[0]]}): the file is corrupt; re-download or re-save it (verify=False skips the check)"
        )


def _check_finite_layers(path: Path, meta: dict, state: dict) -> None:
    """NaN / inf in a quantized layer's scales, smoothing, low-rank factors or bias: CheckpointError naming
    the layer (such a model runs, but every output is NaN or off by orders of magnitude)."""
    for kind in ("quantized_layers", "weight_only_layers"):
        for entry in meta[kind]:
            for t_name in ("wscales", "smooth", "lora_down", "lora_up", "bias"):
                t = state.get(f"{entry['name']}.{t_name}")
                if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise CheckpointError(
                        f"{path}: layer {entry['name']!r} has {bad} non-finite value(s) (NaN/inf) in {t_name}"
                    )


def _aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """A copy in a fresh allocation when `t` sits at an unaligned address (safetensors can hand out views at
    the file's offsets): CPU BLAS picks its code path by alignment, and the loaded model must reproduce the
    saved one bit for bit."""
    return t.clone() if t.numel() and t.data_ptr() % alignment else t


def _layer_from_state(path: Path, name: str, entry: dict, state: dict, device) -> SVDQLinear:
    n, k, r = entry["out_features"], entry["in_features"], entry["rank"]
    shapes = {"smooth": (k,), "lora_down": (k, r), "lora_up": (n, r)}
    dtype = _check_layer_tensors(path, name, "quantized", entry, state, shapes)
    shift = entry.get("act_shift", 0.0)  # absent: signed activations (files before spec §10)
    key = f"{name}.act_shift"
    stored = state.get(key)
    if (shift != 0.0) != (stored is not None) or (
        stored is not None and (stored.numel() != 1 or float(stored.reshape(())) != shift)
    ):
        raise CheckpointError(
            f"{path}: layer {name!r}: metadata act_shift={shift!r} but tensor {key!r} is "
            f"{'absent' if stored is None else stored.tolist()} (spec §10.3: both or neither)"
        )
    try:
        return SVDQLinear(k, n, r, entry["bias"], dtype, device, act_shift=shift)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: layer {name!r}: {e}") from None


def _weight_only_from_state(path: Path, name: str, entry: dict, state: dict, device) -> SVDQWeightOnlyLinear:
    n, k = entry["out_features"], entry["in_features"]
    dtype = _check_layer_tensors(path, name, "weight-only", entry, state, {})
    zero_point = entry.get("zero_point", False)  # absent in files written before zero-point layers
    if not (isinstance(zero_point, bool) or zero_point == "float"):
        raise CheckpointError(f"{path}: corrupt svdq metadata: weight-only layer {name!r} has zero_point={zero_point!r}")
    key = f"{name}.wzeros"
    if zero_point:
        expected = (n, padded_k(k) // GROUP_SIZE)
        if key not in state:
            raise CheckpointError(f"{path}: missing key {key!r} of weight-only layer {name!r} (zero_point)")
        z = state[key]
        zdtype = dtype if zero_point == "float" else torch.uint8  # float offsets share the scales' dtype
        if tuple(z.shape) != expected or z.dtype != zdtype:
            raise CheckpointError(f"{path}: {key!r} is {z.dtype} {tuple(z.shape)}, expected {zdtype} {expected}")
        if zero_point is True and z.numel() and int(z.max()) > 15:
            raise CheckpointError(f"{path}: {key!r} holds {int(z.max())}; zero points are 4-bit (0..15)")
        if zero_point == "float" and not bool(torch.isfinite(z).all()):
            raise CheckpointError(f"{path}: {key!r} holds non-finite zero offsets")
    return SVDQWeightOnlyLinear(k, n, entry["bias"], dtype, device, zero_point=zero_point)


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
