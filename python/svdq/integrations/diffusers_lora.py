"""diffusers' LoRA API on svdq models, routed to svdq's hot-swap (`svdq.load_lora` & co.).

diffusers' pipeline methods (``load_lora_weights``, ``set_adapters``, ``disable_lora`` / ``enable_lora``,
``unload_lora_weights``, ``delete_adapters``, ``fuse_lora``) convert the LoRA file (kohya, xlabs, PEFT, ...)
and then call the denoiser's own methods (``load_lora_adapter``, ``set_adapters``, ``disable_lora``, ...),
which normally inject PEFT layers around ``nn.Linear`` modules. On an svdq model (`install`, done by
`svdq.integrations.diffusers_quantizer.attach`) those model methods are replaced, on that model only, by the
functions below: the adapter goes on the low-rank branch of the quantized layers (and a hook on 16-bit
layers) exactly as `svdq.load_lora` puts it, the 4-bit weights are never touched, and strengths change in
place. Text encoders keep diffusers' own (PEFT) path.

Semantics (diffusers'): ``set_adapters(names, weights)`` activates exactly ``names`` with those weights (the
other loaded adapters contribute nothing); ``disable_lora`` / ``enable_lora`` switch all of them off / back;
``fuse_lora(lora_scale)`` makes the active adapters permanent at ``weight × lora_scale`` — on svdq they stay on
the low-rank branch (no requantization) and survive ``unload_lora_weights``, as fused weights do in diffusers;
``unfuse_lora`` (on the model) takes that back. Not supported (clear error): per-block weight dicts.
"""

from __future__ import annotations

import logging
import os
import types

import torch
from torch import nn

log = logging.getLogger("svdq")

METHODS = (
    "load_lora_adapter",
    "set_adapters",
    "disable_lora",
    "enable_lora",
    "disable_adapters",
    "enable_adapters",
    "unload_lora",
    "delete_adapters",
    "fuse_lora",
    "unfuse_lora",
    "active_adapters",
)


class _State:
    """What diffusers' API needs beyond svdq's registry: the weight of each adapter set by `set_adapters`,
    which are active, whether LoRA is disabled, and the fused ones ({name: weight they were fused at})."""

    def __init__(self):
        self.weights: dict[str, float] = {}
        self.active: list[str] = []
        self.disabled = False
        self.fused: dict[str, float] = {}


def _state(model: nn.Module) -> _State:
    st = model.__dict__.get("_svdq_diffusers_lora")
    if st is None:
        st = model.__dict__["_svdq_diffusers_lora"] = _State()
    return st


def install(model: nn.Module) -> None:
    """Route diffusers' model-level LoRA methods of ``model`` to svdq (idempotent)."""
    _state(model)
    for name in METHODS:
        model.__dict__[name] = types.MethodType(globals()[f"_{name}"], model)
    _sync_peft_config(model)
    _patch_flux_loader()


def is_routed(model) -> bool:
    return isinstance(model, nn.Module) and "_svdq_diffusers_lora" in model.__dict__


def _patch_flux_loader() -> None:
    """FluxLoraLoaderMixin.load_lora_weights first calls ``_maybe_expand_lora_state_dict``, which looks up
    ``<module>.weight`` in the transformer's state dict for every LoRA module (to widen Control-LoRA inputs):
    svdq's 4-bit layers and fused-projection stand-ins have no such entry (KeyError). On svdq models it is
    skipped: their adapters need no expansion (Control LoRAs that widen ``x_embedder`` are not supported there).
    Other models go through diffusers' own code unchanged."""
    try:
        from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    except ImportError:
        return
    current = FluxLoraLoaderMixin.__dict__.get("_maybe_expand_lora_state_dict")
    if current is None or getattr(current.__func__, "_svdq_patched", False):
        return
    original = current.__func__

    def _maybe_expand_lora_state_dict(cls, transformer, lora_state_dict):
        if is_routed(transformer):
            return lora_state_dict
        return original(cls, transformer, lora_state_dict)

    _maybe_expand_lora_state_dict._svdq_patched = True
    FluxLoraLoaderMixin._maybe_expand_lora_state_dict = classmethod(_maybe_expand_lora_state_dict)


def _apply(model: nn.Module) -> None:
    """Set every adapter's svdq strength from the diffusers state."""
    import svdq

    st = _state(model)
    for name in svdq.list_loras(model):
        if name in st.fused:
            strength = st.fused[name]
        elif st.disabled or name not in st.active:
            strength = 0.0
        else:
            strength = st.weights.get(name, 1.0)
        svdq.set_lora_strength(model, name, strength)


def _sync_peft_config(model: nn.Module) -> None:
    # diffusers' pipeline lists a component's adapters from ``model.peft_config`` (keys = adapter names).
    import svdq

    st = _state(model)
    model.__dict__["peft_config"] = {n: info for n, info in svdq.list_loras(model).items() if n not in st.fused}


