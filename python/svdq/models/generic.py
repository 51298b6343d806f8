"""The generic family: svdq's layer plan for any diffusers transformer, discovered from the model itself.

No per-class table. Two sources of truth:

1. **Structure** — the *blocks* are the innermost elements of an ``nn.ModuleList`` that contain an attention
   module (diffusers' ``Attention`` / ``AttentionModuleMixin``, or anything with ``to_q`` and ``to_k``
   linears): FLUX's double and single blocks, Wan's / Qwen-Image's ``transformer_blocks``, Z-Image's
   ``layers`` and refiners, an SDXL UNet's ``BasicTransformerBlock``s (not the ``CrossAttnDownBlock2D`` /
   ``Transformer2DModel`` around them, which contain blocks themselves).
2. **One traced forward** (`analyze(model, run)`; `analyze_pipeline` runs one denoising step of a pipeline)
   with hooks on every ``nn.Linear`` and block records each linear's input tensor, its rows, and which
   tensors the blocks receive.

Rules (docs/models.md, "Generic family"):

* a linear inside a block whose input has one row per sample (``rows == batch``) is a **modulation** (AdaLN)
  linear: W4A16 when asked (`Family.adaln`), 16-bit by default — its output scales whole activations;
* every other linear inside a block (attention and MLP projections: one row per token) is **W4A4**, except
  where `KEEP_16BIT` names it for the model's class (16-bit; measured exceptions: Z-Image's image refiner);
* a linear outside the blocks is **16-bit** (patch / text / timestep embedders, final layer), except a
  per-sample linear that is itself a repeated unit's (an SDXL ResNet's ``time_emb_proj``) or whose output is
  handed to the blocks as several width-sized vectors (``out_features >= 2 * in_features``: PixArt's
  ``adaln_single.linear``, Wan's ``condition_embedder.time_proj``, FLUX.2's shared modulations) — those
  are modulation linears too (W4A16-able);
* W4A4 linears of one block that read the **same input tensor** form a fused group (one GEMM): q/k/v, the
  text stream's ``add_q/k/v_proj``, cross-attention k/v, FLUX single blocks' q/k/v + ``proj_mlp``, SwiGLU
  ``w1``/``w3``. Groups are named by the attention convention when they are one (``to_qkv``, ``to_kv``,
  ``to_added_qkv``, ``to_added_kv`` on the attention module) and ``fused__<part>__<part>…`` (``.`` → ``-``)
  on the parts' closest common parent otherwise, so a checkpoint's layer names alone say how to re-fuse a
  fresh skeleton (`fuse_named`) — no trace is needed to load.

`analyze` stores the resulting `Plan` on the model (``model._svdq_plan``); `svdq.models.family_of` then
returns a `Family` made from it (exact layer names), so `svdq.quantize`, `svdq quantize --adaln w4a16` and
`save_pretrained` treat the model like a hand-mapped one. FLUX.1, SDXL and PixArt-Σ keep their hand-written
families; tests check the generic plan equals them.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

log = logging.getLogger("svdq")

FUSED_PREFIX = "fused__"
# Attention-module conventions for groups: part leaf names (in this order) → fused module name.
CONVENTION_NAMES = {
    ("to_q", "to_k", "to_v"): "to_qkv",
    ("to_k", "to_v"): "to_kv",
    ("add_q_proj", "add_k_proj", "add_v_proj"): "to_added_qkv",
    ("add_k_proj", "add_v_proj"): "to_added_kv",
}
_CONVENTION_PARTS = {v: k for k, v in CONVENTION_NAMES.items()}
_ORDER = {leaf: i for i, leaf in enumerate(("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"))}


# Per-class exceptions to the rules, each measured (docs/models.md, "Generic family"): fnmatch patterns of linears
# inside the blocks that stay 16-bit although the rules make them W4A4.
# Z-Image: the image-token refiner blocks (the first blocks to read the raw patch embedding, before text joins;
# Nunchaku's Z-Image offers the same, ``skip_refiners``). On the tiny pipeline each of their W4A4 linears alone
# moves the transformer output 10-17 % (a main-layer linear: 6-10 %); with them 16-bit the image goes from
# 28.6 to 33.0 dB (guidance 0), for 2 of Z-Image-Turbo's 34 blocks.
KEEP_16BIT = {
    "ZImageTransformer2DModel": ("noise_refiner.*",),
}


class NoBlocksError(ValueError):
    """The model has no repeated attention blocks: nothing the generic family knows to quantize."""


@dataclass
class Plan:
    """Which of a model's ``nn.Linear`` layers (names before fusion) get which precision, and the groups."""

    class_name: str
    blocks: tuple[str, ...]
    w4a4: tuple[str, ...]
    modulation: tuple[str, ...]  # 16-bit by default; W4A16 with ``weight_only=family.adaln``
    fp16: tuple[str, ...]  # always 16-bit
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # fused module name → part names

    def quantized_names(self) -> set[str]:
        """The W4A4 layer names after fusion (a group's ``<fused>.linear`` replaces its parts)."""
        parts = {p for ps in self.groups.values() for p in ps}
        return {n for n in self.w4a4 if n not in parts} | {f"{g}.linear" for g in self.groups}


