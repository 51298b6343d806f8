"""A model loaded from a Nunchaku file or a diffusers nunchaku_lite directory saves as an svdq model directory
(`svdq.save_pretrained`), which loads back computing exactly what the loaded model computed; svdq.json says
where it came from. FLUX.1 files, whose single-block proj_out is two quantized layers (`SplitInputLinear`), are
refused by name."""

import json

import pytest
import torch

import svdq
from svdq.formats import nunchaku as nk
from svdq.formats import nunchaku_lite, nunchaku_models


def _save_and_reload(loaded, inputs, tmp_path):
    with torch.no_grad():
        before = loaded(**inputs)[0]
    out = svdq.save_pretrained(loaded, tmp_path / "svdq")
    info = json.loads((out / "svdq.json").read_text())
    reloaded = svdq.from_pretrained(out)
    with torch.no_grad():
        after = reloaded(**inputs)[0]
    return before, after, info, reloaded


def test_a_loaded_nunchaku_sdxl_file_saves_as_svdq_and_reloads_exactly(tmp_path):
    from test_nunchaku_unet import _inputs, _tiny_unet

    unet = _tiny_unet()
    family = svdq.models.prepare(unet)
    svdq.quantize(unet, rank=16, exclude=family.exclude + ("*attn2.to_kv*",), progress=False)
    path = nunchaku_models.export_sdxl(unet, tmp_path / "svdq-int4_r16-sdxl.safetensors")
    loaded = svdq.from_pretrained(path)
    before, after, info, reloaded = _save_and_reload(loaded, _inputs(), tmp_path)
    assert torch.equal(before, after)
    assert str(path) in info["converted_from"] and info["family"] == "sdxl"
    assert set(svdq.quantized_layers(reloaded)) == set(svdq.quantized_layers(loaded))
    assert reloaded.svdq_config.rank == 16 and reloaded.svdq_config.include == tuple(svdq.quantized_layers(loaded))


def test_a_loaded_nunchaku_lite_directory_saves_as_svdq_and_reloads_exactly(tmp_path):
    from svdq.models import generic, prepare
    from svdq.testing import families as tf

    model = tf.tiny_transformer("qwenimage", 0, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 64, 64, generator=g).to(torch.bfloat16),
              encoder_hidden_states=torch.randn(1, 64, 32, generator=g).to(torch.bfloat16),
              timestep=torch.tensor([0.5], dtype=torch.bfloat16), img_shapes=[[(1, 8, 8)]], return_dict=False)
    generic.analyze(model, lambda m: m(**kw))
    family = prepare(model)
    svdq.quantize(model, weight_only=family.adaln, progress=False, rank=16)
    directory = nunchaku_lite.export(model, tmp_path / "qwen-lite")
    loaded = svdq.from_pretrained(directory)
    before, after, info, reloaded = _save_and_reload(loaded, kw, tmp_path)
    assert torch.equal(before, after)
    assert "nunchaku_lite" in info["converted_from"]
    assert svdq.weight_only_layers(reloaded) and set(svdq.weight_only_layers(reloaded)) == set(
        svdq.weight_only_layers(loaded))
    # the W4A16 layers keep their float offsets (spec §7.2) through the svdq checkpoint
    assert all(m.zero_point_kind == "float" for m in svdq.weight_only_layers(reloaded).values())


def test_a_loaded_flux_file_is_refused_naming_the_split_layer(tmp_path):
    from svdq.testing.tiny import tiny_flux_transformer

    model = tiny_flux_transformer(0, dtype=torch.bfloat16)
    svdq.models.prepare(model)
    svdq.quantize(model, rank=16, progress=False, weight_only=svdq.models.FAMILIES["flux"].adaln)
    loaded = svdq.from_pretrained(nk.export_flux(model, tmp_path / "flux.safetensors"))
    with pytest.raises(ValueError, match=r"single_transformer_blocks\.0\.proj_out \(SplitInputLinear\)"):
        svdq.save_pretrained(loaded, tmp_path / "svdq")
    assert not (tmp_path / "svdq").exists()
