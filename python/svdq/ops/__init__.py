"""The quantized layer's math as functions, one implementation per backend.

Backends: ``"reference"`` (pure PyTorch, docs/numerics.md), and — when the native extension ``svdq._C`` is
built — ``"cpu"`` (fused C++ kernels) and ``"cuda"`` (fused CUDA kernels, when a GPU is present).

Pick one with ``backend=`` on each call or ``with svdq.ops.use_backend("cpu"): ...``; by default the
fastest backend available for the tensor's device is used.

A backend is an object with ``name``, ``devices`` (device types it runs on), ``priority`` (higher wins by
default), ``quantize_act(...)`` and ``w4a4_gemm(...)`` with the signatures of ``svdq.ops.reference``, and
``prepare_weight(qweight, wscales) -> (qweight', wscales')``: the repack from the canonical checkpoint layout
(spec §3) into the layout its GEMM reads, named by ``layout``. The reference and CPU backends read the
canonical layout itself (``layout="canonical"``, ``prepare_weight`` returns its inputs: the CPU GEMM converts
the [N, Kp/64] scales to fp32 per call, a transient of 1/16 of the 4-bit weight). The CUDA backend's layout
``"cuda-g64"`` is group-major with fp32 scales (csrc/cuda/mma_layout.cuh §4).
On an H100/H200 (compute capability 9.0) with ``SVDQ_SM90_FP8=1`` the backend ``"cuda-sm90"`` wins (priority 30;
opt-in until the device check has run it; by default ``"cuda"``'s int8 mma.sync path runs there): sm_90a FP8-wgmma GEMMs for both activation formats, layout
``"cuda-sm90"`` (svdq/ops/sm90_layout.py): weights as e4m3 bytes uint8 [Np, Kp] with N padded to 128 and fp32
scales [Np, Kp/64] — **2x the 4-bit weight bytes in device memory** (still half of bf16; scales 2x too), the
checkpoint and ``state_dict`` stay int4. A backend with a non-canonical
layout also gives ``unprepare_weight(qweight', wscales', dtype, out_features=None) -> (qweight, wscales)``, the
exact inverse (bit for bit; fp32 scales that came from ``dtype`` round back exactly), in plain torch on any
device; ``out_features`` (N) is required by layouts whose shape pads N ("cuda-sm90").
Its ``w4a4_gemm`` receives prepared weights; its ``qact`` layout is private to the backend's pair of ops.

Storage rules for layers (``SVDQLinear``; weight-only layers follow the same rules):

1. One copy. A layer keeps its 4-bit weights once, in the layout of the backend it runs on, *in place of*
   the canonical tensors (no cache beside them). Conversions happen when the layer moves (``.to()`` / its
   ``_apply``), on ``load_state_dict`` and in ``svdq.prepare``; never per call, except when something outside
   the layer swapped canonical tensors in (accelerate's sequential offload restores them from its state-dict
   copy): then the call converts into a transient and counts it (``svdq.linear.LAYOUT_STATS``).
2. ``state_dict()`` (and so ``svdq.save``) always returns the canonical layout: a state-dict hook converts.
3. Stored tensors are frozen ``nn.Parameter``s (``requires_grad=False``), so offload hooks that move
   parameters (accelerate, diffusers group offloading) move them too; integer dtypes are fine for them.
4. A non-canonical layout keeps its fp32 scales bit-cast to int32: the tensors say by themselves that they
   are not canonical (canonical scales are floating), and ``.to(dtype)`` / ``.half()`` and dtype inference
   (diffusers' ``model.dtype``: first floating parameter) leave them alone.
5. Prepared tensors own their storage exactly (no views of larger padded buffers), so a copy (``.to()``,
   ``clone``, ``deepcopy``, pinned offload copies) keeps every byte the kernel reads.
6. accelerate's offload hooks (``enable_sequential_cpu_offload``) restore a hooked layer's tensors before each
   call from their copy of ``state_dict()`` (canonical), cast to the dtype each tensor had when the hook was
   attached: a layer must be canonical when hooked (accelerate sets ``_old_forward`` on it right before) and
   must not keep a conversion while hooked (``_hf_hook`` with ``offload``) — convert into a transient instead.
   diffusers' hooks move the tensors the layer holds, so a kept conversion travels with them.
   (``SVDQLinear.__setattr__`` / ``_accelerate_offloads``; tests/test_offload.py.)
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from . import reference
from .reference import GROUP_SIZE, MAX_RANK, QMAX, QMIN, RANK_MULTIPLE, padded_k  # noqa: F401


CANONICAL = "canonical"  # the checkpoint layout (spec §3), read directly by the reference and CPU backends


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]
    priority: int
    quantize_act: Callable
    w4a4_gemm: Callable
    is_available: Callable[[], bool] = lambda: True
    prepare_weight: Callable = lambda qweight, wscales: (qweight, wscales)
    # Name of the weight layout `prepare_weight` produces; "canonical" means it returns its inputs unchanged.
    layout: str = CANONICAL
    # (qweight', wscales' fp32, dtype, out_features=None) -> canonical (qweight, wscales dtype); required unless
    # layout is canonical.
    unprepare_weight: Callable | None = None
    # W4A8 (spec §8): FP8 e4m3 activations with one scale per token; None where the backend has no kernel.
    quantize_act_fp8: Callable | None = None
    w4a8_gemm: Callable | None = None
    # Shifted unsigned activations (spec §10): quantize_act takes ``act_shift=`` and w4a4_gemm ``act_unsigned=``.
    # False: `svdq_linear` refuses act_shift on this backend (SVDQLinear falls back to the reference ops).
    shifted_act: bool = False


_BACKENDS: dict[str, Backend] = {}
# Context-local (threads, asyncio tasks and generators each see their own): `use_backend` in one thread or
# task never changes which backend another one runs.
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("svdq_backend", default=None)


def register_backend(backend: Backend) -> None:
    """Make a backend selectable by name (native backends call this when `svdq._C` imports)."""
    _BACKENDS[backend.name] = backend


register_backend(
    Backend(
        name="reference",
        devices=("cpu", "cuda"),
        priority=0,
        quantize_act=reference.quantize_act,
        w4a4_gemm=reference.w4a4_gemm,
        quantize_act_fp8=reference.quantize_act_fp8,
        w4a8_gemm=reference.w4a8_gemm,
        shifted_act=True,
    )
)

ACT_FORMATS = ("int4", "fp8")


def available_backends() -> list[str]:
    """Names of the backends usable on this machine, e.g. ``["reference", "cpu"]``."""
    return [name for name, b in _BACKENDS.items() if b.is_available()]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed code with backend ``name`` (context-local: other threads and asyncio tasks keep theirs)."""
    _lookup(name)
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def _lookup(name: str) -> Backend:
    backend = _BACKENDS.get(name)
    if backend is None or not backend.is_available():
        raise ValueError(
            f"svdq backend {name!r} is not available on this machine; available: {available_backends()}"
        )
    return backend


