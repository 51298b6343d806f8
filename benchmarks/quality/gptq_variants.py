"""GPTQ variants on the tiny FLUX.1 / SDXL / PixArt-Σ pipelines' calibrated layers (issue 16): which way of
choosing the residual's codes and the low-rank branch lowers the held-out per-layer output error most.

Per family, the 16-bit pipeline is calibrated once on quality_table's CALIB_PROMPTS (the library's statistics:
distinct-row sample of 256, channel max, Σ xᵀx over all rows; plus every input row, for the variants that need
them) and every layer is then quantized at the α the library's search picks (round to nearest, grid 0.3/0.5/0.7),
once per variant; the error ‖y_q − y‖/‖y‖ is measured on held-out rows (quality_table.held_out_inputs: EVAL_PROMPTS,
1024 rows per layer drawn uniformly). Like `svdq.quantize`, a variant is kept per layer only where it lowers
the error on the calibration sample (else that layer stays round-to-nearest).

Variants:
  gptq               the library's rounding="gptq": GPTQ codes, then the branch refit (svdq.gptq.refit_low_rank)
  gptq, no refit     GPTQ codes with the plain SVD branch (the rounding before the refit)
  gptq+refit ×2      GPTQ → refit → GPTQ on the new residual → refit (alternating)
  act-order          GPTQ in order of decreasing diag(H), static groups (scales from the un-updated residual), + refit
  damp 0.1 / 0.001   GPTQ and refit dampening (default 0.01)
  act-aware          GPTQ against the quantized activations X̃: W' = R·X̂ᵀX̃·(X̃ᵀX̃)⁻¹ (all calibration rows), then
                     GPTQ of W' with Hessian X̃ᵀX̃ (no refit)

    .venv/bin/python benchmarks/quality/gptq_variants.py --out benchmarks/results/gptq_variants_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality_table as qt  # noqa: E402
import svdq  # noqa: E402
from svdq.decompose import Decomposition, decompose, fake_quant_forward, smoothing_factors  # noqa: E402
from svdq.gptq import (  # noqa: E402
    DEFAULT_DAMP, _upper_inverse_cholesky, dequantize, gptq_quantize_weight, refit_low_rank, smoothed_hessian)
from svdq.models import FAMILIES, pipeline_model, prepare  # noqa: E402
from svdq.ops import reference as ref  # noqa: E402
from svdq.quantize import QuantizeConfig, collect_input_stats, quantize_layer, select_linears  # noqa: E402

RANK = 32


def rel_err(x: torch.Tensor, dec: Decomposition, w: torch.Tensor) -> float | None:
    y = x @ w.T
    return None if float(y.norm()) == 0 else float((fake_quant_forward(x, dec) - y).norm() / y.norm())


def residual(w: torch.Tensor, dec: Decomposition) -> torch.Tensor:
    lam = dec.smooth.float()
    return w * lam - dec.lora_up.float() @ (lam[:, None] * dec.lora_down.float()).T


def with_codes(dec: Decomposition, q, s) -> Decomposition:
    return Decomposition(q, s, dec.smooth, dec.lora_down, dec.lora_up)


def refit(w: torch.Tensor, dec: Decomposition, h: torch.Tensor, damp: float = DEFAULT_DAMP) -> Decomposition:
    lam = dec.smooth.float()
    r = min(RANK, *w.shape)
    l1, l2 = refit_low_rank(w * lam - dequantize(dec.qweight, dec.wscales, w.shape[1]), h, r, damp=damp)
    down, up = torch.zeros_like(dec.lora_down), torch.zeros_like(dec.lora_up)
    down[:, :r], up[:, :r] = (l2.T / lam[:, None]).to(down.dtype), l1.to(up.dtype)
    return Decomposition(dec.qweight, dec.wscales, dec.smooth, down, up)


def gptq_act_order(r: torch.Tensor, h: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ in order of decreasing diag(H) with static groups: every scale from the un-updated residual (so the
    stored order and format stay), codes chosen in the permuted order."""
    n, k = r.shape
    kp = ref.padded_k(k)
    w = torch.nn.functional.pad(r, (0, kp - k))
    s = (w.view(n, -1, ref.GROUP_SIZE).abs().amax(-1) / torch.full((1,), float(ref.QMAX))).to(dtype)
    sf = s.float().repeat_interleave(ref.GROUP_SIZE, dim=1)
    hp = torch.zeros(kp, kp)
    hp[:k, :k] = h
    dead = torch.diagonal(hp) <= 0
    hp[dead, :], hp[:, dead] = 0, 0
    hp[dead, dead] = 1
    perm = torch.argsort(torch.diagonal(hp), descending=True)
    wp, sp = w[:, perm].clone(), sf[:, perm]
    u = _upper_inverse_cholesky(hp[perm][:, perm], DEFAULT_DAMP)
    q = torch.zeros_like(wp)
    for j in range(kp):
        sc = sp[:, j]
        safe = torch.where(sc == 0, torch.ones_like(sc), sc)
        qc = torch.where(sc == 0, torch.zeros_like(sc), torch.round(wp[:, j] / safe)).clamp(ref.QMIN, ref.QMAX)
        q[:, j] = qc
        e = (wp[:, j] - qc * sc) / u[j, j]
        wp[:, j:] -= e[:, None] * u[j, j:][None]
    return ref.pack_int4(q[:, torch.argsort(perm)].to(torch.int8)), s


