"""`svdq.save_pretrained` / `svdq.from_pretrained`: a quantized diffusers model as a directory.

    svdq.save_pretrained(pipe.transformer, "flux-schnell-svdq")          # after svdq.quantize
    transformer = svdq.from_pretrained("flux-schnell-svdq")
    pipe = FluxPipeline.from_pretrained(base, transformer=transformer)    # or unet=... for SDXL

Directory layout:

    config.json                          the diffusers model config (``_class_name`` names the class;
                                         ``quantization_config``: {"quant_method": "svdquant", ...})
    diffusion_pytorch_model.safetensors  the whole quantized model (`svdq.save` format, docs/numerics.md §3);
                                         directories written before the diffusers quantizer have
                                         ``svdq_model.safetensors`` (still read)
    svdq.json                            {"family", "class_name", "svdq_version", "base"}: what it is and
                                         (optionally) the 16-bit pipeline it was quantized from

It is a normal diffusers model directory: with svdq imported, ``FluxTransformer2DModel.from_pretrained(dir)``
(or a pipeline whose ``transformer/`` / ``unet/`` it is) loads the same model bit for bit
(`svdq.integrations.diffusers_quantizer`).

The loaded model is the original diffusers class with `SVDQLinear` layers (and the shared-input fusion of
`svdq.models`), so pipelines, schedulers, callbacks and `enable_model_cpu_offload` work as with the 16-bit one.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ._transaction import deferred_interrupts
from .checkpoint import CheckpointError, load, save
from .linear import SVDQLinear
from .models import family_of, get_family
from .version import __version__

# diffusers' own weights name: the directory is a normal diffusers model directory (config.json carries the
# "svdquant" quantization_config), loadable by FluxTransformer2DModel.from_pretrained & co. once svdq is imported.
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
LEGACY_WEIGHTS_NAME = "svdq_model.safetensors"  # what svdq wrote before the diffusers quantizer; still read
INFO_NAME = "svdq.json"
CONFIG_NAME = "config.json"
# Wan 2.2 A14B's second expert: an svdq model directory inside the first one's (`save_pretrained(transformer_2=)`).
SECOND_DENOISER_DIR = "transformer_2"


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    base: str | None = None,
    transformer_2: nn.Module | None = None,
    extra: Callable[[Path], object] | None = None,
) -> Path:
    """Write the quantized diffusers ``model`` to ``directory`` (created); ``base``: the hub id or directory
    of the 16-bit pipeline it belongs to (recorded for `svdq generate` / `svdq eval`).

    transformer_2: the pipeline's second quantized denoiser (Wan 2.2 A14B's low-noise expert), written as the
    svdq model directory ``directory/transformer_2/`` in the same atomic swap (never one expert without the
    other); `load_pipeline` loads both. extra(tmp): writes more files into the new directory before the swap
    (`svdq quantize` writes its 4-bit text encoders so). What an earlier save left in ``directory`` is kept
    unless this save wrote an entry of the same name."""
    if not hasattr(model, "save_config"):
        raise TypeError(f"save_pretrained expects a diffusers model (ModelMixin), got {type(model).__name__}")
    if transformer_2 is not None and getattr(transformer_2, "svdq_config", None) is None:
        raise ValueError(f"transformer_2 ({type(transformer_2).__name__}) is not quantized: run svdq.quantize on it "
                         "first")
    source = getattr(model, "svdq_source", None)  # a model loaded from a Nunchaku file / nunchaku_lite directory
    if getattr(model, "svdq_config", None) is None and source is None:
        raise ValueError(f"{type(model).__name__} is not quantized: run svdq.quantize(model, ...) first")
    if source is not None and getattr(model, "svdq_config", None) is None:
        model.svdq_config = imported_config(model)  # what the file holds, so the checkpoint describes it
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"save_pretrained: {directory} exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    from .integrations.diffusers_quantizer import attach

    attach(model)  # config.json gets quantization_config {"quant_method": "svdquant", ...}
    family = family_of(model)
    info = {
        "family": family.name if family else None,
        "class_name": type(model).__name__,
        "svdq_version": __version__,
        "base": base,
    }
    if source is not None:
        info["converted_from"] = source
    # Write everything into a temporary sibling, then swap it in: a reader (or a crash, or Ctrl-C) sees the
    # old directory or the new one, never new weights next to an old svdq.json (docs/reliability.md).
    tmp = None
    try:
        with deferred_interrupts():  # a pending Ctrl-C is raised inside the try: the cleanup below sees `tmp`
            tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
        model.save_config(tmp)
        save(model, tmp / WEIGHTS_NAME)
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        if transformer_2 is not None:
            save_pretrained(transformer_2, tmp / SECOND_DENOISER_DIR, base=base)
        if extra is not None:
            extra(tmp)
        if directory.is_dir():  # the user's files next to ours (README.md, …) are carried over
            for entry in directory.iterdir():
                if entry.name not in (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, INFO_NAME) and not (
                    tmp / entry.name
                ).exists():
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.copytree(entry, tmp / entry.name, symlinks=True)
                    else:
                        shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)
        with deferred_interrupts():  # the swap and the removal of the old directory, as one step
            old = _swap_in(tmp, directory)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        with deferred_interrupts():  # a second Ctrl-C must not leave half a temporary directory behind
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def imported_config(model: nn.Module):
    """The `QuantizeConfig` an svdq checkpoint records, for a model svdq did not quantize (loaded from a Nunchaku
    file or a diffusers nunchaku_lite directory): its W4A4 layers by name (``include``), its W4A16 layers by name
    (``weight_only``), their largest rank. How the producer chose smoothing and codes is not in those files:
    ``alphas`` / ``rounding`` / ``calib_tokens`` keep their defaults and describe nothing."""
    from .quantize import QuantizeConfig, quantized_layers
    from .weight_only import weight_only_layers

    layers = quantized_layers(model)
    return QuantizeConfig(rank=max((m.rank for m in layers.values()), default=0), include=tuple(layers),
                          exclude=(), weight_only=tuple(weight_only_layers(model)))


def _swap_in(new: Path, target: Path) -> Path | None:
    """Move directory ``new`` to ``target``; returns where the previous ``target`` went (to be removed), or
    None. Linux: one atomic ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames (between them ``target`` is
    briefly absent — never a mix of old and new files)."""
    if not target.exists():
        os.rename(new, target)
        return None
    if _rename_exchange(new, target):
        return new  # now holds the old directory
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    if sys.platform != "linux":
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # libc without renameat2 (glibc < 2.28, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def weights_path(directory: str | os.PathLike) -> Path:
    """The weights file of a saved quantized model (the diffusers name, or the one svdq wrote before)."""
    path = Path(directory) / WEIGHTS_NAME
    return path if path.is_file() or not (Path(directory) / LEGACY_WEIGHTS_NAME).is_file() else Path(directory) / LEGACY_WEIGHTS_NAME


def _svdquant_config(directory: Path) -> dict | None:
    """The config.json of ``directory`` when its quantization_config is svdquant's, else None."""
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return config if (config.get("quantization_config") or {}).get("quant_method") == "svdquant" else None


