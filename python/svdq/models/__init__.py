"""Per-family layer mappings: which projections share one quantized layer, and which layers stay 16-bit.

Supported diffusers classes (docs/models.md explains every choice):

    family   class                      fused groups (one W4A4 GEMM each)
    flux     FluxTransformer2DModel     attn.to_q/k/v → attn.to_qkv; attn.add_q/k/v_proj → attn.to_added_qkv;
                                        single blocks: attn.to_q/k/v + proj_mlp → to_qkv_mlp
    sdxl     UNet2DConditionModel       attn1.to_q/k/v → attn1.to_qkv; attn2.to_k/v → attn2.to_kv
    pixart   PixArtTransformer2DModel   attn1.to_q/k/v → attn1.to_qkv; attn2.to_k/v → attn2.to_kv

Fusion (`prepare`) happens before quantization, on the 16-bit model (`svdq.calibrate_pipeline` and
`svdq quantize` do it; for data-free quantization from Python call `svdq.models.prepare(model)` first): the group's weights are concatenated
into one `nn.Linear` registered under the fused name, so `svdq.quantize` records calibration statistics for
that one layer and gives it one smoothing factor and one low-rank branch. The original attributes
(`attn.to_q`, `block.proj_mlp`, ...) become `ProjectionSlice` stand-ins that hold no weights: calling one runs
the fused layer once per input tensor and returns that projection's columns, so diffusers' own forward code
and attention processors run unchanged (as do schedulers, callbacks and `enable_model_cpu_offload`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

log = logging.getLogger("svdq")


class _PartsCache:
    """One thread's cached fused output: the input it was computed from (identity and version), the output,
    and which parts have been taken."""

    __slots__ = ("x", "version", "y", "taken")

    def __init__(self, x: torch.Tensor, version: int | None, y: torch.Tensor):
        self.x, self.version, self.y, self.taken = x, version, y, set()


class SharedInputLinear(nn.Module):
    """Several projections of the same input computed by one linear layer (`linear`: nn.Linear or SVDQLinear).

    ``forward(x)`` is the whole fused layer (what diffusers' own fused-projection path calls: FLUX double
    blocks run ``attn.to_qkv`` / ``attn.to_added_qkv`` this way, no cache involved). ``part(i, x)`` returns
    projection i of ``x`` for the `ProjectionSlice` stand-ins: the first part asked for a given input tensor
    runs the whole layer; the result is kept until every part has been taken (then dropped), so each input is
    multiplied once. A different input tensor — or the same one modified in place — recomputes.

    The cache is per thread (a dict keyed by thread id: threads running the same model never see each
    other's inputs or outputs) and, under torch.compile, lives only inside the traced graph.
    """

    def __init__(self, linear: nn.Module, names: tuple[str, ...], sizes: tuple[int, ...]):
        super().__init__()
        if sum(sizes) != linear.out_features:
            raise ValueError(f"part sizes {sizes} do not add up to out_features={linear.out_features}")
        self.linear = linear
        self.names = tuple(names)
        self.sizes = tuple(sizes)
        self.offsets = tuple(sum(sizes[:i]) for i in range(len(sizes)))
        self._caches: dict[int, _PartsCache] = {}
        self._clear()

    def _clear(self) -> None:
        # The traced (torch.compile) cache: module attributes Dynamo can follow. Each compiled call starts and
        # ends with it cleared (all parts are taken inside one graph), so threads never share a live entry.
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._taken: set[int] = set()

    @staticmethod
    def _version(x: torch.Tensor) -> int | None:
        try:
            return x._version
        except RuntimeError:  # inference-mode tensors have no version counter (and cannot be modified)
            return None

    def _slice(self, y: torch.Tensor, index: int) -> torch.Tensor:
        return y[..., self.offsets[index] : self.offsets[index] + self.sizes[index]]

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Dynamo traces this cache (identity test, attribute and set updates) into one call of the fused
            # layer per input; the tensor version counter it cannot trace, and in-place updates of a
            # projection's input between its parts do not happen inside diffusers' attention.
            if self._x is not x or index in self._taken:
                self._clear()
                self._y = self.linear(x)
                self._x = x
            y = self._slice(self._y, index)
            self._taken.add(index)
            if len(self._taken) == len(self.sizes):
                self._clear()
            return y
        # Eager: one entry per thread. Dict get/set/pop of distinct keys are atomic under the GIL, and an entry
        # is only ever touched by its own thread.
        tid = threading.get_ident()
        entry = self._caches.get(tid)
        version = self._version(x)
        if entry is None or entry.x is not x or entry.version != version or index in entry.taken:
            entry = _PartsCache(x, version, self.linear(x))
            self._caches[tid] = entry
        y = self._slice(entry.y, index)
        entry.taken.add(index)
        if len(entry.taken) == len(self.sizes):
            self._caches.pop(tid, None)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_caches"] = {}  # cached activations are per call, never part of a copy or a pickle
        return state

    def _apply(self, fn, recurse=True):
        self._caches = {}
        self._clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"parts={dict(zip(self.names, self.sizes))}"


class ProjectionSlice(nn.Module):
    """Stands where one fused projection was (e.g. ``attn.to_q``); holds no weights.

    ``fused`` is the owning `SharedInputLinear` (registered once, under its own name, so it is neither saved
    twice nor visited twice by ``.to()``), ``index`` the part, ``offset`` / ``out_features`` its output rows
    in the fused layer (what LoRA mapping needs).
    """

    def __init__(self, fused: SharedInputLinear, index: int, in_features: int):
        super().__init__()
        object.__setattr__(self, "fused", fused)  # a plain reference, not a submodule
        self.index = index
        self.in_features = in_features
        self.out_features = fused.sizes[index]
        self.offset = fused.offsets[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(self.index, x)

    # nn.Linear's surface, for code that reads it off ``attn.to_q`` (see `SVDQLinear.weight`).
    @property
    def weight(self) -> torch.Tensor:
        from ..linear import weight_standin

        lin = self.fused.linear
        if isinstance(lin, nn.Linear):  # not quantized yet: the real rows (a view)
            return lin.weight[self.offset : self.offset + self.out_features]
        return weight_standin(self.out_features, self.in_features, lin.dtype, lin.device)

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.fused.linear.bias
        return None if b is None else b[self.offset : self.offset + self.out_features]

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def extra_repr(self) -> str:
        return f"{self.fused.names[self.index]}: rows {self.offset}:{self.offset + self.out_features} of the fused layer"


def fuse_linears(owner: nn.Module, fused_name: str, parts: dict[str, tuple[nn.Module, str]]) -> SharedInputLinear | None:
    """Concatenate the `nn.Linear` layers ``parts`` ({label: (parent, attribute)}) into ``owner.<fused_name>``.

    Returns the new `SharedInputLinear`, or None when the group is already fused or not all plain Linears
    (e.g. already quantized, or wrapped by another library): then nothing changes.
    """
    linears = [getattr(parent, attr, None) for parent, attr in parts.values()]
    if any(type(m) is not nn.Linear for m in linears):
        return None
    k = linears[0].in_features
    if any(m.in_features != k for m in linears):
        raise ValueError(f"cannot fuse {list(parts)}: different input sizes {[m.in_features for m in linears]}")
    ref = linears[0].weight
    has_bias = any(m.bias is not None for m in linears)
    fused = nn.Linear(k, sum(m.out_features for m in linears), bias=has_bias, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears]))
        if has_bias:
            fused.bias.copy_(
                torch.cat([m.bias if m.bias is not None else torch.zeros_like(m.weight[:, 0]) for m in linears])
            )
    group = SharedInputLinear(fused, tuple(parts), tuple(m.out_features for m in linears))
    # Plain references (a list is not registered as submodules), for `unfuse`.
    group._origin = [owner, fused_name, list(parts.values()), [m.bias is not None for m in linears]]
    owner.add_module(fused_name, group)
    for i, (parent, attr) in enumerate(parts.values()):
        setattr(parent, attr, ProjectionSlice(group, i, k))
    return group


@dataclass(frozen=True)
class Family:
    """How svdq treats one diffusers model class."""

    name: str
    classes: tuple[str, ...]  # diffusers class names (subclasses match too)
    exclude: tuple[str, ...]  # fnmatch patterns of nn.Linear names kept 16-bit by default
    fuse: Callable[[nn.Module], int]  # fuses the shared-input groups in place; returns how many were fused
    pipeline_component: str  # the pipeline attribute holding the model ("transformer" / "unet")
    # The timestep-conditioning modulation linears (AdaLN): 16-bit by default; `svdq.quantize(weight_only=
    # family.adaln)` / `svdq quantize --adaln w4a16` makes them weight-only 4-bit (W4A16, docs/models.md).
    adaln: tuple[str, ...] = ()
    # fuse(model, layer_names) for a 16-bit skeleton about to load a checkpoint with those quantized-layer names,
    # where the names choose between fusions (None: `fuse`)
    checkpoint_fuse: Callable[[nn.Module, list[str]], int] | None = None


def _fused_projections_noop(*args, **kwargs) -> None:
    """Stands in for diffusers' ``Attention.fuse_projections`` / ``unfuse_projections`` on an attention whose
    projections svdq has fused (``model.fuse_qkv_projections()`` must neither concatenate the stand-ins'
    weights nor delete the quantized fused layer)."""


def _own_fusion(attn: nn.Module, diffusers_path: bool) -> None:
    """Mark ``attn`` as fused by svdq. ``diffusers_path``: its fused layers sit under diffusers' own names
    (``to_qkv`` / ``to_added_qkv`` / ``to_kv``), so diffusers' fused-projection code path runs them directly
    (one call of the fused layer, no input cache): FLUX's processor reads ``attn.fused_projections``, the
    SDXL / PixArt ``Attention`` needs `FusedAttnProcessor2_0` (set when it runs the default processor)."""
    saved = {k: attn.__dict__[k] for k in ("fused_projections", "_supports_qkv_fusion") if k in attn.__dict__}
    object.__setattr__(attn, "_svdq_fusion_saved", (saved, getattr(attn, "processor", None)))
    attn._supports_qkv_fusion = False  # diffusers' AttentionMixin.fuse/unfuse_qkv_projections skip it
    attn.fuse_projections = _fused_projections_noop  # the older Attention class has no such guard
    attn.unfuse_projections = _fused_projections_noop
    if diffusers_path:
        attn.fused_projections = True
        processor = getattr(attn, "processor", None)
        if type(processor).__name__ == "AttnProcessor2_0" and hasattr(attn, "set_processor"):
            from diffusers.models.attention_processor import FusedAttnProcessor2_0

            attn.set_processor(FusedAttnProcessor2_0())


def _release_fusion(attn: nn.Module) -> None:
    """Undo `_own_fusion` (used by `unfuse`)."""
    saved = attn.__dict__.pop("_svdq_fusion_saved", None)
    if saved is None:
        return
    attrs, processor = saved
    for k in ("fused_projections", "_supports_qkv_fusion", "fuse_projections", "unfuse_projections"):
        attn.__dict__.pop(k, None)
    attn.__dict__.update(attrs)
    if processor is not None and hasattr(attn, "set_processor"):
        attn.set_processor(processor)


def _fuse_flux(model: nn.Module, layer_names=None) -> int:
    """`fuse_flux`, for a checkpoint with these quantized-layer names: single blocks as its names say."""
    return fuse_flux(model, single_with_mlp=not any(_NUNCHAKU_SINGLE_QKV.fullmatch(n) for n in layer_names or ()))


def fuse_flux(model: nn.Module, single_with_mlp: bool = True) -> int:
    """FLUX.1's shared-input groups: double blocks' q/k/v and added q/k/v; single blocks' q/k/v together with
    proj_mlp (``to_qkv_mlp``), or with ``single_with_mlp=False`` q/k/v alone (``attn.to_qkv``, proj_mlp apart:
    how Nunchaku's files hold them, `svdq.formats.nunchaku_flux`)."""
    n = 0
    for block in model.transformer_blocks:
        a = block.attn
        qkv = fuse_linears(a, "to_qkv", {"to_q": (a, "to_q"), "to_k": (a, "to_k"), "to_v": (a, "to_v")})
        added = fuse_linears(
            a,
            "to_added_qkv",
            {"add_q_proj": (a, "add_q_proj"), "add_k_proj": (a, "add_k_proj"), "add_v_proj": (a, "add_v_proj")},
        )
        n += (qkv is not None) + (added is not None)
        if qkv is not None and added is not None:
            _own_fusion(a, diffusers_path=True)  # FluxAttnProcessor: attn.to_qkv(x).chunk(3), to_added_qkv(c)
    for block in model.single_transformer_blocks:
        a = block.attn
        if not single_with_mlp:
            if fuse_linears(a, "to_qkv", {"to_q": (a, "to_q"), "to_k": (a, "to_k"), "to_v": (a, "to_v")}) is not None:
                n += 1
                _own_fusion(a, diffusers_path=True)  # FluxAttnProcessor: attn.to_qkv(x).chunk(3) when fused
            continue
        parts = {"attn.to_q": (a, "to_q"), "attn.to_k": (a, "to_k"), "attn.to_v": (a, "to_v"), "proj_mlp": (block, "proj_mlp")}
        if fuse_linears(block, "to_qkv_mlp", parts) is not None:
            n += 1
            # q/k/v and the MLP input share one layer, which diffusers has no fused path for: the
            # ProjectionSlice stand-ins (per-thread cache) serve the attention processor and proj_mlp.
            _own_fusion(a, diffusers_path=False)
    return n


_NUNCHAKU_SINGLE_QKV = re.compile(r"single_transformer_blocks\.\d+\.attn\.to_qkv\.linear")


def _fuse_basic_transformer_blocks(model: nn.Module) -> int:
    """diffusers `BasicTransformerBlock`s (SDXL, PixArt): self-attention q/k/v, cross-attention k/v."""
    from diffusers.models.attention import BasicTransformerBlock

    n = 0
    for block in [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]:
        for attn_name in ("attn1", "attn2"):
            a = getattr(block, attn_name, None)
            if a is None:
                continue
            if getattr(a, "is_cross_attention", False):  # q reads the image tokens, k/v the text
                group = fuse_linears(a, "to_kv", {"to_k": (a, "to_k"), "to_v": (a, "to_v")})
            else:
                group = fuse_linears(a, "to_qkv", {"to_q": (a, "to_q"), "to_k": (a, "to_k"), "to_v": (a, "to_v")})
            if group is not None:
                n += 1
                _own_fusion(a, diffusers_path=True)  # FusedAttnProcessor2_0: attn.to_qkv(x) / attn.to_kv(c)
    return n


# Shared with svdq.quantize.DEFAULT_EXCLUDE (embeddings, AdaLN modulation, final projection, norm_out).
_COMMON_EXCLUDE = (
    "*embed*",
    "proj_out",
    "norm_out*",
    "*norm*.linear",
    "adaln_single*",
    "caption_projection*",
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "flux",
            ("FluxTransformer2DModel",),
            _COMMON_EXCLUDE,
            _fuse_flux,
            "transformer",
            # double blocks (image / text stream) and single blocks; not norm_out.linear (final layer)
            adaln=("*.norm1.linear", "*.norm1_context.linear", "single_transformer_blocks.*.norm.linear"),
            checkpoint_fuse=_fuse_flux,
        ),
        Family(
            "sdxl",
            ("UNet2DConditionModel",),
            _COMMON_EXCLUDE
            + (
                "*time_emb_proj",  # ResNet timestep projections: one row per image, act like a per-channel bias
                "*attentions.*.proj_in",  # the conv feature map ↔ transformer boundary (see docs/models.md)
                "*attentions.*.proj_out",
            ),
            _fuse_basic_transformer_blocks,
            "unet",
            adaln=("*time_emb_proj",),  # SDXL has no AdaLN; the ResNets' timestep projections play its part
        ),
        Family(
            "pixart",
            ("PixArtTransformer2DModel",),
            _COMMON_EXCLUDE,
            _fuse_basic_transformer_blocks,
            "transformer",
            adaln=("adaln_single.linear",),  # the shared AdaLN-single modulation (not its timestep embedder)
        ),
    )
}


