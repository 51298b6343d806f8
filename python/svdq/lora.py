"""LoRA hot-swap: adapters live on the 16-bit low-rank branch, the 4-bit weights are never touched.

docs/numerics.md §6: an adapter ΔW = s·B·A (A [ra, K], B [N, ra], s = strength·alpha/ra) on a quantized
layer is appended to its branch, ``lora_down ← [lora_down | Aᵀ]``, ``lora_up ← [lora_up | B]``, with s per
column in ``lora_scales``. Each adapter's columns in a layer form one block, zero-padded to a multiple of 16
(the kernels' rank granularity). The layer remembers which columns belong to which adapter, so

- ``set_lora_strength`` rewrites that adapter's slice of ``lora_scales`` in place (nothing else moves);
- ``unload_lora`` rebuilds the branch without the adapter's block; unloading the last one puts the original
  ``lora_down`` / ``lora_up`` / ``lora_scales`` tensor objects back (bit-exact).

Fused layers (svdq.models: ``attn.to_q/k/v`` → one layer whose rows are sliced): the adapters of the parts are
placed on the fused layer's row ranges. Parts whose A (and scale) are identical share one set of down
columns (kohya FLUX ``img_attn_qkv`` adapters come that way); otherwise each part gets its own columns and
the up matrix is block-diagonal.

Layers kept 16-bit (``nn.Linear``) and weight-only 4-bit layers (``SVDQWeightOnlyLinear``, which compute in
16 bits) get the same branch as a forward hook, ``y += ((x·down)·scales)·upᵀ``; removing the hook restores
the layer bit-exactly.

The adapter registry lives on the denoiser (``model._svdq_loras``); pass a pipeline to also reach its text
encoders.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import lora_formats
from ._transaction import ObjectSnapshot, TensorSnapshot, model_transaction
from .lora_formats import AdapterWeights, ParsedLora
from .linear import SVDQLinear
from .weight_only import SVDQWeightOnlyLinear
from .ops.reference import MAX_RANK, RANK_MULTIPLE

log = logging.getLogger("svdq")

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class LoraError(ValueError):
    """A LoRA that cannot be applied as asked (unmatched keys with strict=True, shapes, rank limit, names)."""


@dataclass
class LoraInfo:
    """What `list_loras` reports for one loaded adapter."""

    name: str
    strength: float
    format: str  # "peft", "kohya-flux", "kohya-sdxl", "kohya", "community (<diffusers loader mixin>)"
    quantized_layers: int  # SVDQLinear layers it is on (a fused layer counts once)
    fp16_layers: int  # layers computing in 16 bits it is on (nn.Linear, W4A16; denoiser and text encoders)
    text_encoder_modules: int  # of the modules above, how many are in text encoders
    rank: int  # largest adapter rank in the file
    skipped: list[str] = field(default_factory=list)  # keys not applied (strict=False, or no pipeline for TE)


@dataclass
class _Block:
    """One adapter's columns in one layer: down [K, c], up [N, c], per-column alpha/rank (0 on padding)."""

    down: torch.Tensor
    up: torch.Tensor
    unit_scale: torch.Tensor  # fp32 [c]
    up_mask: torch.Tensor | None = None  # fused layers: 1 where `up` holds a part's B (gradient mask), else None