def read_info(directory: str | os.PathLike) -> dict:
    """The ``svdq.json`` of a saved quantized model (CheckpointError when absent), or for a directory written by
    diffusers' save_pretrained (no svdq.json), the same fields derived from its config.json."""
    path = Path(directory) / INFO_NAME
    config = None if path.is_file() else _svdquant_config(Path(directory))
    if config is not None:
        from .models import FAMILIES

        name = config.get("_class_name")
        family = next((f.name for f in FAMILIES.values() if name in f.classes), None)
        version = config["quantization_config"].get("svdq_version")
        return {"family": family, "class_name": name, "svdq_version": version, "base": None}
    if not path.is_file():
        raise CheckpointError(f"{directory} is not an svdq model directory: {INFO_NAME} not found")
    return _read_json(path)


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``; CheckpointError naming the file when it is not one (truncated, …)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the directory is corrupt, save it again") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def resolve(dir_or_hub_id: str | os.PathLike, **hub_kwargs) -> Path:
    """A local directory holding a saved quantized model: ``dir_or_hub_id`` itself, or a Hugging Face Hub
    snapshot (downloaded, or found in the local cache). Clear error when neither works."""
    path = Path(dir_or_hub_id)
    if path.is_dir():
        # svdq.json is optional when config.json says "svdquant" (a directory written by diffusers' own
        # save_pretrained): the family and class follow from the config.
        missing = [n for n in (CONFIG_NAME, INFO_NAME) if not (path / n).is_file()]
        if INFO_NAME in missing and _svdquant_config(path):
            missing.remove(INFO_NAME)
        if not (path / WEIGHTS_NAME).is_file() and not (path / LEGACY_WEIGHTS_NAME).is_file():
            missing.insert(1, WEIGHTS_NAME)
        if missing:
            raise FileNotFoundError(
                f"{path} is not an svdq model directory (saved by svdq.save_pretrained): missing {', '.join(missing)}"
            )
        return path
    s = str(dir_or_hub_id)
    if path.exists() or s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise FileNotFoundError(f"svdq model not found: {s} is not a directory (nor a hub id of the form owner/name)")
    try:
        from huggingface_hub import snapshot_download

        names = [CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, INFO_NAME]
        local = snapshot_download(s, allow_patterns=names + [f"{SECOND_DENOISER_DIR}/{n}" for n in names], **hub_kwargs)
    except Exception as e:  # offline, unknown repo, gated, ...: say what was looked for
        raise FileNotFoundError(
            f"svdq model {s!r}: no local directory of that name, and the Hugging Face Hub repo could not be "
            f"fetched ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Looked for "
            f"{CONFIG_NAME}, {WEIGHTS_NAME} and {INFO_NAME} in ./{s} and in hub repo {s} "
            f"(offline? set HF_HUB_OFFLINE=0 and check the network, or pass a local directory)"
        ) from e
    return resolve(local)


