"""Quantizing in Nunchaku's own form (`svdq.quantize(..., target="nunchaku")`, `svdq quantize --target nunchaku`):
the export is then exact — a model loaded from the exported file computes what the svdq model computes, bit for bit
(issue 13's done-means for FLUX.1 and SDXL; CPU backend)."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import svdq
from svdq.formats import nunchaku as nk
from svdq.formats import nunchaku_target as nt
from svdq.linear import SVDQLinear
from svdq.models.split_input import SplitInputLinear
from svdq.weight_only import SVDQWeightOnlyLinear

sys.path.insert(0, str(Path(__file__).parent))
from test_flux_tiny import transformer_inputs  # noqa: E402
from test_nunchaku_export_models import qwen, zimage  # noqa: E402, F401 (fixtures: tiny Qwen-Image / Z-Image, fused)


def _flux_inputs(seed):
    return {k: v.to(torch.bfloat16) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
            for k, v in transformer_inputs(seed).items()}


def _base_flux():
    from svdq.testing.tiny import tiny_flux_transformer

    model = tiny_flux_transformer(0, dtype=torch.bfloat16)  # hidden 128: every K, N a multiple of 128
    svdq.models.prepare(model)
    return model


@pytest.fixture(scope="module")
def flux_nk():
    model = _base_flux()
    svdq.quantize(model, rank=16, rounding="nearest", progress=False, target="nunchaku",
                  calibration=lambda m: m(**_flux_inputs(0)))
    return model


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def test_flux_is_quantized_in_nunchakus_form(flux_nk):
    """Exactly the layers Nunchaku's FLUX.1 file holds are 4-bit, its mlp_fc2 layers (and only they) shifted,
    proj_out split into the attention half and the MLP half, AdaNorm W4A16 with biases whose + 1 is exact."""
    assert flux_nk.svdq_config.target == "nunchaku"
    shifted = {n for n, m in flux_nk.named_modules() if isinstance(m, SVDQLinear) and m.act_shift}
    assert shifted == {f"transformer_blocks.{i}.{f}" for i in range(2) for f in ("ff.net.2", "ff_context.net.2")} | {
        f"single_transformer_blocks.{i}.proj_out.parts.1" for i in range(len(flux_nk.single_transformer_blocks))}
    assert all(m.act_shift == nk.SHIFT_GELU for n, m in flux_nk.named_modules() if n in shifted)
    for block in flux_nk.single_transformer_blocks:
        assert isinstance(block.proj_out, SplitInputLinear) and block.proj_out.sizes == [128, 512]
        assert all(isinstance(p, SVDQLinear) for p in block.proj_out.parts)
    wo = svdq.weight_only_layers(flux_nk)
    assert set(wo) == {n for n, _ in flux_nk.named_modules() if n.endswith(("norm1.linear", "norm1_context.linear"))
                       or (n.startswith("single_transformer_blocks") and n.endswith("norm.linear"))}
    for name, layer in wo.items():
        chunks = 3 if name.startswith("single") else 6
        size = layer.out_features // chunks
        for c in nk.ADANORM_SCALE_CHUNKS[chunks]:
            b = layer.bias[c * size : (c + 1) * size]
            assert torch.equal(((b.float() + 1).to(b.dtype).float() - 1).to(b.dtype), b), name
    for name in ("x_embedder", "context_embedder", "proj_out", "norm_out.linear"):
        assert type(flux_nk.get_submodule(name)) is nn.Linear, name


def test_flux_export_loads_back_computing_the_same_bits(flux_nk, tmp_path):
    path = nk.export_flux(flux_nk, tmp_path / "nk" / "svdq-int4_r16-tiny.safetensors")
    loaded = svdq.from_pretrained(path)
    for seed in (1, 2):
        inputs = _flux_inputs(seed)
        assert torch.equal(_out(loaded, inputs), _out(flux_nk, inputs))
    # the AdaNorm layers hold the same weights and biases (the +1 taken off exactly)
    a, b = flux_nk.transformer_blocks[1].norm1.linear, loaded.transformer_blocks[1].norm1.linear
    assert torch.equal(a.dequantize(), b.dequantize()) and torch.equal(a.bias, b.bias)
    # broken: an AdaNorm bias whose + 1 is not exact in bf16 comes back off (the snapping is what makes it exact)
    off = copy.deepcopy(flux_nk)
    with torch.no_grad():
        off.transformer_blocks[0].norm1.linear.bias[128:256] += 2.0**-11  # the scale_msa chunk
    loaded_off = svdq.from_pretrained(nk.export_flux(off, tmp_path / "off" / "x.safetensors"))
    assert not torch.equal(_out(loaded_off, _flux_inputs(1)), _out(off, _flux_inputs(1)))


def test_flux_quantized_the_default_way_exports_only_approximately(tmp_path):
    """Without the target (signed fc2 layers, one proj_out layer, unsnapped AdaNorm biases) the file computes
    something close but different: what the target is for."""
    model = _base_flux()
    svdq.quantize(model, rank=16, progress=False, weight_only=svdq.models.FAMILIES["flux"].adaln)  # data-free
    loaded = svdq.from_pretrained(nk.export_flux(model, tmp_path / "x.safetensors"))
    y, y_nk = _out(model, _flux_inputs(1)), _out(loaded, _flux_inputs(1))
    err = float((y_nk.float() - y.float()).norm() / y.float().norm())
    assert not torch.equal(y, y_nk) and err < 0.05, err


def test_streaming_target_quantizes_the_same_layers(flux_nk):
    model = _base_flux()
    svdq.quantize(model, rank=16, rounding="nearest", progress=False, target="nunchaku", streaming=True,
                  propagate="16bit", calibration=lambda m: m(**_flux_inputs(0)))
    want, got = flux_nk.state_dict(), model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_target_errors_leave_the_model_as_it_was():
    model = _base_flux()
    with pytest.raises(ValueError, match="target='nunchaku' chooses the quantized layers itself"):
        svdq.quantize(model, target="nunchaku", exclude=("*",), progress=False)
    with pytest.raises(ValueError, match="one rank for every layer"):
        svdq.quantize(model, target="nunchaku", rank_budget=10_000, calibration=lambda m: None, progress=False)
    with pytest.raises(ValueError, match="multiple of 16"):
        svdq.quantize(model, target="nunchaku", rank=24, progress=False)
    with pytest.raises(ValueError, match="drop act_shift"):
        svdq.quantize(model, target="nunchaku", act_shift=0.171875, progress=False)

    def fail(m):
        m(**_flux_inputs(0))
        raise RuntimeError("calibration failed")

    with pytest.raises(RuntimeError, match="calibration failed"):
        svdq.quantize(model, target="nunchaku", calibration=fail, progress=False)
    assert type(model.single_transformer_blocks[0].proj_out) is nn.Linear  # the split was undone
    assert not svdq.quantized_layers(model) and not hasattr(model, "svdq_config")
    from svdq.testing.tiny import tiny_pixart_transformer

    with pytest.raises(ValueError, match="no Nunchaku layout for PixArtTransformer2DModel"):
        svdq.quantize(tiny_pixart_transformer(0), target="nunchaku", progress=False)


def test_snap_plus_one():
    b = torch.tensor([0.0123, -0.3, 0.9, 1.7, -0.75, 0.0, 1e-6, -1e-6, 3.0, 0.1, 0.2, 0.3], dtype=torch.bfloat16)
    s = nt.snap_plus_one(b, 6, "layer")
    for c in range(6):
        chunk, orig = s[2 * c : 2 * c + 2], b[2 * c : 2 * c + 2]
        if c in (1, 4):  # scale chunks: + 1 exact, within half an ulp of b + 1
            assert torch.equal(((chunk.float() + 1).bfloat16().float() - 1).bfloat16(), chunk)
            assert float((chunk.float() - orig.float()).abs().max()) <= 2.0**-8
        else:
            assert torch.equal(chunk, orig)
    assert s[9] != b[9]  # bf16(0.1) + 1 is not a bf16 value: snapped (0.9, 1.7, 3.0 + 1 are: kept)
    assert torch.equal(s[[2, 3, 8]], b[[2, 3, 8]])
    with pytest.raises(ValueError, match="do not split into 6"):
        nt.snap_plus_one(b[:10], 6, "layer")


def test_sdxl_export_loads_back_computing_the_same_bits(tmp_path):
    from svdq.formats import nunchaku_models as nm
    from test_nunchaku_unet import _inputs, _tiny_unet

    unet = _tiny_unet()
    svdq.models.prepare(unet)
    svdq.quantize(unet, rank=16, rounding="nearest", progress=False, target="nunchaku",
                  calibration=lambda m: m(**_inputs()))
    kv = [m for n, m in unet.named_modules() if n.endswith("attn2.to_kv")]
    assert kv and all(type(m.linear) is nn.Linear for m in kv)  # 16-bit in Nunchaku's SDXL: no --exclude needed
    assert not any(m.act_shift for m in svdq.quantized_layers(unet).values())
    loaded = svdq.from_pretrained(nm.export_sdxl(unet, tmp_path / "x.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs())[0], unet(**_inputs())[0])


def test_cli_quantize_target_nunchaku_then_export(tmp_path, capsys):
    from svdq import cli
    from svdq.testing import tiny

    tiny.tiny_flux_full_pipeline(0).save_pretrained(tmp_path / "flux")
    out = tmp_path / "flux-nk"
    assert cli.main(["quantize", "--model", str(tmp_path / "flux"), "--out", str(out), "--target", "nunchaku",
                     "--exclude", "x"]) == 1
    assert "--target nunchaku chooses the quantized layers and their formats itself: drop --exclude" in capsys.readouterr().err
    assert cli.main(["quantize", "--model", str(tmp_path / "flux"), "--out", str(out), "--target", "nunchaku",
                     "--data-free", "--dtype", "bf16", "--rank", "16"]) == 0
    file = tmp_path / "svdq-int4_r16-flux.safetensors"
    assert cli.main(["export", "--format", "nunchaku", str(out), str(file)]) == 0
    model, loaded = svdq.from_pretrained(out), svdq.from_pretrained(file)
    assert model.svdq_config.target == "nunchaku"
    assert torch.equal(_out(loaded, _flux_inputs(1)), _out(model, _flux_inputs(1)))


def test_qwenimage_file_loads_back_computing_the_same_bits(qwen, tmp_path):
    """Qwen-Image quantized for Nunchaku (shifted img/txt fc2, W4A16 img_mod / txt_mod with exact + 1): svdq's
    export equals the independent test writer's file (tests/test_nunchaku_format.py) and loads back bit for bit."""
    from safetensors.torch import load_file
    from svdq.formats import nunchaku_models as nm
    from test_nunchaku_format import _nunchaku_qwenimage_file

    model, _, kw, _ = qwen
    model = copy.deepcopy(model)
    svdq.quantize(model, rank=16, rounding="nearest", progress=False, target="nunchaku", calibration=lambda m: m(**kw))
    shifted = {n.split(".", 2)[2] for n, m in svdq.quantized_layers(model).items() if m.act_shift}
    assert shifted == {"img_mlp.net.2", "txt_mlp.net.2"}
    assert {n.split(".", 2)[2] for n in svdq.weight_only_layers(model)} == {"img_mod.1", "txt_mod.1"}
    y = _out(model, kw)
    written = _nunchaku_qwenimage_file(model, tmp_path / "svdq-int4_r16-qwen-image.safetensors")
    assert torch.equal(_out(svdq.from_pretrained(written), kw), y)
    exported = nm.export(model, tmp_path / "export" / "svdq-int4_r16-qwen-image.safetensors")
    a, b = load_file(str(written)), load_file(str(exported))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # nothing recomputed
    assert torch.equal(_out(svdq.from_pretrained(exported), kw), y)
    # `svdq generate --quantized <the file>` runs it in the base pipeline
    from svdq import cli
    from svdq.testing import families as tf

    tf.tiny_family_pipeline("qwenimage", 0, torch.bfloat16).save_pretrained(tmp_path / "qwen")
    image = tmp_path / "img.png"
    assert cli.main(["generate", "--model", str(tmp_path / "qwen"), "--quantized", str(exported), "--prompt", "a cat",
                     "--steps", "1", "--height", "32", "--width", "32", "--max-sequence-length", "64", "--dtype",
                     "bf16", "--out", str(image)]) == 0
    assert image.is_file()


