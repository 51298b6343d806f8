"""FLUX.1, SDXL and PixArt-Σ end to end through diffusers, on tiny pipelines (seeded weights, tiny text
encoders and tokenizers): calibrate_pipeline → quantize → save_pretrained → from_pretrained into a fresh
pipeline → generate with a fixed seed.

PSNR bound (MIN_PSNR_DB = 30 dB, images in [0, 1]). What the bound has to separate: a correct W4A4 model
differs from its 16-bit model by the INT4 noise left after smoothing and the low-rank branch — a few percent
relative error per layer — which moves pixels by ~1/255 (measured: FLUX 62 dB, SDXL 43 dB, PixArt-Σ 49 dB
with these settings); a broken mapping (a projection sliced from the wrong rows, smoothing or low-rank
applied twice, a layer left unquantized in the wrong dtype) changes the image itself, and two images from
the same tiny pipeline with *different* seeds are ~10–15 dB apart. 30 dB (RMS error ≈ 8/255) leaves
>10 dB margin on the worst family and stays far above the failure modes. The reload must be bit-exact:
same tensors, same backend, same inputs.
"""

import math

import numpy as np
import pytest
import torch

import svdq
from svdq.testing import tiny
from svdq.models import FAMILIES, call_defaults, pipeline_component, pipeline_model

MIN_PSNR_DB = 30.0
STEPS = 3
PROMPT = "a red fox sitting in the snow"
CALIB_PROMPTS = ["a lighthouse in a storm, watercolor", "portrait of an old man, studio light"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def call_kwargs(pipe) -> dict:
    kw = dict(num_inference_steps=STEPS, height=tiny.TINY_IMAGE_SIZE, width=tiny.TINY_IMAGE_SIZE, **call_defaults(pipe))
    if "transformer" in pipe.components and pipe.transformer.__class__.__name__.startswith("Flux"):
        kw["max_sequence_length"] = 32  # real FLUX uses 512 T5 tokens; 32 keeps the test fast
    return kw


def generate(pipe, seed: int = 1) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt=PROMPT, generator=gen, output_type="np", **call_kwargs(pipe)).images[0]


@pytest.mark.parametrize("family", ["flux", "sdxl", "pixart"])
def test_pipeline_end_to_end(family, tmp_path):
    pipe = tiny.tiny_pipeline(family)
    reference = generate(pipe)
    other_seed = generate(pipe, seed=2)

    model = pipeline_model(pipe)
    calibration = svdq.calibrate_pipeline(pipe, CALIB_PROMPTS, progress=False, **call_kwargs(pipe))
    config = svdq.QuantizeConfig(alphas=(0.3, 0.5, 0.7), exclude=FAMILIES[family].exclude)  # short α grid: speed
    svdq.quantize(model, calibration=calibration, config=config, progress=False)
    assert all(r["rel_error"] is not None for r in model.svdq_report.values())  # every layer was calibrated
    assert any(n.endswith(("to_qkv.linear", "to_qkv_mlp.linear")) for n in model.svdq_report)  # fused groups
    quantized = generate(pipe)

    q_psnr = psnr(quantized, reference)
    print(f"{family}: W4A4 vs 16-bit PSNR {q_psnr:.1f} dB (other seed: {psnr(other_seed, reference):.1f} dB)")
    assert q_psnr >= MIN_PSNR_DB
    assert psnr(other_seed, reference) < MIN_PSNR_DB  # the bound does tell images apart

    svdq.save_pretrained(model, tmp_path / "q", base="tiny")
    fresh = tiny.tiny_pipeline(family, seed=5)  # different 16-bit weights: everything must come from the file
    loaded = svdq.from_pretrained(tmp_path / "q", expected_family=family)
    assert type(loaded) is type(model) and loaded.svdq_info["family"] == family
    setattr(fresh, pipeline_component(fresh), loaded)
    # The text encoders / VAE of the fresh pipeline differ (seed 5): put the originals back for the comparison.
    for name in ("vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            setattr(fresh, name, getattr(pipe, name))
    assert np.array_equal(generate(fresh), quantized)


def test_calibrate_pipeline_sees_every_step_and_both_cfg_branches():
    pipe = tiny.tiny_sdxl_pipeline(0)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    calibration = svdq.calibrate_pipeline(pipe, ["a", "b", "c"], num_inference_steps=2, batch_size=2,
                                          guidance_scale=5.0, progress=False)
    calibration(pipe.unet)
    assert calls == [4, 4, 2, 2]  # 2 steps × (batch of 2 prompts, then 1) × (uncond + cond)
    with pytest.raises(ValueError, match="quantize that module"):
        calibration(tiny.tiny_sdxl_unet(0))


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing config.json, diffusion_pytorch_model.safetensors, svdq.json"):
        svdq.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        svdq.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="could not be fetched") as e:
        svdq.from_pretrained("svdq-test/no-such-model", local_files_only=True)
    assert "diffusion_pytorch_model.safetensors" in str(e.value)  # says what was looked for

    model = svdq.quantize(tiny.tiny_pixart_transformer(0), progress=False)  # unfused: loads too
    svdq.save_pretrained(model, tmp_path / "pixart")
    with pytest.raises(svdq.CheckpointError, match=r"holds a quantized PixArtTransformer2DModel \(pixart\), but a flux"):
        svdq.from_pretrained(tmp_path / "pixart", expected_family="flux")
    (tmp_path / "pixart" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing diffusion_pytorch_model.safetensors"):
        svdq.from_pretrained(tmp_path / "pixart")
    with pytest.raises(ValueError, match="not quantized"):
        svdq.save_pretrained(tiny.tiny_pixart_transformer(0), tmp_path / "x")


def test_bf16_reload_is_bit_exact(tmp_path):
    """Non-persistent buffers (PixArt's pos_embed) are not in the file: they must get the model's dtype."""
    from test_models import pixart_inputs

    model = tiny.tiny_pixart_transformer(0, dtype=torch.bfloat16)
    svdq.quantize(model, progress=False)
    svdq.save_pretrained(model, tmp_path / "q")
    loaded = svdq.from_pretrained(tmp_path / "q")
    assert loaded.pos_embed.pos_embed.dtype == torch.bfloat16
    x = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
         for k, v in pixart_inputs(model).items()}
    with torch.no_grad():
        assert torch.equal(loaded(**x, return_dict=False)[0], model(**x, return_dict=False)[0])