# Keywords of diffusers' ModelMixin.from_pretrained that mean something here: passed to the Hub download.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")
# Accepted for drop-in compatibility and ignored: they only change how 16-bit weights would be read.
IGNORED_KWARGS = ("low_cpu_mem_usage", "use_safetensors")


def from_pretrained(
    dir_or_hub_id: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    expected_family: str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    device_map: str | torch.device | dict | None = None,
    verify: bool = True,
    **kwargs,
) -> nn.Module:
    """Load a model written by `save_pretrained` (a directory or a hub id) onto ``device`` (default cpu).

    expected_family ("flux" / "sdxl" / "pixart"): raise a clear error when the checkpoint is another family
    (e.g. before handing it to a pipeline of that family). verify: check the tensors' checksums (`svdq.load`).

    diffusers' keywords: ``torch_dtype`` (or ``dtype``) must be the checkpoint's dtype, or ``"auto"`` — a
    quantized model's scales are rounded to its dtype, so it is not converted; quantize again in the other
    dtype. ``device_map``: one device (``"cuda"``, ``{"": "cuda:0"}``), the same as ``device``; per-module
    placement is not supported. Hub keywords (``revision``, ``token``, ``cache_dir``, ``local_files_only``,
    ``force_download``, ``proxies``) go to the download; ``low_cpu_mem_usage`` / ``use_safetensors`` are
    accepted and ignored (svdq always reads safetensors, and never builds 16-bit weights). Any other keyword
    raises TypeError.
    """
    import diffusers

    if "dtype" in kwargs:  # diffusers' newer name for torch_dtype
        if torch_dtype is not None:
            raise TypeError("from_pretrained: pass torch_dtype or dtype, not both")
        torch_dtype = kwargs.pop("dtype")
    unknown = sorted(set(kwargs) - set(HUB_KWARGS) - set(IGNORED_KWARGS))
    if unknown:
        raise TypeError(
            f"from_pretrained got unexpected keyword argument(s) {unknown}; accepted: device, expected_family, "
            f"torch_dtype/dtype, device_map, verify, {', '.join(HUB_KWARGS + IGNORED_KWARGS)}"
        )
    hub_kwargs = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
    device = _device_from_map(device, device_map)
    torch_dtype = _parse_dtype(torch_dtype)
    from .formats import nunchaku

    nunchaku_file = nunchaku.find_checkpoint(dir_or_hub_id)  # a Nunchaku SVDQuant file (docs/formats.md)
    if nunchaku_file is not None:
        model = nunchaku.from_pretrained(nunchaku_file)
        return model.to(device) if device is not None else model
    directory = resolve(dir_or_hub_id, **hub_kwargs)
    info = read_info(directory)
    if expected_family is not None:
        get_family(expected_family)
        if info.get("family") != expected_family:
            raise CheckpointError(
                f"{directory} holds a quantized {info.get('class_name')} ({info.get('family')}), but a "
                f"{expected_family} model was expected"
            )
    config = _read_json(directory / CONFIG_NAME)
    class_name = config.get("_class_name", info.get("class_name"))
    if info.get("class_name") not in (None, class_name):
        raise CheckpointError(
            f"{directory}: {CONFIG_NAME} describes a {class_name} but {INFO_NAME} a {info.get('class_name')} "
            f"(files from different saves); save the model again"
        )
    cls = getattr(diffusers, str(class_name), None)
    if cls is None:
        raise CheckpointError(f"{directory}: config names class {class_name!r}, which diffusers does not have")
    weights = weights_path(directory)
    if torch_dtype is not None:
        file_dtype = _checkpoint_dtype(weights)
        if file_dtype is not None and file_dtype != torch_dtype:
            raise ValueError(
                f"{directory} holds a {file_dtype} quantized model but torch_dtype={torch_dtype} was asked for; a "
                f"quantized model is not converted (its scales are rounded to its dtype): quantize again in "
                f"{torch_dtype}, or pass torch_dtype={file_dtype} / 'auto'"
            )
    # Build the skeleton without allocating or initialising 16-bit weights (every tensor comes from the file);
    # fall back to a normal build if the class keeps non-persistent buffers that the file cannot provide.
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
        if _meta_tensor_attributes(model):  # e.g. Qwen-Image's RoPE tables: plain attributes, not buffers
            raise NotImplementedError("tensor attributes the file cannot provide")
        load(model, weights, device=device, verify=verify)
    except NotImplementedError:  # "Cannot copy out of meta tensor": a non-persistent buffer (e.g. pos_embed)
        model = cls.from_config(config)
        load(model, weights, device=device, verify=verify)
    _match_buffer_dtype(model)
    model.svdq_info = info
    return model.eval()


