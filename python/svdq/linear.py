"""`SVDQLinear`: the drop-in W4A4 replacement for `nn.Linear` (docs/numerics.md)."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from . import ops
from .ops import autograd
from .decompose import Decomposition, decompose
from .ops.reference import GROUP_SIZE, check_act_shift, padded_k, shift_bias

# Tensors in the canonical checkpoint layout (spec §3), in the order they are saved.
STORED_TENSORS = ("qweight", "wscales", "smooth", "lora_down", "lora_up")
log = logging.getLogger("svdq")
_FALLBACK_WARNED: set[str] = set()


def _warn_reference_fallback(backend: str) -> None:
    """Once per backend and process: shifted layers run the (slow) reference ops there."""
    if backend not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(backend)
        log.warning(
            "svdq: backend %r has no kernel for shifted unsigned activations (act_shift; docs/numerics.md §10, e.g. "
            "the mlp_fc2 layers of Nunchaku files or of svdq quantize --target nunchaku / --act-shift): those layers "
            "run the reference ops — exact, much slower (docs/kernels.md §13)", backend)


ACT_SHIFT_KEY = "act_shift"  # state_dict key of a shifted layer's activation shift (spec §10.3), fp32 [1]
FROZEN_TENSORS = ("qweight", "wscales")  # no gradient exists for them: `FrozenParameter`

# Weight-layout conversions since import (tests and benchmarks read and reset it): "convert" = a layer's
# resident weights rewritten in another backend's layout (on a move, a load, `prepare_layout`, or the first call
# after one); "transient" = a call that had to convert into a temporary because something outside the layer
# swapped canonical tensors in (accelerate's sequential offload restores them from its state-dict copy).
LAYOUT_STATS = {"convert": 0, "transient": 0}


class FrozenParameter(nn.Parameter):
    """A 4-bit layer's codes and their scales (``qweight``, ``wscales``, W4A16's ``wzeros``): a Parameter, not a
    buffer, because offload hooks (accelerate, diffusers group offloading) move parameters — but one that never
    requires grad. Integer tensors cannot (torch raises), and neither has a gradient (the codes are fixed), so
    ``requires_grad_`` leaves it frozen instead of raising: ``model.requires_grad_(True)`` (diffusers and PEFT
    training code calls it) then makes the layer's floating tensors trainable as torch would (smoothing,
    low-rank branch, bias: the backward covers them) and keeps the codes frozen. Setting ``.requires_grad =
    True`` on the tensor itself still raises (an explicit request that cannot be met)."""

    def __new__(cls, data=None, requires_grad=False):
        return super().__new__(cls, data, requires_grad=False)

    def requires_grad_(self, requires_grad: bool = True):
        return self

    def __reduce_ex__(self, proto):  # pickling (multiprocessing) keeps the class; nothing else to carry
        return (FrozenParameter, (self.data,))


def _frozen(t: torch.Tensor) -> nn.Parameter:
    # Parameters, not buffers: offload hooks (accelerate, diffusers group offloading) move parameters.
    return nn.Parameter(t.detach(), requires_grad=False)


def keep_frozen(module: nn.Module, names: tuple[str, ...]) -> None:
    """Make ``module``'s parameters ``names`` `FrozenParameter`s again where torch replaced them with plain ones
    (``load_state_dict(assign=True)``, `_apply`'s overwrite path): the class is restored on the object torch
    left in place, so hooks keyed on that Parameter still find it."""
    for name in names:
        p = module._parameters.get(name)
        if p is not None and type(p) is not FrozenParameter:
            if p.requires_grad:
                p.requires_grad = False
            p.__class__ = FrozenParameter


@contextlib.contextmanager
def plain_parameters(module: nn.Module, names: tuple[str, ...]):
    """Within: ``names`` are plain ``nn.Parameter``s (torch's own ``_apply`` / ``load_state_dict`` paths run
    unchanged: with ``torch.__future__.set_swap_module_params_on_conversion(True)`` they wrap the tensor in
    ``nn.Parameter(...)``, which refuses a Parameter subclass); after: `FrozenParameter`s again (`keep_frozen`)."""
    for name in names:
        p = module._parameters.get(name)
        if type(p) is FrozenParameter:
            p.__class__ = nn.Parameter
    try:
        yield
    finally:
        keep_frozen(module, names)


def _canonical_state_dict(module: "SVDQLinear", state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: the checkpoint layout whatever layout the layer computes from (ops rule 2)."""
    if module.layout != ops.CANONICAL:
        qweight, wscales = module.canonical_weights()
        state_dict[prefix + "qweight"], state_dict[prefix + "wscales"] = qweight, wscales
    if module.act_shift:
        # Spec §10.3: the shift is part of a shifted layer's numerics (its bias cancels it), so it travels with
        # the tensors; only shifted layers have the key (older readers refuse it as unexpected, never run it
        # signed).
        state_dict[prefix + ACT_SHIFT_KEY] = torch.tensor([module.act_shift], dtype=torch.float32, device=module.device)


def weight_standin(out_features: int, in_features: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A NaN [out_features, in_features] tensor holding one element (see `SVDQLinear.weight`)."""
    return torch.full((), float("nan"), dtype=dtype, device=device).expand(out_features, in_features)


class SVDQLinear(nn.Module):
    """y = W4A4(x/λ) + (x · lora_down · lora_scales) · lora_upᵀ + bias.

    Stored tensors (``nn.Parameter``s created with ``requires_grad=False``; ``qweight``/``wscales`` are
    `FrozenParameter`s that ``requires_grad_(True)`` leaves frozen; ``state_dict`` gives the canonical layout,
    spec §3): ``qweight`` int8 [N, Kp/2], ``wscales`` [N, Kp/64], ``smooth`` [K], ``lora_down`` [K, r],
    ``lora_up`` [N, r], ``bias`` [N] (or None). ``lora_scales`` fp32 [r] (a buffer, not saved) is the per-rank
    strength of the low-rank branch (ones for the SVD part; LoRA adapters set their own).
    The backend (``svdq.ops``) is picked per call from the input's device. ``qweight``/``wscales`` are held
    once, in the layout of the backend that runs them (``layout``; the storage rules in ``svdq.ops``): on the
    CPU the canonical tensors themselves, on CUDA the GEMM's layout (converted when the layer moves there).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 32,
        bias: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        act_format: str = "int4",
        act_shift: float = 0.0,
    ):
        super().__init__()
        # How activations are quantized at run time (not stored with the weights: both formats read the same
        # checkpoint): "int4" = W4A4 (spec §4), "fp8" = W4A8 (spec §8). Per call: `svdq.ops.use_act_format`.
        self.act_format = ops.check_act_format(act_format)
        # Shifted unsigned activations (spec §10): 0 = signed codes; δ > 0 = x + δ quantized to codes 0…15, with
        # the bias storing the shift's correction. Stored with the tensors (state_dict key "act_shift").
        self.act_shift = check_act_shift(act_shift)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"SVDQLinear needs positive sizes, got in={in_features} out={out_features}")
        if not dtype.is_floating_point:
            raise ValueError(f"SVDQLinear dtype must be a floating dtype, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        kp = padded_k(in_features)
        f = dict(dtype=dtype, device=device)
        self.qweight = FrozenParameter(torch.zeros(out_features, kp // 2, dtype=torch.int8, device=device))
        self.wscales = FrozenParameter(torch.zeros(out_features, kp // GROUP_SIZE, **f))
        self.smooth = _frozen(torch.ones(in_features, **f))
        self.lora_down = _frozen(torch.zeros(in_features, rank, **f))
        self.lora_up = _frozen(torch.zeros(out_features, rank, **f))
        self.bias = _frozen(torch.zeros(out_features, **f)) if bias else None
        self.register_buffer("lora_scales", torch.ones(rank, dtype=torch.float32, device=device), persistent=False)
        # Which backend layout qweight/wscales are in when not canonical (see `layout`).
        self._layout = ops.CANONICAL
        self.register_state_dict_post_hook(_canonical_state_dict)

    @property
    def rank(self) -> int:
        return self.lora_down.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        # smooth is always in the model dtype (wscales is not once prepared: fp32 bits, ops rule 4).
        return self.smooth.dtype

    @property
    def layout(self) -> str:
        """The layout of the resident ``qweight``/``wscales``: ``"canonical"`` or a backend's (``"cuda-g64"``).
        Read from the tensors (canonical scales are floating, prepared ones int32 bits), so tensors that a hook
        swapped in behind the layer's back are never misread."""
        return ops.CANONICAL if self.wscales.is_floating_point() else self._layout

    # ---- the nn.Linear surface: what diffusers and user code read off a Linear -----------------------------
    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def weight(self) -> torch.Tensor:
        """nn.Linear's ``weight`` metadata for code that reads it (diffusers casts inputs to
        ``to_q.weight.dtype``, checks ``.device`` / ``.shape``): a [out_features, in_features] tensor of the
        compute dtype on the layer's device. Its values are NaN (one stored element, expanded): the 4-bit weight
        is not a dense matrix, so arithmetic with this stand-in is loudly wrong instead of silently so, and
        writes to it raise."""
        return weight_standin(self.out_features, self.in_features, self.dtype, self.device)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int = 32, smooth: torch.Tensor | None = None, act_shift: float = 0.0
    ) -> "SVDQLinear":
        """Quantize ``linear`` (data-free when ``smooth`` is None). The rank is padded to a multiple of 16.
        ``act_shift`` δ > 0: shifted unsigned activations (spec §10; for inputs ≥ −δ, e.g. after GELU)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        dec = decompose(linear.weight, rank, smooth)
        return cls.from_decomposition(dec, linear.bias, act_shift=act_shift)

    @classmethod
    def from_decomposition(cls, dec: Decomposition, bias: torch.Tensor | None, act_shift: float = 0.0) -> "SVDQLinear":
        """The layer of a decomposition. ``act_shift`` δ > 0: a shifted layer (spec §10), whose stored bias is
        ``shift_bias`` (b − δ·Σ_k Ŵq/λ from the stored codes; a bias tensor even when ``bias`` is None)."""
        act_shift = check_act_shift(act_shift)
        n, k = dec.lora_up.shape[0], dec.smooth.shape[0]
        has_bias = bias is not None or act_shift != 0.0
        layer = cls(k, n, dec.rank, has_bias, dec.wscales.dtype, dec.wscales.device, act_shift=act_shift)
        with torch.no_grad():
            for name in STORED_TENSORS:
                getattr(layer, name).copy_(getattr(dec, name))
            if act_shift:
                layer.bias.copy_(shift_bias(bias, dec.qweight, dec.wscales, dec.smooth, act_shift))
            elif bias is not None:
                layer.bias.copy_(bias.detach())
        layer._settle()
        return layer

    def set_lowrank(self, lora_down: torch.Tensor, lora_up: torch.Tensor, lora_scales: torch.Tensor) -> None:
        """Replace the whole low-rank branch (used by LoRA hot-swap); the 4-bit tensors are not touched."""
        r = lora_down.shape[1]
        if lora_down.shape != (self.in_features, r) or lora_up.shape != (self.out_features, r):
            raise ValueError(
                f"low-rank branch shapes {tuple(lora_down.shape)}, {tuple(lora_up.shape)} do not fit a "
                f"[{self.in_features} -> {self.out_features}] layer"
            )
        if lora_scales.shape != (r,):
            raise ValueError(f"lora_scales must have shape ({r},), got {tuple(lora_scales.shape)}")
        self.lora_down = _frozen(lora_down.to(self.dtype).contiguous())
        self.lora_up = _frozen(lora_up.to(self.dtype).contiguous())
        self.lora_scales = lora_scales.to(torch.float32).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.dtype not in ops.INPUT_DTYPES:  # the error, named
            ops.check_input(x, f"SVDQLinear [{self.in_features} -> {self.out_features}]")  # (no f-string per call)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"SVDQLinear expects inputs with last dimension {self.in_features}, got shape {tuple(x.shape)}"
            )
        backend = ops.select_backend(x.device)
        if backend.name in ("cuda", "cuda-sm90") and self.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"SVDQLinear [{self.in_features} -> {self.out_features}] stores {self.dtype}; the CUDA kernels run "
                "bf16/fp16 layers: convert the model once with model.to(torch.bfloat16) (or torch.float16), e.g. a "
                "checkpoint quantized in fp32 on a CPU"
            )
        if x.numel() == 0:  # M = 0 (any leading dims), as nn.Linear allows: no kernel launch, an empty result
            return x.new_empty((*x.shape[:-1], self.out_features))
        # Any stride, as nn.Linear takes (transposed / sliced views): the kernels read dense rows of K.
        x = x.contiguous()
        qweight, wscales = self._weights_for(backend)
        scales = None if self.rank == 0 else self.lora_scales
        act_format = ops.act_format_override() or self.act_format
        shift = self.act_shift
        if shift:
            if act_format != "int4":
                raise ValueError(
                    f"SVDQLinear [{self.in_features} -> {self.out_features}] has shifted unsigned activations "
                    f"(act_shift={shift}, spec §10): it runs W4A4 (act_format='int4') only, not {act_format!r}"
                )
            if not backend.shifted_act:  # no fused kernel for §10 here yet: the reference ops, canonical weights
                _warn_reference_fallback(backend.name)
                backend = ops.registered_backend("reference")
                qweight, wscales = self.canonical_weights()
        if autograd.needs_grad(x, self.smooth, self.lora_down, self.lora_up, self.bias, scales):
            if shift and self.smooth.requires_grad:
                raise NotImplementedError(
                    f"SVDQLinear [{self.in_features} -> {self.out_features}]: no gradient for the smoothing of a "
                    "shifted layer (act_shift; spec §9's formula assumes unshifted inputs); freeze `smooth`"
                )
            # Training / input gradients: the same forward, plus a backward (svdq.ops.autograd, spec §9).
            return autograd.svdq_linear(
                x, self.smooth, self.lora_down, self.lora_up, self.bias, scales,
                forward_fn=lambda x_, s, d, u, b, sc: ops.svdq_linear(
                    x_, qweight, wscales, s, d, u, b, sc, backend=backend.name, act_format=act_format,
                    act_shift=shift),
                weights_fn=self.canonical_weights, qweight=self.qweight, wscales=self.wscales,
            )
        return ops.svdq_linear(
            x, qweight, wscales, self.smooth, self.lora_down, self.lora_up, self.bias, scales, backend=backend.name,
            act_format=act_format, act_shift=shift,
        )

    def _weights_for(self, backend: ops.Backend) -> tuple[torch.Tensor, torch.Tensor]:
        """The 4-bit weights in ``backend``'s layout, as its GEMM takes them (prepared scales as fp32)."""
        held = self.layout
        if held == backend.layout:
            if held == ops.CANONICAL:
                return self.qweight, self.wscales
            return self.qweight, self.wscales.view(torch.float32)
        # Another layout than this backend's: the first call after a switch of backend, or canonical tensors
        # swapped in by a hook. Keep the conversion (one copy) unless hooks own this layer's tensors (they
        # would restore or coerce them) or torch.compile is tracing (no module mutation in a graph).
        qweight, wscales = self.canonical_weights()
        if backend.layout != ops.CANONICAL:
            qweight, wscales = backend.prepare_weight(qweight, wscales)
        if torch.compiler.is_compiling():
            return qweight, wscales
        if self._accelerate_offloads():
            LAYOUT_STATS["transient"] += 1
            return qweight, wscales
        self._store(qweight, wscales, backend.layout)
        LAYOUT_STATS["convert"] += 1
        return qweight, wscales

    def _accelerate_offloads(self) -> bool:
        """Whether an accelerate hook offloads this layer's tensors: it restores them before each call from its
        copy of the state dict (canonical), coerced to the dtype each tensor had when the hook was attached, so
        the layer must stay canonical under it (conversions are per-call transients). diffusers' hooks move the
        tensors the layer holds (`param.data = ...`) and are fine with a kept conversion."""
        hook = getattr(self, "_hf_hook", None)
        return hook is not None and any(getattr(h, "offload", False) for h in getattr(hook, "hooks", (hook,)))

    def __setattr__(self, name, value):
        if name == "_old_forward" and "_parameters" in self.__dict__:
            # accelerate's add_hook_to_module sets `_old_forward` right before the hook's init_hook records the
            # tensors (their dtype included, see `_accelerate_offloads`): be canonical by then.
            self.prepare_layout(ops.CANONICAL)
        super().__setattr__(name, value)

    def canonical_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(qweight, wscales)`` in the canonical layout (spec §3), converted when the layer holds another one."""
        qweight, wscales = self.qweight.detach(), self.wscales.detach()
        if self.layout == ops.CANONICAL:
            return qweight, wscales
        return ops.unprepare_weight(qweight, wscales.view(torch.float32), self._layout, self.dtype,
                                    out_features=self.out_features)

    def prepare_layout(self, layout: str) -> None:
        """Hold the weights in ``layout`` (``"canonical"`` or a backend's), wherever they are: e.g. the CUDA
        layout on the CPU before an offload hook takes its copies, so that they travel prepared."""
        if self.qweight.device.type == "meta" or self.layout == layout:
            return
        qweight, wscales = self.canonical_weights()
        if layout != ops.CANONICAL:
            qweight, wscales = ops.layout_backend(layout).prepare_weight(qweight, wscales)
        self._store(qweight, wscales, layout)
        LAYOUT_STATS["convert"] += 1

    def _store(self, qweight: torch.Tensor, wscales: torch.Tensor, layout: str) -> None:
        """Replace the resident weights (in place: the Parameter objects stay, hooks keyed on them still work)."""
        if layout != ops.CANONICAL:
            wscales = wscales.view(torch.int32)  # ops rule 4
            for name, t in (("qweight", qweight), ("wscales", wscales)):
                if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                    raise RuntimeError(
                        f"SVDQLinear [{self.in_features} -> {self.out_features}]: the {layout} layout's {name} "
                        f"{tuple(t.shape)} is a view of a larger buffer; a copy would drop bytes the kernel "
                        "reads (svdq.ops rule 5)"
                    )
        with torch.no_grad():
            self.qweight.data = qweight
            self.wscales.data = wscales
        self._layout = layout

    def _settle(self) -> None:
        """Hold the weights in the layout of the backend that runs them on their device (done on moves and
        loads, so calls never convert). On the CPU a prepared layout is kept: offloaded weights wait there for
        their accelerator, and a CPU call converts once should it run there."""
        device = self.qweight.device
        if device.type == "meta" or (device.type == "cpu" and self.layout != ops.CANONICAL):
            return
        try:
            backend = ops.select_backend(device)
        except ValueError:  # no backend runs on this device (or `use_backend` names one for another device)
            return
        if backend.layout == self.layout:
            return
        try:
            self.prepare_layout(backend.layout)
        except ValueError:
            # A layout the backend cannot build for this layer (fp32 scales on CUDA): stay canonical; forward
            # raises the clear error should the layer run there.
            pass

    def _apply(self, fn, recurse=True):
        dtype = self.dtype
        with plain_parameters(self, FROZEN_TENSORS):
            result = super()._apply(fn, recurse)
        # `.to(dtype)` converts every floating tensor; the per-rank strengths are fp32 by spec (§4.1).
        self.lora_scales = self.lora_scales.to(torch.float32)
        if self.layout != ops.CANONICAL and self.dtype != dtype:
            # `.to(dtype)` left the int32 scale bits alone: round them as it rounds canonical scales.
            qweight, wscales = ops.unprepare_weight(
                self.qweight.detach(), self.wscales.detach().view(torch.float32), self._layout, dtype,
                out_features=self.out_features,
            )
            self._store(qweight, wscales.to(self.dtype), ops.CANONICAL)
        self._settle()
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The incoming tensors are canonical: load them into canonical tensors, then settle for the device.
        self.prepare_layout(ops.CANONICAL)
        key = prefix + ACT_SHIFT_KEY
        if key in state_dict:  # a shifted layer (spec §10.3); the key's absence means signed (0)
            t = state_dict[key]
            if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point():
                error_msgs.append(f"{key}: expected one floating value (the activation shift), got {t!r}")
                return
            try:
                self.act_shift = check_act_shift(float(t.reshape(())))
            except ValueError as e:
                error_msgs.append(f"{key}: {e}")
                return
        elif prefix + "qweight" in state_dict:  # this layer's tensors without the key: a signed layer
            self.act_shift = 0.0
        # (neither: a partial state dict without this layer, e.g. load_state_dict(strict=False) of other modules)
        with plain_parameters(self, FROZEN_TENSORS):
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        self._settle()

    def weight_bytes(self) -> int:
        """Bytes of the stored weights (4-bit + scales + smoothing + low-rank + bias)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, dtype={self.dtype}"
            + (f", act_format={self.act_format}" if self.act_format != "int4" else "")
            + (f", act_shift={self.act_shift}" if self.act_shift else "")
        )


def prepare_layout(model: nn.Module, backend: str) -> int:
    """Hold the weights of every `SVDQLinear` in ``model`` in the layout of backend ``backend`` (e.g.
    ``"cuda"``), in place and wherever they are now; returns how many layers changed.

    For offloading: a model loaded on the CPU holds the canonical layout, and the hooks that carry weights to
    the GPU (diffusers group offloading, accelerate) take their copies from it; preparing first makes them
    carry the GPU's layout, so no step repacks. ``model.to("cuda")`` needs no call (layers convert on arrival)."""
    layout = ops.registered_backend(backend).layout
    layers = [m for m in model.modules() if isinstance(m, SVDQLinear)]
    changed = sum(m.layout != layout for m in layers)
    for m in layers:
        m.prepare_layout(layout)
    return changed


def set_act_format(model: nn.Module, act_format: str, include: str | tuple[str, ...] = "*") -> int:
    """Set ``act_format`` ("int4" | "fp8") on the `SVDQLinear` layers of ``model`` whose qualified names match
    an fnmatch pattern of ``include``; returns how many layers were set (0 raises: a pattern that matches
    nothing is a mistake)."""
    import fnmatch

    ops.check_act_format(act_format)
    patterns = (include,) if isinstance(include, str) else tuple(include)
    hits = [m for name, m in model.named_modules()
            if isinstance(m, SVDQLinear) and any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not hits:
        raise ValueError(f"set_act_format: no SVDQLinear layer of the model matches {patterns}")
    for m in hits:
        m.act_format = act_format
    return len(hits)