def _alpha_keys(state: dict, network_alphas: dict | None, metadata: dict | None, prefix: str | None) -> dict:
    """Per-module ``<module>.alpha`` entries (the form `svdq.load_lora` reads) from diffusers' ``network_alphas``
    and PEFT ``metadata`` (lora_alpha / alpha_pattern / use_rslora)."""
    from ..lora_formats import _PEFT_KEY, _alpha_module, _pattern_alpha

    out = {}
    for key, value in (network_alphas or {}).items():
        module = _alpha_module(key)
        if prefix and not module.startswith(prefix + "."):
            module = f"{prefix}.{module}"
        out[f"{module}.alpha"] = torch.tensor(float(value))
    if metadata:
        for key, t in state.items():
            m = _PEFT_KEY.match(key)
            if m and m.group("which") == "A":
                module = m.group("module")
                path = module[len(prefix) + 1 :] if prefix and module.startswith(prefix + ".") else module
                out.setdefault(f"{module}.alpha", torch.tensor(_pattern_alpha(metadata, "", path, t.shape[0])))
    return out


def _load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix="transformer", hotswap=False, **kwargs):
    import svdq

    st = _state(self)
    adapter_name = kwargs.get("adapter_name") or f"default_{len(svdq.list_loras(self))}"
    source = pretrained_model_name_or_path_or_dict
    if isinstance(source, dict):
        state = dict(source)
        if prefix is not None:
            state = {k: v for k, v in state.items() if k.startswith(f"{prefix}.")}
            if not state:
                # diffusers' own behaviour: a LoRA without keys for this component is not an error
                log.info("svdq: LoRA %r has no %s.* keys; nothing loaded on %s", adapter_name, prefix, type(self).__name__)
                return
        state.update(_alpha_keys(state, kwargs.get("network_alphas"), kwargs.get("metadata"), prefix))
        source = state
    elif not (isinstance(source, (str, os.PathLike)) and str(source).endswith(".safetensors")):
        raise ValueError(
            f"svdq models load LoRAs from a state dict or a .safetensors file, got {source!r}: use "
            "pipe.load_lora_weights(repo_or_dir, weight_name=...) (diffusers resolves it) or a file path"
        )
    if adapter_name in svdq.list_loras(self):
        if not hotswap:
            raise ValueError(f"an adapter named {adapter_name!r} is already loaded (hotswap=True replaces it)")
        svdq.unload_lora(self, adapter_name)  # svdq's swap is the hot-swap: the 4-bit weights stay
    svdq.load_lora(self, source, name=adapter_name, strength=1.0, strict=True)
    if adapter_name not in st.active:
        st.active.append(adapter_name)  # diffusers: a newly loaded adapter is active at weight 1
    st.weights[adapter_name] = 1.0
    _apply(self)
    _sync_peft_config(self)


def _set_adapters(self, adapter_names, weights=None):
    import svdq

    st = _state(self)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if weights is None or isinstance(weights, (int, float)):
        weights = [weights] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapter names but {len(weights)} weights")
    loaded = [n for n in svdq.list_loras(self) if n not in st.fused]
    missing = [n for n in names if n not in loaded]
    if missing:
        raise ValueError(f"adapter(s) {missing} are not loaded on {type(self).__name__} (loaded: {loaded})")
    for n, w in zip(names, weights):
        if isinstance(w, dict):
            raise NotImplementedError(
                "per-block LoRA weights (a dict) are not supported on svdq models; pass one float per adapter"
            )
        st.weights[n] = 1.0 if w is None else float(w)
    st.active = names
    _apply(self)


def _disable_lora(self):
    _state(self).disabled = True
    _apply(self)


def _enable_lora(self):
    _state(self).disabled = False
    _apply(self)


_disable_adapters = _disable_lora
_enable_adapters = _enable_lora


def _delete_adapters(self, adapter_names):
    import svdq

    st = _state(self)
    for n in [adapter_names] if isinstance(adapter_names, str) else list(adapter_names):
        svdq.unload_lora(self, n)
        st.weights.pop(n, None)
        st.fused.pop(n, None)
        if n in st.active:
            st.active.remove(n)
    _sync_peft_config(self)


def _unload_lora(self):
    """Remove every adapter that is not fused (diffusers: fused weights stay in the model)."""
    import svdq

    st = _state(self)
    names = [n for n in svdq.list_loras(self) if n not in st.fused]
    for n in names:
        svdq.unload_lora(self, n)
        st.weights.pop(n, None)
    st.active = [n for n in st.active if n not in names]
    _sync_peft_config(self)


def _fuse_lora(self, lora_scale=1.0, safe_fusing=False, adapter_names=None):
    import svdq

    st = _state(self)
    names = list(adapter_names) if adapter_names is not None else [n for n in st.active if n not in st.fused]
    loaded = svdq.list_loras(self)
    for n in names:
        if n not in loaded:
            raise ValueError(f"cannot fuse adapter {n!r}: not loaded (loaded: {list(loaded)})")
        weight = 0.0 if st.disabled or n not in st.active else st.weights.get(n, 1.0)
        st.fused[n] = weight * float(lora_scale)
    _apply(self)
    _sync_peft_config(self)


def _unfuse_lora(self):
    st = _state(self)
    st.fused.clear()
    _apply(self)
    _sync_peft_config(self)


def _active_adapters(self):
    st = _state(self)
    return [] if st.disabled else list(st.active)
