"""diffusers' ``nunchaku_lite`` model directories <-> svdq models (docs/formats.md).

diffusers (≥ 0.42, ``diffusers/quantizers/nunchaku/``) loads prequantized Nunchaku-layout checkpoints packaged
as ordinary diffusers model directories: ``config.json`` is the model's config plus a compact
``quantization_config``::

    {"quant_method": "nunchaku_lite", "compute_dtype": "bfloat16",
     "svdq_w4a4": {"precision": "int4", "group_size": 64, "rank": 32, "targets": [module paths]},
     "awq_w4a16": {"precision": "int4", "group_size": 64, "targets": [module paths]}}

and the weights (``diffusion_pytorch_model.safetensors``, or shards with an index) keep diffusers' module
paths. diffusers builds the model class from the config, replaces every target (an ``nn.Linear``) by its
``SVDQW4A4Linear`` / ``AWQW4A16Linear`` and loads the file into it. Unlike Nunchaku's own model files there is
no model-specific code: no fused projections, no shifted activations (``act_unsigned`` is never set from the
config: every W4A4 target quantizes its activations signed, δ = 0), no AdaNorm interleave or +1 (an AWQ
target must compute exactly the ``nn.Linear`` it replaces). Per target (K inputs, N outputs, rank R, D the
compute dtype):

    svdq_w4a4   qweight int8 [N, K/2]   wscales D [K/64, N]   smooth_factor D [K]   proj_down D [K, R]
                proj_up D [N, R]        bias D [N] (when the Linear has one)
                — Nunchaku's packing (`svdq.formats.nunchaku.layer_to_nunchaku`, C++ names lora_down /
                lora_up / smooth), unpadded: K and N must be multiples of 128 and R of 16
    awq_w4a16   qweight int32 [N/4, K/2]   wscales, wzeros D [K/64, N]   bias D [N]
                — TinyChat's packing (`svdq.formats.nunchaku.pack_awq`, splits = 1), w = u·s + wzeros

so `load` turns each W4A4 target into an `SVDQLinear` (exact: a permutation) and each AWQ target into an
`SVDQWeightOnlyLinear(zero_point="float")` (spec §7.2, exact), for any diffusers model class; `export` writes
an svdq-quantized model in this form (svdq's fused projection groups split back to the module paths; exact).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError
from ..ops.reference import GROUP_SIZE
from . import nunchaku as nk

QUANT_METHOD = "nunchaku_lite"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
SECTIONS = ("svdq_w4a4", "awq_w4a16")
# Tensors of one target in diffusers' modules (quantizers/nunchaku/utils.py SVDQW4A4Linear / AWQW4A16Linear),
# ``bias`` besides when the replaced Linear has one.
SVDQ_TENSORS = ("qweight", "wscales", "smooth_factor", "proj_down", "proj_up")
AWQ_TENSORS = ("qweight", "wscales", "wzeros")
# where svdq's layers and the layout need multiples: W4A4 packs 128-channel × 128-input tiles with no room for
# padding (diffusers' module shapes are the unpadded ones), the low-rank factors 16×16 tiles; AWQ interleaves
# four output rows per 64-input group
W4A4_MULTIPLE, AWQ_ROWS = 2 * GROUP_SIZE, 4
NVFP4_MESSAGE = (
    "NVFP4 (E2M1 weights and activations, fp8 e4m3 scales per 16 inputs, group_size 16): svdq runs INT4 "
    "(precision 'int4', group_size 64) only. NVFP4 directories run in diffusers' NunchakuLite loader with the "
    "nunchaku-lite kernels on Blackwell GPUs (compute capability 10.0 or newer); use the model's int4 directory"
)
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


# ---- finding and reading a directory ------------------------------------------------------------------------------


def _config(path: Path) -> dict | None:
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return config if isinstance(config, dict) else None


def _is_lite(path: Path) -> bool:
    config = _config(path)
    qc = config.get("quantization_config") if config else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def find_directory(path: str | os.PathLike) -> Path | None:
    """The ``nunchaku_lite`` model directory ``path`` names: itself, the ``transformer/`` (or ``unet/``) of a
    pipeline directory, or the directory of its weights file; None when it is none of these."""
    path = Path(path)
    if path.is_file():
        return path.parent if path.suffix == ".safetensors" and _is_lite(path.parent) else None
    if not path.is_dir():
        return None
    if _is_lite(path):
        return path
    if (path / "model_index.json").is_file():
        for component in ("transformer", "unet"):
            if _is_lite(path / component):
                return path / component
    return None


def read_config(directory: str | os.PathLike) -> tuple[dict, dict, torch.dtype]:
    """(model config without ``quantization_config``, the checked compact config, compute dtype) of a
    ``nunchaku_lite`` directory. CheckpointError naming ``config.json`` and the field: not an object, another
    quant_method, an unknown compute dtype, a missing / malformed section, NVFP4 (by name), a group size other
    than 64, a rank that is not a multiple of 16, empty or repeated targets."""
    where = Path(directory) / CONFIG_NAME
    try:
        config = json.loads(where.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{where}: not found (a nunchaku_lite model directory has a config.json)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(config).__name__}")
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{where}: quantization_config.quant_method is not {QUANT_METHOD!r}")
    name = qc.get("compute_dtype") or "bfloat16"  # diffusers' default when absent or null
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{where}: quantization_config.compute_dtype = {name!r}, expected a torch floating dtype name (e.g. 'bfloat16')")
    if all(qc.get(s) is None for s in SECTIONS):
        raise CheckpointError(f"{where}: the {QUANT_METHOD} quantization_config has neither 'svdq_w4a4' nor 'awq_w4a16' targets")
    seen: dict[str, str] = {}
    for section in SECTIONS:
        raw = qc.get(section)
        if raw is None:
            continue
        field = f"{where}: quantization_config.{section}"
        if not isinstance(raw, dict):
            raise CheckpointError(f"{field} must be a JSON object")
        for key, kind in (("precision", str), ("group_size", int), ("targets", list)) + ((("rank", int),) if section == "svdq_w4a4" else ()):
            if not isinstance(raw.get(key), kind) or isinstance(raw.get(key), bool):
                raise CheckpointError(f"{field}.{key} = {raw.get(key)!r}, expected a{'n' if kind is int else ''} {kind.__name__}")
        if raw["precision"] == "nvfp4":
            raise CheckpointError(f"{field}.precision = 'nvfp4': {NVFP4_MESSAGE}")
        if raw["precision"] != "int4":
            raise CheckpointError(f"{field}.precision = {raw['precision']!r}: unknown precision (diffusers knows 'int4' and 'nvfp4'; svdq reads 'int4')")
        if raw["group_size"] != GROUP_SIZE:
            raise CheckpointError(f"{field}.group_size = {raw['group_size']}, expected {GROUP_SIZE} (int4)")
        if section == "svdq_w4a4" and (raw["rank"] < 0 or raw["rank"] % nk.LOWRANK_TILE):
            raise CheckpointError(
                f"{field}.rank = {raw['rank']}, expected a multiple of {nk.LOWRANK_TILE} (the packed low-rank factors are "
                f"16×16 tiles with no room for padding)"
            )
        if not raw["targets"] or not all(isinstance(t, str) and t for t in raw["targets"]):
            raise CheckpointError(f"{field}.targets must be a non-empty list of module paths")
        for t in raw["targets"]:
            if t in seen:
                raise CheckpointError(f"{field}.targets: {t!r} is listed twice ({seen[t]} and {section})")
            seen[t] = section
    model_config = {k: v for k, v in config.items() if k != "quantization_config"}
    return model_config, qc, dtype


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model directory: ``diffusion_pytorch_model.safetensors``, or the shards its
    ``.index.json`` names. CheckpointError naming the file when neither is there or the index is malformed."""
    directory = Path(directory)
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        return [single]
    if not index.is_file():
        others = sorted(p.name for p in directory.glob("diffusion_pytorch_model*") if p.is_file())
        raise CheckpointError(
            f"{directory}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found"
            + (f" (found {', '.join(others)}: svdq reads safetensors only)" if others else "")
        )
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from e
    files = []
    for name in sorted(set(weight_map.values())):
        shard = directory / name
        if Path(name).name != name or shard.suffix != ".safetensors" or not shard.is_file():
            raise CheckpointError(f"{index}: shard {name!r} is not a .safetensors file in {directory}")
        files.append(shard)
    return files