def family_of(model: nn.Module) -> Family | None:
    """The `Family` of ``model`` (by its diffusers class or a base class), or None for other models."""
    names = {c.__name__ for c in type(model).__mro__}
    for family in FAMILIES.values():
        if names.intersection(family.classes):
            return family
    # Any other diffusers transformer, once `generic.analyze` traced it (svdq.calibrate_pipeline does).
    from .generic import family_from_plan

    return family_from_plan(model)


def get_family(name: str) -> Family:
    if name == "generic":  # per model: its plan comes from a traced forward (svdq.models.generic)
        return Family("generic", (), (), lambda model: 0, "transformer")
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; svdq supports {sorted(FAMILIES)}")
    return FAMILIES[name]


def prepare(model: nn.Module, layer_names=None) -> Family | None:
    """Fuse ``model``'s shared-input projections in place (idempotent); returns its family (None: unknown,
    nothing done). Called by `svdq.calibrate_pipeline` / `svdq quantize` before quantization, and by
    `svdq.load` on a 16-bit skeleton whose checkpoint has fused layers (``layer_names``: its quantized layers),
    so the module names match."""
    family = family_of(model)
    if family is None:
        return None
    if layer_names is not None and family.checkpoint_fuse is not None:
        n = family.checkpoint_fuse(model, list(layer_names))
    else:
        n = family.fuse(model)
    if n:
        log.info("svdq: fused %d shared-input projection groups of %s", n, type(model).__name__)
    return family


