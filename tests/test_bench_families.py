"""`svdq bench --model` for the generic family's models (Qwen-Image, Wan 2.1 14B, SD3.5-large, Z-Image-Turbo,
FLUX.2-dev, Chroma1, SANA-1600M, HiDream-I1), without a GPU:

* the input builder (`svdq.bench.model.make_inputs`) gives the family's CPU-mode stand-in exactly the keyword
  names, dtypes and shapes that the family's tiny diffusers pipeline hands its transformer at the same resolution
  (bf16: the GPU benchmark's dtype, where the pipelines' dtype conventions differ — timesteps in the latents' dtype
  or float32, int64 or floating position ids), and the stand-in's forward on them gives the transformer's output
  shape;
* the full-size configs are the published ones: their bf16 parameter bytes match docs/models.md's table within 1 %,
  and a forward of the full-size model on the meta device accepts the full-size inputs (text widths, Llama layer
  count, video frames) and returns the latents' shape;
* `svdq bench --model wan2.1-14b --device cpu` runs end to end: the layer plan comes from one traced forward, and
  the layers svdq quantizes are the plan's W4A4 linears.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path

import pytest
import torch

from svdq.bench import model as bmodel
from svdq.commands.bench import MODEL_CHOICES
from svdq.testing import families as tf

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"
GENERIC = tuple(bmodel.GENERIC_MODELS)
# docs/models.md's "Generic family" table: the first cell of each family's row starts with this.
TABLE_ROW = {"qwen-image": "Qwen-Image (", "wan2.1-14b": "Wan 2.x", "sd3.5-large": "SD3.5", "z-image-turbo": "Z-Image",
             "flux2-dev": "FLUX.2", "chroma1": "Chroma", "sana-1600m": "SANA", "hidream-i1": "HiDream-I1"}
# One batch-1 step: SD3's and SANA's pipelines run classifier-free guidance by default, a batch-2 call (the
# benchmark times batch 1); SANA's resolution binning would move the 32² request to a 512² bin.
NO_CFG = {"sd3": dict(guidance_scale=1.0), "sana": dict(guidance_scale=1.0, use_resolution_binning=False)}
# Pipelines that pass the prompt's own tokens, not max_sequence_length (the tiny prompt's length is taken as is).
UNPADDED = {"qwenimage": lambda kw: kw["encoder_hidden_states"].shape[1],
            "zimage": lambda kw: kw["cap_feats"][0].shape[0]}


class _Captured(Exception):
    pass


def _pipeline_call(family: str, dtype: torch.dtype) -> dict:
    """The keyword arguments (positional ones bound to their names) of the tiny pipeline's first transformer call;
    the transformer itself does not run (the pre-hook stops the pipeline)."""
    pipe = tf.tiny_family_pipeline(family, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    call = {}

    def hook(module, args, kwargs):
        call.update(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
        raise _Captured

    pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    with pytest.raises(_Captured):
        pipe(prompt="a red fox", num_inference_steps=1, output_type="latent",
             **{**tf.CALL_KWARGS[family], **NO_CFG.get(family, {})})
    call.pop("return_dict", None)
    return call


def _same_structure(got, want, where: str) -> None:
    """Same nesting, tensor shapes and dtypes, and equal non-tensor values (None, ints, image shapes)."""
    if torch.is_tensor(want):
        assert torch.is_tensor(got), f"{where}: {type(got).__name__} instead of a tensor"
        assert (tuple(got.shape), got.dtype) == (tuple(want.shape), want.dtype), \
            f"{where}: {tuple(got.shape)} {got.dtype}, the pipeline passes {tuple(want.shape)} {want.dtype}"
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{where}: {got!r} vs {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            _same_structure(g, w, f"{where}[{i}]")
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: {got!r} vs {want!r}"
        for k in want:
            _same_structure(got[k], want[k], f"{where}.{k}")
    else:
        assert got == want, f"{where}: {got!r}, the pipeline passes {want!r}"


def test_cli_choices_are_the_models():
    assert MODEL_CHOICES == tuple(bmodel.MODELS)
    assert set(GENERIC) == set(TABLE_ROW) and {s.family for s in bmodel.GENERIC_MODELS.values()} == set(tf.FAMILIES)


@pytest.mark.parametrize("name", GENERIC)
def test_inputs_match_the_tiny_pipeline(name):
    spec = bmodel.cpu_spec(name)
    fam = spec.family
    assert spec.cls == tf.CLASSES[fam] and spec.config == tf.CONFIGS[fam]  # the stand-in is the tiny transformer
    res = tf.VIDEO_SIZE if spec.frames > 1 else tf.IMAGE_SIZE
    dtype = torch.bfloat16
    want = _pipeline_call(fam, dtype)
    if fam in UNPADDED:
        spec = dataclasses.replace(spec, text_tokens=UNPADDED[fam](want))
    cpu = torch.device("cpu")
    model = bmodel.build_model(spec, cpu, torch.float32)  # make_inputs reads only its config
    got = bmodel.make_inputs(spec, model, res, cpu, dtype)
    assert sorted(got) == sorted(want), f"{name}: keyword names {sorted(got)}, the pipeline passes {sorted(want)}"
    # the latents come first (svdq.models.generic.analyze reads the batch size from the first argument)
    assert next(iter(got)) == next(iter(inspect.signature(model.forward).parameters))
    _same_structure(got, want, name)
    # The stand-in runs on them and returns the latents' shape (Z-Image: a list of per-sample latents); in fp32, the
    # CPU-mode baseline (bf16 depthwise convolutions, SANA's MLP, take seconds on a CPU).
    inputs = bmodel.make_inputs(spec, model, res, cpu, torch.float32)
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    latents = inputs.get("hidden_states", inputs.get("x"))
    _same_structure(out, latents, f"{name} output")
    assert all(torch.isfinite(o).all() for o in (out if isinstance(out, list) else [out]))


def _table_bf16_gib(name: str) -> float:
    rows = [line for line in DOCS.read_text().splitlines() if line.startswith("| " + TABLE_ROW[name])]
    assert len(rows) == 1, f"docs/models.md: {len(rows)} rows for {name}"
    cells = [c.strip() for c in rows[0].strip("|").split(" | ")]
    return float(re.fullmatch(r"([\d.]+) GiB", cells[5]).group(1))  # the "bf16" column


@pytest.mark.parametrize("name", GENERIC)
def test_full_size_is_the_published_config(name):
    spec = bmodel.MODELS[name]
    model = bmodel.meta_model(spec)
    gib = sum(p.numel() for p in model.parameters()) * 2 / 2**30
    assert gib == pytest.approx(_table_bf16_gib(name), rel=0.01), f"{name}: {gib:.2f} GiB in bf16"
    if name == "hidream-i1":
        return  # its MoE routing calls torch.nonzero, which has no meta implementation
    # The full-size inputs fit the full-size model (shapes only: on the meta device nothing is computed).
    meta = torch.device("meta")
    inputs = bmodel.make_inputs(spec, model.to(torch.bfloat16), 512, meta, torch.bfloat16)
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    latents = inputs.get("hidden_states", inputs.get("x"))
    _same_structure(out, latents, f"{name} output")
    if name == "wan2.1-14b":  # 17 frames through the 4× temporal VAE: 5 latent frames
        assert latents.shape[2] == 5


def test_resolution_must_fit_the_vae_and_patch():
    spec = bmodel.MODELS["sana-1600m"]  # DC-AE: 32 pixels per latent, patch 1
    with pytest.raises(ValueError, match="sana-1600m: resolution must be a multiple of 32"):
        bmodel.make_inputs(spec, bmodel.meta_model(spec), 48, torch.device("meta"), torch.bfloat16)
    # and `svdq bench` says so before building anything (the GPU configuration; no GPU needed to check it)
    with pytest.raises(ValueError, match=r"sana-1600m: resolutions must be multiples of 32 pixels .*\[48\]"):
        bmodel.default_config("sana-1600m", torch.device("cuda"), resolutions=(512, 48))
    bmodel.default_config("sana-1600m", torch.device("cuda"), resolutions=(512, 1024))


def test_cli_wan_cpu_mode(tmp_path):
    from svdq.cli import main

    rc = main(["bench", "--model", "wan2.1-14b", "--device", "cpu", "--repeats", "2", "--warmup", "0", "--threads", "1",
               "--res", "16", "--variants", "fp32,svdq", "--backends", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "bench_cpu_wan2.1-14b.json").read_text())
    assert res["config"]["class"] == "WanTransformer3DModel" and res["config"]["frames"] == tf.VIDEO_FRAMES
    plan = res["model"]["generic_plan"]
    assert plan["traced_at_res"] == 16 and plan["fused_groups"] > 0 and plan["modulation"] >= 1
    # fp8 / nf4 / int4 would swap these: exactly the plan's W4A4 linears; svdq quantizes them, fused.
    assert res["model"]["quantized_linear_layers"] == plan["w4a4"]
    assert res["quantization"]["layers"] == plan["quantized_after_fusion"] < plan["w4a4"]
    rows = {r["variant"]: r for r in res["rows"]}
    assert rows["fp32"]["status"] == "ok" and rows["svdq"]["status"] == "ok" and rows["svdq"]["backend"] == "cpu"
    assert "video" in rows["svdq"]["tokens"] and rows["svdq"]["weight_ratio_vs_baseline"] > 1.0
