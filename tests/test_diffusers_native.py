"""diffusers' own workflow on svdq models (tiny FLUX, SDXL and PixArt-Σ pipelines), each step compared bit for
bit with svdq's own API: quantize → diffusers ``save_pretrained`` (pipeline and model) → diffusers
``from_pretrained`` (``DiffusionPipeline`` and the model class) → ``load_lora_weights`` + ``set_adapters`` →
generate → ``disable_lora`` / ``enable_lora`` / ``fuse_lora`` → unload.

Before svdq registered its diffusers quantizer, diffusers' ``from_pretrained`` of a saved svdq model came back
with every quantized layer "newly initialized" (meta tensors) and ``load_lora_weights`` raised
``KeyError 'transformer_blocks.0.attn.to_q.weight'``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import svdq
from svdq.testing import tiny
from svdq.linear import SVDQLinear
from svdq.models import pipeline_component, pipeline_model

STEPS = 2
PROMPT = "a red fox sitting in the snow"


def call_kwargs(pipe) -> dict:
    from svdq.models import call_defaults

    kw = dict(num_inference_steps=STEPS, height=tiny.TINY_IMAGE_SIZE, width=tiny.TINY_IMAGE_SIZE, **call_defaults(pipe))
    if type(pipeline_model(pipe)).__name__.startswith("Flux"):
        kw["max_sequence_length"] = 32
    return kw


def generate(pipe, seed: int = 1) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np",
                **call_kwargs(pipe)).images[0]


def run(model, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny.tiny_model_inputs(family))[0]


def quantized_pipeline(family: str):
    pipe = tiny.tiny_pipeline(family)
    return pipe, quantized(pipeline_model(pipe))


def quantized(model):
    svdq.models.prepare(model)
    return svdq.quantize(model, progress=False)  # data-free: this module tests plumbing, not quality


MODELS = {"flux": tiny.tiny_flux_transformer, "sdxl": tiny.tiny_sdxl_unet, "pixart": tiny.tiny_pixart_transformer}


@pytest.mark.parametrize("family", ["flux", "sdxl", "pixart"])
def test_diffusers_save_and_load_round_trip(family, tmp_path):
    from diffusers import DiffusionPipeline

    pipe, model = quantized_pipeline(family)
    component = pipeline_component(pipe)
    image = generate(pipe)
    out = run(model, family)

    pipe.save_pretrained(tmp_path / "pipe")  # diffusers' own pipeline save
    config = json.loads((tmp_path / "pipe" / component / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "svdquant"
    loaded_pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    loaded = pipeline_model(loaded_pipe)
    assert type(loaded) is type(model)
    names = {n for n, m in loaded.named_modules() if isinstance(m, SVDQLinear)}
    assert names == {n for n, m in model.named_modules() if isinstance(m, SVDQLinear)}
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items())):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    assert np.array_equal(generate(loaded_pipe), image)  # bit-exact image through diffusers' own load

    # The model class's from_pretrained, svdq.from_pretrained and svdq.load read the same directory.
    cls_loaded = type(model).from_pretrained(tmp_path / "pipe", subfolder=component)
    assert torch.equal(run(cls_loaded, family), out)
    assert torch.equal(run(svdq.from_pretrained(tmp_path / "pipe" / component), family), out)

    # svdq.save_pretrained writes a directory that diffusers loads; diffusers' save_pretrained writes one
    # that svdq loads (checked above): the two are the same format.
    svdq.save_pretrained(model, tmp_path / "svdq")
    assert torch.equal(run(type(model).from_pretrained(tmp_path / "svdq"), family), out)
    loaded.save_pretrained(tmp_path / "again")
    assert torch.equal(run(svdq.from_pretrained(tmp_path / "again"), family), out)


def test_bf16_round_trip_keeps_dtype(tmp_path):
    """The saved dtype is recorded: loading without torch_dtype gives the same bf16 model (not fp32)."""
    from diffusers import PixArtTransformer2DModel

    model = quantized(tiny.tiny_pixart_transformer(0, dtype=torch.bfloat16))
    model.save_pretrained(tmp_path)
    # device_map: accelerate moves the model before the quantizer's post-processing (non-saved buffers must
    # already be real then)
    loaded = PixArtTransformer2DModel.from_pretrained(tmp_path, device_map="cpu")
    assert loaded.pos_embed.pos_embed.dtype == torch.bfloat16 and loaded.dtype == torch.bfloat16
    x = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
         for k, v in tiny.tiny_model_inputs("pixart").items()}
    with torch.no_grad():
        assert torch.equal(loaded(**x)[0], model(**x)[0])


def test_quantize_on_load_equals_svdq_quantize(tmp_path):
    from diffusers import FluxTransformer2DModel

    full = tiny.tiny_flux_transformer(0)
    full.save_pretrained(tmp_path)
    ours = svdq.quantize(svdq.models.prepare(full) and full, rank=16, progress=False)
    loaded = FluxTransformer2DModel.from_pretrained(
        tmp_path, quantization_config={"quant_method": "svdquant", "rank": 16}
    )
    assert sum(isinstance(m, SVDQLinear) for m in loaded.modules()) == len(svdq.quantized_layers(ours))
    assert torch.equal(run(loaded, "flux"), run(ours, "flux"))
    with pytest.raises(ValueError, match="method must be one of"):
        FluxTransformer2DModel.from_pretrained(tmp_path, quantization_config={"quant_method": "svdquant",
                                                                              "method": "gptq4"})


def test_checkpoint_of_another_model_fails_clearly(tmp_path):
    from diffusers import FluxTransformer2DModel

    model = quantized(tiny.tiny_flux_transformer(0))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_layers"] += 1  # a skeleton with a double block the file does not have
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(svdq.CheckpointError, match="missing keys"):
        FluxTransformer2DModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# LoRA through diffusers' API

TARGETS = {"flux": ("attn.to_q", "attn.to_k", "attn.to_v", "ff.net.2", "proj_mlp"),
           "sdxl": ("attn1.to_q", "attn1.to_v", "attn2.to_k", "ff.net.2"),
           "pixart": ("attn1.to_q", "attn1.to_k", "attn2.to_v", "ff.net.2")}
PREFIX = {"flux": "transformer", "sdxl": "unet", "pixart": "transformer"}


def peft_lora(family: str, seed: int, rank: int = 4, std: float = 0.05) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT-format LoRA on the 16-bit model's module names."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in MODELS[family](0).named_modules():
        if type(m) is torch.nn.Linear and name.endswith(TARGETS[family]):
            sd[f"{PREFIX[family]}.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * std
            sd[f"{PREFIX[family]}.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * std
    assert sd
    return sd


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_pipeline_lora_api_matches_svdq_api(family):
    pipe, model = quantized_pipeline(family)
    base_out, base_image = run(model, family), generate(pipe)
    one, two = peft_lora(family, 1), peft_lora(family, 2)

    # svdq's own API: the reference for every step
    svdq.load_lora(model, dict(one), name="one", strength=0.7)
    svdq.load_lora(model, dict(two), name="two", strength=0.3)
    ref_both, ref_image = run(model, family), generate(pipe)
    svdq.set_lora_strength(model, "two", 0.0)
    svdq.set_lora_strength(model, "one", 1.0)
    ref_one = run(model, family)
    svdq.set_lora_strength(model, "one", 0.35)
    ref_one_half = run(model, family)
    svdq.unload_lora(model, "one")
    svdq.unload_lora(model, "two")
    assert torch.equal(run(model, family), base_out)
    assert not torch.equal(ref_both, base_out) and not torch.equal(ref_one, ref_both)

    # diffusers' API on the same pipeline
    pipe.load_lora_weights(dict(one), adapter_name="one")
    pipe.load_lora_weights(dict(two), adapter_name="two")
    assert set(pipe.get_list_adapters()[PREFIX[family]]) == {"one", "two"}
    pipe.set_adapters(["one", "two"], adapter_weights=[0.7, 0.3])
    assert torch.equal(run(model, family), ref_both)
    assert np.array_equal(generate(pipe), ref_image)
    pipe.disable_lora()
    assert torch.equal(run(model, family), base_out)
    pipe.enable_lora()
    assert torch.equal(run(model, family), ref_both)
    pipe.set_adapters("one")  # only "one", weight 1: "two" contributes nothing
    assert torch.equal(run(model, family), ref_one)
    with pytest.raises(ValueError, match="not in the list of present adapters"):
        pipe.set_adapters(["three"])

    # fuse at 0.7 × 0.5: the fused adapter stays (on the low-rank branch) through unload_lora_weights
    pipe.set_adapters("one", 0.7)
    pipe.fuse_lora(components=[PREFIX[family]], lora_scale=0.5)
    pipe.unload_lora_weights()
    assert list(svdq.list_loras(model)) == ["one"] and pipe.get_list_adapters()[PREFIX[family]] == []
    assert torch.equal(run(model, family), ref_one_half)
    model.unfuse_lora()
    pipe.unload_lora_weights()
    assert svdq.list_loras(model) == {}
    assert torch.equal(run(model, family), base_out)  # bit-exact: the original branch is back
    assert np.array_equal(generate(pipe), base_image)


def test_model_level_lora_api_pixart():
    """PixArt pipelines have no LoRA loader in diffusers; the model-level methods work on svdq models."""
    model = quantized(tiny.tiny_pixart_transformer(0))
    base_out = run(model, "pixart")
    lora = peft_lora("pixart", 3)
    svdq.load_lora(model, dict(lora), name="a", strength=0.6)
    ref = run(model, "pixart")
    svdq.unload_lora(model, "a")

    model.load_lora_adapter(dict(lora), prefix="transformer", adapter_name="a")
    model.set_adapters(["a"], [0.6])
    assert torch.equal(run(model, "pixart"), ref)
    with pytest.raises(NotImplementedError, match="per-block"):
        model.set_adapters(["a"], [{"transformer_blocks": 0.5}])
    with pytest.raises(ValueError, match="already loaded"):
        model.load_lora_adapter(dict(lora), prefix="transformer", adapter_name="a")
    model.delete_adapters("a")
    assert torch.equal(run(model, "pixart"), base_out)


def test_save_with_adapters_is_refused(tmp_path):
    model = quantized(tiny.tiny_flux_transformer(0))
    model.load_lora_adapter(peft_lora("flux", 1), prefix="transformer", adapter_name="one")
    with pytest.raises(ValueError, match="cannot save while LoRA adapters are loaded"):
        model.save_pretrained(tmp_path)
