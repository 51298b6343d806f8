"""Reading LoRA files: every supported layout → one canonical table {module path: (A, B, alpha)}.

Supported layouts (detected from the keys, not from the file name):

- **diffusers / PEFT**: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (also ``lora_A.<adapter>.weight``,
  a ``base_model.model.`` prefix, per-module ``<module>.alpha``, and the ``lora_adapter_metadata`` JSON that
  diffusers writes: ``r``, ``lora_alpha``, ``alpha_pattern``, ``use_rslora``, optionally prefixed by component).
  Older diffusers spellings (``.lora.down.weight``, ``to_q_lora.down``, ``lora_linear_layer``) are renamed with
  diffusers' own ``convert_unet_state_dict_to_peft`` / ``convert_state_dict_to_peft``.
- **kohya / sd-scripts** (``lora_unet_…``, ``lora_te…``, ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``):
  * FLUX: ``diffusers.FluxLoraLoaderMixin.lora_state_dict`` (wraps ``_convert_kohya_flux_lora_to_diffusers``:
    BFL names such as ``double_blocks_0_img_attn_qkv`` split into q/k/v, alpha folded into the weights), and the
    xlabs layout it also recognizes;
  * SDXL: ``diffusers.StableDiffusionXLLoraLoaderMixin.lora_state_dict`` with the UNet config (wraps
    ``_maybe_map_sgm_blocks_to_diffusers`` and ``_convert_non_diffusers_lora_to_diffusers``, alphas returned);
  * anything else (PixArt-Σ, which has no diffusers LoRA loader, or kohya files trained on diffusers module
    names): ``lora_unet_<path with _>`` / ``lora_transformer_<path with _>`` is matched against the model's own
    module names with dots replaced by underscores.
- **the community layouts of the generic families** (ComfyUI / original-repo names under ``diffusion_model.``,
  kohya / musubi ``lora_unet_…``, ``.lora_down``/``.lora_up`` with ``.alpha``, ai-toolkit, …): converted by the
  ``lora_state_dict`` of the family's own diffusers loader (`DIFFUSERS_LORA_LOADERS`: QwenImageLoraLoaderMixin,
  WanLoraLoaderMixin, ZImageLoraLoaderMixin, Flux2LoraLoaderMixin, …) — the code ``pipe.load_lora_weights`` runs,
  so a file loads into an svdq model exactly as diffusers reads it; alphas come folded into the weights.

The canonical module path is relative to a *component*: ``""`` for the denoiser (transformer / UNet) and
``"text_encoder"``, ``"text_encoder_2"``, … for the text encoders of a pipeline.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("svdq")

DENOISER_PREFIXES = ("transformer", "unet")
TEXT_ENCODER_RE = re.compile(r"^(text_encoder(?:_\d)?)\.")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# The diffusers LoRA loader (a `*LoraLoaderMixin` of `diffusers.loaders.lora_pipeline`) of each generic-family
# denoiser class: the mixin its pipelines inherit (ChromaPipeline uses FLUX.1's).
DIFFUSERS_LORA_LOADERS = {
    "QwenImageTransformer2DModel": "QwenImageLoraLoaderMixin",
    "WanTransformer3DModel": "WanLoraLoaderMixin",
    "ZImageTransformer2DModel": "ZImageLoraLoaderMixin",
    "Flux2Transformer2DModel": "Flux2LoraLoaderMixin",
    "SD3Transformer2DModel": "SD3LoraLoaderMixin",
    "SanaTransformer2DModel": "SanaLoraLoaderMixin",
    "HiDreamImageTransformer2DModel": "HiDreamImageLoraLoaderMixin",
    "ChromaTransformer2DModel": "FluxLoraLoaderMixin",
}


@dataclass
class AdapterWeights:
    """One module's adapter: ΔW = (alpha / rank) · B · A, with A [rank, K] and B [N, rank]."""

    down: torch.Tensor  # A [r, K]
    up: torch.Tensor  # B [N, r]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class ParsedLora:
    """A LoRA file in canonical form. ``modules`` keys are ``(component, module path)``."""

    modules: dict[tuple[str, str], AdapterWeights]
    format: str  # "peft", "kohya-flux", "kohya-sdxl", "kohya", "community (<diffusers loader mixin>)"
    unsupported: list[str] = field(default_factory=list)  # keys we understood but cannot apply (DoRA, lora bias…)
    unparsed: list[str] = field(default_factory=list)  # keys in no layout we know