class _Branch:
    """The LoRA state of one physical layer (SVDQLinear, or a hooked nn.Linear / SVDQWeightOnlyLinear)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.blocks: OrderedDict[str, _Block] = OrderedDict()
        self.strengths: dict[str, float] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        self.quantized = isinstance(module, SVDQLinear)
        # Adapters being trained (`lora_parameters`): computed by `train_hook` from their leaf tensors on every
        # call, so gradients reach them and optimizer steps take effect; the others are fused into the branch.
        self.trainable: dict[str, None] = {}
        self.train_hook = None
        if self.quantized:
            self.base = (module.lora_down, module.lora_up, module.lora_scales)
        else:
            self.hook = None
            self.down = self.up = self.scales = None

    @property
    def base_rank(self) -> int:
        return self.base[0].shape[1] if self.quantized else 0

    def columns(self) -> int:
        return sum(b.down.shape[1] for b in self.blocks.values())

    def rebuild(self) -> None:
        """Concatenate base + blocks into the layer's branch (or restore the base when no block is left)."""
        m = self.module
        if self.trainable and self.train_hook is None:
            self.train_hook = m.register_forward_hook(self._train_hook)
        elif not self.trainable and self.train_hook is not None:
            self.train_hook.remove()
            self.train_hook = None
        frozen = [(name, b) for name, b in self.blocks.items() if name not in self.trainable]
        if self.quantized:
            device = m.lora_down.device  # the branch's device (follows model.to(); 4-bit tensors may be elsewhere)
            if not frozen:
                down, up, scales = (t.to(device) for t in self.base)
                m.set_lowrank(down, up, scales)
                return
            down, up, scales, start = [self.base[0].to(device)], [self.base[1].to(device)], [self.base[2].to(device)], self.base_rank
        else:
            if not frozen:
                if self.hook is not None:
                    self.hook.remove()
                self.hook = None
                self.down = self.up = self.scales = None
                return
            device = _weight_device(m)
            down, up, scales, start = [], [], [], 0
        self.offsets = {}
        for name, b in frozen:
            c = b.down.shape[1]
            down.append(b.down.to(device))
            up.append(b.up.to(device))
            scales.append(b.unit_scale.to(device) * self.strengths[name])
            self.offsets[name] = (start, start + c)
            start += c
        with torch.no_grad():
            if self.quantized:
                m.set_lowrank(torch.cat(down, 1), torch.cat(up, 1), torch.cat(scales))
            else:
                self.down, self.up, self.scales = torch.cat(down, 1), torch.cat(up, 1), torch.cat(scales)
                if self.hook is None:
                    self.hook = m.register_forward_hook(self._forward_hook)

    def set_strength(self, name: str, strength: float) -> None:
        self.strengths[name] = strength
        if name in self.trainable:  # read by train_hook on every call
            return
        start, end = self.offsets[name]
        target = self.module.lora_scales if self.quantized else self.scales
        with torch.no_grad():
            target[start:end].copy_(self.blocks[name].unit_scale.to(target.device) * strength)

    def _train_hook(self, module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        # The fused branch's arithmetic (spec §4.1–4.2), as differentiable torch ops on the adapters' leaves.
        x = args[0]
        for name in self.trainable:
            b = self.blocks[name]
            scale = b.unit_scale.to(x.device) * self.strengths[name]
            act = (x.to(torch.float32) @ b.down.to(torch.float32)) * scale
            out = out + act.to(out.dtype) @ b.up.to(out.dtype).T
        return out

    def _forward_hook(self, module: nn.Linear, args, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if self.down.device != x.device:  # the model was moved after loading: follow it once
            self.down, self.up, self.scales = self.down.to(x.device), self.up.to(x.device), self.scales.to(x.device)
        # Same arithmetic as the quantized branch (spec §4.1–4.2): fp32 down and scale, compute-dtype up.
        act = (x.to(torch.float32) @ self.down.to(torch.float32)) * self.scales
        return out + (act.to(out.dtype) @ self.up.to(out.dtype).T)


@dataclass
class _Adapter:
    info: LoraInfo
    branches: list[_Branch]


class _Registry:
    def __init__(self):
        self.adapters: OrderedDict[str, _Adapter] = OrderedDict()
        self.branches: dict[int, _Branch] = {}  # id(module) → branch


@dataclass
class _Target:
    """Where one LoRA module path lands: a physical layer and a row range of its output."""

    path: str  # module path of the physical layer (within its component)
    module: nn.Module  # SVDQLinear, SVDQWeightOnlyLinear or nn.Linear
    rows: tuple[int, int]
    in_features: int


# ----------------------------------------------------------------------------------------------------------
# Resolving the model


def _components(model) -> tuple[nn.Module, dict[str, nn.Module]]:
    """(denoiser, {component name: module}) for a model or a diffusers pipeline."""
    if isinstance(model, nn.Module):
        return model, {"": model}
    denoiser = getattr(model, "transformer", None)
    if denoiser is None:
        denoiser = getattr(model, "unet", None)
    if not isinstance(denoiser, nn.Module):
        raise TypeError(f"expected an nn.Module or a diffusers pipeline with a transformer/unet, got {type(model).__name__}")
    comps = {"": denoiser}
    for te in TEXT_ENCODERS:
        m = getattr(model, te, None)
        if isinstance(m, nn.Module):
            comps[te] = m
    return denoiser, comps


def _registry(denoiser: nn.Module, create: bool = False) -> _Registry | None:
    reg = denoiser.__dict__.get("_svdq_loras")
    if reg is None and create:
        reg = _Registry()
        denoiser.__dict__["_svdq_loras"] = reg  # plain attribute: not a module, not in the state dict
    return reg


def lora_targets(module: nn.Module) -> dict[str, _Target]:
    """Every module path a LoRA may name in ``module`` → the physical layer and rows it lands on.

    Plain ``nn.Linear`` / ``SVDQLinear`` layers map to themselves (all rows); the ``ProjectionSlice`` stand-ins
    of fused projections (svdq.models, e.g. ``attn.to_q``) map to their rows of the fused layer; a fused group's
    own name (``attn.to_qkv``) maps to the whole fused layer.
    """
    from .models import ProjectionSlice, SharedInputLinear

    names = {id(m): n for n, m in module.named_modules()}
    targets = {}
    for name, m in module.named_modules():
        if not name:
            continue
        if isinstance(m, (SVDQLinear, SVDQWeightOnlyLinear, nn.Linear)):
            targets[name] = _Target(name, m, (0, m.out_features), m.in_features)
        elif isinstance(m, ProjectionSlice):
            lin = m.fused.linear
            targets[name] = _Target(names[id(lin)], lin, (m.offset, m.offset + m.out_features), m.in_features)
        elif isinstance(m, SharedInputLinear):
            targets[name] = _Target(f"{name}.linear", m.linear, (0, m.linear.out_features), m.linear.in_features)
    return targets


def _weight_device(m: nn.Module) -> torch.device:
    return m.qweight.device if isinstance(m, SVDQWeightOnlyLinear) else m.weight.device


def _linear_names(comps: dict[str, nn.Module]) -> dict[str, list[str]]:
    return {c: list(lora_targets(m)) for c, m in comps.items()}


# ----------------------------------------------------------------------------------------------------------
# Planning: which blocks go where (no model changes)


@dataclass
class Plan:
    """The result of matching a LoRA against a model (what `svdq lora inspect` prints)."""

    format: str
    matched: dict[tuple[str, str], _Target]  # (component, LoRA module path) → target
    blocks: dict[int, tuple[_Target, _Block]]  # id(physical module) → (target, block) to append
    unmatched: list[str]  # LoRA module paths / keys that match no layer (or do not fit it)
    text_encoder_skipped: list[str]  # text-encoder modules (no pipeline given)
    ranks: dict[tuple[str, str], int]
    physical_names: dict[int, str]  # id(physical module) → "component:path"
    rank: int


def plan_lora(model, source, *, parsed: ParsedLora | None = None, device=None) -> Plan:
    """Match ``source`` against ``model`` (a model or a pipeline) without changing anything."""
    denoiser, comps = _components(model)
    if parsed is None:
        parsed = lora_formats.parse(source, denoiser, _linear_names(comps))
    targets = {c: lora_targets(m) for c, m in comps.items()}
    matched, unmatched, te_skipped, ranks = {}, [], [], {}
    per_module: dict[int, list[tuple[_Target, AdapterWeights]]] = {}
    physical_names = {}
    for (comp, path), w in parsed.modules.items():
        label = f"{comp}.{path}" if comp else path
        ranks[(comp, path)] = w.rank
        if comp not in comps:
            if comp in TEXT_ENCODERS:
                te_skipped.append(label)
            else:
                unmatched.append(label)
            continue
        t = _lookup(targets[comp], path)
        if t is None:
            unmatched.append(label)
            continue
        if w.down.shape[1] != t.in_features or w.up.shape[0] != t.rows[1] - t.rows[0]:
            unmatched.append(
                f"{label} (A {tuple(w.down.shape)}, B {tuple(w.up.shape)} do not fit "
                f"[{t.in_features} -> {t.rows[1] - t.rows[0]}])"
            )
            continue
        matched[(comp, path)] = t
        per_module.setdefault(id(t.module), []).append((t, w))
        physical_names[id(t.module)] = f"{comp}:{t.path}" if comp else t.path
    unmatched += parsed.unsupported + parsed.unparsed
    blocks = {key: (parts[0][0], _make_block(parts, device)) for key, parts in per_module.items()}
    return Plan(
        format=parsed.format,
        matched=matched,
        blocks=blocks,
        unmatched=unmatched,
        text_encoder_skipped=te_skipped,
        ranks=ranks,
        physical_names=physical_names,
        rank=max(ranks.values(), default=0),
    )


def _lookup(targets: dict[str, _Target], path: str) -> _Target | None:
    """``targets[path]``, allowing for transformers 5's CLIP text models, which dropped the ``text_model.``
    level that LoRA files (trained on transformers 4) still name."""
    t = targets.get(path)
    if t is None and path.startswith("text_model."):
        t = targets.get(path[len("text_model.") :])
    elif t is None:
        t = targets.get("text_model." + path)
    return t


def _make_block(parts: list[tuple[_Target, AdapterWeights]], device=None) -> _Block:
    """The columns one adapter adds to one physical layer (several parts when the layer is fused)."""
    module = parts[0][0].module
    if isinstance(module, SVDQLinear):  # the branch's dtype and device
        dtype, device = module.dtype, device or module.lora_down.device
    elif isinstance(module, SVDQWeightOnlyLinear):
        dtype, device = module.dtype, device or module.qweight.device
    else:
        dtype, device = module.weight.dtype, device or module.weight.device
    n, k = module.out_features, module.in_features
    # Group parts whose A and scale are identical: they share one set of down columns.
    groups: list[tuple[AdapterWeights, list[tuple[int, int, torch.Tensor]]]] = []
    for t, w in sorted(parts, key=lambda p: p[0].rows):
        for a, members in groups:
            if a.scale == w.scale and (a.down is w.down or torch.equal(a.down, w.down)):
                members.append((*t.rows, w.up))
                break
        else:
            groups.append((w, [(*t.rows, w.up)]))
    cols = sum(a.rank for a, _ in groups)
    pad = -(-cols // RANK_MULTIPLE) * RANK_MULTIPLE - cols
    # One write per element (no zero-fill-then-copy): these blocks are most of a load's memory traffic.
    cast = dict(device=device, dtype=dtype)
    down = torch.cat([a.down.T.to(**cast) for a, _ in groups] + [torch.zeros(k, pad, **cast)], 1)
    f32 = dict(device=device, dtype=torch.float32)
    unit = torch.cat([torch.full((a.rank,), a.scale, **f32) for a, _ in groups] + [torch.zeros(pad, **f32)])
    (_, members0), *rest = groups
    if not rest and len(members0) == 1 and members0[0][:2] == (0, n):  # a plain layer: [B | 0]
        up = torch.cat([members0[0][2].to(**cast), torch.zeros(n, pad, **cast)], 1)
        return _Block(down, up, unit)
    up = torch.zeros(n, cols + pad, **cast)
    mask = torch.zeros(n, cols + pad, dtype=torch.bool, device=device)
    c = 0
    for a, members in groups:
        for r0, r1, b in members:
            up[r0:r1, c : c + a.rank] = b.to(**cast)
            mask[r0:r1, c : c + a.rank] = True
        c += a.rank
    return _Block(down, up, unit, mask)


# ----------------------------------------------------------------------------------------------------------
# Public API


def load_lora(
    model,
    source: str | os.PathLike | dict,
    name: str | None = None,
    strength: float = 1.0,
    strict: bool = True,
    pipeline=None,
) -> str:
    """Apply the LoRA ``source`` to ``model`` (a quantized or 16-bit model, or a diffusers pipeline); returns
    the adapter's name.

    source: a ``.safetensors`` path or a state dict, in diffusers/PEFT or kohya format (FLUX, SDXL, PixArt-Σ;
    see `svdq.lora_formats`). name: defaults to the file's stem (``lora_<n>`` for a dict); must be new.
    strength: the multiplier of alpha/rank, changeable later with `set_lora_strength`.
    strict: keys that match no layer raise `LoraError` listing them and nothing is applied; with
    ``strict=False`` they are logged as a warning and the rest is applied. Text-encoder keys are applied when
    the text encoders are reachable (``model`` or ``pipeline`` is a pipeline) and reported otherwise.
    """
    target = pipeline if pipeline is not None else model
    denoiser, comps = _components(target)
    strength = _check_strength(strength)
    reg = _registry(denoiser) or _Registry()  # attached to the model only when the adapter is applied
    if name is None:
        name = Path(source).stem if isinstance(source, (str, os.PathLike)) else f"lora_{len(reg.adapters)}"
    if not isinstance(name, str) or not name:
        raise LoraError(f"a LoRA name must be a non-empty string, got {name!r}")
    if name in reg.adapters:
        raise LoraError(f"a LoRA named {name!r} is already loaded; unload it or pick another name")
    plan = plan_lora(target, source)
    if plan.unmatched:
        msg = f"LoRA {name!r}: {len(plan.unmatched)} key(s) match no layer of {type(denoiser).__name__}: " + _few(
            plan.unmatched
        )
        if strict:
            raise LoraError(msg + " (nothing applied; strict=False applies the rest)")
        log.warning(msg)
    if plan.text_encoder_skipped:
        log.warning(
            "LoRA %r: %d text-encoder module(s) not applied (pass the pipeline to reach them): %s",
            name,
            len(plan.text_encoder_skipped),
            _few(plan.text_encoder_skipped),
        )
    if not plan.blocks:
        raise LoraError(f"LoRA {name!r} matches no layer of {type(denoiser).__name__}")
    # Check the kernels' rank limit on every quantized layer before touching any.
    for key, (t, block) in plan.blocks.items():
        if isinstance(t.module, SVDQLinear):
            total = t.module.rank + block.down.shape[1]
            if total > MAX_RANK:
                raise LoraError(
                    f"LoRA {name!r}: layer {plan.physical_names[key]} would have rank {total} > MAX_RANK={MAX_RANK} "
                    f"(current {t.module.rank} + {block.down.shape[1]}); unload another adapter first"
                )
    te_ids = {id(m) for c, comp in comps.items() if c for m in comp.modules()}
    branches = []
    # Everything above only read the model; apply all layers in one step, undone completely on any exception
    # (also KeyboardInterrupt: Ctrl-C is held until the step is over), svdq._transaction.
    with _transaction(denoiser, comps, reg):
        denoiser.__dict__["_svdq_loras"] = reg  # plain attribute: not a module, not in the state dict
        for key, (t, block) in plan.blocks.items():
            br = reg.branches.get(key)
            if br is None:
                br = reg.branches[key] = _Branch(t.module)
            br.blocks[name] = block
            br.strengths[name] = strength
            branches.append(br)
            br.rebuild()
        info = LoraInfo(
            name=name,
            strength=strength,
        format=plan.format,
        quantized_layers=sum(br.quantized for br in branches),
        fp16_layers=sum(not br.quantized for br in branches),
            text_encoder_modules=sum(id(br.module) in te_ids for br in branches),
            rank=plan.rank,
            skipped=list(plan.unmatched) + list(plan.text_encoder_skipped),
        )
        reg.adapters[name] = _Adapter(info, branches)
    return name


def set_lora_strength(model, name: str, strength: float) -> None:
    """Change adapter ``name``'s strength live: rewrites its columns of ``lora_scales`` only."""
    strength = _check_strength(strength)
    adapter = _get(model, name)
    targets = [br.module.lora_scales if br.quantized else br.scales for br in adapter.branches]
    # Only these few values and the registry change (no module does): no snapshot of the modules (a strength
    # change stays cheap on a 1000-module model).
    with _transaction(None, {}, _registry(_components(model)[0]), tensors=targets):
        for br in adapter.branches:
            br.set_strength(name, strength)
        adapter.info.strength = strength


def unload_lora(model, name: str) -> None:
    """Remove adapter ``name``; with no adapter left a layer gets its original tensors back (bit-exact)."""
    adapter = _get(model, name)
    denoiser, _ = _components(model)
    reg = _registry(denoiser)
    modules = {id(br.module): br.module for br in adapter.branches}  # text-encoder layers included
    with _transaction(denoiser, modules, reg):
        for br in adapter.branches:
            br.blocks.pop(name)
            br.strengths.pop(name)
            br.offsets.pop(name, None)
            br.trainable.pop(name, None)
            br.rebuild()
            if not br.blocks:
                reg.branches.pop(id(br.module), None)
        del reg.adapters[name]


def lora_parameters(model, name: str) -> list[torch.Tensor]:
    """Make adapter ``name`` trainable on a quantized (or 16-bit) model and return its factors — QLoRA-style
    training of LoRA adapters on a 4-bit model.

    Each of its blocks (per physical layer: down [K, c], up [N, c]) becomes a pair of leaf tensors with
    ``requires_grad=True`` — pass them to an optimizer. While trainable, the adapter runs as a side branch
    (a forward hook with the fused branch's arithmetic, spec §4.1–4.2) so that updated values are used on the
    next call; the 4-bit layer's backward (svdq.ops.autograd) carries gradients to its input. Zero padding
    columns (scale 0) get zero gradients; on fused layers only each part's own rows of ``up`` are trained
    (a gradient mask). `freeze_lora` fuses it back into the branch. Create the parameters after moving the
    model to its device (they stay where they are created). Returns [down, up, down, up, …].
    """
    adapter = _get(model, name)
    denoiser, _ = _components(model)
    reg = _registry(denoiser)
    params = []
    with _transaction(denoiser, {id(br.module): br.module for br in adapter.branches}, reg):
        for br in adapter.branches:
            b = br.blocks[name]
            if name not in br.trainable:
                b.down = b.down.detach().clone().requires_grad_(True)
                b.up = b.up.detach().clone().requires_grad_(True)
                if b.up_mask is not None:
                    b.up.register_hook(lambda grad, mask=b.up_mask: grad * mask.to(grad.device))
                br.trainable[name] = None
                br.rebuild()
            params += [b.down, b.up]
    return params


def freeze_lora(model, name: str) -> None:
    """End training of adapter ``name``: its current factors (detached) are fused into the layers' branches
    again, as `load_lora` puts them (bit-exact with loading those factors)."""
    adapter = _get(model, name)
    denoiser, _ = _components(model)
    reg = _registry(denoiser)
    with _transaction(denoiser, {id(br.module): br.module for br in adapter.branches}, reg):
        for br in adapter.branches:
            if name in br.trainable:
                b = br.blocks[name]
                b.down, b.up = b.down.detach(), b.up.detach()
                del br.trainable[name]
                br.rebuild()


def _check_strength(strength) -> float:
    """A finite real number, else LoraError (checked before anything changes)."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) and not (
        isinstance(strength, torch.Tensor) and strength.numel() == 1 and not strength.is_complex()
    ):
        raise LoraError(f"LoRA strength must be a real number, got {strength!r}")
    value = float(strength)
    if not math.isfinite(value):
        raise LoraError(f"LoRA strength must be finite, got {value}")
    return value


def _transaction(denoiser: nn.Module | None, modules: dict, reg: _Registry | None, tensors=()):
    """svdq._transaction.model_transaction over the denoiser, the other touched modules and the registry."""
    extra = [ObjectSnapshot([reg, *reg.adapters.values(), *(a.info for a in reg.adapters.values()),
                             *reg.branches.values(), *(b for br in reg.branches.values() for b in br.blocks.values())])
             ] if reg is not None else []
    extra.append(TensorSnapshot([t for t in tensors if t is not None]))
    models = ([] if denoiser is None else [denoiser]) + [m for m in modules.values() if m is not denoiser]
    return model_transaction(*models, extra=extra)


def list_loras(model) -> dict[str, LoraInfo]:
    """The loaded adapters, in load order: name → `LoraInfo` (strength, format, layer counts, rank)."""
    denoiser, _ = _components(model)
    reg = _registry(denoiser)
    return {} if reg is None else {n: a.info for n, a in reg.adapters.items()}


def _get(model, name: str) -> _Adapter:
    denoiser, _ = _components(model)
    reg = _registry(denoiser)
    if reg is None or name not in reg.adapters:
        loaded = [] if reg is None else list(reg.adapters)
        raise LoraError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")
    return reg.adapters[name]


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} in all)"
