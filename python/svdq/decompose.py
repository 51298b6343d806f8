"""Offline part of the spec (docs/numerics.md §2): smoothing factors, low-rank branch, INT4 residual.

Everything here works on one weight matrix at a time in fp32, on the weight's own device, so memory stays
bounded by a few copies of the largest layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gptq import dequantize, gptq_quantize_weight, refit_low_rank, smoothed_hessian
from .ops import reference
from .ops.reference import RANK_MULTIPLE

SMOOTH_MIN, SMOOTH_MAX = 1e-5, 1e5
# Exact SVD below this many columns/rows; above it a randomized SVD (torch.svd_lowrank) with oversampling
# and power iterations: exact SVD of a 3072×12288 matrix takes seconds even on a GPU, ×11 smoothing
# candidates × hundreds of layers is too slow; the randomized one needs a few skinny matmuls.
EXACT_SVD_MAX_DIM = 256
LOWRANK_OVERSAMPLE = 32
LOWRANK_POWER_ITERS = 2
SVD_SEED = 0


@dataclass
class Decomposition:
    """The stored tensors of one quantized layer (canonical layout, spec §3)."""

    qweight: torch.Tensor  # int8 [N, Kp/2]
    wscales: torch.Tensor  # D [N, Kp/64]
    smooth: torch.Tensor  # D [K]
    lora_down: torch.Tensor  # D [K, r]
    lora_up: torch.Tensor  # D [N, r]

    @property
    def rank(self) -> int:
        return self.lora_down.shape[1]


def padded_rank(rank: int) -> int:
    """Kernels take ranks in multiples of 16: extra columns are zero and change nothing."""
    return -(-rank // RANK_MULTIPLE) * RANK_MULTIPLE


def top_singular(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors of fp32 `weight` [N, K]: (L1 = U·S [N, r], L2 = Vᵀ [r, K]).

    Exact for small matrices, randomized (seeded, so quantization is reproducible) for large ones.
    """
    n, k = weight.shape
    if min(n, k) <= EXACT_SVD_MAX_DIM or rank + LOWRANK_OVERSAMPLE >= min(n, k):
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return u[:, :rank] * s[:rank], vh[:rank]
    devices = [weight.device] if weight.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(SVD_SEED)
        u, s, v = torch.svd_lowrank(weight, q=rank + LOWRANK_OVERSAMPLE, niter=LOWRANK_POWER_ITERS)
    return u[:, :rank] * s[:rank], v[:, :rank].T


def stored_smooth(smooth: torch.Tensor | None, k: int, dtype: torch.dtype, device) -> torch.Tensor:
    """λ as `decompose` stores it, in fp32: ones when None; non-finite / non-positive entries → 1; clamped to
    [SMOOTH_MIN, SMOOTH_MAX]; rounded to the model dtype (the rounded λ is what Ŵ is built from)."""
    if smooth is None:
        lam = torch.ones(k, dtype=torch.float32, device=device)
    else:
        if smooth.shape != (k,):
            raise ValueError(f"smooth must have shape ({k},), got {tuple(smooth.shape)}")
        lam = smooth.detach().to(device=device, dtype=torch.float32)
        lam = torch.where(torch.isfinite(lam) & (lam > 0), lam, torch.ones_like(lam))
        lam = lam.clamp(SMOOTH_MIN, SMOOTH_MAX)
    return lam.to(dtype).to(torch.float32)


