"""Pure-PyTorch implementation of docs/numerics.md — the reference every other backend is tested against.

Written for clarity, not speed: each function follows one section of the spec.
"""

from __future__ import annotations

import torch

GROUP_SIZE = 64
QMAX = 7
QMIN = -8
UQMAX = 15  # unsigned INT4 range 0…15 of shifted activations (spec §10)
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


def check_act_shift(act_shift: float) -> float:
    """``act_shift`` validated (spec §10): 0 = signed activations, a finite δ > 0 = shifted unsigned ones."""
    if isinstance(act_shift, bool) or not isinstance(act_shift, (int, float)):
        raise TypeError(f"act_shift must be a float (0 = signed activations), got {type(act_shift).__name__}")
    act_shift = float(act_shift)
    if not (act_shift >= 0.0 and act_shift < float("inf")):
        raise ValueError(f"act_shift must be 0 (signed) or a finite shift > 0 (unsigned codes), got {act_shift}")
    return act_shift


def quantize_groups_unsigned(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned INT4 per row and 64-group of shifted activations (spec §10.1).

    values: fp32 [R, Kp] (the shifted, smoothed x̂, zero-padded). Returns (u uint8 [R, Kp] in 0…15, scales fp32
    [R, G]). Same scale rule as `quantize_groups` with 15 for 7 (the scale comes from max|x̂|: a value below
    the shift's floor makes the scale larger and itself clamps to 0); same non-finite rule.
    """
    rows, kp = values.shape
    if kp % GROUP_SIZE:
        raise ValueError(f"quantize_groups_unsigned needs Kp % {GROUP_SIZE} == 0, got {kp}")
    groups = values.reshape(rows, kp // GROUP_SIZE, GROUP_SIZE)
    amax = groups.abs().amax(dim=-1)  # NaN if the group holds a NaN
    scales = amax / torch.full_like(amax, UQMAX)  # tensor / tensor: IEEE division (see quantize_groups)
    finite = torch.isfinite(amax)
    scales = torch.where(finite, scales, torch.full_like(scales, float("nan")))
    s = scales.unsqueeze(-1)
    dead = (s == 0) | ~finite.unsqueeze(-1)
    safe = torch.where(dead, torch.ones_like(s), s)
    u = torch.round(groups / safe)  # round-half-to-even
    u = torch.where(dead, torch.zeros_like(u), u).clamp_(0, UQMAX)
    return u.reshape(rows, kp).to(torch.uint8), scales


def pack_uint4(u: torch.Tensor) -> torch.Tensor:
    """[R, Kp] int values in [0, 15] → int8 [R, Kp/2]; low nibble = even k (spec §10.1, as `pack_int4`)."""
    if u.shape[-1] % 2:
        raise ValueError(f"pack_uint4 needs an even number of columns, got shape {tuple(u.shape)}")
    u = u.to(torch.int16)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8).view(torch.int8)


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [R, Kp/2] → uint8 [R, Kp] with values in [0, 15] (inverse of `pack_uint4`)."""
    b = packed.view(torch.uint8)
    return torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)


def quantize_act(
    x: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_scales: torch.Tensor | None = None,
    act_shift: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spec §4.1. x [M, K] → (qact int8 [M, Kp/2], ascales fp32 [M, G], lora_act fp32 [M, r]).

    ``act_shift`` δ > 0: shifted unsigned activations (spec §10.1): x̂ = (x + δ) / λ, codes 0…15 packed as
    unsigned nibbles, scale max|x̂| / 15; `w4a4_gemm` must then get ``act_unsigned=True``. lora_act reads the
    raw (unshifted) x either way."""
    if x.dim() != 2 or not x.is_floating_point():  # an integer x would quantize to integer garbage
        raise ValueError(f"quantize_act expects a floating x [M, K], got {x.dtype} of shape {tuple(x.shape)}")
    act_shift = check_act_shift(act_shift)
    m, k = x.shape
    xf = x.to(torch.float32)
    if act_shift:
        # fp32 add (δ is a float32 constant; 0.171875 = 11/64 is exact), then IEEE division by λ
        xhat = (xf + torch.tensor(act_shift, dtype=torch.float32, device=x.device)) / smooth.to(torch.float32)
    else:
        xhat = xf / smooth.to(torch.float32)
    # padding columns are 0 (not δ/1): they never raise a group's scale and their codes are 0
    xhat = torch.nn.functional.pad(xhat, (0, padded_k(k) - k))
    if act_shift:
        u, ascales = quantize_groups_unsigned(xhat)
        qact = pack_uint4(u)
    else:
        q, ascales = quantize_groups(xhat, torch.float32)
        qact = pack_int4(q)
    lora_act = xf @ lora_down.to(torch.float32)
    if lora_scales is not None:
        lora_act = lora_act * lora_scales.to(torch.float32)
    return qact, ascales, lora_act


def shift_bias(
    bias: torch.Tensor | None, qweight: torch.Tensor, wscales: torch.Tensor, smooth: torch.Tensor, act_shift: float
) -> torch.Tensor:
    """The stored bias of a shifted layer (spec §10.3): b' = D(b − δ·Σ_k q_w[n, k]·s_w[n, g(k)] / λ_k), the
    sum over the K real columns in fp64, rounded once to the model dtype D (that of ``wscales``). It cancels
    exactly (in real arithmetic) what the shift adds through the *stored* 4-bit weights. ``bias`` None = 0."""
    act_shift = check_act_shift(act_shift)
    k = smooth.shape[0]
    q = unpack_int4(qweight).double()[:, :k]
    s = wscales.double().repeat_interleave(GROUP_SIZE, dim=1)[:, :k]
    shift = (q * s / smooth.double()).sum(dim=1) * act_shift
    b = bias.double() if bias is not None else torch.zeros_like(shift)
    return (b - shift).to(wscales.dtype)


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
    act_unsigned: bool = False,
) -> torch.Tensor:
    """Spec §4.2. Returns y [M, N] in `out_dtype`. ``act_unsigned``: ``qact`` holds the unsigned codes 0…15 of
    shifted activations (spec §10.2); the shift's correction is already in ``bias``."""
    m, n = qact.shape[0], qweight.shape[0]
    groups = ascales.shape[1]
    codes = unpack_uint4(qact) if act_unsigned else unpack_int4(qact)
    qa = codes.to(torch.int32).reshape(m, groups, GROUP_SIZE)
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
