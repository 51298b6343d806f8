"""`SVDQWeightOnlyLinear`: weight-only 4-bit (W4A16) for layers that must stay accurate (docs/numerics.md §7).

Used for the AdaLN modulation linears (FLUX.1 ``norm1.linear`` / ``norm1_context.linear`` / ``norm.linear``):
one input row per image, so there is no GEMM to speed up, but on FLUX.1-dev they hold 3.2 B of the 11.9 B
parameters. Only the weights are quantized — per output row and 64-group, symmetric INT4, exactly as the W4A4
residual (spec §2.4) — and the layer computes in the input's dtype: dequantize W, then one 16-bit GEMM.

The dequantized W is transient (built and freed on every call; nothing is cached, or the memory saving would
be gone). Its cost is one pass over the weight: for FLUX.1 a 3072 → 18432 layer dequantizes 56.6 M weights
per call (read 28 MB of INT4 + 1.8 MB of scales, write 113 MB of bf16: ~0.05 ms at 3 TB/s on a Hopper GPU as
one fused pass), ~3 ms per denoising step over the 76 modulation layers (3.23 B weights, as many as 57 of the
3072 → 18432 ones). `dequantize_weight` as written takes a few elementwise passes in eager mode (estimated
~15 ms per step at 3 TB/s; torch.compile fuses them); not measured on a GPU yet. The extra peak memory is one
layer's 16-bit weight (113 MB).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops import reference
from .ops.reference import GROUP_SIZE, padded_k

# Buffers in the checkpoint, in the order they are saved (bias is saved too when the layer has one).
STORED_TENSORS = ("qweight", "wscales")


def unpack_int4_signed(packed: torch.Tensor) -> torch.Tensor:
    """int8 [N, Kp/2] → int8 [N, Kp], values in [-8, 7]; same result as `reference.unpack_int4` with two
    shifts per nibble (arithmetic right shift sign-extends) instead of int16 intermediates."""
    lo = (packed.view(torch.uint8) << 4).view(torch.int8) >> 4
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def dequantize_weight(qweight: torch.Tensor, wscales: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in ``dtype`` per spec §7: ``q_w · s_w`` in fp32, rounded to ``dtype``.

    The product of an INT4 value and a bf16/fp16/fp32 scale is exact in fp32, so when the scales already are in
    ``dtype`` (or ``dtype`` is fp32) multiplying in ``dtype`` gives the same bits with one rounding and no fp32
    temporary.
    """
    n = qweight.shape[0]
    q = unpack_int4_signed(qweight).view(n, -1, GROUP_SIZE)
    if wscales.dtype == dtype or dtype == torch.float32:
        w = q.to(dtype) * wscales.to(dtype).unsqueeze(-1)
    else:
        w = (q.to(torch.float32) * wscales.to(torch.float32).unsqueeze(-1)).to(dtype)
    w = w.view(n, -1)
    return w if w.shape[1] == in_features else w[:, :in_features]


class SVDQWeightOnlyLinear(nn.Module):
    """y = x · dequant(qweight, wscales)ᵀ + bias, computed in x's dtype (W4A16, spec §7).

    Buffers: ``qweight`` int8 [N, Kp/2] (packed like spec §3), ``wscales`` [N, Kp/64] in the model dtype D,
    ``bias`` [N] in D (or None). No smoothing and no low-rank branch (docs/models.md says why).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"SVDQWeightOnlyLinear needs positive sizes, got in={in_features} out={out_features}")
        if not dtype.is_floating_point:
            raise ValueError(f"SVDQWeightOnlyLinear dtype must be a floating dtype, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        kp = padded_k(in_features)
        self.register_buffer("qweight", torch.zeros(out_features, kp // 2, dtype=torch.int8, device=device))
        self.register_buffer("wscales", torch.zeros(out_features, kp // GROUP_SIZE, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @property
    def dtype(self) -> torch.dtype:
        return self.wscales.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SVDQWeightOnlyLinear":
        """Quantize ``linear``'s weight (data-free: per row and 64-group absmax scales, spec §2.4)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        qweight, wscales = reference.quantize_weight(w.to(torch.float32), w.dtype)
        with torch.no_grad():
            layer.qweight.copy_(qweight)
            layer.wscales.copy_(wscales)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [N, K] as the layer uses it (in ``dtype``, default the model dtype)."""
        return dequantize_weight(self.qweight, self.wscales, self.in_features, dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"SVDQWeightOnlyLinear expects inputs with last dimension {self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"SVDQWeightOnlyLinear expects a floating-point input, got {x.dtype}")
        w = self.dequantize(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def weight_bytes(self) -> int:
        """Bytes of the stored tensors (4-bit weight + scales + bias)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"dtype={self.dtype}, W4A16"
        )


def weight_only_layers(model: nn.Module) -> dict[str, SVDQWeightOnlyLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SVDQWeightOnlyLinear)}