def _device_from_map(device, device_map) -> torch.device | str:
    """The one device to load onto, from ``device`` and diffusers' ``device_map``."""
    if device_map is None:
        return "cpu" if device is None else device
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(
                f"device_map {device_map!r}: svdq loads a quantized model onto one device; per-module placement is "
                "not supported (use device_map={'': device} or device=; pipe.enable_model_cpu_offload() offloads)"
            )
        device_map = device_map[""]
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ValueError(
            f"device_map={device_map!r}: svdq loads a quantized model onto one device; pass device='cuda' (or "
            "device_map='cuda')"
        )
    try:
        mapped = torch.device(device_map)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device_map={device_map!r} is not a device ({e})") from e
    if device is not None and torch.device(device) != mapped:
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree; pass one of them")
    return mapped


def _parse_dtype(torch_dtype) -> torch.dtype | None:
    if torch_dtype is None or torch_dtype == "auto":
        return None
    if isinstance(torch_dtype, str):
        resolved = getattr(torch, torch_dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"torch_dtype={torch_dtype!r} is not a torch dtype")
        torch_dtype = resolved
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"torch_dtype must be a floating torch dtype or 'auto', got {torch_dtype!r}")
    return torch_dtype


def _checkpoint_dtype(path: Path) -> torch.dtype | None:
    """The model dtype D of a checkpoint (its first layer's ``wscales``), read from the header only."""
    from safetensors import safe_open

    from .checkpoint import read_metadata

    meta = read_metadata(path)
    layers = meta["quantized_layers"] or meta["weight_only_layers"]
    if not layers:
        return None
    with safe_open(str(path), framework="pt") as f:
        name = _SAFETENSORS_DTYPES.get(f.get_slice(f"{layers[0]['name']}.wscales").get_dtype())
    return name and getattr(torch, name)


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _meta_tensor_attributes(model: nn.Module) -> list[str]:
    """Tensors a module keeps as plain attributes (neither parameters nor buffers) that are on the meta
    device: built by ``__init__``, never saved, so a meta skeleton would keep them without data."""
    return [
        f"{name}.{attr}" if name else attr
        for name, m in model.named_modules()
        for attr, v in vars(m).items()
        if torch.is_tensor(v) and v.is_meta
    ]