def is_attention(module: nn.Module) -> bool:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    if isinstance(module, (Attention, AttentionModuleMixin)):
        return True
    return isinstance(getattr(module, "to_q", None), nn.Linear) and isinstance(getattr(module, "to_k", None), nn.Linear)


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the innermost ``nn.ModuleList`` elements that contain an attention module."""
    candidates = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList):
            for i, child in enumerate(m):
                if child is not None and any(is_attention(c) for c in child.modules()):  # (UNet lists hold None)
                    candidates.append(f"{name}.{i}" if name else str(i))
    cset = set(candidates)
    return [c for c in candidates if not any(o != c and o.startswith(c + ".") for o in cset)]


def _inside(name: str, prefixes: Iterable[str]) -> str | None:
    return next((p for p in prefixes if name.startswith(p + ".")), None)


def _in_module_list_element(model: nn.Module, name: str) -> bool:
    """Whether some ancestor of ``name`` (not the layer itself) is an element of an ``nn.ModuleList``."""
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        parent = model.get_submodule(".".join(parts[:i])) if i else model
        if isinstance(parent, nn.ModuleList):
            return True
    return False


def _tensors(obj, out: list) -> None:
    if torch.is_tensor(obj):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def analyze(model: nn.Module, run: Callable[[nn.Module], object]) -> Plan:
    """Trace one forward of ``model`` (``run(model)`` must call it, e.g. one pipeline step) and store the
    generic `Plan` as ``model._svdq_plan``. Only the first forward call is recorded. Raises `NoBlocksError`
    naming the class when the model has no repeated attention blocks."""
    cls = type(model).__name__
    blocks = find_blocks(model)
    if not blocks:
        raise NoBlocksError(
            f"{cls} has no repeated attention blocks (nn.ModuleList elements containing an attention module): "
            "svdq's generic family finds nothing to quantize in it; choose layers yourself with "
            "svdq.quantize(model, include=[...])"
        )
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    state = {"recording": True, "batch": None}
    inputs: dict[str, torch.Tensor] = {}  # first input of each linear (kept alive: ids stay unique)
    outputs: dict[str, torch.Tensor] = {}
    block_storages: set[int] = set()
    keep: list[torch.Tensor] = []

    def model_pre(_m, args, kwargs):
        if state["recording"] and state["batch"] is None:
            first = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(first, (list, tuple)):  # Z-Image takes a list of per-sample latents
                state["batch"] = len(first)
            elif torch.is_tensor(first):
                state["batch"] = first.shape[0]

    def model_post(*_):
        state["recording"] = False

    def block_pre(_m, args, kwargs):
        if state["recording"]:
            ts: list[torch.Tensor] = []
            _tensors((args, kwargs), ts)
            keep.extend(ts)
            block_storages.update(_storage(t) for t in ts)

    def linear_pre(name):
        def hook(_m, args):
            if state["recording"] and name not in inputs:
                inputs[name] = args[0]

        return hook

    def linear_post(name):
        def hook(_m, _args, out):
            if state["recording"] and name not in outputs:
                outputs[name] = out

        return hook

    handles = [model.register_forward_pre_hook(model_pre, with_kwargs=True), model.register_forward_hook(model_post)]
    for b in blocks:
        handles.append(model.get_submodule(b).register_forward_pre_hook(block_pre, with_kwargs=True))
    for n, m in linears.items():
        handles.append(m.register_forward_pre_hook(linear_pre(n)))
        handles.append(m.register_forward_hook(linear_post(n)))
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    if state["batch"] is None:
        raise RuntimeError(f"analyze: the run never called {cls}.forward")
    batch = state["batch"]

    def per_sample(n: str) -> bool:
        x = inputs.get(n)
        return x is not None and x.numel() // max(x.shape[-1], 1) == batch

    keep_16bit = KEEP_16BIT.get(cls, ())
    w4a4, modulation, fp16 = [], [], []
    for n, m in linears.items():
        if _inside(n, blocks):
            if per_sample(n):
                modulation.append(n)
            else:
                (fp16 if any(fnmatch.fnmatchcase(n, p) for p in keep_16bit) else w4a4).append(n)
        elif per_sample(n) and (
            _in_module_list_element(model, n)
            or (n in outputs and _storage(outputs[n]) in block_storages and m.out_features >= 2 * m.in_features)
        ):
            modulation.append(n)
        else:
            fp16.append(n)
    groups = _groups(model, blocks, w4a4, linears, inputs)
    plan = Plan(cls, tuple(blocks), tuple(w4a4), tuple(modulation), tuple(fp16), groups)
    model._svdq_plan = plan
    log.info("svdq generic %s: %d blocks, %d W4A4 linears in %d fused groups, %d modulation, %d 16-bit",
             cls, len(blocks), len(w4a4), len(groups), len(modulation), len(fp16))
    return plan


def _groups(model, blocks, w4a4, linears, inputs) -> dict[str, tuple[str, ...]]:
    by_input: dict[tuple[str, int], list[str]] = {}
    for n in w4a4:
        x = inputs.get(n)
        if x is None:
            continue  # never ran in the trace: quantized alone
        by_input.setdefault((_inside(n, blocks), id(x)), []).append(n)
    groups = {}
    for (_block, _), names in by_input.items():
        if len(names) < 2 or len({linears[n].weight.dtype for n in names}) > 1:
            continue
        if any("-" in n or "__" in n for n in names):
            continue  # the fused name could not be decoded back into these parts: leave them unfused
        fused, parts = group_name(names)
        groups[fused] = parts
    return groups


def group_name(names: list[str]) -> tuple[str, tuple[str, ...]]:
    """(fused module's full name, parts in fused order) for linears reading one input."""
    split = [n.split(".") for n in names]
    common = 0
    while all(len(s) > common + 1 for s in split) and len({s[common] for s in split}) == 1:
        common += 1
    owner = ".".join(split[0][:common])
    rel = [".".join(s[common:]) for s in split]
    if all("." not in r for r in rel):
        ordered = tuple(sorted(rel, key=lambda r: _ORDER.get(r, len(_ORDER))))
        if ordered in CONVENTION_NAMES:
            full = tuple(f"{owner}.{r}" if owner else r for r in ordered)
            return (f"{owner}.{CONVENTION_NAMES[ordered]}" if owner else CONVENTION_NAMES[ordered]), full
    fused = FUSED_PREFIX + "__".join(r.replace(".", "-") for r in rel)
    return (f"{owner}.{fused}" if owner else fused), tuple(names)


def decode_group(fused_name: str) -> tuple[str, ...] | None:
    """The part names of a fused module name written by `group_name` (None: not a generic group name)."""
    owner, _, leaf = fused_name.rpartition(".")
    if leaf in _CONVENTION_PARTS:
        rel = _CONVENTION_PARTS[leaf]
    elif leaf.startswith(FUSED_PREFIX):
        rel = tuple(r.replace("-", ".") for r in leaf[len(FUSED_PREFIX) :].split("__"))
    else:
        return None
    return tuple(f"{owner}.{r}" if owner else r for r in rel)


def fuse_groups(model: nn.Module, groups: dict[str, tuple[str, ...]]) -> int:
    """Fuse each group ({fused name: part names}) in place; returns how many were fused (others: already)."""
    from . import fuse_linears

    n = 0
    for fused, parts in groups.items():
        owner_name, _, leaf = fused.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        locations = {}
        for p in parts:
            parent_name, _, attr = p.rpartition(".")
            locations[p[len(owner_name) + 1 :] if owner_name else p] = (
                model.get_submodule(parent_name) if parent_name else model,
                attr,
            )
        n += fuse_linears(owner, leaf, locations) is not None
    return n


def fuse_from_plan(model: nn.Module) -> int:
    plan = getattr(model, "_svdq_plan", None)
    if plan is None:
        raise ValueError(f"{type(model).__name__}: no generic plan; run svdq.models.generic.analyze(model, run) first")
    return fuse_groups(model, plan.groups)


def named_groups(layer_names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Fused groups named in a checkpoint's quantized-layer names (``<fused>.linear``)."""
    groups = {}
    for n in layer_names:
        if n.endswith(".linear"):
            fused = n[: -len(".linear")]
            parts = decode_group(fused)
            if parts is not None:
                groups[fused] = parts
    return groups


def fuse_named(model: nn.Module, layer_names: Iterable[str]) -> int:
    """Fuse a fresh 16-bit skeleton as the checkpoint with these layer names was (no trace needed)."""
    groups = named_groups(layer_names)
    for fused, parts in groups.items():
        for p in parts:
            try:
                m = model.get_submodule(p)
            except AttributeError:
                raise ValueError(
                    f"fused layer {fused!r} of the checkpoint has part {p!r}, which {type(model).__name__} lacks"
                ) from None
            if type(m) is not nn.Linear:
                raise ValueError(f"fused layer {fused!r}: part {p!r} of {type(model).__name__} is a {type(m).__name__}")
    return fuse_groups(model, groups)


def family_from_plan(model: nn.Module):
    """A `Family` for a model analyzed by `analyze` (exact layer names), or None."""
    from . import Family

    plan = getattr(model, "_svdq_plan", None)
    if plan is None or plan.class_name != type(model).__name__:
        return None
    return Family(
        "generic",
        (plan.class_name,),
        tuple(plan.fp16) + tuple(plan.modulation),
        fuse_from_plan,
        "transformer",
        adaln=tuple(plan.modulation),
    )


class _FirstForwardDone(Exception):
    """Raised by `analyze_pipeline`'s hook after the traced component's first forward: the rest of the pipeline
    call is not needed."""


def analyze_pipeline(pipe, prompt: str = "a photo", *, component: str | None = None, **call_kwargs) -> Plan:
    """`analyze` the pipeline's denoiser (or the denoiser ``component``, e.g. Wan 2.2's ``"transformer_2"``)
    with its first forward in ``pipe(prompt, **call_kwargs)``; the call stops right after it.

    ``num_inference_steps`` (default: the pipeline's) decides which timesteps come first: a component that runs
    only at low noise (Wan 2.2's ``transformer_2``, below ``boundary_ratio``) is reached after the other expert's
    steps, so give the step count you calibrate with. ValueError naming the component when it never runs."""
    from . import pipeline_model

    model = pipeline_model(pipe, component)
    name = component or "denoiser"
    kwargs = {**call_kwargs, "output_type": "latent"}
    previous = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    ran = []

    def stop(*_):  # registered after analyze's own hooks, so it runs after they have recorded the forward
        ran.append(True)
        raise _FirstForwardDone

    def run(_m):
        handle = model.register_forward_hook(stop)
        try:
            pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **kwargs)
        except _FirstForwardDone:
            pass
        finally:
            handle.remove()
        if not ran:
            raise ValueError(never_ran_message(pipe, name, kwargs.get("num_inference_steps")))

    try:
        return analyze(model, run)
    finally:
        pipe._progress_bar_config = previous


def never_ran_message(pipe, component: str, steps) -> str:
    """Why a pipeline call never ran the denoiser ``component`` (Wan 2.2: its experts split the timesteps)."""
    msg = (f"{type(pipe).__name__}'s {component} never ran during a pipeline call with "
           f"num_inference_steps={steps if steps is not None else 'its default'}")
    ratio = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
    if ratio is not None:
        msg += (f" (boundary_ratio={ratio}: transformer runs at timesteps >= {ratio} of the training timesteps, "
                "transformer_2 below; use more steps so that both experts run)")
    return msg


def is_diffusers_model(model: nn.Module) -> bool:
    from diffusers import ModelMixin

    return isinstance(model, ModelMixin)


__all__ = [
    "NoBlocksError",
    "Plan",
    "analyze",
    "analyze_pipeline",
    "decode_group",
    "family_from_plan",
    "find_blocks",
    "fuse_named",
    "group_name",
]