def select_backend(device: torch.device, backend: str | None = None) -> Backend:
    """The backend an op uses for tensors on ``device``: explicit name > ``use_backend`` > fastest."""
    name = backend or _override.get()
    if name is not None:
        chosen = _lookup(name)
        if device.type not in chosen.devices:
            raise ValueError(
                f"svdq backend {name!r} runs on {chosen.devices}, but the tensors are on {device.type}"
            )
        return chosen
    candidates = [b for b in _BACKENDS.values() if device.type in b.devices and b.is_available()]
    if not candidates:
        raise ValueError(f"no svdq backend runs on device {device}; available: {available_backends()}")
    return max(candidates, key=lambda b: b.priority)


def quantize_act(x, smooth, lora_down, lora_scales=None, *, backend: str | None = None):
    """Smooth, quantize x [M, K] to INT4 per 64-group and run the low-rank down projection in one pass.

    Returns ``(qact int8 [M, Kp/2], ascales fp32 [M, Kp/64], lora_act fp32 [M, r])`` (spec §4.1).
    """
    check_input(x, "quantize_act")
    return select_backend(x.device, backend).quantize_act(x, smooth, lora_down, lora_scales)


def w4a4_gemm(qact, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype, *, backend=None):
    """W4A4 GEMM with per-group scales, the low-rank up projection and bias fused (spec §4.2)."""
    return select_backend(qact.device, backend).w4a4_gemm(
        qact, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype
    )


def prepare_weight(qweight, wscales, *, backend=None):
    """Repack canonical ``qweight``/``wscales`` for ``backend``'s GEMM (done once, when a layer moves)."""
    return select_backend(qweight.device, backend).prepare_weight(qweight, wscales)