def _match_buffer_dtype(model: nn.Module) -> None:
    """Non-persistent floating buffers (not in the file, e.g. PixArt's pos_embed) were built in fp32 by
    the skeleton: give them the dtype of the loaded parameters, as the saved model had them."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is None:
        return
    for module in model.modules():
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            buf = module._buffers.get(name)
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype and not isinstance(module, SVDQLinear):
                module._buffers[name] = buf.to(dtype)


def load_pipeline(base: str | os.PathLike, quantized: str | os.PathLike | None = None, *, device="cpu", torch_dtype=None):
    """The diffusers pipeline ``base`` (hub id or directory), with its denoiser replaced by the svdq model
    at ``quantized`` (when given). Clear errors for a missing base and a checkpoint of another family."""
    from diffusers import DiffusionPipeline

    from .models import FAMILIES

    base_path = Path(base)
    if not base_path.is_dir() and (str(base).startswith((".", "/", "~")) or str(base).count("/") != 1):
        raise FileNotFoundError(f"base pipeline not found: {base} is not a directory (nor a hub id owner/name)")
    if base_path.is_dir() and not (base_path / "model_index.json").is_file():
        raise FileNotFoundError(f"{base} is not a diffusers pipeline directory: model_index.json not found")
    kwargs = {} if torch_dtype is None else {_dtype_kwarg(): torch_dtype}
    if quantized is not None:
        index = _model_index(base)
        components = _pipeline_denoisers(index)
        component = components[0]
        class_name = index.get(component, [None, None])[1]
        expected = next((f.name for f in FAMILIES.values() if class_name in f.classes), None)
        models = load_quantized_denoisers(quantized, components, device=device, expected_family=expected,
                                          pipeline=f"base pipeline {base}")
        for model in models.values():
            model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
            if torch_dtype is not None and model_dtype is not None and model_dtype != torch_dtype:
                raise ValueError(
                    f"the quantized model at {quantized} is {model_dtype} but the pipeline was asked for "
                    f"{torch_dtype}: load the base pipeline in {model_dtype} (--dtype), or quantize again in "
                    f"{torch_dtype}"
                )
        kwargs.update(models)
    # The pipeline's own class, not DiffusionPipeline: DiffusionPipeline.from_pretrained (diffusers 0.42) drops a
    # passed denoiser that the pipeline declares optional (WanPipeline's transformer, optional since Wan 2.2's
    # two-expert form) and loads the 16-bit one from disk instead — found by `svdq generate` on a Wan pipeline.
    pipeline_class = DiffusionPipeline
    if quantized is not None:
        import diffusers

        pipeline_class = getattr(diffusers, str(index.get("_class_name")), None) or DiffusionPipeline
    try:
        pipe = pipeline_class.from_pretrained(str(base), **kwargs)
    except OSError as e:
        raise FileNotFoundError(f"cannot load base pipeline {base!r}: {str(e).splitlines()[0]}") from e
    for name in components if quantized is not None else ():
        if getattr(pipe, name, None) is not kwargs[name]:
            raise RuntimeError(f"{type(pipe).__name__}.from_pretrained did not take the quantized {name} passed to "
                               "it (a diffusers loading change?); please report this")
    pipe = pipe.to(device)
    if quantized is not None:  # 4-bit text encoders written by `svdq quantize --text-encoder w4a16`, if any
        from .formats import nunchaku
        from .weight_only import load_text_encoders

        if nunchaku.find_checkpoint(quantized) is None:  # a Nunchaku checkpoint holds the denoiser only
            load_text_encoders(pipe, resolve(quantized), device)
    return pipe


def _pipeline_denoisers(index: dict) -> list[str]:
    """The denoiser components a pipeline's model_index.json declares, in the order they run: transformer (or
    unet), then Wan 2.2 A14B's transformer_2 when present (a Wan 2.1 index lists it as [null, null])."""
    first = "transformer" if "transformer" in index else "unet"
    return [first] + [SECOND_DENOISER_DIR] * bool((index.get(SECOND_DENOISER_DIR) or [None])[0])