def pipeline_model(pipe, component: str | None = None) -> nn.Module:
    """The denoiser of a diffusers pipeline (``pipe.transformer`` or ``pipe.unet``), or the named
    ``component`` (e.g. ``"transformer_2"``: Wan 2.2 A14B's low-noise expert, see `denoiser_components`)."""
    if component is not None:
        model = getattr(pipe, component, None)
        if not isinstance(model, nn.Module):
            raise ValueError(f"{type(pipe).__name__} has no denoiser component {component!r} (its denoisers: "
                             f"{denoiser_components(pipe) if _has_denoiser(pipe) else 'none'})")
        return model
    for attr in ("transformer", "unet"):
        model = getattr(pipe, attr, None)
        if isinstance(model, nn.Module):
            return model
    raise ValueError(f"{type(pipe).__name__} has neither a transformer nor a unet to quantize")


def pipeline_component(pipe) -> str:
    """The name of the denoiser's pipeline component ("transformer" / "unet")."""
    return "transformer" if isinstance(getattr(pipe, "transformer", None), nn.Module) else "unet"


# Pipeline components that are a second denoiser next to ``transformer``: Wan 2.2 A14B's low-noise expert
# (WanPipeline runs ``transformer`` at timesteps >= boundary_ratio · num_train_timesteps, ``transformer_2`` below).
SECOND_DENOISERS = ("transformer_2",)