def read_source(source: str | os.PathLike | dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A ``.safetensors`` path or a state dict → (shallow copy of the tensors, adapter metadata dict)."""
    if isinstance(source, dict):
        return dict(source), {}
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors LoRA files are read (no pickle)")
    from safetensors import safe_open

    from ._transaction import read_all_tensors

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = read_all_tensors(f)  # Ctrl-C stays KeyboardInterrupt, never an "unreadable file"
    except Exception as e:  # safetensors' own error types for truncated / garbage files
        raise ValueError(f"{path}: not a readable safetensors LoRA file ({type(e).__name__}: {e})") from e
    adapter_meta = {}
    raw = meta.get("lora_adapter_metadata")
    if raw:
        try:
            adapter_meta = json.loads(raw)
        except json.JSONDecodeError:
            log.warning("%s: unreadable lora_adapter_metadata ignored", path)
    return tensors, adapter_meta


def model_family(model: nn.Module) -> str:
    """"flux", "sdxl" (any UNet2DConditionModel), "pixart" or "generic", from the denoiser's class."""
    name = type(model).__name__
    if name.startswith("Flux"):
        return "flux"
    if name == "UNet2DConditionModel":
        return "sdxl"
    if name.startswith("PixArt"):
        return "pixart"
    return "generic"


def is_kohya(keys) -> bool:
    return any(k.startswith(KOHYA_PREFIXES) or ".lora_down.weight" in k for k in keys)


def parse(
    source: str | os.PathLike | dict,
    denoiser: nn.Module,
    module_names: dict[str, list[str]] | None = None,
) -> ParsedLora:
    """Read ``source`` and bring it to canonical form for ``denoiser``.

    module_names: per component ("" = denoiser), the names of its linear modules (used to match kohya names that
    are module paths with ``_`` for ``.``; defaults to the denoiser's).
    """
    state, meta = read_source(source)
    if not state:
        raise ValueError("the LoRA state dict is empty")
    family = model_family(denoiser)
    alphas: dict[str, float] = {}
    fmt = "peft"
    unparsed: list[str] = []
    loader = diffusers_lora_loader(denoiser) if family == "generic" else None
    if loader is not None and not _peft_named(state):
        converted = _convert_with_diffusers(loader, state)
        if converted is not None:
            state, fmt = converted, f"community ({loader.__name__})"
    if fmt == "peft" and is_kohya(state.keys()):
        if family == "flux":
            from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

            # alpha is folded into the weights by the converter; any transformer.* keys come back PEFT-named.
            state, alphas_out = FluxLoraLoaderMixin.lora_state_dict(state, return_alphas=True)
            alphas = {k: float(v) for k, v in (alphas_out or {}).items()}
            fmt = "kohya-flux"
        elif family == "sdxl":
            from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin

            state, network_alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
                state, unet_config=denoiser.config
            )
            alphas = {_alpha_module(k): float(v) for k, v in (network_alphas or {}).items()}
            fmt = "kohya-sdxl"
        else:
            names = module_names if module_names is not None else {"": _linear_names(denoiser)}
            state, alphas, unparsed = _convert_kohya_generic(state, names)
            fmt = "kohya"
    state = _normalize_peft_names(state)
    modules, unsupported, rest = _collect(state, alphas, meta)
    return ParsedLora(modules=modules, format=fmt, unsupported=unsupported, unparsed=unparsed + rest)


