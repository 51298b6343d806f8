"""Smoke test of an installed svdq wheel (run by scripts/wheel_check.sh in a venv with another torch).

Checks, from outside the checkout: the package imports, its native library loaded into *this* torch (which is
not the one it was built with), the CPU kernels equal the reference on a layer, and the tiny FLUX pipeline
quantizes, saves, reloads and generates (`svdq demo`). Exits non-zero with the reason on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expect-torch", required=True, help="major.minor the venv's torch must have, e.g. 2.13")
    args = ap.parse_args()

    import svdq
    from svdq import _native
    from svdq.ops import reference

    info = svdq.build_info()
    print("svdq", svdq.__version__, "from", Path(svdq.__file__).parent)
    print("build_info:", json.dumps(info))
    assert "site-packages" in svdq.__file__, f"svdq imported from {svdq.__file__}, not from the installed wheel"
    assert torch.__version__.startswith(args.expect_torch + "."), f"torch {torch.__version__} in this venv"
    assert info["native"], f"native library did not load: {info.get('import_error')}"
    built, runs = info["torch_version"].split("+")[0], torch.__version__.split("+")[0]
    assert built != runs, f"built with torch {built} and running on {runs}: not a cross-version test"
    assert "cpu" in svdq.ops.available_backends()

    # one layer: CPU kernels vs the reference (bit-equal activations; the GEMM within the spec's bound)
    g = torch.Generator().manual_seed(0)
    m, k, n, r = 37, 257, 70, 32
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    smooth = (torch.rand(k, generator=g) + 0.5).to(torch.bfloat16)
    lora_down = (torch.randn(k, r, generator=g) * 0.1).to(torch.bfloat16)
    qact, ascales, lora_act = _native.quantize_act(x, smooth, lora_down, None)
    qact_r, ascales_r, lora_act_r = reference.quantize_act(x, smooth, lora_down, None)
    assert torch.equal(qact, qact_r) and torch.equal(ascales, ascales_r), "quantize_act differs from the reference"
    kp = qact.shape[1] * 2
    qweight = torch.randint(-128, 128, (n, kp // 2), generator=g, dtype=torch.int8)
    wscales = (torch.rand(n, kp // 64, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    lora_up = (torch.randn(n, r, generator=g) * 0.1).to(torch.bfloat16)
    y = _native.w4a4_gemm(qact_r, ascales_r, qweight, wscales.float(), lora_act_r, lora_up, None, torch.bfloat16)
    y_ref = reference.w4a4_gemm(qact_r, ascales_r, qweight, wscales, lora_act_r, lora_up, None, torch.bfloat16)
    rel = ((y.double() - y_ref.double()).norm() / y_ref.double().norm()).item()
    assert rel <= 1e-3, f"w4a4_gemm differs from the reference: relative error {rel:.2e}"
    print(f"layer [{m}x{k}] -> {n}, rank {r}: quantize_act bit-equal, w4a4_gemm rel. error {rel:.1e}")

    # the tiny FLUX pipeline end to end: calibrate, quantize, save, reload into fresh weights, generate
    from svdq.testing import tiny

    pipe = tiny.tiny_flux_pipeline(seed=0)
    gen = dict(height=32, width=32, num_inference_steps=2, guidance_scale=1.0)
    prompt = tiny.synthetic_prompts(1, seed=7)[0]

    def image(p):
        return p(**prompt, **gen, generator=torch.Generator().manual_seed(0), output_type="pt").images[0]

    image16 = image(pipe)
    calib = tiny.synthetic_prompts(2, seed=0)
    svdq.models.prepare(pipe.transformer)
    svdq.quantize(pipe.transformer, calibration=lambda _m: [pipe(**q, **gen, output_type="latent") for q in calib],
                  rank=16)
    with tempfile.TemporaryDirectory() as out:
        ckpt = svdq.save(pipe.transformer, Path(out) / "transformer.safetensors")
        pipe.transformer = svdq.load(tiny.tiny_flux_pipeline(seed=1).transformer, ckpt)
    assert svdq.ops.select_backend(torch.device("cpu")).name == "cpu"
    image4 = image(pipe)
    mse = torch.mean((image4.double() - image16.double()) ** 2).item()
    psnr = 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-20))).item()
    assert torch.isfinite(image4).all() and psnr > 15, f"4-bit image PSNR {psnr:.1f} dB vs 16-bit"
    print(f"tiny FLUX pipeline: quantized, saved, reloaded, generated on the cpu backend; PSNR {psnr:.1f} dB")
    print(f"wheel smoke test passed: built with torch {info['torch_version']}, ran on torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
