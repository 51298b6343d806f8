"""GPTQ rounding of the residual (svdq.gptq, svdq.quantize(rounding="gptq")).

What could break: the stored format (codes, scales, padding) drifting from docs/numerics.md §3; the error
spread going to the wrong columns (then GPTQ is *worse* than round-to-nearest); the Hessian built from raw
instead of smoothed inputs; the guard that keeps round-to-nearest where GPTQ does not help.
"""

import pytest
import torch
from torch import nn

import svdq
from svdq.decompose import decompose, fake_quant_forward, smoothing_factors
from svdq.gptq import gptq_quantize_weight, smoothed_hessian
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
    assert mean["gptq"] <= 0.85 * mean["nearest"], errors  # measured 0.81 (each seed 0.81–0.82)
    assert all(g <= 1.01 * n for g, n in zip(errors["gptq"], errors["nearest"])), errors


def test_gptq_falls_back_to_nearest_without_calibration_and_where_it_does_not_help(monkeypatch):
    lin, calib_x, _ = correlated_outlier_layer(3)
    data_free = nn.Sequential(lin)
    svdq.quantize(data_free, rounding="gptq", progress=False)
    assert data_free.svdq_config.rounding == "gptq" and "rounding" not in data_free.svdq_report["0"]
    nearest = svdq.SVDQLinear.from_linear(lin, rank=32)
    assert torch.equal(data_free[0].qweight, nearest.qweight)  # rounded to nearest: no Hessian without data

    # A GPTQ that makes things worse (error spread with the wrong sign) must be rejected by the guard.
    import svdq.decompose as d

    real = d.gptq_quantize_weight
    monkeypatch.setattr(d, "gptq_quantize_weight", lambda r, h, dt: real(r, -h + 2 * torch.diag(torch.diag(h)), dt))
    lin, calib_x, _ = correlated_outlier_layer(3)
    model = nn.Sequential(lin)
    svdq.quantize(model, calibration=lambda m: m(calib_x), rounding="gptq", progress=False)
    assert model.svdq_report["0"]["rounding"] == "nearest"
    assert model.svdq_report["0"]["rel_error"] == model.svdq_report["0"]["rel_error_nearest"]


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