def _headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], torch.dtype | str]]:
    """{tensor name: (file, shape, dtype)} from the safetensors headers (no tensor data read)."""
    from safetensors import safe_open

    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():
                    sl = h.get_slice(key)
                    dtype = sl.get_dtype()
                    if key in out:
                        raise CheckpointError(f"{f}: tensor {key!r} is also in {out[key][0]}")
                    out[key] = (f, tuple(sl.get_shape()), _DTYPES.get(dtype, dtype))
        except CheckpointError:
            raise
        except Exception as e:  # truncated / not safetensors
            raise CheckpointError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    return out


# ---- building the model --------------------------------------------------------------------------------------------


def _skeleton(config: dict, where: Path) -> nn.Module:
    """The diffusers model of ``config`` with its parameters on the meta device (buffers and tensors made in
    ``__init__`` are real, as diffusers' own loader builds it: accelerate's init_empty_weights)."""
    import diffusers
    from accelerate import init_empty_weights

    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise CheckpointError(f"{where}: _class_name {name!r} is not a diffusers model class")
    known = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with init_empty_weights():
            return cls.from_config(known)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: the config does not build a {name}: {e}") from e


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _linear(model: nn.Module, target: str, where: str) -> nn.Linear:
    try:
        module = model.get_submodule(target)
    except AttributeError:
        raise CheckpointError(f"{where}: target {target!r} is not a module of {type(model).__name__}") from None
    if not isinstance(module, nn.Linear):
        raise CheckpointError(f"{where}: target {target!r} is a {type(module).__name__}, expected a Linear layer")
    return module