def _has_denoiser(pipe) -> bool:
    return any(isinstance(getattr(pipe, a, None), nn.Module) for a in ("transformer", "unet"))


def denoiser_components(pipe) -> list[str]:
    """The pipeline's denoiser components in the order they run: ``["transformer"]`` / ``["unet"]``, or
    ``["transformer", "transformer_2"]`` for a two-expert pipeline (Wan 2.2 A14B). `svdq quantize` quantizes
    each, calibrated on the timesteps it runs at."""
    first = pipeline_component(pipe)
    return [first] + [c for c in SECOND_DENOISERS if isinstance(getattr(pipe, c, None), nn.Module)]


# PixArt pipelines snap height/width to aspect-ratio bins defined for the released sample sizes only.
_PIXART_BINNED_SAMPLE_SIZES = (32, 64, 128, 256)


def call_defaults(pipe) -> dict:
    """Keyword arguments a pipeline call needs for this model beyond diffusers' defaults."""
    model = getattr(pipe, "transformer", None)
    if model is not None and family_of(model) is FAMILIES["pixart"]:
        if model.config.sample_size not in _PIXART_BINNED_SAMPLE_SIZES:
            return {"use_resolution_binning": False}
    return {}


def unfuse(model: nn.Module) -> int:
    """Undo `prepare` for the groups whose fused layer is still a 16-bit `nn.Linear` (not quantized yet):
    the original projections come back as `nn.Linear` with their exact weights. Returns how many groups."""
    n = 0
    for group in [m for m in model.modules() if isinstance(m, SharedInputLinear)]:
        origin = getattr(group, "_origin", None)
        if origin is None or type(group.linear) is not nn.Linear:
            continue
        owner, fused_name, locations, had_bias = origin
        for parent, _ in locations:
            if "_svdq_fusion_saved" in parent.__dict__:
                _release_fusion(parent)
        w, b = group.linear.weight, group.linear.bias
        for (parent, attr), offset, size, bias in zip(locations, group.offsets, group.sizes, had_bias):
            lin = nn.Linear(w.shape[1], size, bias=bias, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w[offset : offset + size])
                if bias:
                    lin.bias.copy_(b[offset : offset + size])
            setattr(parent, attr, lin)
        delattr(owner, fused_name)
        n += 1
    return n


