"""GPTQ rounding of the INT4 residual (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization").

Round-to-nearest (docs/numerics.md §2.4) rounds every weight on its own. GPTQ rounds the columns of the
smoothed residual R [N, K] one at a time and spreads each column's rounding error over the columns not yet
rounded, weighted by the inverse Hessian H = X̂ᵀX̂ of the layer's smoothed calibration inputs — so it
minimizes ‖X̂ (R − R_q)ᵀ‖ (the residual's share of the output error) instead of ‖R − R_q‖.

Only *how the codes and scales are chosen* changes: the result is the stored format of §3 exactly — codes
−8..7, one scale in the model dtype per row and 64-group, padding columns 0, columns in stored order
(act-order with static groups would fit the format too; it measured no gain, below). Each group's scale is chosen when GPTQ
reaches the group, from the group's values *after* the earlier columns' error was spread onto them
(`s = D(max|group| / 7)`, the §2.4 formula on the updated values), so the scale covers what is rounded.

After the codes are chosen, the rank-r low-rank branch is refit to what they left (`refit_low_rank`): the
branch was the top-r SVD of Ŵ, chosen before any rounding and blind to the inputs; the refit takes the best
rank-r L for ‖X̂ (Ŵ − Q − L)ᵀ‖ (Ŵ's smoothed weight, Q the dequantized codes), so the 16-bit branch absorbs the
largest directions of the codes' output error. Same stored tensors (lora_down, lora_up) and shapes.

Measured (`benchmarks/quality/gptq_variants.py` → `benchmarks/results/gptq_variants_cpu.json`: tiny FLUX.1 /
SDXL / PixArt-Σ pipelines, mean held-out per-layer error against round to nearest): GPTQ with the plain SVD
branch −22 / −16 / −26 %, with the refit −25 / −24 / −30 % (worst layer 0.83 / 0.92 / 0.82× nearest).
Measured and *not* kept: alternating GPTQ ↔ refit twice (within ±0.3 %, twice the time), act-order with static
groups (within ±0.6 %), dampening 0.1 / 0.001 (within ±0.5 %), and GPTQ against the quantized activations X̃
(W' = R·X̂ᵀX̃·(X̃ᵀX̃)⁻¹, Hessian X̃ᵀX̃): −40 % on PixArt-Σ but +18 % on SDXL and +625 % on FLUX (worst layers 7.8×
and 109×) — it fits the calibration rows' particular activation rounding where rows are few per channel, and
the guard (error on the calibration sample, part of those rows) cannot see that.

End to end (`benchmarks/quality/gptq_refit_e2e.py` → `benchmarks/results/gptq_refit_e2e_cpu.json`: held-out
final latents vs 16-bit; nearest / GPTQ + refit / GPTQ with the plain branch): FLUX 0.0038 / 0.0024 / 0.0025,
SDXL 0.0419 / 0.0406 / 0.0407, PixArt-Σ 0.0223 / 0.0211 / 0.0163. The refit's per-layer gain carries over on
FLUX and SDXL, not on PixArt-Σ: there every layer's held-out error is 2–10 % lower with it, yet the latents'
error is 29 % higher than without it. Not explained yet (open): it is not a larger output bias, nor a larger
weight error ‖Q + L − Ŵ‖ (both are lower with the refit), nor the dampening (0.1 and 1.0 measure the same).
"""

from __future__ import annotations

import torch

from .ops.reference import GROUP_SIZE, QMAX, QMIN, pack_int4, padded_k, unpack_int4

DEFAULT_DAMP = 0.01  # fraction of mean(diag H) added to the diagonal (GPTQ's default): keeps H invertible
BLOCK = 128  # columns per lazy-update block (GPTQ's choice); a multiple of GROUP_SIZE so groups never straddle
MAX_DAMP_TRIES = 6  # each retry multiplies the dampening by 10


