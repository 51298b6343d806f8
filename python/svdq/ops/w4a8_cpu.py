"""The CPU kernels of the W4A8 ops ``svdq::quantize_act_fp8`` / ``svdq::w4a8_gemm`` (docs/numerics.md §8).

W4A8 keeps the W4A4 checkpoint (int4 g64 weights, spec §3) and quantizes activations to FP8 e4m3 with one fp32
scale per token. A CPU has no FP8 arithmetic, so these are torch ops, registered as the ops' CPU kernels (the
schemas come from the native library, csrc/registration.cpp):

- quantize_act_fp8: the spec's elementwise steps in the spec's order (IEEE fp32 division, torch's RNE
  float → float8_e4m3fn cast), so qact and ascales are bit-identical to the reference;
- w4a8_gemm: Ŵ[n, k] = s_w[n, g] · q_w[n, k] (exact in fp32: an 11-bit scale times a 4-bit integer), then one
  fp32 GEMM a · Ŵᵀ scaled by s_a per row. The sum order differs from the reference's per-group sums (spec §8.3
  allows it: ‖Δy‖/‖y‖ ≤ 1e-3).

qweight is read in the canonical layout (on the CPU, prepare_weight is a copy).
"""

from __future__ import annotations

import torch

GROUP_SIZE = 64
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _describe(t: torch.Tensor) -> str:
    return f"shape {list(t.shape)}, dtype {t.dtype}, device {t.device}"


def _expect(cond: bool, op: str, name: str, t: torch.Tensor, what: str) -> None:
    if not cond:
        raise RuntimeError(f"svdq::{op}: {name} must be {what}; got {_describe(t)}")


def quantize_act_fp8(x, smooth, lora_down, lora_scales):
    op = "quantize_act_fp8"
    _expect(x.dim() == 2, op, "x", x, "a 2-D CPU tensor [M, K]")
    _expect(x.dtype in _FLOAT_DTYPES, op, "x", x, "fp32/bf16/fp16 [M, K]")
    m, k = x.shape
    _expect(k >= 1, op, "x", x, "[M, K] with K >= 1")
    _expect(smooth.dim() == 1 and smooth.shape[0] == k and smooth.is_floating_point(), op, "smooth", smooth,
            f"a floating [K] tensor, K = x.shape[1] = {k}")
    _expect(lora_down.dim() == 2 and lora_down.shape[0] == k and lora_down.is_floating_point(), op, "lora_down",
            lora_down, f"a floating [K, r] tensor, K = x.shape[1] = {k}")
    r = lora_down.shape[1]
    if lora_scales is not None:
        _expect(lora_scales.dim() == 1 and lora_scales.shape[0] == r and lora_scales.dtype == torch.float32, op,
                "lora_scales", lora_scales, f"fp32 [r], r = lora_down.shape[1] = {r}")
    kp = (k + GROUP_SIZE - 1) // GROUP_SIZE * GROUP_SIZE
    xf = x.float()
    xhat = torch.nn.functional.pad(xf / smooth.float(), (0, kp - k))
    amax = xhat.abs().amax(dim=1) if m else xf.new_zeros(0)
    # IEEE division by a tensor (not a scalar: a scalar divisor may become a reciprocal multiply).
    ascales = amax / torch.full_like(amax, FP8_MAX)
    s = ascales.unsqueeze(1)
    zero = s.eq(0)
    scaled = torch.where(zero, torch.zeros_like(xhat), xhat / torch.where(zero, torch.ones_like(s), s))
    qact = scaled.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    lora_act = xf @ lora_down.float()
    if lora_scales is not None:
        lora_act.mul_(lora_scales)
    return qact.contiguous(), ascales.contiguous(), lora_act.contiguous()


def w4a8_gemm(qact, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype):
    op = "w4a8_gemm"
    _expect(qact.dim() == 2 and qact.dtype == torch.uint8 and qact.shape[1] % GROUP_SIZE == 0, op, "qact", qact,
            "uint8 [M, Kp] (e4m3 bytes from quantize_act_fp8), Kp a multiple of 64")
    m, kp = qact.shape
    groups = kp // GROUP_SIZE
    _expect(ascales.dim() == 1 and ascales.shape[0] == m and ascales.dtype == torch.float32, op, "ascales", ascales,
            f"fp32 [M], M = qact.shape[0] = {m}")
    _expect(qweight.dim() == 2 and qweight.dtype == torch.int8 and qweight.shape[1] == kp // 2, op, "qweight",
            qweight, f"int8 [N, Kp/2] with Kp/2 = qact.shape[1] / 2 = {kp // 2}")
    n = qweight.shape[0]
    _expect(wscales.dim() == 2 and tuple(wscales.shape) == (n, groups) and wscales.is_floating_point(), op,
            "wscales", wscales, f"floating [N, Kp/64] = [{n}, {groups}]")
    _expect(lora_up.dim() == 2 and lora_up.shape[0] == n, op, "lora_up", lora_up,
            f"[N, r] with N = qweight.shape[0] = {n}")
    r = lora_up.shape[1]
    _expect(lora_act.dim() == 2 and tuple(lora_act.shape) == (m, r) and lora_act.dtype == torch.float32, op,
            "lora_act", lora_act, f"fp32 [M, r] = [{m}, {r}]")
    if bias is not None:
        _expect(bias.dim() == 1 and bias.shape[0] == n and bias.is_floating_point(), op, "bias", bias,
                f"floating [N], N = {n}")
    if out_dtype not in _FLOAT_DTYPES:
        raise RuntimeError(f"svdq::w4a8_gemm: out_dtype must be fp32, bf16 or fp16; got {out_dtype}")
    # int4 nibbles → int values (low nibble = even k, spec §3), sign-extended: ((b << 4) >> 4) for the low one.
    b = qweight.to(torch.int32)
    lo = (b << 28) >> 28
    hi = b >> 4
    qw = torch.stack((lo, hi), dim=2).reshape(n, groups, GROUP_SIZE).float()
    w = (qw * wscales.float().unsqueeze(2)).reshape(n, kp)  # exact products
    a = qact.view(torch.float8_e4m3fn).float()
    acc = (a @ w.t()).mul_(ascales.unsqueeze(1))
    if r:
        acc.add_(lora_act.to(out_dtype).float() @ lora_up.float().t())
    if bias is not None:
        acc.add_(bias.float())
    return acc.to(out_dtype)


def register() -> None:
    """Register both as the CPU kernels of the native library's ops (call once, after it loaded)."""
    torch.library.impl("svdq::quantize_act_fp8", "CPU")(quantize_act_fp8)
    torch.library.impl("svdq::w4a8_gemm", "CPU")(w4a8_gemm)