def load_quantized_denoisers(quantized, components: list[str], *, device="cpu", expected_family: str | None = None,
                             pipeline: str = "the pipeline") -> dict[str, nn.Module]:
    """{component: svdq model} for a pipeline whose denoiser components are ``components`` (`_pipeline_denoisers`
    / `svdq.models.denoiser_components`): the first from ``quantized``, Wan 2.2 A14B's ``transformer_2`` from
    ``quantized/transformer_2/``. CheckpointError, before anything loads, when exactly one of the pipeline and
    the quantized directory has a transformer_2 (the pipeline would run a 16-bit expert, or miss one)."""
    from .formats import nunchaku

    second = None
    if nunchaku.find_checkpoint(quantized) is None:  # a Nunchaku file holds one denoiser
        second = resolve(quantized) / SECOND_DENOISER_DIR
    has_second = second is not None and second.is_dir()
    wants_second = SECOND_DENOISER_DIR in components
    if wants_second and not has_second:
        raise CheckpointError(
            f"{pipeline} has a {SECOND_DENOISER_DIR} (Wan 2.2 A14B's low-noise expert) but {quantized} holds no "
            f"quantized {SECOND_DENOISER_DIR}/: quantize the pipeline with svdq quantize (it quantizes both experts)"
        )
    if has_second and not wants_second:
        raise CheckpointError(
            f"{quantized} holds a quantized {SECOND_DENOISER_DIR}/ (a two-expert model, Wan 2.2 A14B) but {pipeline} "
            f"has no {SECOND_DENOISER_DIR}: use the base pipeline it was quantized from"
        )
    models = {components[0]: from_pretrained(quantized, device=device, expected_family=expected_family)}
    if has_second:
        models[SECOND_DENOISER_DIR] = from_pretrained(second, device=device, expected_family=expected_family)
    return models


def _dtype_kwarg() -> str:
    """diffusers renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name warns)."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


def _model_index(base) -> dict:
    path = Path(base) / "model_index.json"
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(base), "model_index.json"))
        except Exception as e:
            raise FileNotFoundError(
                f"base pipeline {base!r}: no local directory, and its model_index.json could not be fetched from "
                f"the Hugging Face Hub ({type(e).__name__}); offline? pass a local pipeline directory"
            ) from e
    return json.loads(path.read_text())