def smoothed_hessian(xtx: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """Σ x̂ᵀx̂ of the smoothed inputs x̂ = x / λ from the raw Σ xᵀx: diag(1/λ) · XᵀX · diag(1/λ) (fp32).

    The calibration hooks record the raw XᵀX once because λ is chosen after calibration (per α candidate).
    """
    inv = 1.0 / smooth.to(device=xtx.device, dtype=torch.float32)
    return xtx.to(torch.float32) * inv.unsqueeze(0) * inv.unsqueeze(1)


def _upper_inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """U with H⁻¹ = Uᵀ U (upper Cholesky factor of the dampened inverse Hessian), as GPTQ uses it."""
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(MAX_DAMP_TRIES):
        lower, info = torch.linalg.cholesky_ex(h + (damp * 10**attempt) * mean_diag * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError(
        f"GPTQ: the calibration Hessian ({h.shape[0]}×{h.shape[0]}) is not positive definite even with dampening "
        f"{damp * 10 ** (MAX_DAMP_TRIES - 1):g}·mean(diag); non-finite calibration inputs?"
    )


def gptq_quantize_weight(
    residual: torch.Tensor,
    hessian: torch.Tensor,
    dtype: torch.dtype,
    *,
    damp: float = DEFAULT_DAMP,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual R fp32 [N, K] + Hessian H [K, K] of its (smoothed) inputs → (qweight int8 [N, Kp/2],
    wscales `dtype` [N, G]): the stored tensors of docs/numerics.md §3, like `reference.quantize_weight`.

    Input channels the calibration never excited (H[k, k] = 0) get no error compensation and are rounded to
    nearest from whatever error earlier columns spread onto them (none: their H row is zero).
    """
    if residual.dim() != 2:
        raise ValueError(f"GPTQ expects a 2-D residual [N, K], got shape {tuple(residual.shape)}")
    n, k = residual.shape
    if hessian.shape != (k, k):
        raise ValueError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match the residual's K = {k}")
    if block % GROUP_SIZE:
        raise ValueError(f"GPTQ block must be a multiple of {GROUP_SIZE}, got {block}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("GPTQ: the calibration Hessian has non-finite entries (inf/NaN calibration inputs?)")
    kp = padded_k(k)
    dev = residual.device
    w = torch.nn.functional.pad(residual.to(torch.float32), (0, kp - k))
    h = torch.zeros(kp, kp, dtype=torch.float32, device=dev)
    h[:k, :k] = hessian.to(device=dev, dtype=torch.float32)
    # Padding columns and never-excited channels: decoupled unit rows, so no error flows into or out of them
    # (padding stays exactly 0 → code 0, as §3 requires).
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    if bool(dead.all()):
        h = torch.eye(kp, dtype=torch.float32, device=dev)
    hinv = _upper_inverse_cholesky(h, damp)

    q = torch.zeros(n, kp, dtype=torch.float32, device=dev)
    scales = torch.zeros(n, kp // GROUP_SIZE, dtype=dtype, device=dev)
    for b0 in range(0, kp, block):
        b1 = min(b0 + block, kp)
        w1 = w[:, b0:b1].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            j = b0 + i
            if j % GROUP_SIZE == 0:
                amax = w1[:, i : i + GROUP_SIZE].abs().amax(dim=1)
                # Tensor / tensor: IEEE division, as reference.quantize_groups (CUDA scalar division differs).
                s_d = (amax / torch.full_like(amax, QMAX)).to(dtype)
                scales[:, j // GROUP_SIZE] = s_d
                s = s_d.to(torch.float32)
                zero = s == 0
                safe = torch.where(zero, torch.ones_like(s), s)
            col = w1[:, i]
            qc = torch.round(col / safe)  # round half to even
            qc = torch.where(zero, torch.zeros_like(qc), qc).clamp_(QMIN, QMAX)
            q[:, j] = qc
            e = (col - qc * s) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    return pack_int4(q.to(torch.int8)), scales


def dequantize(qweight: torch.Tensor, wscales: torch.Tensor, k: int) -> torch.Tensor:
    """The stored codes × scales as fp32 [N, K] (padding columns dropped): what the 4-bit GEMM multiplies."""
    n = qweight.shape[0]
    q = unpack_int4(qweight).to(torch.float32).view(n, -1, GROUP_SIZE)
    return (q * wscales.to(torch.float32).unsqueeze(-1)).view(n, -1)[:, :k]


def refit_low_rank(
    target: torch.Tensor, hessian: torch.Tensor, rank: int, *, damp: float = DEFAULT_DAMP
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-r L = L1·L2 nearest to ``target`` T [N, K] in the metric of the inputs: argmin ‖(T − L)·C‖ with
    H + δ·I = C·Cᵀ (δ = damp·mean(diag H), as GPTQ dampens). With T = Ŵ − Q this is the low-rank branch that
    minimizes the layer's output error ‖X̂(Ŵ − Q − L)ᵀ‖ for the codes Q already chosen.

    Solution (Eckart–Young in the C metric): top-r SVD of T·C = U·S·Vᵀ, L = U_r·S_r·V_rᵀ·C⁻¹. Returned in the
    form §2.2 stores, (L1 = U'·S' [N, r], L2 = V'ᵀ [r, K]) with orthonormal rows of L2 — the SVD of L itself —
    so the stored branch has the magnitudes plain SVDQuant gives it (C⁻¹ would otherwise scale lora_down by
    1/‖x̂‖ and lora_up by ‖x̂‖, out of fp16's range for large activations). fp32 throughout.
    """
    from .decompose import top_singular  # decompose imports this module

    n, k = target.shape
    h = hessian.to(device=target.device, dtype=torch.float32)
    mean_diag = float(torch.diagonal(h).mean())
    if mean_diag <= 0:  # no calibration signal at all: the unweighted best rank-r approximation
        return top_singular(target.to(torch.float32), rank)
    eye = torch.eye(k, dtype=torch.float32, device=h.device)
    for attempt in range(MAX_DAMP_TRIES):
        c, info = torch.linalg.cholesky_ex(h + (damp * 10**attempt) * mean_diag * eye)
        if int(info) == 0:
            break
    else:
        raise ValueError(f"low-rank refit: the calibration Hessian ({k}×{k}) is not positive definite even with "
                         f"dampening {damp * 10 ** (MAX_DAMP_TRIES - 1):g}·mean(diag); non-finite calibration inputs?")
    l1, vt = top_singular(target.to(torch.float32) @ c, rank)  # (U_r·S_r, V_rᵀ)
    l2 = torch.linalg.solve_triangular(c, vt, upper=False, left=False)  # V_rᵀ·C⁻¹
    # Back to SVD form: L2ᵀ = Qb·Rb (QR, K×r), then the SVD of the small N×r factor L1·Rbᵀ.
    qb, rb = torch.linalg.qr(l2.T)
    u, s, vh = torch.linalg.svd(l1 @ rb.T, full_matrices=False)
    return u * s, vh @ qb.T


def hessian_bytes(in_features: int) -> int:
    """Memory of one layer's Σ xᵀx accumulator (fp32 [K, K])."""
    return 4 * in_features * in_features


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now (CUDA: the driver's count; CPU: available physical pages)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import os

    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): do not limit
        return 1 << 62


def layers_within_memory(layers: dict, budget: int | None = None) -> list[str]:
    """Names of the layers whose Hessian accumulators fit `budget` bytes (default: half the memory free on
    the device of the first layer's weight, where calibration inputs arrive), smallest K first so that the
    most layers get GPTQ. The rest round to nearest; a warning names how many and the memory missing.

    Why a guard: a full-size FLUX.1-dev needs ≈ 64 GB of fp32 Hessians for all its layers at once (the
    K = 12288 / 15360 projections dominate); without it the default rounding would make calibrating such a
    model fail on an 80 GB GPU where round-to-nearest succeeds.
    """
    import logging

    if not layers:
        return []
    if budget is None:
        budget = free_memory(next(iter(layers.values())).weight.device) // 2
    chosen, used = [], 0
    for name, layer in sorted(layers.items(), key=lambda kv: kv[1].in_features):
        need = hessian_bytes(layer.in_features)
        if used + need > budget:
            continue
        chosen.append(name)
        used += need
    if len(chosen) < len(layers):
        total = sum(hessian_bytes(m.in_features) for m in layers.values())
        logging.getLogger("svdq").warning(
            "svdq.quantize: GPTQ Hessians for all %d layers need %.1f GB, more than the %.1f GB budget (half the "
            "free memory); %d layers (the widest inputs) round to nearest instead (svdq_report[...]['rounding'])",
            len(layers), total / 1e9, budget / 1e9, len(layers) - len(chosen),
        )
    return chosen