def diffusers_lora_loader(denoiser: nn.Module):
    """The diffusers LoRA loader mixin for this denoiser's class (`DIFFUSERS_LORA_LOADERS`), or None."""
    name = DIFFUSERS_LORA_LOADERS.get(type(denoiser).__name__)
    if name is None:
        return None
    from diffusers.loaders import lora_pipeline

    return getattr(lora_pipeline, name, None)


def _peft_named(state: dict[str, torch.Tensor]) -> bool:
    """Every key already diffusers / PEFT (``<module>.lora_A/B.weight``, ``<module>.alpha``) under no foreign prefix."""
    return not any(k.startswith("diffusion_model.") for k in state) and all(
        _PEFT_KEY.match(k.removeprefix("base_model.model.")) or k.endswith(".alpha") for k in state
    )


def _convert_with_diffusers(loader, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """``loader.lora_state_dict`` on the tensors (a dict: nothing is read from disk, nothing unpickled) →
    diffusers / PEFT keys; None when the result is still not PEFT-named (a layout that loader does not know:
    the generic kohya matcher gets the original keys)."""
    try:
        # Copies of the tensors: diffusers' Wan converter scales some of them in place (`*= scale_down` on the
        # caller's tensors, diffusers 0.42.1), which would change a user's dict and double-scale a second load.
        out = loader.lora_state_dict({k: v.clone() for k, v in state.items()})
    except (KeyError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        log.info("%s.lora_state_dict did not convert the LoRA (%s: %s)", loader.__name__, type(e).__name__, e)
        return None
    if isinstance(out, tuple):  # (state dict, alphas / metadata) for some loaders
        out = out[0]
    return out if out and _peft_named(out) else None


def _linear_names(model: nn.Module) -> list[str]:
    from .linear import SVDQLinear
    from .weight_only import SVDQWeightOnlyLinear

    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, SVDQLinear, SVDQWeightOnlyLinear)) and n]


def _convert_kohya_generic(
    state: dict[str, torch.Tensor], names: dict[str, list[str]]
) -> tuple[dict[str, torch.Tensor], dict[str, float], list[str]]:
    """kohya keys whose names are the model's module paths with ``_`` for ``.`` → PEFT keys (alpha kept)."""
    # lora_unet_ / lora_transformer_ → denoiser; lora_te_/lora_te1_ → text_encoder; lora_te2_ → text_encoder_2.
    prefixes = {
        "lora_unet_": "",
        "lora_transformer_": "",
        "lora_te_": "text_encoder",
        "lora_te1_": "text_encoder",
        "lora_te2_": "text_encoder_2",
        "lora_te3_": "text_encoder_3",
    }
    flat = {comp: {n.replace(".", "_"): n for n in ns} for comp, ns in names.items()}
    out, alphas, unparsed = {}, {}, []
    for key, t in state.items():
        stem, _, suffix = key.partition(".")
        prefix = next((p for p in sorted(prefixes, key=len, reverse=True) if stem.startswith(p)), None)
        if prefix is None or suffix not in ("lora_down.weight", "lora_up.weight", "alpha"):
            unparsed.append(key)
            continue
        comp = prefixes[prefix]
        module = flat.get(comp, {}).get(stem[len(prefix) :])
        if module is None:
            # keep it visible as an unmatched key, in the dotted spelling a user would search for
            module = stem[len(prefix) :]
        full = f"{comp}.{module}" if comp else module
        if suffix == "alpha":
            alphas[full] = float(t)
        else:
            out[f"{full}.lora_{'A' if suffix == 'lora_down.weight' else 'B'}.weight"] = t
    return out, alphas, unparsed


