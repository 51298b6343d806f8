"""4-bit text encoders (issue 12 item 4): `svdq.quantize_text_encoder` on transformers' T5 (FLUX's
text_encoder_2, PixArt's text_encoder), `svdq.save` / `svdq.load` and `svdq.load_text_encoders` round trips,
the pipeline-level quality on the tiny FLUX pipeline, and `svdq quantize --text-encoder w4a16`."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import svdq
from svdq import cli
from svdq.testing import tiny
from svdq.weight_only import (
    CPU_INT4,
    TEXT_ENCODERS_DIR,
    SVDQWeightOnlyLinear,
    large_text_encoders,
    quantize_pipeline_text_encoders,
)

PROMPTS = ["a red fox in the snow", "a lighthouse at night, oil painting"]


def _t5():
    tok = tiny.tiny_t5_tokenizer()
    return tok, tiny.tiny_t5_text_encoder(tok, seed=12, d_model=64)


def _encode(tok, te, prompts=PROMPTS):
    ids = tok(prompts, padding="max_length", max_length=24, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return te(ids).last_hidden_state


def _linear_bytes(model):
    return sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if ".layer." in n and "layer_norm" not in n)


@pytest.mark.parametrize("zero_point", [False, True])
def test_t5_encoder_w4a16_close_smaller_and_round_trips(zero_point, tmp_path):
    tok, te = _t5()
    y16 = _encode(tok, te)
    bytes16 = _linear_bytes(te)
    q = svdq.quantize_text_encoder(copy.deepcopy(te), zero_point=zero_point)
    layers = svdq.weight_only_layers(q)
    # Every linear of both blocks: q, k, v, o and the feed-forward wi, wo.
    assert len(layers) == 2 * 6 and not any(type(m) is nn.Linear for m in q.modules())
    assert all(m.zero_point == zero_point for m in layers.values())
    assert q.svdq_config.weight_only == ("*",) and q.svdq_config.include == ()
    y = _encode(tok, q)
    assert all(m.layout == CPU_INT4 for m in layers.values())  # the int4 kernel ran, no per-call dequantize
    err = float((y - y16).norm() / y16.norm())
    # Measured: 0.134 symmetric, 0.113 with zero points (random tiny weights, mean weight error 0.106 / 0.090;
    # 4 bits at group 64).
    assert err < 0.16, err
    # Linear weights: fp32 → 4 bits + a scale (+ zero point) per 64 weights, the 32-wide `o` inputs padded to
    # 64: measured 6.54x (6.36x with zero points) smaller.
    ratio = bytes16 / _linear_bytes(q)
    assert ratio > (6.2 if zero_point else 6.4), ratio
    path = svdq.save(q, tmp_path / "t5.safetensors")
    loaded = svdq.load(_t5()[1], path)
    assert {n: m.zero_point for n, m in svdq.weight_only_layers(loaded).items()} == \
        {n: m.zero_point for n, m in layers.items()}
    assert torch.equal(_encode(tok, loaded), y)


def test_t5_fp16_with_fp32_wo_runs_the_kernel_in_fp32():
    """transformers keeps T5's `wo` in fp32 in fp16 models and casts its input to `wo.weight.dtype`: the W4A16
    `wo` reports its dtype there, so it gets fp32 inputs and runs the fp32 kernel (no fp16 overflow path)."""
    tok, te = _t5()
    te = te.half()
    for block in te.encoder.block:
        block.layer[1].DenseReluDense.wo.float()
    y16 = _encode(tok, te)
    svdq.quantize_text_encoder(te)
    wo_layers = [b.layer[1].DenseReluDense.wo for b in te.encoder.block]
    assert all(m.dtype == torch.float32 and m.weight.dtype == torch.float32 and m.weight.shape == (64, 128)
               for m in wo_layers)
    y = _encode(tok, te)
    assert all(m.layout == CPU_INT4 for m in wo_layers)
    assert torch.isfinite(y).all() and float((y.float() - y16.float()).norm() / y16.float().norm()) < 0.16


def test_quantize_text_encoder_all_or_nothing_and_errors():
    _, te = _t5()
    before = {k: v.clone() for k, v in te.state_dict().items()}
    with torch.no_grad():
        te.encoder.block[1].layer[1].DenseReluDense.wo.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"encoder\.block\.1\.layer\.1\.DenseReluDense\.wo.*non-finite"):
        svdq.quantize_text_encoder(te)
    assert not svdq.weight_only_layers(te) and not hasattr(te, "svdq_config")
    assert all(torch.equal(before[k], v) or k.endswith("wo.weight") for k, v in te.state_dict().items())
    with pytest.raises(ValueError, match="no nn.Linear of T5EncoderModel matches"):
        svdq.quantize_text_encoder(te, include=["no.such.*"])


def _psnr(a, b):
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(1.0 / mse) if mse else float("inf")


def _images(pipe):
    out = []
    for i, p in enumerate(PROMPTS):
        g = torch.Generator().manual_seed(i)
        out.append(pipe(prompt=p, height=32, width=32, num_inference_steps=2, guidance_scale=1.0, generator=g,
                        output_type="np").images[0])
    return np.stack(out)


def test_flux_pipeline_with_4bit_t5_psnr_and_bytes():
    pipe = tiny.tiny_flux_full_pipeline(0)
    assert large_text_encoders(pipe) == ["text_encoder_2"]  # the T5; the CLIP stays 16-bit
    ref = _images(pipe)
    t5_bytes = sum(t.numel() * t.element_size() for t in pipe.text_encoder_2.state_dict().values())
    assert quantize_pipeline_text_encoders(pipe) == ["text_encoder_2"]
    q_bytes = sum(t.numel() * t.element_size() for t in pipe.text_encoder_2.state_dict().values())
    images = _images(pipe)
    psnr = _psnr(images, ref)
    # Measured: images with the 4-bit T5 vs the 16-bit one (same seeds) PSNR 62.8 dB (70.1 with zero points;
    # the tiny random-weight denoiser depends weakly on the text, so this bounds harm, not quality); the whole
    # tiny T5 (fp32, its embedding table stays 16-bit) 2.54x smaller.
    assert psnr > 45, psnr
    assert t5_bytes / q_bytes > 2.4, t5_bytes / q_bytes


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("te")
    tiny.tiny_flux_full_pipeline(0).save_pretrained(root / "flux")
    return root


def test_cli_quantize_text_encoder_w4a16(flux_dir, capsys):
    from diffusers import FluxPipeline

    out = flux_dir / "flux-q"
    assert cli.main(["quantize", "--model", str(flux_dir / "flux"), "--out", str(out), "--data-free",
                     "--text-encoder", "w4a16"]) == 0
    assert "text encoder(s) W4A16: text_encoder_2" in capsys.readouterr().out
    path = out / TEXT_ENCODERS_DIR / "text_encoder_2.safetensors"
    assert path.is_file() and svdq.read_metadata(path)["weight_only_layers"]
    pipe = FluxPipeline.from_pretrained(flux_dir / "flux")
    expected = copy.deepcopy(pipe.text_encoder_2)
    svdq.quantize_text_encoder(expected)
    assert svdq.load_text_encoders(pipe, out) == ["text_encoder_2"]
    # `svdq generate --quantized OUT` loads them too (svdq.pretrained.load_pipeline).
    from svdq.pretrained import load_pipeline

    generated = load_pipeline(flux_dir / "flux", out)
    assert len(svdq.weight_only_layers(generated.text_encoder_2)) == 12
    assert not svdq.weight_only_layers(generated.text_encoder)  # the CLIP stays 16-bit
    assert all(isinstance(m, SVDQWeightOnlyLinear) for n, m in pipe.text_encoder_2.named_modules()
               if n.endswith((".q", ".k", ".v", ".o", ".wi", ".wo")))
    ids = torch.tensor([[5, 9, 1, 0, 0]])
    with torch.no_grad():
        assert torch.equal(pipe.text_encoder_2(ids).last_hidden_state, expected(ids).last_hidden_state)