def registered_backend(name: str) -> Backend:
    """The backend registered as ``name``, available on this machine or not (layouts are plain torch)."""
    if name not in _BACKENDS:
        raise ValueError(f"no svdq backend {name!r}; registered: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


def layout_backend(layout: str) -> Backend:
    """A registered backend whose weights use ``layout`` (available on this machine or not: the layout
    conversions are plain torch, so a layer prepared elsewhere can still be converted back)."""
    for b in _BACKENDS.values():
        if b.layout == layout:
            return b
    raise ValueError(f"no svdq backend uses weight layout {layout!r}; registered: {sorted(_BACKENDS)}")


def unprepare_weight(qweight, wscales, layout: str, dtype: torch.dtype, out_features: int | None = None):
    """Prepared ``qweight``/``wscales`` (fp32) in ``layout`` → canonical, scales in ``dtype`` (exact).
    ``out_features`` (N): required for layouts that pad N ("cuda-sm90"), checked by the others."""
    if layout == CANONICAL:
        return qweight, wscales
    return layout_backend(layout).unprepare_weight(qweight, wscales, dtype, out_features=out_features)


_act_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("svdq_act_format", default=None)


@contextlib.contextmanager
def use_act_format(act_format: str) -> Iterator[None]:
    """Run the enclosed code with every `SVDQLinear` quantizing activations as ``act_format`` (per context, as
    ``use_backend``; wins over the layers' own ``act_format``): "int4" (W4A4) or "fp8" (W4A8, spec §8)."""
    check_act_format(act_format)
    token = _act_override.set(act_format)
    try:
        yield
    finally:
        _act_override.reset(token)


def act_format_override() -> str | None:
    """The ``use_act_format`` in force in this context, or None."""
    return _act_override.get()


def check_act_format(act_format: str) -> str:
    """``act_format`` validated: "int4" (W4A4, spec §4) or "fp8" (W4A8, spec §8)."""
    if act_format not in ACT_FORMATS:
        raise ValueError(f"act_format must be one of {ACT_FORMATS}, got {act_format!r}")
    return act_format


def _w4a8_ops(be: Backend) -> tuple[Callable, Callable]:
    if be.quantize_act_fp8 is None or be.w4a8_gemm is None:
        raise ValueError(
            f"svdq backend {be.name!r} has no W4A8 kernels (act_format='fp8'); use act_format='int4' or "
            f"backend 'reference'"
        )
    return be.quantize_act_fp8, be.w4a8_gemm


def quantize_act_fp8(x, smooth, lora_down, lora_scales=None, *, backend: str | None = None):
    """W4A8 activations (spec §8.1): ``(qact uint8 [M, Kp] e4m3, ascales fp32 [M], lora_act fp32 [M, r])``."""
    check_input(x, "quantize_act_fp8")
    return _w4a8_ops(select_backend(x.device, backend))[0](x, smooth, lora_down, lora_scales)


def w4a8_gemm(qact, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype, *, backend=None):
    """W4A8 GEMM (spec §8.2): int4 g64 weights × per-token FP8 activations, low-rank up and bias fused."""
    return _w4a8_ops(select_backend(qact.device, backend))[1](
        qact, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype
    )


def check_input(x, what: str = "svdq") -> None:
    """Inputs every backend takes: a tensor of at least 1 dimension in fp32 / bf16 / fp16 (spec §4.3).
    Anything else is a clear ValueError here, not a backend-specific failure or integer garbage."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{what}: the input is a 0-dim tensor; expected [..., K] (at least 1 dimension)")
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(
            f"{what}: input dtype {x.dtype} is not supported; inputs are float32, bfloat16 or float16 (spec §4.3)"
        )


INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def svdq_linear(
    x, qweight, wscales, smooth, lora_down, lora_up, bias=None, lora_scales=None, *, backend=None, act_format="int4",
    act_shift=0.0,
):
    """The whole layer: ``y = W4A4(x) + (x · lora_down · scales) · lora_upᵀ + bias`` for x [..., K].

    ``qweight``/``wscales`` must already be in the backend's layout (`prepare_weight`). ``act_format="fp8"``
    quantizes the activations to FP8 e4m3 per token instead (W4A8, spec §8); the weights are the same.
    ``act_shift`` δ > 0: shifted unsigned INT4 activations (spec §10; ``bias`` must be the shifted layer's
    stored bias, which cancels the shift), on backends with ``shifted_act``.
    """
    check_input(x, "svdq_linear")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    be = select_backend(x.device, backend)
    if reference.check_act_shift(act_shift):
        if act_format != "int4":
            raise ValueError(
                f"svdq_linear: act_shift={act_shift} (shifted unsigned INT4 activations, spec §10) runs with "
                f"act_format='int4' only, got {act_format!r}"
            )
        if not be.shifted_act:
            raise ValueError(
                f"svdq backend {be.name!r} has no shifted-activation kernels (act_shift, spec §10); use the "
                "'reference' backend for this layer"
            )
        qact, ascales, lora_act = be.quantize_act(x2, smooth, lora_down, lora_scales, act_shift=act_shift)
        y = be.w4a4_gemm(qact, ascales, qweight, wscales, lora_act, lora_up, bias, x.dtype, act_unsigned=True)
        return y.reshape(*lead, lora_up.shape[0])
    if check_act_format(act_format) == "fp8":
        quant, gemm = _w4a8_ops(be)
    else:
        quant, gemm = be.quantize_act, be.w4a4_gemm
    qact, ascales, lora_act = quant(x2, smooth, lora_down, lora_scales)
    y = gemm(qact, ascales, qweight, wscales, lora_act, lora_up, bias, x.dtype)
    return y.reshape(*lead, lora_up.shape[0])  # N (a prepared qweight may pad it: "cuda-sm90")