def _alpha_module(key: str) -> str:
    """diffusers' network_alphas key → module path (it spells it ``<module>.alpha`` or ``<down key>.alpha``)."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    stem = key[: -len(".alpha")] if key.endswith(".alpha") else key
    if stem.endswith(".weight"):  # e.g. unet.….attn1.processor.to_q_lora.down.weight
        (peft_key,) = convert_unet_state_dict_to_peft({stem: None}).keys()
        m = _PEFT_KEY.match(peft_key)
        if m:
            return m.group("module")
    return stem.replace(".processor.", ".")


def _normalize_peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older diffusers spellings → PEFT (``<module>.lora_A.weight``), via diffusers' own tables."""
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    if all(".lora_A." in k or ".lora_B." in k or not k.endswith(".weight") for k in state):
        return state
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    te = {k: v for k, v in state.items() if TEXT_ENCODER_RE.match(k)}
    rest = {k: v for k, v in state.items() if k not in te}
    if te and any("lora_linear_layer" in k or "_lora." in k for k in te):
        old = any("_lora." in k for k in te)
        te = convert_state_dict_to_peft(te, StateDictType.DIFFUSERS_OLD if old else StateDictType.DIFFUSERS)
        te = {k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v for k, v in te.items()}
    rest = convert_unet_state_dict_to_peft(rest)
    rest = {k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v for k, v in rest.items()}
    return {**rest, **te}


def _split_component(path: str) -> tuple[str, str]:
    m = TEXT_ENCODER_RE.match(path)
    if m:
        return m.group(1), path[m.end() :]
    head, _, tail = path.partition(".")
    if head in DENOISER_PREFIXES and tail:
        return "", tail
    return "", path


def _meta_value(meta: dict, component: str, key: str):
    prefix = {"": ("transformer.", "unet.", ""), "text_encoder": ("text_encoder.",)}.get(component, (f"{component}.",))
    for p in prefix:
        if p + key in meta:
            return meta[p + key]
    return None


def _collect(
    state: dict[str, torch.Tensor], alphas: dict[str, float], meta: dict
) -> tuple[dict[tuple[str, str], AdapterWeights], list[str], list[str]]:
    downs, ups, file_alphas = {}, {}, {}
    unsupported, unparsed = [], []
    for key, t in state.items():
        m = _PEFT_KEY.match(key)
        if m:
            (downs if m.group("which") == "A" else ups)[m.group("module")] = t
        elif key.endswith(".alpha") and t.numel() == 1:
            file_alphas[key[: -len(".alpha")]] = float(t)
        elif any(s in key for s in ("lora_magnitude_vector", "dora_scale", ".lora_B.bias", "lora_B.default.bias")):
            unsupported.append(key)
        else:
            unparsed.append(key)
    alphas = {**{k.removeprefix("base_model.model."): v for k, v in alphas.items()}, **file_alphas}
    modules = {}
    for module in sorted(downs.keys() | ups.keys()):
        if module not in downs or module not in ups:
            unparsed.append(f"{module}.lora_{'B' if module in downs else 'A'}.weight (missing)")
            continue
        a, b = downs[module], ups[module]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            # conv LoRAs (4-d) and mismatched pairs cannot go on a linear low-rank branch
            unsupported.append(f"{module} (A {tuple(a.shape)}, B {tuple(b.shape)})")
            continue
        component, path = _split_component(module)
        rank = a.shape[0]
        alpha = alphas.get(module)
        if alpha is None:
            alpha = _pattern_alpha(meta, component, path, rank)
        modules[(component, path)] = AdapterWeights(down=a, up=b, alpha=float(alpha))
    return modules, unsupported, unparsed


def _pattern_alpha(meta: dict, component: str, path: str, rank: int) -> float:
    """alpha from PEFT metadata (alpha_pattern > lora_alpha, rsLoRA aware); none → alpha = rank (scale 1)."""
    if not meta:
        return float(rank)
    pattern = _meta_value(meta, component, "alpha_pattern") or {}
    alpha = None
    for pat, value in pattern.items():
        if path == pat or path.endswith("." + pat) or re.fullmatch(pat, path):
            alpha = value
            break
    if alpha is None:
        alpha = _meta_value(meta, component, "lora_alpha")
    if alpha is None:
        return float(rank)
    if _meta_value(meta, component, "use_rslora"):
        # rsLoRA scales by alpha/sqrt(r); canonical scale is alpha'/r, so alpha' = alpha·sqrt(r).
        return float(alpha) * rank**0.5
    return float(alpha)
