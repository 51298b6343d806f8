"""GPTQ rounding of the residual (svdq.gptq, svdq.quantize(rounding="gptq")).

What could break: the stored format (codes, scales, padding) drifting from docs/numerics.md §3; the error
spread going to the wrong columns (then GPTQ is *worse* than round-to-nearest); the Hessian built from raw
instead of smoothed inputs; the low-rank refit after GPTQ fitting in the wrong metric (or not at all); the
guard that keeps round-to-nearest where GPTQ does not help; the calibration sample collapsing onto repeated
rows (then the tiny SDXL's cross-attention layers are calibrated on zero rows only).
"""

import pytest
import torch
from torch import nn

import svdq
from svdq.decompose import decompose, fake_quant_forward, smoothing_factors
from svdq.gptq import dequantize, gptq_quantize_weight, refit_low_rank, smoothed_hessian
from svdq.ops import reference as ref


def correlated_outlier_layer(seed: int, k: int = 320, n: int = 128, rows: int = 2048, latent: int = 48):
    """A layer with outlier input channels (×20–50, as test_quantize.outlier_layer) whose inputs are also
    *correlated*: they live near a `latent`-dimensional subspace, as real activations do (their covariance
    spectrum decays fast). GPTQ's gain comes from that correlation; with white inputs it equals rounding to
    nearest. K = 320 is not a multiple of 128 (the GPTQ block), so the last block is short."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
        lin.weight.add_(torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g) / k**0.5)
    gain = torch.ones(k)
    gain[torch.randperm(k, generator=g)[:8]] = torch.rand(8, generator=g) * 30 + 20
    mix = torch.randn(latent, k, generator=g) / latent**0.5
    x = (torch.randn(rows, latent, generator=g) @ mix + 0.1 * torch.randn(rows, k, generator=g)) * gain
    return lin, x[: rows // 2], x[rows // 2 :]


def dequant(qweight, wscales, k):
    n = qweight.shape[0]
    q = ref.unpack_int4(qweight).to(torch.float32).view(n, -1, ref.GROUP_SIZE)
    return (q * wscales.to(torch.float32).unsqueeze(-1)).view(n, -1)[:, :k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_hessian_is_round_to_nearest_bit_exact(dtype):
    # H = I: no correlation, nothing to compensate → exactly §2.4 (same codes, same scales, same padding).
    torch.manual_seed(0)
    r = torch.randn(24, 200) * torch.rand(200) * 3
    r[3, 64:128] = 0  # an all-zero group: scale 0, codes 0
    q_ref, s_ref = ref.quantize_weight(r, dtype)
    q, s = gptq_quantize_weight(r, torch.eye(200), dtype)
    assert s.dtype == dtype and s.shape == s_ref.shape == (24, 4) and q.shape == q_ref.shape == (24, 128)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_codes_scales_and_padding_are_the_stored_format():
    lin, x, _ = correlated_outlier_layer(0, k=200)
    w = lin.weight.detach()
    q, s = gptq_quantize_weight(w, x.T @ x, torch.bfloat16)
    codes = ref.unpack_int4(q)
    assert codes.shape == (128, 256) and s.shape == (128, 4) and s.dtype == torch.bfloat16
    assert (codes[:, 200:] == 0).all()  # K..Kp−1 stay 0 (§3)
    assert codes.min() >= ref.QMIN and codes.max() <= ref.QMAX
    # every group uses its range: the scale was chosen from the values GPTQ rounds, not a stale maximum
    assert (codes.abs().amax(dim=-1) >= 6).all()
    # the layer built from it runs through the ordinary reference ops
    dec = decompose(w, 0, None, xtx=x.T @ x)
    assert torch.equal(dec.qweight, gptq_quantize_weight(w, x.T @ x, torch.float32)[0])


def test_gptq_lowers_the_residual_output_error_it_minimizes():
    lin, cx, tx = correlated_outlier_layer(1)
    w = lin.weight.detach()
    near = dequant(*ref.quantize_weight(w, torch.float32), w.shape[1])
    gptq = dequant(*gptq_quantize_weight(w, cx.T @ cx, torch.float32), w.shape[1])
    e_near = float((tx @ (near - w).T).norm())
    e_gptq = float((tx @ (gptq - w).T).norm())
    assert e_gptq < 0.7 * e_near, (e_gptq, e_near)  # held-out rows; measured ≈ 0.5
    # ...while the plain weight error grows: GPTQ trades it for the directions the inputs excite
    assert float((gptq - w).norm()) > float((near - w).norm())


def test_hessian_is_taken_on_the_smoothed_inputs():
    lin, cx, tx = correlated_outlier_layer(2)
    w = lin.weight.detach()
    lam = smoothing_factors(cx.abs().amax(0), w, 0.5)
    xtx = cx.T @ cx
    h = smoothed_hessian(xtx, lam)
    xh = cx / lam
    torch.testing.assert_close(h, xh.T @ xh, rtol=1e-4, atol=1e-3 * float(h.abs().max()))
    # decompose(xtx=raw) must smooth it itself: against the raw Hessian the result is worse on held-out data.
    y = tx @ w.T
    good = decompose(w, 16, lam, xtx=xtx)
    wrong = decompose(w, 16, lam)
    wrong.qweight, wrong.wscales = gptq_quantize_weight(
        w * wrong.smooth.float() - wrong.lora_up.float() @ (wrong.smooth.float()[:, None] * wrong.lora_down.float()).T,
        xtx, torch.float32)
    err = {d: float((fake_quant_forward(tx, dec) - y).norm() / y.norm()) for d, dec in (("good", good), ("wrong", wrong))}
    assert err["good"] < err["wrong"], err


def test_quantize_gptq_beats_nearest_on_outlier_layers():
    # Done criterion of issue 16: ≥ 15 % lower mean output error than SVDQuant round-to-nearest, no layer
    # worse by more than noise — on held-out inputs of the whole layer (smoothing, low-rank, both quantizers).
    errors = {"nearest": [], "gptq": []}
    for seed in range(4):
        for rounding in errors:
            lin, calib_x, test_x = correlated_outlier_layer(seed)
            with torch.no_grad():
                expected = lin(test_x)
                model = nn.Sequential(lin)
                config = svdq.QuantizeConfig(alphas=(0.3, 0.5, 0.7), rounding=rounding)
                svdq.quantize(model, calibration=lambda m: m(calib_x), config=config, progress=False)
                errors[rounding].append(float((model(test_x) - expected).norm() / expected.norm()))
            report = model.svdq_report["0"]
            if rounding == "gptq":
                assert report["rounding"] == "gptq" and report["rel_error"] < report["rel_error_nearest"]
    mean = {r: sum(e) / len(e) for r, e in errors.items()}
    assert mean["gptq"] <= 0.85 * mean["nearest"], errors  # measured 0.80 (GPTQ without the refit: 0.81)
    assert all(g <= 1.01 * n for g, n in zip(errors["gptq"], errors["nearest"])), errors


def test_gptq_falls_back_to_nearest_without_calibration_and_where_it_does_not_help(monkeypatch):
    lin, calib_x, _ = correlated_outlier_layer(3)
    data_free = nn.Sequential(lin)
    svdq.quantize(data_free, rounding="gptq", progress=False)
    assert data_free.svdq_config.rounding == "gptq" and "rounding" not in data_free.svdq_report["0"]
    nearest = svdq.SVDQLinear.from_linear(lin, rank=32)
    assert torch.equal(data_free[0].qweight, nearest.qweight)  # rounded to nearest: no Hessian without data

    # A GPTQ that makes things worse must be rejected by the guard. (Error spread with the wrong sign is no
    # longer bad enough: the low-rank refit after it absorbs much of the damage; codes of −R are.)
    import svdq.decompose as d

    real = d.gptq_quantize_weight
    monkeypatch.setattr(d, "gptq_quantize_weight", lambda r, h, dt: real(-r, h, dt))
    lin, calib_x, _ = correlated_outlier_layer(3)
    model = nn.Sequential(lin)
    svdq.quantize(model, calibration=lambda m: m(calib_x), rounding="gptq", progress=False)
    assert model.svdq_report["0"]["rounding"] == "nearest"
    assert model.svdq_report["0"]["rel_error"] == model.svdq_report["0"]["rel_error_nearest"]


# ---- the low-rank branch refit after GPTQ (svdq.gptq.refit_low_rank) ----

def test_refit_low_rank_is_the_best_rank_r_fit_in_the_input_metric():
    g = torch.Generator().manual_seed(5)
    t = torch.randn(48, 96, generator=g)
    x = (torch.randn(600, 12, generator=g) @ torch.randn(12, 96, generator=g) + 0.1 * torch.randn(600, 96, generator=g))
    x[:, :4] *= 20  # outlier channels: the metric differs a lot from the plain Frobenius norm
    h = x.T @ x
    l1, l2 = refit_low_rank(t, h, 8)
    assert l1.shape == (48, 8) and l2.shape == (8, 96)
    torch.testing.assert_close(l2 @ l2.T, torch.eye(8), atol=1e-5, rtol=0)  # stored in SVD form (§2.2)
    # Eckart–Young in the C metric (H + δI = C·Cᵀ, δ = 0.01·mean diag): the error is the tail of T·C's spectrum
    c = torch.linalg.cholesky(h + 0.01 * torch.diagonal(h).mean() * torch.eye(96))
    sv = torch.linalg.svdvals(t @ c)
    got = float(((t - l1 @ l2) @ c).norm())
    assert got == pytest.approx(float(sv[8:].norm()), rel=1e-4)
    # ...which the plain SVD (what SVDQuant's branch is) and the wrong-side factor C⁻ᵀ do not reach
    u, s, vh = torch.linalg.svd(t, full_matrices=False)
    assert float(((t - (u[:, :8] * s[:8]) @ vh[:8]) @ c).norm()) > 1.2 * got
    a = torch.linalg.svd(t @ torch.linalg.inv(c).T, full_matrices=False)
    wrong = (a.U[:, :8] * a.S[:8]) @ a.Vh[:8] @ c.T
    assert float(((t - wrong) @ c).norm()) > 1.2 * got
    # H = I (or no signal at all): the plain best rank-r approximation
    for eye in (torch.eye(96), torch.zeros(96, 96)):
        e1, e2 = refit_low_rank(t, eye, 8)
        torch.testing.assert_close(e1 @ e2, (u[:, :8] * s[:8]) @ vh[:8], atol=1e-4, rtol=1e-4)


def _variants_at_alpha(lin, calib_x, alpha):
    """Decompositions of one layer at smoothing α: round to nearest, GPTQ + refit (decompose(xtx=)), and the
    broken variants the refit and the Hessian must beat."""
    from svdq.decompose import Decomposition, top_singular

    w = lin.weight.detach()
    k = w.shape[1]
    lam = smoothing_factors(calib_x.abs().amax(0), w, alpha)
    xtx = calib_x.T @ calib_x
    near = decompose(w, 32, lam)
    lam_d = near.smooth.float()
    residual = w * lam_d - near.lora_up.float() @ (lam_d[:, None] * near.lora_down.float()).T
    q, s = gptq_quantize_weight(residual, smoothed_hessian(xtx, lam_d), torch.float32)
    l1, l2 = top_singular(w * lam_d - dequantize(q, s, k), 32)
    return {
        "nearest": near,
        "gptq": decompose(w, 32, lam, xtx=xtx),
        "no refit": Decomposition(q, s, near.smooth, near.lora_down, near.lora_up),  # the SVD branch kept
        "refit unweighted": Decomposition(q, s, near.smooth, l2.T / lam_d[:, None], l1),  # refit ignoring H
        # zeroed Hessian compensation: only diag(H) → GPTQ rounds to nearest, the refit weighs channels only
        "diagonal Hessian": decompose(w, 32, lam, xtx=torch.diag(torch.diagonal(xtx))),
    }


def test_refit_and_hessian_compensation_each_lower_the_held_out_error():
    errors = {}
    for seed in range(2):
        lin, calib_x, test_x = correlated_outlier_layer(seed)
        y = test_x @ lin.weight.detach().T
        for name, dec in _variants_at_alpha(lin, calib_x, 0.7).items():  # α = 0.7: what the search picks here
            errors.setdefault(name, []).append(float((fake_quant_forward(test_x, dec) - y).norm() / y.norm()))
    mean = {name: sum(e) / len(e) for name, e in errors.items()}
    ratio = {name: m / mean["gptq"] for name, m in mean.items()}
    # measured: nearest 1.26, no refit 1.02, refit unweighted 1.07, diagonal Hessian 1.15 (× GPTQ + refit)
    assert ratio["nearest"] > 1.18 and ratio["no refit"] > 1.01 and ratio["refit unweighted"] > 1.03, ratio
    assert ratio["diagonal Hessian"] > 1.08, ratio
    assert all(g < n for g, n in zip(errors["gptq"], errors["no refit"])), errors  # every seed


def test_gptq_decomposition_keeps_the_stored_format():
    lin, calib_x, _ = correlated_outlier_layer(6, k=200)
    w = lin.weight.detach().to(torch.bfloat16)
    lam = smoothing_factors(calib_x.abs().amax(0), w, 0.5)
    near = decompose(w, 20, lam)
    dec = decompose(w, 20, lam, xtx=calib_x.T @ calib_x)
    for name in ("qweight", "wscales", "smooth", "lora_down", "lora_up"):
        a, b = getattr(dec, name), getattr(near, name)
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape)
    assert dec.lora_down.shape == (200, 32) and torch.equal(dec.smooth, near.smooth)
    assert (dec.lora_down[:, 20:] == 0).all() and (dec.lora_up[:, 20:] == 0).all()  # rank 20 padded to 32
    assert float(dec.lora_up[:, :20].float().norm()) > 0
    codes = ref.unpack_int4(dec.qweight)
    assert codes.min() >= ref.QMIN and codes.max() <= ref.QMAX and (codes[:, 200:] == 0).all()
    assert (codes.abs().amax(dim=-1) >= 6).all()  # s = max|group|/7 of the values GPTQ rounds: ranges used
    # the refit branch stays in SVD form (orthonormal rows of L2 = λ·lora_down), like the plain one
    l2 = (dec.smooth.float()[:, None] * dec.lora_down.float())[:, :20].T
    torch.testing.assert_close(l2 @ l2.T, torch.eye(20), atol=0.02, rtol=0)  # bf16-rounded factors


# ---- the tiny SDXL pipeline's calibrated layers ----

@pytest.fixture(scope="module")
def sdxl_layers():
    """The tiny SDXL UNet's quantized layers, their calibration statistics (2 prompts × 2 steps, CFG, Hessians
    for every layer) and held-out input rows (another prompt and seed; 512 rows per layer drawn uniformly from
    every row the layer sees)."""
    from svdq.models import FAMILIES, call_defaults, pipeline_model, prepare
    from svdq.quantize import collect_input_stats, select_linears
    from svdq.testing import tiny

    pipe = tiny.tiny_pipeline("sdxl")
    model = pipeline_model(pipe)
    prepare(model)
    kwargs = dict(num_inference_steps=2, height=32, width=32, **call_defaults(pipe))
    layers = select_linears(model, svdq.QuantizeConfig(exclude=FAMILIES["sdxl"].exclude))
    calib = svdq.calibrate_pipeline(pipe, ["a lighthouse in a storm, watercolor", "portrait of an old man"],
                                    progress=False, **kwargs)
    stats = collect_input_stats(model, layers, calib, 256, xtx=list(layers))
    rows = {name: [] for name in layers}
    hooks = [m.register_forward_pre_hook(lambda _m, a, _n=name: rows[_n].append(a[0].reshape(-1, a[0].shape[-1])))
             for name, m in layers.items()]
    try:
        svdq.calibrate_pipeline(pipe, ["a red fox sitting in the snow"], seed=100, progress=False, **kwargs)(model)
    finally:
        for h in hooks:
            h.remove()
    g = torch.Generator().manual_seed(0)
    held = {}
    for name, chunks in rows.items():
        x = torch.cat(chunks)
        held[name] = x[torch.randperm(x.shape[0], generator=g)[:512]]
    return layers, stats, held


def test_gptq_beats_nearest_on_the_tiny_sdxl_layers(sdxl_layers):
    # Done criterion of issue 16 on a pipeline: ≥ 15 % lower mean held-out per-layer error than SVDQuant round
    # to nearest, no layer worse beyond noise. The SDXL layers are where GPTQ alone fell short (K = 64: one
    # group per row; the refit of the rank-32 branch after it is what reaches the goal).
    from svdq.quantize import quantize_layer

    layers, stats, held = sdxl_layers
    cross_kv = [n for n in layers if n.endswith("attn2.to_kv.linear")]
    assert cross_kv and all(int((stats[n].sample.abs().sum(1) > 0).sum()) > 100 for n in cross_kv)  # not zero rows
    config = svdq.QuantizeConfig(alphas=(0.3, 0.5, 0.7), rounding="gptq")
    errors = {"nearest": {}, "gptq": {}}
    with torch.no_grad():
        for name, lin in layers.items():
            w, x = lin.weight.detach(), held[name]
            y = x @ w.T
            if float(y.norm()) == 0:  # every held-out row zero (can happen for cross-attention): nothing to score
                continue
            dec, info = quantize_layer(lin, stats[name], config)
            alpha = info["alpha"]
            near = decompose(w, 32, None if alpha is None else smoothing_factors(stats[name].absmax, w, alpha))
            for key, d in (("nearest", near), ("gptq", dec)):
                errors[key][name] = float((fake_quant_forward(x, d) - y).norm() / y.norm())
    assert len(errors["gptq"]) >= 50
    mean = {k: sum(e.values()) / len(e) for k, e in errors.items()}
    assert mean["gptq"] <= 0.85 * mean["nearest"], mean  # measured 0.77
    worst = max(errors["gptq"][n] / errors["nearest"][n] for n in errors["gptq"])
    assert worst <= 1.02, worst  # measured 0.94 (no layer worse)


# ---- the calibration sample ----

def test_calibration_sample_keeps_distinct_rows_whatever_the_split():
    from svdq.quantize import InputStats

    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(300, 64, generator=g)
    # the SDXL case: half the rows one all-zero row (empty negative prompt), text rows repeated every step
    x = torch.cat([torch.zeros(2000, 64), distinct.repeat(4, 1)])
    x = x[torch.randperm(x.shape[0], generator=g)]
    whole, split = InputStats(), InputStats()
    whole.update(x, 256)
    for chunk in x.split(333):
        split.update(chunk, 256)
    assert torch.equal(whole.sample, split.sample) and torch.equal(whole.keys, split.keys)
    assert whole.sample.shape == (256, 64) and whole.seen == x.shape[0]
    assert torch.unique(whole.sample, dim=0).shape[0] == 256  # no row twice (before: 256 copies of a few rows)
    assert int((whole.sample.abs().sum(1) == 0).sum()) <= 1


def test_dead_channels_and_bad_hessians():
    torch.manual_seed(0)
    r = torch.randn(16, 130)
    x = torch.randn(500, 130)
    x[:, 5] = 0  # a channel the calibration never excited
    q, s = gptq_quantize_weight(r, x.T @ x, torch.float32)
    assert torch.isfinite(s).all() and (ref.unpack_int4(q)[:, 130:] == 0).all()
    with pytest.raises(ValueError, match=r"Hessian shape \(129, 129\) does not match the residual's K = 130"):
        gptq_quantize_weight(r, torch.eye(129), torch.float32)
    bad = x.T @ x
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        gptq_quantize_weight(r, bad, torch.float32)
    with pytest.raises(ValueError, match=r"xtx must have shape \(130, 130\) for a weight \(16, 130\)"):
        decompose(r, 16, xtx=torch.eye(4))


def test_config_field_validated_and_round_trips():
    with pytest.raises(ValueError, match="rounding must be one of"):
        svdq.QuantizeConfig(rounding="stochastic")
    c = svdq.QuantizeConfig(rounding="gptq")
    assert svdq.QuantizeConfig.from_dict(c.to_dict()) == c
    old = c.to_dict()
    del old["rounding"]  # a checkpoint written before the field existed was rounded to nearest
    assert svdq.QuantizeConfig.from_dict(old).rounding == "nearest"


def test_default_is_gptq_and_hessians_beyond_the_memory_budget_round_to_nearest(monkeypatch, caplog):
    import svdq.gptq as g

    assert svdq.QuantizeConfig().rounding == "gptq"
    small, _, _ = correlated_outlier_layer(0, k=64, n=32)
    wide, calib_wide, _ = correlated_outlier_layer(0, k=320, n=32)
    layers = {"wide": wide, "small": small}
    # the budget fits the small layer's Hessian (64²·4 B), not the wide one's (320²·4 B): smallest K first
    assert g.layers_within_memory(layers, budget=g.hessian_bytes(64) + 100) == ["small"]
    assert g.layers_within_memory(layers, budget=g.hessian_bytes(64) + g.hessian_bytes(320)) == ["small", "wide"]
    # through svdq.quantize: free memory 2× the small Hessian → budget (half) fits only layer "0" (K = 64)
    monkeypatch.setattr(g, "free_memory", lambda device: 2 * g.hessian_bytes(64) + 100)
    calib_small = correlated_outlier_layer(1, k=64, n=32)[1]
    model = nn.Sequential(small, wide)  # two independent layers, each calibrated on its own inputs
    with caplog.at_level("WARNING", logger="svdq"):
        svdq.quantize(model, calibration=lambda m: (m[0](calib_small), m[1](calib_wide)), progress=False)
    assert "round to nearest instead" in caplog.text
    assert model.svdq_report["1"]["rounding"] == "nearest" and "rel_error_nearest" not in model.svdq_report["1"]
    assert "rel_error_nearest" in model.svdq_report["0"]  # GPTQ was tried on the layer that fit


# ---- per-layer rank under a byte budget (QuantizeConfig.rank_budget) ----

def test_allocate_ranks_spends_the_budget_where_error_drops_most():
    from svdq.decompose import allocate_ranks

    curves = {
        "steep": {0: 1.0, 16: 0.5, 32: 0.3, 48: 0.25},
        "flat_then_drop": {0: 1.0, 16: 0.99, 32: 0.2, 48: 0.19},  # greedy must look past the flat first step
        "flat": {0: 0.5, 16: 0.49, 32: 0.48, 48: 0.47},
    }
    unit = {"steep": 10, "flat_then_drop": 10, "flat": 10}
    ranks = allocate_ranks(curves, unit, budget=10 * 64)
    assert ranks == {"steep": 32, "flat_then_drop": 32, "flat": 0}, ranks
    assert sum(r * unit[n] for n, r in ranks.items()) <= 640
    assert allocate_ranks(curves, unit, budget=0) == {"steep": 0, "flat_then_drop": 0, "flat": 0}
    with pytest.raises(ValueError, match="rank budget 5 bytes is below"):
        allocate_ranks({"a": {16: 0.1}}, {"a": 1}, budget=5)


def test_rank_budget_moves_rank_to_the_layer_that_needs_it():
    # Layer "0": white noise plus a strong rank-96 part (rank up to 96 pays a lot); layer "1": white noise (rank
    # pays little). Same byte budget as rank 48 everywhere → "0" gets more, "1" less, and the summed error drops
    # (measured: 0.92× of uniform; giving the rank to the wrong layer makes it > 1).
    g = torch.Generator().manual_seed(7)
    k = n = 384
    u, v = torch.linalg.qr(torch.randn(n, 96, generator=g))[0], torch.linalg.qr(torch.randn(k, 96, generator=g))[0]
    weights = [2 * u @ v.T + 0.2 * torch.randn(n, k, generator=g) / k**0.5, torch.randn(n, k, generator=g) / k**0.5]
    inputs = [correlated_outlier_layer(s, k=k, n=n)[1:] for s in (10, 11)]

    def build():
        m = nn.Sequential(nn.Linear(k, n), nn.Linear(k, n))
        with torch.no_grad():
            for lin, w in zip(m, weights):
                lin.weight.copy_(w)
        return m

    def run(m, which):
        return [m[i](inputs[i][which]) for i in range(2)]

    from svdq.decompose import branch_bytes

    budget = 2 * branch_bytes(n, k, 48, torch.float32)
    errors = {}
    with torch.no_grad():
        expected = run(build(), 1)
        for key, budget_ in (("uniform", None), ("budget", budget)):
            model = build()
            config = svdq.QuantizeConfig(rank=48, rounding="nearest", alphas=(0.5,), rank_budget=budget_)
            svdq.quantize(model, calibration=lambda m: run(m, 0), config=config, progress=False)
            errors[key] = [float((a - b).norm() / b.norm()) for a, b in zip(run(model, 1), expected)]
            ranks = [model.svdq_report[str(i)]["rank"] for i in range(2)]
            if key == "uniform":
                assert ranks == [48, 48]
            else:
                assert ranks[0] > 48 > ranks[1], ranks
                assert sum(branch_bytes(n, k, r, torch.float32) for r in ranks) <= budget
    assert sum(errors["budget"]) < 0.95 * sum(errors["uniform"]), errors


def test_rank_budget_needs_calibration_and_svdquant():
    lin, _, _ = correlated_outlier_layer(0, k=64, n=32)
    with pytest.raises(ValueError, match="rank_budget needs calibration"):
        svdq.quantize(nn.Sequential(lin), rank_budget=10**6, progress=False)
    with pytest.raises(ValueError, match="needs method 'svdquant'"):
        svdq.QuantizeConfig(method="naive", rank_budget=1000)