def expected_tensors(section: str, k: int, n: int, rank: int, bias: bool, dtype: torch.dtype) -> dict:
    """{key: (shape, dtype)} of one target as diffusers' SVDQW4A4Linear / AWQW4A16Linear allocate it."""
    g = k // GROUP_SIZE
    if section == "svdq_w4a4":
        out = {"qweight": ((n, k // 2), torch.int8), "wscales": ((g, n), dtype), "smooth_factor": ((k,), dtype),
               "proj_down": ((k, rank), dtype), "proj_up": ((n, rank), dtype)}
    else:
        out = {"qweight": ((n // 4, k // 2), torch.int32), "wscales": ((g, n), dtype), "wzeros": ((g, n), dtype)}
    if bias:
        out["bias"] = ((n,), dtype)
    return out


def check_shape(section: str, k: int, n: int, target: str) -> str | None:
    """Why the layout cannot hold a [k -> n] target of ``section``, or None."""
    if section == "svdq_w4a4" and (k % W4A4_MULTIPLE or n % W4A4_MULTIPLE):
        return (f"{target} is [{k} -> {n}]: diffusers' SVDQW4A4Linear holds Nunchaku's packed tiles unpadded, so K and "
                f"N must be multiples of {W4A4_MULTIPLE}")
    if section == "awq_w4a16" and (k % GROUP_SIZE or n % AWQ_ROWS):
        return (f"{target} is [{k} -> {n}]: the AWQ W4A16 layout needs K a multiple of {GROUP_SIZE} and N of "
                f"{AWQ_ROWS}")
    return None


def load(path: str | os.PathLike) -> nn.Module:
    """The svdq model of a diffusers ``nunchaku_lite`` directory (or a pipeline directory holding one, see
    `find_directory`): the config's diffusers class with every ``svdq_w4a4`` target an `SVDQLinear`
    and every ``awq_w4a16`` target an `SVDQWeightOnlyLinear(zero_point="float")`, both exact, and the other
    tensors copied (floating ones cast to the compute dtype, as diffusers' loader does).

    Checked before anything is read beyond the headers: the config (`read_config`), every target (a Linear of
    the model whose K and N the layout can hold), the key set against what diffusers' modules allocate
    (missing and unexpected keys), every shape and dtype; the quantized tensors must be in the compute dtype
    (svdq does not round scales). CheckpointError naming the file, key and expectation; nothing half-loaded."""
    from safetensors import safe_open

    from ..pretrained import _match_buffer_dtype
    from ..weight_only import SVDQWeightOnlyLinear, pack_nibbles
    from .nunchaku_models import finish

    directory = find_directory(path) or Path(path)
    config, qc, dtype = read_config(directory)
    cfg = directory / CONFIG_NAME
    files = weight_files(directory)
    headers = _headers(files)
    model = _skeleton(config, cfg)
    reference = model.state_dict()
    where = lambda key: f"{headers[key][0] if key in headers else directory}: {key}"  # noqa: E731
    targets: dict[str, tuple[str, int, int, bool]] = {}  # target → (section, K, N, bias)
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for section in SECTIONS:
        if qc.get(section) is None:
            continue
        rank = qc[section].get("rank", 0)
        for target in qc[section]["targets"]:
            lin = _linear(model, target, f"{cfg}: quantization_config.{section}")
            k, n, bias = lin.in_features, lin.out_features, lin.bias is not None
            why = check_shape(section, k, n, target)
            if why:
                raise CheckpointError(f"{cfg}: quantization_config.{section}: {why}")
            targets[target] = (section, k, n, bias)
            expected |= {f"{target}.{key}": v for key, v in expected_tensors(section, k, n, rank, bias, dtype).items()}
    prefixes = tuple(t + "." for t in targets)
    rest = {key: (tuple(t.shape), t.dtype) for key, t in reference.items() if not key.startswith(prefixes)}
    # non-persistent buffers are rebuilt by __init__ (never in a state dict); a file holding them is accepted
    ignored = {n for n, _ in model.named_buffers() if n not in reference}
    missing = sorted((expected.keys() | rest.keys()) - headers.keys())
    unexpected = sorted(headers.keys() - expected.keys() - rest.keys() - ignored)
    if missing or unexpected:
        parts = [f"{label} key(s) {keys[:10]}{f' and {len(keys) - 10} more' if len(keys) > 10 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(
            f"{directory}: the weights do not match the {type(model).__name__} of config.json with its "
            f"{QUANT_METHOD} targets replaced: {'; '.join(parts)}"
        )
    for key, (shape, want) in expected.items():
        _, got_shape, got = headers[key]
        if got_shape != shape or got != want:
            hint = " (svdq loads the quantized tensors in the compute dtype only: converting scales rounds them)" \
                if got_shape == shape and isinstance(got, torch.dtype) and got.is_floating_point and want.is_floating_point else ""
            raise CheckpointError(f"{where(key)}: {got} {list(got_shape)}, expected {want} {list(shape)}{hint}")
    for key, (shape, want) in rest.items():
        _, got_shape, got = headers[key]
        if got_shape != shape:
            raise CheckpointError(f"{where(key)}: shape {list(got_shape)}, expected {list(shape)} for {type(model).__name__}")
        if not isinstance(got, torch.dtype) or got.is_floating_point != want.is_floating_point:
            raise CheckpointError(f"{where(key)}: dtype {got}, expected a {'floating' if want.is_floating_point else str(want)} tensor")

    handles = {f: safe_open(str(f), framework="pt") for f in files}

    def get(key: str) -> torch.Tensor:
        try:
            return handles[headers[key][0]].get_tensor(key)
        except Exception as e:  # data cut off after a readable header
            raise CheckpointError(f"{where(key)}: cannot read the tensor ({type(e).__name__}: {e})") from e

    for target, (section, k, n, bias) in targets.items():
        keys = SVDQ_TENSORS if section == "svdq_w4a4" else AWQ_TENSORS
        tensors = {key: get(f"{target}.{key}") for key in keys + (("bias",) if bias else ())}
        here = f"{headers[target + '.qweight'][0]}: {target}"
        if section == "svdq_w4a4":
            module = nk.svdq_layer(tensors, k, n, 0.0, where=here)  # signed: diffusers never sets act_unsigned
        else:
            t = nk.unpack_awq(tensors, k, n, 1, where=here)
            if not bool(torch.isfinite(t["scales"]).all() and torch.isfinite(t["zeros"]).all()):
                raise CheckpointError(f"{here}: non-finite wscales / wzeros")
            module = SVDQWeightOnlyLinear(k, n, bias, dtype, zero_point="float")
            module.load_state_dict({"qweight": pack_nibbles(t["codes"]), "wscales": t["scales"],
                                    "wzeros": t["zeros"]} | ({"bias": t["bias"]} if bias else {}), strict=True)
        _set_module(model, target, module)
    values = {}
    for key in rest:
        t = get(key)
        values[key] = t.to(dtype) if t.is_floating_point() else t  # diffusers casts every float to compute_dtype
    model = finish(model, values, directory, f"{type(model).__name__} ({QUANT_METHOD})")
    _match_buffer_dtype(model)
    model.svdq_source = f"the diffusers {QUANT_METHOD} directory {directory}"
    return model


# ---- export --------------------------------------------------------------------------------------------------------


def _targets_of(model: nn.Module) -> list[tuple[str, str, nn.Module, list[tuple[str, int]]]]:
    """(section, svdq layer name, layer, [(diffusers module path, rows)]) for every quantized layer: a layer
    that svdq fused from several projections (`SharedInputLinear`) lists its parts under their module paths."""
    from ..models import SharedInputLinear
    from ..quantize import quantized_layers
    from ..weight_only import weight_only_layers

    out = []
    for section, layers in (("svdq_w4a4", quantized_layers(model)), ("awq_w4a16", weight_only_layers(model))):
        for name, layer in layers.items():
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if isinstance(parent, SharedInputLinear) and leaf == "linear":
                owner = parent_name.rpartition(".")[0]
                parts = [(f"{owner}.{label}" if owner else label, size) for label, size in zip(parent.names, parent.sizes)]
            else:
                parts = [(name, layer.out_features)]
            out.append((section, name, layer, parts))
    return out


def _split_rows(t: dict[str, torch.Tensor], sizes: list[int], keys: tuple[str, ...]) -> list[dict[str, torch.Tensor]]:
    """Row blocks of the per-output tensors ``keys``; the others are shared (exact: each row is its own)."""
    parts = [dict() for _ in sizes]
    for key, v in t.items():
        for part, chunk in zip(parts, torch.split(v, sizes) if key in keys else [v] * len(sizes)):
            part[key] = chunk.contiguous()
    return parts


def _awq_tensors(layer, t: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Canonical W4A16 tensors (one part) → codes u, scales and float zeros (w = u·s + zero), exactly or not at
    all: symmetric q ↦ u = q + 8, zero −8·s (a power of two: exact); integer zero points z ↦ zero D(−z·s),
    refused where that rounds; float offsets as they are."""
    from ..weight_only import unpack_nibbles

    k = layer.in_features
    u = unpack_nibbles(t["qweight"])[:, :k]
    s = t["wscales"]
    kind = layer.zero_point_kind
    if kind == "float":
        codes, zero = u, t["wzeros"]
    elif kind == "int":
        zero = (-t["wzeros"].float() * s.float()).to(s.dtype)
        if not torch.equal(zero.float(), -t["wzeros"].float() * s.float()):
            raise ValueError(
                f"layer {name!r}: its integer zero points z·s are not exact in {s.dtype}; AWQ stores float zeros "
                f"(w = u·s + zero): quantize it symmetric (svdq.quantize(weight_only=...)) to export it"
            )
        codes = u
    else:
        codes, zero = (u + 8) & 0xF, (s.float() * -8).to(s.dtype)  # signed nibble q (two's complement) → q + 8
    return {"codes": codes, "scales": s, "zeros": zero}


def export(model: nn.Module, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write an svdq-quantized diffusers ``model`` as a diffusers ``nunchaku_lite`` directory ``out``:
    ``config.json`` (the model's config with the compact quantization_config) and one
    ``diffusion_pytorch_model.safetensors``, written atomically (a temporary sibling renamed into place).

    Every W4A4 layer (`SVDQLinear`) becomes an ``svdq_w4a4`` target and every W4A16 layer an ``awq_w4a16``
    target, under diffusers' module paths: svdq's fused groups are split back into their projections (rows
    of the codes, scales, lora_up and bias; smoothing and lora_down shared), ranks are padded with zero columns
    to one rank (a multiple of 16). Only permutations and padding: a layer loads back bit for bit (`load`).
    Refused (ValueError naming the layer and why): loaded LoRA adapters or low-rank strengths ≠ 1, shifted
    activations (diffusers runs every target signed), W4A8, fp32 or mixed dtypes (the kernels run bf16 / fp16),
    K / N the layout cannot hold, W4A16 zero points that do not convert exactly, a layer or part that is not a
    Linear of the diffusers class, a bias where the diffusers Linear has none. ``out`` may already be a
    ``nunchaku_lite`` directory (replaced) or, with ``overwrite``, any directory; else FileExistsError."""
    from safetensors.torch import save_file

    from .._transaction import deferred_interrupts
    from ..lora import list_loras
    from ..pretrained import _swap_in

    out = Path(out)
    if out.exists() and not (out.is_dir() and (overwrite or _is_lite(out) or not any(out.iterdir()))):
        raise FileExistsError(f"export --format nunchaku-lite: {out} exists and is not a {QUANT_METHOD} directory")
    if not hasattr(model, "config") or not hasattr(model, "save_config"):
        raise TypeError(f"export --format nunchaku-lite: expected a diffusers model, got {type(model).__name__}")
    if list_loras(model):
        raise ValueError("export --format nunchaku-lite: unload the LoRA adapters first (svdq.unload_lora)")
    found = _targets_of(model)
    if not found:
        raise ValueError("export --format nunchaku-lite: the model is not quantized (svdq.quantize it first)")
    dtypes = {layer.dtype for _, _, layer, _ in found}
    if len(dtypes) != 1 or dtypes - {torch.bfloat16, torch.float16}:
        raise ValueError(f"export --format nunchaku-lite: Nunchaku's kernels run bf16 or fp16 layers, this model has {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    config = json.loads(model.to_json_string())
    config.pop("quantization_config", None)
    config["_class_name"] = type(model).__name__
    ref = _skeleton(config, Path(f"{type(model).__name__} config"))  # the diffusers model diffusers' loader builds
    rank = nk._up(max([layer.rank for s, _, layer, _ in found if s == "svdq_w4a4"] or [0]), nk.LOWRANK_TILE)
    tensors: dict[str, torch.Tensor] = {}
    sections: dict[str, list[str]] = {s: [] for s in SECTIONS}
    owned: list[str] = []
    for section, name, layer, parts in found:
        what = f"export --format nunchaku-lite: layer {name!r}"
        k = layer.in_features
        if section == "svdq_w4a4":
            if layer.act_format != "int4":
                raise ValueError(f"{what} runs act_format={layer.act_format!r}; the format runs W4A4 (int4 activations)")
            if layer.act_shift:
                raise ValueError(f"{what} has shifted activations (act_shift={layer.act_shift}); diffusers' loader runs "
                                 f"every target on signed ones (it never sets act_unsigned): quantize it with act_shift=0")
            if not bool((layer.lora_scales == 1).all()):
                raise ValueError(f"{what} has low-rank strengths ≠ 1 (a LoRA or scaled branch): the format has none")
            t = {key: v.detach().cpu() for key, v in layer.state_dict().items() if key != "act_shift"}
            pad = rank - t["lora_down"].shape[1]  # zero columns: exact
            t["lora_down"] = torch.nn.functional.pad(t["lora_down"], (0, pad))
            t["lora_up"] = torch.nn.functional.pad(t["lora_up"], (0, pad))
            split = _split_rows(t, [r for _, r in parts], ("qweight", "wscales", "lora_up", "bias"))
        else:
            t = {key: v.detach().cpu() for key, v in layer.state_dict().items()}
            split = [_awq_tensors(layer, p, name) | ({"bias": p["bias"]} if "bias" in p else {})
                     for p in _split_rows(t, [r for _, r in parts], ("qweight", "wscales", "wzeros", "bias"))]
        for (path, rows), part in zip(parts, split):
            try:
                lin = _linear(ref, path, what)
            except CheckpointError as e:
                raise ValueError(f"{e}: diffusers' loader replaces Linear layers of {type(model).__name__} only") from None
            if (lin.in_features, lin.out_features) != (k, rows):
                raise ValueError(f"{what}: part {path!r} is [{k} -> {rows}], diffusers' Linear there is "
                                 f"[{lin.in_features} -> {lin.out_features}]")
            why = check_shape(section, k, rows, path)
            if why:
                raise ValueError(f"{what}: {why}")
            b = part.pop("bias", None)
            if lin.bias is None and b is not None and bool(b.any()):
                raise ValueError(f"{what}: part {path!r} has a non-zero bias but diffusers' Linear there has none")
            if lin.bias is not None:
                part["bias"] = b if b is not None else torch.zeros(rows, dtype=dtype)
            if section == "svdq_w4a4":
                packed = nk.layer_to_nunchaku(part, k, rows)
                packed = {"qweight": packed["qweight"], "wscales": packed["wscales"], "smooth_factor": packed["smooth"],
                          "proj_down": packed["lora_down"], "proj_up": packed["lora_up"]} | (
                    {"bias": packed["bias"]} if "bias" in packed else {})
            else:
                packed = nk.pack_awq(part["codes"], part["scales"], part["zeros"], part.get("bias"), 1, pad_groups=False)
            tensors |= {f"{path}.{key}": v.contiguous() for key, v in packed.items()}
            sections[section].append(path)
        owned.append(name)
    # every other tensor: what the diffusers model holds besides its targets, as the svdq model has it
    targets = [p for s in SECTIONS for p in sections[s]]
    prefixes = tuple(p + "." for p in targets)
    ours = model.state_dict()
    for key, want in ref.state_dict().items():
        if key.startswith(prefixes):
            continue
        if key not in ours:
            raise ValueError(f"export --format nunchaku-lite: the model has no tensor {key!r}, which diffusers' "
                             f"{type(model).__name__} loads (is it quantized in a form the format cannot hold?)")
        if tuple(ours[key].shape) != tuple(want.shape):
            raise ValueError(f"export --format nunchaku-lite: {key!r} has shape {list(ours[key].shape)}, diffusers' "
                             f"{type(model).__name__} expects {list(want.shape)}")
        tensors[key] = ours[key].detach().cpu().contiguous()
    qc = {"quant_method": QUANT_METHOD, "compute_dtype": str(dtype).removeprefix("torch.")}
    if sections["svdq_w4a4"]:
        qc["svdq_w4a4"] = {"precision": "int4", "group_size": GROUP_SIZE, "rank": rank, "targets": sections["svdq_w4a4"]}
    if sections["awq_w4a16"]:
        qc["awq_w4a16"] = {"precision": "int4", "group_size": GROUP_SIZE, "targets": sections["awq_w4a16"]}
    config["quantization_config"] = qc
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        with deferred_interrupts():  # a pending Ctrl-C is raised inside the try: the cleanup below sees `tmp`
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        with deferred_interrupts():  # swap in and remove the old directory as one step
            old = _swap_in(tmp, out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        with deferred_interrupts():
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