def decompose(
    weight: torch.Tensor,
    rank: int,
    smooth: torch.Tensor | None = None,
    *,
    xtx: torch.Tensor | None = None,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Decomposition:
    """Quantize one weight [N, K] per docs/numerics.md §2 into the canonical stored tensors.

    `rank` is clamped to min(N, K) and then padded with zero columns to a multiple of 16; `smooth` (λ, [K])
    defaults to ones (data-free). The dtype `D` of the stored tensors is `weight.dtype`.
    xtx: Σ xᵀx [K, K] of the layer's raw calibration inputs → the residual is rounded by GPTQ against the
    smoothed inputs' Hessian and the low-rank branch is then refit to the codes (`svdq.gptq`); ``None`` →
    round to nearest (§2.4).
    factors: `top_singular(W·diag(λ), r')` for some r' ≥ rank, already computed for this λ (the per-layer
    rank search reuses one SVD for every rank it tries); ``None`` → computed here.
    """
    if weight.dim() != 2:
        raise ValueError(f"decompose expects a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    dtype = weight.dtype
    n, k = weight.shape
    w = weight.detach().to(torch.float32)
    lam = stored_smooth(smooth, k, dtype, w.device)
    w_hat = w * lam

    r = min(rank, n, k)
    stored_rank = padded_rank(r)
    lora_down = torch.zeros(k, stored_rank, dtype=dtype, device=w.device)
    lora_up = torch.zeros(n, stored_rank, dtype=dtype, device=w.device)
    residual = w_hat
    if r > 0:
        l1, l2 = top_singular(w_hat, r) if factors is None else (factors[0][:, :r], factors[1][:r])
        lora_down[:, :r] = (l2.T / lam.unsqueeze(1)).to(dtype)
        lora_up[:, :r] = l1.to(dtype)
        # Residual against the *rounded* stored branch: the quantizer sees exactly the error it leaves.
        down_hat = lam.unsqueeze(1) * lora_down[:, :r].to(torch.float32)
        residual = w_hat - lora_up[:, :r].to(torch.float32) @ down_hat.T
    if xtx is None:
        qweight, wscales = reference.quantize_weight(residual, dtype)
    else:
        if xtx.shape != (k, k):
            raise ValueError(f"xtx must have shape ({k}, {k}) for a weight {tuple(weight.shape)}, got {tuple(xtx.shape)}")
        hessian = smoothed_hessian(xtx.to(w.device), lam)
        qweight, wscales = gptq_quantize_weight(residual, hessian, dtype)
        if r > 0:  # the branch is refit to the error the codes left, in the inputs' metric (svdq.gptq)
            l1, l2 = refit_low_rank(w_hat - dequantize(qweight, wscales, k), hessian, r)
            lora_down[:, :r] = (l2.T / lam.unsqueeze(1)).to(dtype)
            lora_up[:, :r] = l1.to(dtype)
    return Decomposition(qweight, wscales, lam.to(dtype), lora_down, lora_up)


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """λ_j = max|X_j|^α / max|W_j|^(1−α); channels with a zero statistic get λ_j = 1 (spec §2.1)."""
    a = act_absmax.to(torch.float32)
    w = weight.detach().to(torch.float32).abs().amax(dim=0).to(a.device)
    lam = a.pow(alpha) / w.pow(1 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(lam)
    return torch.where(ok, lam, torch.ones_like(lam)).clamp(SMOOTH_MIN, SMOOTH_MAX)


def fake_quant_forward(x: torch.Tensor, dec: Decomposition, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's output in fp32 computed by dequantizing both operands — the spec's math in one matmul.

    Equal to the reference ops up to fp32 summation order; used to score smoothing candidates fast.
    """
    n, k = dec.lora_up.shape[0], dec.smooth.shape[0]
    qact, ascales, lora_act = reference.quantize_act(x, dec.smooth, dec.lora_down)
    kp = reference.padded_k(k)
    act = reference.unpack_int4(qact).to(torch.float32).view(x.shape[0], -1, reference.GROUP_SIZE)
    act = (act * ascales.unsqueeze(-1)).view(x.shape[0], kp)
    wq = reference.unpack_int4(dec.qweight).to(torch.float32).view(n, -1, reference.GROUP_SIZE)
    wq = (wq * dec.wscales.to(torch.float32).unsqueeze(-1)).view(n, kp)
    y = act @ wq.T
    if lora_act.shape[1]:
        y = y + lora_act.to(x.dtype).to(torch.float32) @ dec.lora_up.to(torch.float32).T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y


def branch_bytes(n: int, k: int, rank: int, dtype: torch.dtype) -> int:
    """Bytes of a stored low-rank branch: lora_down [K, r] + lora_up [N, r] in the model dtype."""
    return rank * (n + k) * torch.empty((), dtype=dtype).element_size()


def rank_error_curve(
    weight: torch.Tensor, smooth: torch.Tensor | None, x: torch.Tensor, ranks: list[int]
) -> dict[int, float]:
    """Relative output error ‖y_q − y‖/‖y‖ on the rows `x` of the layer quantized (round to nearest) at each
    of `ranks` with smoothing `smooth`: the curve `allocate_ranks` spends a byte budget on. One SVD at the
    largest rank serves every rank (its leading factors are the smaller ranks' best factors)."""
    w = weight.detach().to(torch.float32)
    xs = x.to(weight.dtype)
    ref = xs.to(torch.float32) @ w.T
    lam = stored_smooth(smooth, w.shape[1], weight.dtype, w.device)
    top = max(ranks)
    factors = top_singular(w * lam, min(top, *w.shape)) if top > 0 else None
    curve = {}
    for r in ranks:
        dec = decompose(weight, r, smooth, factors=factors)
        curve[r] = float((fake_quant_forward(xs, dec) - ref).norm() / ref.norm().clamp_min(1e-30))
    return curve


def allocate_ranks(curves: dict[str, dict[int, float]], unit_bytes: dict[str, int], budget: int) -> dict[str, int]:
    """Per-layer ranks (keys of each curve, multiples of 16) whose branches cost at most `budget` bytes in
    total (`unit_bytes[name]`: bytes per rank of that layer) and lower the sum of the layers' errors the most.

    Greedy on the best error drop per byte: every layer starts at its smallest rank; each step takes, over all
    layers, the move to a larger rank with the largest (error drop / extra bytes) that still fits — looking
    past the next step, so a curve that is flat for 16 and then falls still gets its ranks.
    """
    ranks = {name: min(c) for name, c in curves.items()}
    spent = sum(ranks[n] * unit_bytes[n] for n in curves)
    if spent > budget:
        raise ValueError(
            f"rank budget {budget} bytes is below the smallest ranks' cost ({spent} bytes); raise it or lower the "
            "smallest rank"
        )
    while True:
        best = None
        for name, curve in curves.items():
            r0, e0 = ranks[name], curves[name][ranks[name]]
            for r1, e1 in curve.items():
                extra = (r1 - r0) * unit_bytes[name]
                if r1 <= r0 or spent + extra > budget or e1 >= e0:
                    continue
                gain = (e0 - e1) / extra
                if best is None or gain > best[0]:
                    best = (gain, name, r1, extra)
        if best is None:
            return ranks
        _, name, r1, extra = best
        ranks[name] = r1
        spent += extra
