"""`SVDQWeightOnlyLinear`: weight-only 4-bit (W4A16) linears (docs/numerics.md §7).

Used for the AdaLN modulation linears of the denoisers (one input row per image: a GEMV) and for whole text
encoders (`quantize_text_encoder`: FLUX's / PixArt's T5, M = tokens). Weights are INT4 per output row and
64-group with one scale each and, optionally, a zero point per group on unsigned codes u: an integer z
(``Ŵ = (u − z)·s``, svdq's own quantizer) or a float offset m (``Ŵ = u·s + m``, AWQ / TinyChat's form, which
Nunchaku's AdaNorm layers store: loaded exactly); activations stay in the compute dtype.

Kernels: PyTorch's own int4 weight-only matmuls, measured against dequantize-then-GEMM in
benchmarks/bench_w4a16.py (docs/numerics.md §7 has the numbers): ``torch.ops.aten._weight_int4pack_mm_for_cpu``
on CPU (any float dtype) and tinygemm ``torch.ops.aten._weight_int4pack_mm`` on CUDA (bf16). Both compute
``(u − 8)·s + m'`` per group with a float offset m', so the layer feeds them ``m' = (8 − z)·s`` (0 for
symmetric layers, whose signed codes q are u − 8) or ``m' = 8·s + m`` (float offsets), rounded to the scales'
dtype (the kernels' tolerance, spec §7.3).

One resident copy: on its first call on a device the layer repacks its codes *in place* into that kernel's
layout (``qweight`` becomes uint8 [Np, Kp/2] for the CPU op, int32 tiles for tinygemm) and replaces
``wscales`` by the kernel's [G, Np, 2] scale/offset tensor; ``state_dict`` (and so `svdq.save`) converts
back to the canonical layout, so files never see a backend layout. Each tensor's layout is told by its dtype
and rank, so code that swaps ``.data`` behind the layer's back (offload hooks) can never make it misread one.
Without a usable kernel (another compute dtype than the scales', shapes or dtypes the op refuses, a torch
whose layout probe fails) the layer dequantizes per call, as before (spec §7's reference path).
"""

from __future__ import annotations

import logging
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .linear import FrozenParameter, plain_parameters, weight_standin
from .ops import autograd, reference
from .ops.reference import GROUP_SIZE, padded_k

log = logging.getLogger(__name__)

# Tensors in the checkpoint, in the order they are saved (wzeros only for zero-point layers, bias when present).
STORED_TENSORS = ("qweight", "wscales", "wzeros")

CANONICAL, CPU_INT4, CUDA_TINYGEMM = "canonical", "cpu_int4pack", "cuda_tinygemm"
_UNSIGNED_OFFSET = 8  # the kernels' fixed code offset: Ŵ = (u − 8)·s + m


# ---- canonical codes ----------------------------------------------------------------------------------------