def act_dequant(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """X̃: the dequantized smoothed activations the 4-bit GEMM multiplies (K real columns)."""
    k = x.shape[1]
    q, s, _ = ref.quantize_act(x, lam, torch.zeros(k, 0))
    a = ref.unpack_int4(q).float().view(x.shape[0], -1, ref.GROUP_SIZE) * s.unsqueeze(-1)
    return a.view(x.shape[0], -1)[:, :k]


def act_aware(w, dec, rows):
    lam = dec.smooth.float()
    xh, xt = rows / lam, act_dequant(rows, lam)
    ht = xt.T @ xt
    target = torch.linalg.solve(ht, (xh.T @ xt).T @ residual(w, dec).T).T  # R·X̂ᵀX̃·(X̃ᵀX̃)⁻¹
    return with_codes(dec, *gptq_quantize_weight(target, ht, w.dtype))


VARIANTS = {
    "gptq": lambda w, near, h, lam, st, rows: decompose(w, RANK, lam, xtx=st.xtx),
    "gptq, no refit": lambda w, near, h, lam, st, rows: with_codes(near, *gptq_quantize_weight(residual(w, near), h, w.dtype)),
    "gptq+refit x2": lambda w, near, h, lam, st, rows: refit(w, with_codes(
        d1 := decompose(w, RANK, lam, xtx=st.xtx), *gptq_quantize_weight(residual(w, d1), h, w.dtype)), h),
    "act-order (static groups)": lambda w, near, h, lam, st, rows: refit(w, with_codes(
        near, *gptq_act_order(residual(w, near), h, w.dtype)), h),
    "damp 0.1": lambda w, near, h, lam, st, rows: refit(w, with_codes(
        near, *gptq_quantize_weight(residual(w, near), h, w.dtype, damp=0.1)), h, damp=0.1),
    "damp 0.001": lambda w, near, h, lam, st, rows: refit(w, with_codes(
        near, *gptq_quantize_weight(residual(w, near), h, w.dtype, damp=0.001)), h, damp=0.001),
    "act-aware": lambda w, near, h, lam, st, rows: act_aware(w, near, rows),
}


def evaluate(family: str) -> dict:
    pipe = qt.tiny.tiny_pipeline(family)
    model = pipeline_model(pipe)
    prepare(model)
    layers = select_linears(model, QuantizeConfig(exclude=FAMILIES[family].exclude))
    calib = svdq.calibrate_pipeline(pipe, qt.CALIB_PROMPTS, progress=False, **qt.call_kwargs(pipe))
    stats = collect_input_stats(model, layers, calib, 256, xtx=list(layers))
    rows = qt.all_rows(pipe, model, layers, qt.CALIB_PROMPTS, 0)
    held = qt.held_out_inputs(pipe, model, layers)
    config = QuantizeConfig(alphas=qt.ALPHAS, rounding="nearest")
    errors = {v: {} for v in ["nearest", *VARIANTS]}
    seconds = dict.fromkeys(VARIANTS, 0.0)
    with torch.no_grad():
        for name, lin in layers.items():
            st = stats[name]
            if st.sample is None or name not in held:
                continue
            w = lin.weight.detach().float()
            near, info = quantize_layer(lin, st, config)
            lam = None if info["alpha"] is None else smoothing_factors(st.absmax, w, info["alpha"])
            h = smoothed_hessian(st.xtx, near.smooth.float())
            e_near = rel_err(held[name], near, w)
            if e_near is None:  # every held-out row zero: nothing to score
                continue
            errors["nearest"][name] = e_near
            on_sample = rel_err(st.sample.float(), near, w)
            for v, make in VARIANTS.items():
                t0 = time.perf_counter()
                dec = make(w, near, h, lam, st, rows[name].float())
                seconds[v] += time.perf_counter() - t0
                s_err = rel_err(st.sample.float(), dec, w)
                keep = on_sample is not None and s_err is not None and s_err < on_sample  # quantize_layer's guard
                errors[v][name] = rel_err(held[name], dec if keep else near, w)
    base = sum(errors["nearest"].values()) / len(errors["nearest"])
    out = {"layers": len(errors["nearest"]), "nearest_mean": base, "variants": {}}
    for v in VARIANTS:
        m = sum(errors[v].values()) / len(errors[v])
        worst = max(errors[v][n] / errors["nearest"][n] for n in errors[v])
        out["variants"][v] = {"mean": m, "vs_nearest_pct": 100 * (m / base - 1), "worst_layer_ratio": worst,
                              "seconds": round(seconds[v], 2)}
        print(f"{family:7s} {v:28s} {m:.4f} {100 * (m / base - 1):+6.1f} %  worst layer {worst:.3f}  "
              f"{seconds[v]:.1f} s", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(qt.FAMILY_NAMES), choices=qt.FAMILY_NAMES)
    ap.add_argument("--out", help="JSON results")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    results = {f: evaluate(f) for f in args.families}
    if args.out:
        from svdq.bench.env import write_results

        write_results(args.out, results, torch.device("cpu"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
