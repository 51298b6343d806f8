"""Pure-PyTorch implementation of docs/numerics.md — the reference every other backend is tested against.

Written for clarity, not speed: each function follows one section of the spec.
"""

from __future__ import annotations

import torch

GROUP_SIZE = 64
QMAX = 7
QMIN = -8
RANK_MULTIPLE = 16
MAX_RANK = 512


def padded_k(k: int) -> int:
    """K rounded up to whole 64-groups (spec §1, `Kp`)."""
    return -(-k // GROUP_SIZE) * GROUP_SIZE


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[R, Kp] int values in [-8, 7] → int8 [R, Kp/2]; low nibble = even k (spec §3)."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, got shape {tuple(q.shape)}")
    q = q.to(torch.int16)
    lo = q[..., 0::2] & 0xF
    hi = (q[..., 1::2] & 0xF) << 4
    packed = (lo | hi).to(torch.uint8)
    return packed.view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [R, Kp/2] → int8 [R, Kp] with values in [-8, 7] (inverse of `pack_int4`)."""
    b = packed.view(torch.uint8).to(torch.int16)
    lo = b & 0xF
    hi = (b >> 4) & 0xF
    q = torch.stack([lo, hi], dim=-1).flatten(-2)
    q = torch.where(q >= 8, q - 16, q)
    return q.to(torch.int8)


def quantize_groups(values: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT4 per row and 64-group (spec §2.4 and §4.1).

    values: fp32 [R, Kp] (already zero-padded). Returns (q int8 [R, Kp], scales [R, G] in `scale_dtype`).
    The scale is rounded to `scale_dtype` first and q is computed against the rounded scale; for activations
    `scale_dtype` is fp32, so nothing is rounded.
    """
    rows, kp = values.shape
    if kp % GROUP_SIZE:
        raise ValueError(f"quantize_groups needs Kp % {GROUP_SIZE} == 0, got {kp}")
    groups = values.reshape(rows, kp // GROUP_SIZE, GROUP_SIZE)
    amax = groups.abs().amax(dim=-1)  # NaN if the group holds a NaN (torch.amax propagates it)
    # Tensor / tensor: PyTorch's CUDA division by a Python scalar multiplies by its reciprocal, which is not
    # the IEEE division the spec (and every kernel) uses — 1 ulp off in about half the groups (H200, measured).
    scales = amax / torch.full_like(amax, QMAX)
    # Spec §4.1, non-finite input: a NaN or ±Inf in the group gives scale NaN and codes 0, so that every
    # output the group feeds is NaN (NaN · anything = NaN), as nn.Linear would give.
    finite = torch.isfinite(amax)
    scales = torch.where(finite, scales, torch.full_like(scales, float("nan"))).to(scale_dtype)
    s = scales.to(torch.float32).unsqueeze(-1)
    dead = (s == 0) | ~finite.unsqueeze(-1)
    safe = torch.where(dead, torch.ones_like(s), s)
    q = torch.round(groups / safe)  # torch.round is round-half-to-even
    q = torch.where(dead, torch.zeros_like(q), q).clamp_(QMIN, QMAX)
    return q.reshape(rows, kp).to(torch.int8), scales


def quantize_weight(residual: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual R fp32 [N, K] → (qweight int8 [N, Kp/2], wscales `dtype` [N, G]) (spec §2.4, §3)."""
    n, k = residual.shape
    padded = torch.nn.functional.pad(residual.to(torch.float32), (0, padded_k(k) - k))
    q, scales = quantize_groups(padded, dtype)
    return pack_int4(q), scales


def quantize_act(
    x: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spec §4.1. x [M, K] → (qact int8 [M, Kp/2], ascales fp32 [M, G], lora_act fp32 [M, r])."""
    if x.dim() != 2 or not x.is_floating_point():  # an integer x would quantize to integer garbage
        raise ValueError(f"quantize_act expects a floating x [M, K], got {x.dtype} of shape {tuple(x.shape)}")
    m, k = x.shape
    xf = x.to(torch.float32)
    xhat = xf / smooth.to(torch.float32)
    xhat = torch.nn.functional.pad(xhat, (0, padded_k(k) - k))
    q, ascales = quantize_groups(xhat, torch.float32)
    lora_act = xf @ lora_down.to(torch.float32)
    if lora_scales is not None:
        lora_act = lora_act * lora_scales.to(torch.float32)
    return pack_int4(q), ascales, lora_act


# float8_e4m3fn bytes of the INT4 codes -8..7, indexed by the code's low nibble (exact: |q| <= 8 needs 3 bits).
_E4M3_OF_NIBBLE = torch.tensor(
    [0x00, 0x38, 0x40, 0x44, 0x48, 0x4A, 0x4C, 0x4E, 0xD0, 0xCE, 0xCC, 0xCA, 0xC8, 0xC4, 0xC0, 0xB8], dtype=torch.uint8
)


def int4_codes_to_e4m3(qact: torch.Tensor) -> torch.Tensor:
    """Packed INT4 int8 [M, Kp/2] → the same codes as float8_e4m3fn bytes, uint8 [M, Kp] (exact)."""
    b = qact.view(torch.uint8).to(torch.int64)
    nib = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)
    return _E4M3_OF_NIBBLE.to(qact.device)[nib]


def quantize_act_e4m3(
    x: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_act` with the INT4 codes written as float8_e4m3fn bytes (the Hopper FP8 GEMM's A operand).

    x [M, K] → (qact uint8 [M, Kp] (code q as the e4m3 value q, exact), ascales fp32 [M, G], lora_act fp32
    [M, r]); codes, scales and lora_act are exactly those of `quantize_act` (spec §4.1).
    """
    qact, ascales, lora_act = quantize_act(x, smooth, lora_down, lora_scales)
    return int4_codes_to_e4m3(qact), ascales, lora_act


def w4a4_gemm(
    qact: torch.Tensor,
    ascales: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    lora_act: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Spec §4.2. Returns y [M, N] in `out_dtype`."""
    m, n = qact.shape[0], qweight.shape[0]
    groups = ascales.shape[1]
    qa = unpack_int4(qact).to(torch.int32).reshape(m, groups, GROUP_SIZE)
    qw = unpack_int4(qweight).to(torch.int32).reshape(n, groups, GROUP_SIZE)
    # Exact integer dot products per group, [M, N, G]; done group by group to bound memory.
    acc = torch.zeros(m, n, dtype=torch.float32, device=qact.device)
    sw = wscales.to(torch.float32)
    for g in range(groups):
        dots = (qa[:, g, :].to(torch.float64) @ qw[:, g, :].to(torch.float64).T).to(torch.float32)
        acc += (ascales[:, g : g + 1] * sw[:, g].unsqueeze(0)) * dots
    if lora_act.shape[1]:
        acc += lora_act.to(out_dtype).to(torch.float32) @ lora_up.to(torch.float32).T
    if bias is not None:
        acc += bias.to(torch.float32)
    return acc.to(out_dtype)


# ---- W4A8: FP8 e4m3 activations, one scale per token (spec §8) -------------------------------------------

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_act_fp8(
    x: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spec §8.1. x [M, K] → (qact uint8 [M, Kp] e4m3 bytes, ascales fp32 [M], lora_act fp32 [M, r])."""
    m, k = x.shape
    xf = x.to(torch.float32)
    xhat = xf / smooth.to(torch.float32)
    xhat = torch.nn.functional.pad(xhat, (0, padded_k(k) - k))
    amax = xhat.abs().amax(dim=1) if k else torch.zeros(m, dtype=torch.float32, device=x.device)
    ascales = amax / torch.full_like(amax, FP8_MAX)  # IEEE division (see quantize_groups)
    s = ascales.unsqueeze(1)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    # x̂/s ≤ 448·(1 + 2⁻²³) rounds to 448, never to NaN; the clamp only documents the saturation.
    scaled = torch.where(s == 0, torch.zeros_like(xhat), xhat / safe).clamp_(-FP8_MAX, FP8_MAX)
    qact = scaled.to(torch.float8_e4m3fn).view(torch.uint8)  # round-to-nearest-even
    lora_act = xf @ lora_down.to(torch.float32)
    if lora_scales is not None:
        lora_act = lora_act * lora_scales.to(torch.float32)
    return qact, ascales, lora_act


def fp8_e4m3_to_float(codes: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3fn bytes → their exact fp32 values."""
    return codes.view(torch.float8_e4m3fn).to(torch.float32)


def w4a8_gemm(
    qact: torch.Tensor,
    ascales: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    lora_act: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Spec §8.2. qact uint8 [M, Kp] e4m3, ascales fp32 [M]; weights as w4a4_gemm. Returns y [M, N]."""
    m, n = qact.shape[0], qweight.shape[0]
    groups = wscales.shape[1]
    a = fp8_e4m3_to_float(qact).reshape(m, groups, GROUP_SIZE)
    qw = unpack_int4(qweight).to(torch.float32).reshape(n, groups, GROUP_SIZE)
    acc = torch.zeros(m, n, dtype=torch.float32, device=qact.device)
    sw = wscales.to(torch.float32)
    for g in range(groups):
        # P[m, n, g]: the group's dot product is exact in fp64 (spec §8.2), then rounded once to fp32.
        dots = (a[:, g, :].to(torch.float64) @ qw[:, g, :].to(torch.float64).T).to(torch.float32)
        acc += sw[:, g].unsqueeze(0) * dots
    acc = acc * ascales.to(torch.float32).unsqueeze(1)
    if lora_act.shape[1]:
        acc += lora_act.to(out_dtype).to(torch.float32) @ lora_up.to(torch.float32).T
    if bias is not None:
        acc += bias.to(torch.float32)
    return acc.to(out_dtype)