def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int8/uint8 [N, Kp/2] → uint8 [N, Kp] raw nibbles (low nibble = even k, spec §3)."""
    b = packed.view(torch.uint8)
    return torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """uint8 [N, Kp] values in [0, 15] → int8 [N, Kp/2] (low nibble = even k, spec §3)."""
    u = u.to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).view(torch.int8)


def unpack_int4_signed(packed: torch.Tensor) -> torch.Tensor:
    """int8 [N, Kp/2] → int8 [N, Kp], values in [-8, 7]; same result as `reference.unpack_int4` with two
    shifts per nibble (arithmetic right shift sign-extends) instead of int16 intermediates."""
    lo = (packed.view(torch.uint8) << 4).view(torch.int8) >> 4
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def quantize_weight_zero_point(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spec §7, zero-point variant: W fp32 [N, K] → (qweight int8 [N, Kp/2] unsigned nibbles u, wscales
    ``dtype`` [N, G], wzeros uint8 [N, G]).

    Per row and 64-group of W zero-padded to Kp: lo = min(W, 0), hi = max(W, 0) (0 stays exactly
    representable), ``s = D((hi − lo)/15)``, ``z = clamp(round(−lo / s), 0, 15)``,
    ``u = clamp(round(W / s) + z, 0, 15)``; s == 0 (an all-zero group) gives u = z = 0.
    """
    n, k = w.shape
    kp = padded_k(k)
    g = F.pad(w.to(torch.float32), (0, kp - k)).reshape(n, kp // GROUP_SIZE, GROUP_SIZE)
    lo = g.amin(dim=-1).clamp(max=0.0)
    hi = g.amax(dim=-1).clamp(min=0.0)
    span = hi - lo
    scales = (span / torch.full_like(span, 15.0)).to(dtype)  # IEEE division, as reference.quantize_groups
    s = scales.to(torch.float32)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    z = torch.round(-lo / safe).clamp_(0, 15)
    u = (torch.round(g / safe.unsqueeze(-1)) + z.unsqueeze(-1)).clamp_(0, 15)
    zero = (s == 0).unsqueeze(-1)
    u = torch.where(zero, torch.zeros_like(u), u)
    z = torch.where(s == 0, torch.zeros_like(z), z)
    return pack_nibbles(u.reshape(n, kp).to(torch.uint8)), scales, z.to(torch.uint8)


def dequantize_weight(
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    in_features: int,
    dtype: torch.dtype,
    wzeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """W [N, K] in ``dtype`` per spec §7 from canonical tensors: ``D(fp32(q) · fp32(s))`` with q the signed
    code, or ``q = u − z`` for integer zero points (uint8 ``wzeros``); ``D(fp32(u) · fp32(s) + fp32(m))`` for
    float offsets (floating ``wzeros`` = m, spec §7.2).

    q is an integer in [-15, 15] and s a bf16/fp16/fp32 value, so the product is exact in fp32 and there is one
    rounding, to ``dtype``; when the scales already are in ``dtype`` (or ``dtype`` is fp32) multiplying in
    ``dtype`` gives the same bits without an fp32 temporary. Float offsets add one fp32 rounding (the sum).
    """
    n = qweight.shape[0]
    if wzeros is not None and wzeros.is_floating_point():
        u = unpack_nibbles(qweight).view(n, -1, GROUP_SIZE).to(torch.float32)
        w = (u * wscales.to(torch.float32).unsqueeze(-1) + wzeros.to(torch.float32).unsqueeze(-1)).to(dtype)
        w = w.view(n, -1)
        return w if w.shape[1] == in_features else w[:, :in_features]
    if wzeros is None:
        q = unpack_int4_signed(qweight).view(n, -1, GROUP_SIZE)
    else:
        u = unpack_nibbles(qweight).view(n, -1, GROUP_SIZE)
        q = u.to(torch.int8) - wzeros.to(torch.int8).unsqueeze(-1)
    if wscales.dtype == dtype or dtype == torch.float32:
        w = q.to(dtype) * wscales.to(dtype).unsqueeze(-1)
    else:
        w = (q.to(torch.float32) * wscales.to(torch.float32).unsqueeze(-1)).to(dtype)
    w = w.view(n, -1)
    return w if w.shape[1] == in_features else w[:, :in_features]


# ---- kernel layouts -----------------------------------------------------------------------------------------
# PyTorch's CPU layout (aten/src/ATen/native/cpu/int4mm_kernel.cpp): rows in blocks of BLOCK_N (64 with AVX-512,
# 32 otherwise), each block stored [K, BLOCK_N/2] with byte j = row j (low nibble) | row j + BLOCK_N/2 (high).
# BLOCK_N depends on the CPU torch was built for, so it is probed once per process and every packed layer is
# checked to unpack to its codes; rows are padded to a multiple of 64 (a valid block count for both widths).
_CPU_ROW_MULTIPLE = 64
_TINYGEMM_ROW_MULTIPLE = 8  # tinygemm's n // 8 tiles
_probe_lock = threading.Lock()
_cpu_block_n: int | None = None  # 0 = the layout is not one svdq can invert: no CPU kernel
_numeric_ok: dict[str, bool] = {}


def _row_pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _cpu_unpack(packed: torch.Tensor, block_n: int) -> torch.Tensor:
    """uint8 [Np, Kp/2] in the CPU op's layout → uint8 [Np, Kp] codes (inverse of its packing)."""
    np_, kp = packed.shape[0], packed.shape[1] * 2
    b = packed.reshape(np_ // block_n, kp, block_n // 2)
    v = torch.cat([b & 0xF, b >> 4], dim=-1)  # [blocks, Kp, BLOCK_N]: row j, then row j + BLOCK_N/2
    return v.permute(0, 2, 1).reshape(np_, kp)


def _cpu_block_size() -> int:
    global _cpu_block_n
    with _probe_lock:
        if _cpu_block_n is None:
            _cpu_block_n = 0
            g = torch.Generator().manual_seed(0)
            u = torch.randint(0, 16, (2 * _CPU_ROW_MULTIPLE, 128), generator=g, dtype=torch.int32)
            try:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 2)
            except (RuntimeError, AttributeError) as e:  # an op this torch lacks or refuses
                log.warning("svdq W4A16: torch's CPU int4 pack op is unusable (%s); dequantizing per call", e)
                return 0
            for block_n in (64, 32):
                if packed.shape == (u.shape[0], 64) and torch.equal(_cpu_unpack(packed, block_n), u.to(torch.uint8)):
                    _cpu_block_n = block_n
                    break
            else:
                log.warning("svdq W4A16: torch's CPU int4 layout is not the one svdq inverts; dequantizing per call")
        return _cpu_block_n


def _cuda_pack(u: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """uint8 [Np, Kp] codes (on a CUDA device) → tinygemm's int32 tiles. Its input packs the even k in the
    HIGH nibble (the opposite of spec §3)."""
    b = ((u[:, 0::2] << 4) | u[:, 1::2]).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(b, inner_k_tiles)


def _cuda_unpack(packed: torch.Tensor, kp: int, chunk: int = 1024) -> torch.Tensor:
    """tinygemm tiles → uint8 [Np, Kp] codes, by tinygemm itself: rows of the identity times the weight with
    scale 1 and offset 8 give (u − 8)·1 + 8 = u, exact in bf16 (the tile layout is not documented)."""
    np_ = packed.shape[0] * 8
    ones = torch.ones(kp // GROUP_SIZE, np_, dtype=torch.bfloat16, device=packed.device)
    sz = torch.stack([ones, ones * _UNSIGNED_OFFSET], dim=-1).contiguous()
    eye = torch.eye(kp, dtype=torch.bfloat16, device=packed.device)
    cols = [torch.ops.aten._weight_int4pack_mm(eye[i : i + chunk], packed, GROUP_SIZE, sz) for i in range(0, kp, chunk)]
    return torch.cat(cols).t().to(torch.uint8).contiguous()


def _kernel_offsets(s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """The kernels' offsets m' [N, G] in s's dtype (they compute (u − 8)·s + m'): 0 for symmetric layers,
    (8 − z)·s for integer zero points, 8·s + m for float offsets (each rounded once, from fp32)."""
    if z is None:
        return torch.zeros_like(s)
    s32 = s.to(torch.float32)
    if z.is_floating_point():
        return (_UNSIGNED_OFFSET * s32 + z.to(torch.float32)).to(s.dtype)
    return ((_UNSIGNED_OFFSET - z.to(torch.float32)) * s32).to(s.dtype)


def _scale_offsets(s: torch.Tensor, z: torch.Tensor | None, np_: int) -> torch.Tensor:
    """[G, Np, 2] (scale, offset m') in s's dtype for the kernels; rows past N are zero."""
    n = s.shape[0]
    sz = torch.stack([s, _kernel_offsets(s, z)], dim=-1)
    if np_ != n:
        sz = F.pad(sz, (0, 0, 0, 0, 0, np_ - n))
    return sz.transpose(0, 1).contiguous()


def _check_numerics(kind: str, device: torch.device) -> bool:
    """Once per process and kernel: the op computes Σ x·((u − 8)·s + m) as assumed (catches a changed formula
    or layout in another torch version) on a small layer with zero points."""
    key = f"{kind}:{device.type}"
    with _probe_lock:
        if key in _numeric_ok:
            return _numeric_ok[key]
    g = torch.Generator().manual_seed(1)
    n, kp = 2 * _CPU_ROW_MULTIPLE, 256
    u = torch.randint(0, 16, (n, kp), generator=g, dtype=torch.uint8)
    z = torch.randint(0, 16, (n, kp // GROUP_SIZE), generator=g, dtype=torch.uint8)
    dtype = torch.float32 if kind == CPU_INT4 else torch.bfloat16
    s = (torch.rand(n, kp // GROUP_SIZE, generator=g) + 0.5).to(dtype)
    x = torch.randn(3, kp, generator=g).to(dtype)
    w = ((u.float().view(n, -1, GROUP_SIZE) - z.float()[..., None]) * s.float()[..., None]).view(n, kp)
    expected = x.float() @ w.T
    try:
        if kind == CPU_INT4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32), 2), GROUP_SIZE,
                _scale_offsets(s, z, n))
            ok = float((y.float() - expected).norm() / expected.norm()) < 1e-5
        else:
            packed = _cuda_pack(u.to(device), 4)
            y = torch.ops.aten._weight_int4pack_mm(x.to(device), packed, GROUP_SIZE, _scale_offsets(s, z, n).to(device))
            ok = float((y.float().cpu() - expected).norm() / expected.norm()) < 1e-2
            ok = ok and torch.equal(_cuda_unpack(packed, kp).cpu(), u)
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        log.warning("svdq W4A16: torch's %s int4 matmul is unusable here (%s); dequantizing per call", kind, e)
        ok = False
    else:
        if not ok:
            log.warning("svdq W4A16: torch's %s int4 matmul does not compute (u-8)*s+m here; dequantizing per call",
                        kind)
    with _probe_lock:
        _numeric_ok[key] = ok
    return ok


def _frozen(t: torch.Tensor | None) -> nn.Parameter | None:
    """The layer's tensors are Parameters created frozen, not buffers: accelerate's and diffusers' offload hooks
    move a module's parameters (buffers only on request), so offloading moves them too. (Used for the bias; the
    4-bit tensors are `FrozenParameter`s, which ``requires_grad_(True)`` leaves frozen.)"""
    return None if t is None else nn.Parameter(t, requires_grad=False)


_FROZEN = ("qweight", "wscales", "wzeros")


class SVDQWeightOnlyLinear(nn.Module):
    """y = x · Ŵᵀ + bias, computed in x's dtype (W4A16, spec §7).

    Canonical tensors (what ``state_dict`` and checkpoints hold): ``qweight`` int8 [N, Kp/2] (packed as spec §3:
    signed codes q, or unsigned codes u with ``zero_point``), ``wscales`` [N, Kp/64] in the model dtype D,
    ``wzeros`` (zero-point layers only): uint8 [N, Kp/64] in [0, 15] with ``zero_point=True`` / ``"int"``
    (Ŵ = (u − z)·s), or D [N, Kp/64] float offsets with ``zero_point="float"`` (Ŵ = u·s + m, AWQ's form),
    ``bias`` [N] in D (or None). After a call on a device with a kernel, ``qweight`` / ``wscales`` hold that kernel's layout instead
    (see the module docstring); ``canonical()`` gives the canonical tensors in any state.
    No smoothing and no low-rank branch (docs/models.md says why).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        zero_point: bool | str = False,
    ):
        super().__init__()
        kinds = {False: None, None: None, True: "int", "int": "int", "float": "float"}
        if isinstance(zero_point, (bool, str, type(None))) and zero_point in kinds:
            zero_kind = kinds[zero_point]
        else:
            raise ValueError(f"SVDQWeightOnlyLinear zero_point must be False, True / 'int' or 'float', got {zero_point!r}")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"SVDQWeightOnlyLinear needs positive sizes, got in={in_features} out={out_features}")
        if not dtype.is_floating_point:
            raise ValueError(f"SVDQWeightOnlyLinear dtype must be a floating dtype, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        kp = padded_k(in_features)
        g = kp // GROUP_SIZE
        # The codes, scales and zero points never require grad (`FrozenParameter`); the bias may be trained.
        self.qweight = FrozenParameter(torch.zeros(out_features, kp // 2, dtype=torch.int8, device=device))
        self.wscales = FrozenParameter(torch.zeros(out_features, g, dtype=dtype, device=device))
        zdtype = torch.uint8 if zero_kind == "int" else dtype
        self.wzeros = FrozenParameter(torch.zeros(out_features, g, dtype=zdtype, device=device)) if zero_kind else None
        self.bias = _frozen(torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._no_kernel: set[str] = set()  # kernels this layer's shapes were refused by (not retried)

    @property
    def weight(self) -> torch.Tensor:
        """nn.Linear's ``weight`` metadata, as `SVDQLinear.weight`: a NaN [out, in] stand-in (one stored element)
        with the layer's dtype and device. Code written for nn.Linear reads it: transformers' T5 casts its input
        to ``wo.weight.dtype`` (``wo`` stays fp32 in fp16 models, against overflow)."""
        return weight_standin(self.out_features, self.in_features, self.dtype, self.device)

    @property
    def zero_point(self) -> bool:
        return self.wzeros is not None

    @property
    def zero_point_kind(self) -> str | None:
        """None (symmetric), "int" (uint8 zero points z) or "float" (offsets m in the model dtype)."""
        if self.wzeros is None:
            return None
        return "float" if self.wzeros.is_floating_point() else "int"

    @property
    def dtype(self) -> torch.dtype:
        return self.wscales.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def layout(self) -> str:
        """Which layout ``qweight`` holds, told by its dtype: int8 canonical, uint8 CPU op, int32 tinygemm."""
        return {torch.int8: CANONICAL, torch.uint8: CPU_INT4, torch.int32: CUDA_TINYGEMM}[self.qweight.dtype]

    @classmethod
    def from_linear(cls, linear: nn.Linear, zero_point: bool = False) -> "SVDQWeightOnlyLinear":
        """Quantize ``linear``'s weight (data-free, per row and 64-group): symmetric absmax scales (spec §2.4),
        or with ``zero_point`` min/max scales and integer zero points (spec §7)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if not isinstance(zero_point, bool):  # float offsets come only from other quantizers' files (AWQ)
            raise ValueError(f"from_linear: zero_point must be True or False (integer zero points), got {zero_point!r}")
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device, zero_point)
        if zero_point:
            qweight, wscales, wzeros = quantize_weight_zero_point(w.to(torch.float32), w.dtype)
        else:
            (qweight, wscales), wzeros = reference.quantize_weight(w.to(torch.float32), w.dtype), None
        with torch.no_grad():
            layer.qweight.copy_(qweight)
            layer.wscales.copy_(wscales)
            if wzeros is not None:
                layer.wzeros.copy_(wzeros)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    # -- canonical view of whatever layout is resident --------------------------------------------------------

    def _codes(self) -> torch.Tensor:
        """Unsigned codes u uint8 [N, Kp] (u = q + 8 for symmetric layers), from any layout."""
        n, kp, q = self.out_features, padded_k(self.in_features), self.qweight.detach()
        layout = self.layout
        if layout == CANONICAL:
            u = unpack_nibbles(q)
            return u if self.zero_point else u ^ _UNSIGNED_OFFSET
        if layout == CPU_INT4:
            block_n = _cpu_block_size()
            if not block_n:
                raise RuntimeError("svdq W4A16: a CPU-packed layer, but this torch's CPU int4 layout is unknown")
            return _cpu_unpack(q, block_n)[:n]
        if not torch.cuda.is_available():
            raise RuntimeError("svdq W4A16: the layer holds tinygemm (CUDA) tiles; unpacking them needs a CUDA GPU")
        dev = q.device if q.is_cuda else torch.device("cuda")
        return _cuda_unpack(q.to(dev), kp)[:n].to(q.device)

    def _scales(self) -> torch.Tensor:
        s = self.wscales.detach()
        return s if s.dim() == 2 else s[:, : self.out_features, 0].t().contiguous()

    def canonical(self) -> dict[str, torch.Tensor]:
        """The canonical tensors (spec §7) as saved: qweight, wscales, wzeros (zero-point layers), bias."""
        if self.layout == CANONICAL:
            qweight = self.qweight.detach()
        else:
            u = self._codes()
            qweight = pack_nibbles(u if self.zero_point else u ^ _UNSIGNED_OFFSET)
        out = {"qweight": qweight, "wscales": self._scales()}
        if self.wzeros is not None:
            out["wzeros"] = self.wzeros.detach()
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return out

    def to_canonical(self) -> "SVDQWeightOnlyLinear":
        """Put the canonical tensors back in place of a kernel layout (in place; returns self)."""
        if self.layout != CANONICAL or self.wscales.dim() != 2:
            t = self.canonical()
            self.qweight.data = t["qweight"]
            self.wscales.data = t["wscales"]
        return self

    def _accelerate_offloads(self) -> bool:
        """Whether an accelerate hook offloads this layer's tensors: before each call it restores them from its
        copy of the (canonical) state dict, coerced to the dtypes they had when the hook was attached, so the
        layer must stay canonical under it (and dequantizes per call). diffusers' hooks move the tensors the
        layer holds (``param.data = ...``) and keep a repacked layout (same rule as `SVDQLinear`)."""
        hook = getattr(self, "_hf_hook", None)
        return hook is not None and any(getattr(h, "offload", False) for h in getattr(hook, "hooks", (hook,)))

    def __setattr__(self, name, value):
        if name == "_old_forward" and "_parameters" in self.__dict__ and self.qweight.device.type != "meta":
            # accelerate's add_hook_to_module sets `_old_forward` right before the hook records the tensors and
            # their dtypes: be canonical by then (an int8 code tensor recorded as uint8 would read as CPU-packed).
            self.to_canonical()
        super().__setattr__(name, value)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Checkpoints hold the canonical layout only, whatever the backend repacked into.
        if self.layout == CANONICAL and self.wscales.dim() == 2:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, t in self.canonical().items():
            destination[prefix + name] = t

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.to_canonical()  # a state dict is canonical: shapes and meaning must match before it is copied in
        with plain_parameters(self, _FROZEN):
            return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        with plain_parameters(self, _FROZEN):
            result = super()._apply(fn, recurse)
        # A dtype change rounds the kernel's offsets m' a second time: rebuild them from z (or m) and s.
        if self.wscales.dim() == 3 and self.wzeros is not None and self.wscales.device.type != "meta":
            with torch.no_grad():
                n, s = self.out_features, self.wscales[:, : self.out_features, 0]
                z = self.wzeros.t().to(s.device)
                self.wscales.data[:, :n, 1] = _kernel_offsets(s, z)
        return result

    # -- kernels -----------------------------------------------------------------------------------------------

    def _kernel_for(self, x: torch.Tensor) -> str | None:
        """The kernel for this call, or None (dequantize): it computes in the scales' dtype, so x must match."""
        if x.dtype != self.dtype:
            return None
        if x.device.type == "cpu":
            kind = CPU_INT4
        elif x.device.type == "cuda" and x.dtype == torch.bfloat16:  # tinygemm is bf16-only
            kind = CUDA_TINYGEMM
        else:
            return None
        if kind in self._no_kernel:
            return None
        return kind

    def _packed(self, kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(qweight, wscales) in ``kind``'s layout on ``device``, from whatever is resident; changes nothing."""
        n, kp = self.out_features, padded_k(self.in_features)
        u = self._codes().to(device)
        s = self._scales().to(device)
        z = None if self.wzeros is None else self.wzeros.detach().to(device)
        np_ = _row_pad(n, _CPU_ROW_MULTIPLE if kind == CPU_INT4 else _TINYGEMM_ROW_MULTIPLE)
        u = F.pad(u, (0, 0, 0, np_ - n), value=_UNSIGNED_OFFSET)
        if kind == CPU_INT4:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32), 2)
        else:
            packed = _cuda_pack(u, 8 if kp % 128 == 0 else 4)
        return packed, _scale_offsets(s, z, np_)

    @torch.compiler.disable
    def _repack(self, kind: str, device: torch.device) -> bool:
        """Repack in place for ``kind`` (once per device change); False when the kernel cannot take this layer."""
        if not _check_numerics(kind, device):
            self._no_kernel.add(kind)
            return False
        with torch.no_grad():
            packed, sz = self._packed(kind, device)
            if kind == CPU_INT4:
                block_n = _cpu_block_size()
                u = F.pad(self._codes().to(device), (0, 0, 0, packed.shape[0] - self.out_features), value=_UNSIGNED_OFFSET)
                if not block_n or not torch.equal(_cpu_unpack(packed, block_n), u):
                    log.warning("svdq W4A16: CPU int4 layout check failed for a %dx%d layer; dequantizing per call",
                                self.out_features, self.in_features)
                    self._no_kernel.add(kind)
                    return False
            z = None if self.wzeros is None else self.wzeros.detach().to(device)
            self.qweight.data = packed
            self.wscales.data = sz
            if self.wzeros is not None:
                self.wzeros.data = z
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"SVDQWeightOnlyLinear expects inputs with last dimension {self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"SVDQWeightOnlyLinear expects a floating-point input, got {x.dtype}")
        if self.qweight.device != x.device and self.qweight.device.type != "meta":
            raise ValueError(f"SVDQWeightOnlyLinear: input on {x.device}, weights on {self.qweight.device} (move one)")
        kind = self._kernel_for(x)
        qweight, wscales = self.qweight, self.wscales
        if kind is not None and self._accelerate_offloads():
            # The hook owns the (canonical) tensors: pack a per-call transient, keep nothing (svdq.ops rule 6).
            if _check_numerics(kind, x.device) and (kind != CPU_INT4 or _cpu_block_size()):
                with torch.no_grad():
                    qweight, wscales = self._packed(kind, x.device)
            else:
                kind = None
        elif kind is not None and (self.layout != kind or self.wscales.dim() != 3):
            # First call on this device, or canonical tensors put back: repack in place, once.
            if self._repack(kind, x.device):
                qweight, wscales = self.qweight, self.wscales
            else:
                kind = None
        if kind is not None and autograd.needs_grad(x, self.bias):
            # The fused int4 kernels have no derivative: the same forward, backward through Ŵ (svdq.ops.autograd).
            return autograd.weight_only_linear(x, self.bias, self.forward, lambda: self.dequantize(torch.float32))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if kind is None:
            return F.linear(x, self.dequantize(x.dtype), bias)
        kp = padded_k(self.in_features)
        x2 = x.reshape(-1, self.in_features)
        if kp != self.in_features:
            x2 = F.pad(x2, (0, kp - self.in_features))
        x2 = x2.contiguous()
        if kind == CPU_INT4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, qweight, GROUP_SIZE, wscales)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, qweight, GROUP_SIZE, wscales)
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight Ŵ [N, K] per spec §7 (in ``dtype``, default the model dtype), from any layout."""
        dtype = dtype or self.dtype
        if self.layout == CANONICAL and self.wscales.dim() == 2:
            return dequantize_weight(self.qweight, self.wscales, self.in_features, dtype, self.wzeros)
        t = self.canonical()
        return dequantize_weight(t["qweight"], t["wscales"], self.in_features, dtype, t.get("wzeros"))

    def weight_bytes(self) -> int:
        """Bytes of the stored (canonical) tensors: 4-bit weight + scales (+ zero points) + bias."""
        return sum(t.numel() * t.element_size() for t in self.canonical().values())

    def resident_bytes(self) -> int:
        """Bytes the layer holds now, in whatever layout is resident."""
        return sum(p.numel() * p.element_size() for p in self.parameters(recurse=False))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"dtype={self.dtype}, W4A16{', float zero points' if self.zero_point_kind == 'float' else ', zero points' if self.zero_point else ''}"
        )


def weight_only_layers(model: nn.Module) -> dict[str, SVDQWeightOnlyLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SVDQWeightOnlyLinear)}


# ---- text encoders ------------------------------------------------------------------------------------------

TEXT_ENCODER_MIN_PARAMS = 300_000_000  # "large": T5-XXL 4.7 B, CLIP-G 0.69 B; CLIP-L (0.12 B) stays 16-bit
TEXT_ENCODERS_DIR = "text_encoders"  # <saved model dir>/text_encoders/<pipeline component>.safetensors


def quantize_text_encoder(
    model: nn.Module,
    *,
    zero_point: bool = False,
    include: tuple[str, ...] | list[str] | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    progress: bool = False,
) -> nn.Module:
    """Make every ``nn.Linear`` of a text encoder (``T5EncoderModel``, ``CLIPTextModel``, …) weight-only 4-bit
    (W4A16, spec §7), in place; returns ``model``. Data-free: per row and 64-group scales (and zero points with
    ``zero_point``). include / exclude: fnmatch patterns on module names (default: all linears).
    All or nothing: a non-finite weight raises ValueError naming the layer, before the model changes.
    ``svdq.save`` / ``svdq.load`` round-trip the result like a quantized denoiser."""
    from tqdm.auto import tqdm

    from ._transaction import model_transaction
    from .quantize import QuantizeConfig, _check_finite, _set_submodule, matches, relative_error

    include = ("*",) if include is None else tuple(include)
    exclude = tuple(exclude)
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and matches(n, include, exclude)}
    if not linears:
        raise ValueError(f"quantize_text_encoder: no nn.Linear of {type(model).__name__} matches include={include} "
                         f"exclude={exclude}")
    for name, linear in linears.items():
        _check_finite(name, {"weight": linear.weight, "bias": linear.bias})
    new_layers, report = {}, dict(getattr(model, "svdq_report", {}) or {})
    for name, linear in tqdm(linears.items(), desc="svdq text encoder", unit="layer", disable=not progress):
        with torch.no_grad():
            layer = new_layers[name] = SVDQWeightOnlyLinear.from_linear(linear, zero_point=zero_point)
            err = relative_error(layer.dequantize(torch.float32), linear.weight.detach().to(torch.float32))
        report[name] = {"in_features": layer.in_features, "out_features": layer.out_features, "precision": "w4a16",
                        "zero_point": zero_point, "weight_rel_error": err}
    with model_transaction(model):
        for name, layer in new_layers.items():
            _set_submodule(model, name, layer)
        model.svdq_report = report
        # No W4A4 layer (include=()): the weight-only patterns are the whole selection.
        model.svdq_config = QuantizeConfig(include=(), exclude=exclude, weight_only=include)
    return model


def large_text_encoders(pipe, min_params: int = TEXT_ENCODER_MIN_PARAMS) -> list[str]:
    """The pipeline components worth 4 bits: every T5 encoder (FLUX's text_encoder_2, PixArt's / SD3's T5, any
    size, so the tiny pipelines have one too) and any other text encoder of ``min_params`` parameters or more."""
    names = []
    for name, comp in getattr(pipe, "components", {}).items():
        if not name.startswith("text_encoder") or not isinstance(comp, nn.Module):
            continue
        if "T5" in type(comp).__name__ or sum(p.numel() for p in comp.parameters()) >= min_params:
            names.append(name)
    return names


def quantize_pipeline_text_encoders(pipe, *, zero_point: bool = False, components: list[str] | None = None,
                                    progress: bool = False) -> list[str]:
    """`quantize_text_encoder` on the pipeline's large text encoders (`large_text_encoders`, or ``components``);
    returns the component names quantized."""
    names = large_text_encoders(pipe) if components is None else list(components)
    for name in names:
        quantize_text_encoder(getattr(pipe, name), zero_point=zero_point, progress=progress)
    return names


def save_text_encoders(pipe, directory, components: list[str]):
    """Write each quantized text encoder to ``directory/text_encoders/<component>.safetensors`` (`svdq.save`
    format, written atomically); returns the paths."""
    from pathlib import Path

    from .checkpoint import save

    out = Path(directory) / TEXT_ENCODERS_DIR
    return [save(getattr(pipe, name), out / f"{name}.safetensors") for name in components]


def load_text_encoders(pipe, directory, device: str | torch.device | None = None) -> list[str]:
    """Load the 4-bit text encoders saved by `save_text_encoders` into ``pipe``'s 16-bit ones (in place, each
    all or nothing); returns the component names loaded (none when the directory has no text_encoders/)."""
    from pathlib import Path

    from .checkpoint import CheckpointError, load

    loaded = []
    for path in sorted((Path(directory) / TEXT_ENCODERS_DIR).glob("*.safetensors")):
        name = path.name[: -len(".safetensors")]
        target = getattr(pipe, name, None)
        if not isinstance(target, nn.Module):
            raise CheckpointError(f"{path}: the pipeline {type(pipe).__name__} has no text encoder {name!r}")
        dev = device if device is not None else next(target.parameters()).device
        load(target, path, dev)
        loaded.append(name)
    return loaded