FUSED_NAMES = ("to_qkv", "to_kv", "to_added_qkv", "to_qkv_mlp")


def has_fused_layers(layer_names) -> bool:
    """Whether quantized-layer names (a checkpoint's) come from a model fused by `prepare`."""
    from .generic import named_groups

    names = list(layer_names)
    return any(n.endswith(".linear") and n.split(".")[-2] in FUSED_NAMES for n in names) or bool(named_groups(names))


@contextlib.contextmanager
def fused_for_checkpoint(model: nn.Module, layer_names):
    """Fuse ``model`` (a 16-bit skeleton) when the checkpoint's layer names say it was fused; if the body
    raises, the fusion is undone, so a failed `svdq.load` leaves the skeleton as it was."""
    from . import generic

    hand_mapped = family_of(model) is not None and family_of(model).name != "generic"
    fused_here = has_fused_layers(layer_names) and not is_fused(model) and (
        hand_mapped or generic.is_diffusers_model(model)
    )
    if fused_here:
        # Hand-mapped families fuse by their own code; any other model by the names (generic groups).
        prepare(model, layer_names) if hand_mapped else generic.fuse_named(model, layer_names)
    try:
        yield
    except BaseException:
        if fused_here:
            unfuse(model)
        raise


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, SharedInputLinear) for m in model.modules())


__all__ = [
    "FAMILIES",
    "Family",
    "ProjectionSlice",
    "SharedInputLinear",
    "family_of",
    "fuse_linears",
    "get_family",
    "is_fused",
    "call_defaults",
    "denoiser_components",
    "pipeline_component",
    "pipeline_model",
    "prepare",
    "unfuse",
]