def test_zimage_main_blocks_export_loads_back_computing_the_same_bits(zimage, tmp_path):
    """Z-Image quantized for Nunchaku: the main blocks only (a skip_refiners file; svdq keeps the noise refiner
    16-bit), SwiGLU pair fused in svdq's order and moved into the file's: loads back bit for bit."""
    from svdq.formats import nunchaku_models as nm

    model, _, (args, kwargs), _ = zimage
    model = copy.deepcopy(model)
    svdq.quantize(model, rank=16, rounding="nearest", progress=False, target="nunchaku",
                  calibration=lambda m: m(*args, **kwargs))
    assert {n.split(".")[0] for n in svdq.quantized_layers(model)} == {"layers"}
    loaded = svdq.from_pretrained(nm.export(model, tmp_path / "svdq-int4_r16-z-image.safetensors"))
    with torch.no_grad():
        want, got = model(*args, **kwargs)[0], loaded(*args, **kwargs)[0]
    assert len(want) == len(got) and all(torch.equal(a, b) for a, b in zip(want, got))


def test_sana_with_a_self_attention_out_bias_is_refused_before_any_work():
    """Nunchaku's SANA runtime has no attn.out_proj bias: target="nunchaku" says so before calibrating (the export
    would refuse the model after the whole quantization), and leaves the model as it was."""
    from svdq.models.generic import fuse_groups
    from test_nunchaku_sana import BLOCKS, _tiny_sana

    model = _tiny_sana()
    for b in BLOCKS:
        fuse_groups(model, {f"{b}.attn1.to_qkv": tuple(f"{b}.attn1.to_{p}" for p in "qkv")})
    with torch.no_grad():
        model.transformer_blocks[1].attn1.to_out[0].bias[3] = 0.5

    def calibration(m):
        raise AssertionError("calibration ran")

    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn1\.to_out\.0 has a non-zero bias"):
        svdq.quantize(model, rank=16, target="nunchaku", calibration=calibration, progress=False)
    assert not svdq.quantized_layers(model) and type(model.transformer_blocks[0].ff.conv_inverted) is nn.Conv2d
