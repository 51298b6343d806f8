"""A quality bound that real breakage fails: the denoiser output of calibrated SVDQuant W4A4 against the 16-bit
model, on tiny FLUX / SDXL / PixArt-Σ models (seeded weights with planted activation outliers, as in the real
models), held-out inputs.

Why not the image PSNR of test_pipelines (≥ 30 dB): it only catches catastrophes — measured on tiny FLUX, naive
W4A4 still gave 47.8 dB, swapped int4 nibbles 43.1 dB, a zeroed low-rank branch 46.6 dB. The relative error of
the denoiser's output (‖y_q − y_16‖ / ‖y_16‖ on an input not used for calibration) is far more sensitive.
Measured with these settings (one calibration input, smoothing α ∈ {0.5} against λ = 1 — the short search
keeps the test at ~90 CPU-seconds for all three families; CPU backend):

    family   svdquant   naive    swapped nibbles   zeroed low-rank   smoothing inverted (x·λ, not x/λ)
    flux     0.0153     0.0576   0.0921            0.0701            1.36
    sdxl     0.0309     0.2026   0.2383            0.2388            1.40
    pixart   0.0061     0.0535   0.0639            0.1472            1.41

(With the α grid {0.3, 0.5, 0.7} and two calibration inputs svdquant reaches 0.0117 / 0.0316 / 0.0065 and the
broken variants stay as far away.) The bound is twice the measured svdquant error (rounded up): a correct
model has 2× headroom (numerics that change by a rounding step move it by far less), every broken variant
exceeds it by ≥ 1.8×.
"""

from __future__ import annotations

import copy

import pytest
import torch

import svdq
from svdq.testing import tiny
from svdq.linear import SVDQLinear
from svdq.models import FAMILIES

BUILD = {"flux": tiny.tiny_flux_transformer, "sdxl": tiny.tiny_sdxl_unet, "pixart": tiny.tiny_pixart_transformer}
BOUND = {"flux": 0.031, "sdxl": 0.062, "pixart": 0.013}  # 2 × measured svdquant error (module docstring)
CALIB_SEEDS, EVAL_SEEDS = (0,), (7,)


def outputs(model, family: str) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**tiny.tiny_model_inputs(family, s))[0].flatten() for s in EVAL_SEEDS])


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def quantized(full, family: str, method: str):
    model = copy.deepcopy(full)
    svdq.models.prepare(model)
    config = svdq.QuantizeConfig(method=method, alphas=(0.5,), exclude=FAMILIES[family].exclude)
    calibration = lambda m: [m(**tiny.tiny_model_inputs(family, s)) for s in CALIB_SEEDS]  # noqa: E731
    return svdq.quantize(model, calibration=calibration, config=config, progress=False)


def swap_nibbles(layer: SVDQLinear) -> None:
    q = layer.qweight
    q.copy_(((q & 0x0F) << 4) | ((q >> 4) & 0x0F))


def zero_lowrank(layer: SVDQLinear) -> None:
    layer.lora_up.zero_()


def invert_smoothing(layer: SVDQLinear) -> None:
    layer.smooth.copy_(1 / layer.smooth)  # the kernel would compute x·λ instead of x/λ


def broken(model, corrupt) -> torch.nn.Module:
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SVDQLinear):
                corrupt(m)
    return model


@pytest.mark.parametrize("family", ["flux", "sdxl", "pixart"])
def test_svdquant_within_bound_and_every_broken_variant_outside(family):
    full = BUILD[family](0)
    ref = outputs(full, family)
    good = quantized(full, family, "svdquant")
    assert sum(isinstance(m, SVDQLinear) and not torch.all(m.smooth == 1) for m in good.modules()) > 0
    errors = {
        "svdquant": rel(outputs(good, family), ref),
        "naive": rel(outputs(quantized(full, family, "naive"), family), ref),
        "swapped nibbles": rel(outputs(broken(good, swap_nibbles), family), ref),
        "zeroed low-rank": rel(outputs(broken(good, zero_lowrank), family), ref),
        "inverted smoothing": rel(outputs(broken(good, invert_smoothing), family), ref),
    }
    print(family, {k: round(v, 5) for k, v in errors.items()})
    assert errors["svdquant"] <= BOUND[family], errors
    for variant in ("naive", "swapped nibbles", "zeroed low-rank", "inverted smoothing"):
        assert errors[variant] > BOUND[family], (variant, errors)
