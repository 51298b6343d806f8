"""svdq.quantize, SVDQLinear and the offline decomposition."""

import pytest
import torch
from torch import nn

import svdq
from svdq.decompose import decompose, top_singular
from svdq.ops import reference as ref


def outlier_layer(seed: int, k: int = 512, n: int = 256):
    """A layer whose inputs have 8 heavy channels (×20–50) and whose weight has a rank-8 component.

    Real diffusion-model layers have both (activation outliers; weights with a few dominant directions):
    the heavy channels ruin per-group activation scales (naive), smoothing moves them into the weight
    (smoothquant), and the low-rank branch absorbs what smoothing made hard for the weight (svdquant).
    """
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
        lin.weight.add_(torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g) / k**0.5)
    gain = torch.ones(k)
    gain[torch.randperm(k, generator=g)[:8]] = torch.rand(8, generator=g) * 30 + 20
    x = torch.randn(1024, k, generator=g) * gain
    return lin, x[:512], x[512:]


@pytest.mark.parametrize("seed", [0, 1])
def test_method_ablation_on_outlier_layers(seed):
    errors = {}
    for method in ("naive", "smoothquant", "svdquant"):
        lin, calib_x, test_x = outlier_layer(seed)
        with torch.no_grad():
            expected = lin(test_x)
            model = nn.Sequential(lin)
            svdq.quantize(model, calibration=lambda m: m(calib_x), method=method, progress=False)
            assert isinstance(model[0], svdq.SVDQLinear)
            errors[method] = float((model(test_x) - expected).norm() / expected.norm())
    assert errors["svdquant"] < errors["smoothquant"] < errors["naive"], errors
    assert errors["svdquant"] <= 0.5 * errors["naive"], errors


def test_data_free_uses_unit_smoothing_and_lowrank():
    lin, _, test_x = outlier_layer(3)
    layer = svdq.SVDQLinear.from_linear(lin, rank=20)
    assert layer.rank == 32  # padded to a multiple of 16 with zero columns
    assert torch.equal(layer.smooth, torch.ones_like(layer.smooth))
    assert (layer.lora_down[:, 20:] == 0).all() and (layer.lora_up[:, 20:] == 0).all()
    with torch.no_grad():
        rank0 = svdq.SVDQLinear.from_linear(lin, rank=0)
        e_lr = (layer(test_x) - lin(test_x)).norm()
        e_0 = (rank0(test_x) - lin(test_x)).norm()
    assert e_lr < e_0  # the branch absorbs the weight's dominant directions


def test_lowrank_branch_reads_raw_input():
    # lora_down = diag(1/λ)·L2ᵀ, so x·lora_down·lora_upᵀ = x̂·L2ᵀ·L1ᵀ: check against the smoothed SVD.
    torch.manual_seed(0)
    w = torch.randn(48, 128, dtype=torch.float64).float()
    lam = torch.rand(128) + 0.5
    dec = decompose(w, 16, lam)
    l1, l2 = top_singular(w * dec.smooth.float(), 16)
    x = torch.randn(4, 128)
    torch.testing.assert_close(x @ dec.lora_down @ dec.lora_up.T, (x / dec.smooth) @ l2.T @ l1.T, rtol=1e-4, atol=1e-4)


def test_randomized_svd_matches_exact_for_large_layers(monkeypatch):
    import svdq.decompose as d

    torch.manual_seed(0)
    w = torch.randn(300, 40) @ torch.randn(40, 400) + 0.01 * torch.randn(300, 400)
    exact = top_singular(w, 16)
    monkeypatch.setattr(d, "EXACT_SVD_MAX_DIM", 64)
    fast = d.top_singular(w, 16)
    torch.testing.assert_close(fast[0] @ fast[1], exact[0] @ exact[1], rtol=1e-3, atol=1e-3)


def test_svdqlinear_matches_reference_ops_and_keeps_leading_dims():
    lin, _, x = outlier_layer(4, k=100, n=24)
    layer = svdq.SVDQLinear.from_linear(lin.to(torch.bfloat16), rank=16)
    x = x[:6].reshape(2, 3, 100).to(torch.bfloat16)
    y = layer(x)
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16
    qact, ascales, lora_act = ref.quantize_act(x.reshape(6, 100), layer.smooth, layer.lora_down, layer.lora_scales)
    expected = ref.w4a4_gemm(qact, ascales, layer.qweight, layer.wscales, lora_act, layer.lora_up, layer.bias,
                             torch.bfloat16)
    assert torch.equal(y.reshape(6, 24), expected)
    with pytest.raises(ValueError, match="last dimension 100"):
        layer(torch.zeros(2, 99, dtype=torch.bfloat16))


def test_config_validation_and_patterns():
    with pytest.raises(ValueError, match="method"):
        svdq.QuantizeConfig(method="gptq")
    with pytest.raises(ValueError, match="rank"):
        svdq.QuantizeConfig(rank=-1)
    assert svdq.QuantizeConfig(method="naive").rank == 0
    model = nn.ModuleDict({"x_embedder": nn.Linear(64, 64), "blk": nn.ModuleDict({"to_q": nn.Linear(64, 64),
                                                                                "proj_out": nn.Linear(64, 64)}),
                           "proj_out": nn.Linear(64, 64)})
    svdq.quantize(model, progress=False)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n}
    assert kinds["x_embedder"] == "Linear" and kinds["proj_out"] == "Linear"  # 16-bit by default
    assert kinds["blk.to_q"] == "SVDQLinear" and kinds["blk.proj_out"] == "SVDQLinear"
    model2 = nn.ModuleDict({"a": nn.Linear(64, 64), "b": nn.Linear(64, 64)})
    svdq.quantize(model2, include=["a"], progress=False)
    assert isinstance(model2["a"], svdq.SVDQLinear) and type(model2["b"]) is nn.Linear


def test_to_dtype_keeps_lora_scales_fp32():
    layer = svdq.SVDQLinear.from_linear(nn.Linear(64, 32), rank=16).to(torch.bfloat16)
    assert layer.wscales.dtype == torch.bfloat16 and layer.lora_scales.dtype == torch.float32
    layer(torch.randn(3, 64, dtype=torch.bfloat16))  # every backend accepts the converted layer
