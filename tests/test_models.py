"""svdq.models: per-family shared-input fusion and default 16-bit layers (FLUX.1, SDXL, PixArt-Σ).

Fast: single forward passes of the tiny denoisers, no pipelines.
"""

import copy

import pytest
import torch
from torch import nn

import svdq
from svdq.testing import tiny
from svdq.models import FAMILIES, ProjectionSlice, SharedInputLinear, family_of, fuse_linears, prepare


def flux_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = tiny.synthetic_prompts(1, seed)[0]
    return dict(
        hidden_states=torch.randn(1, 64, 16, generator=g),
        encoder_hidden_states=p["prompt_embeds"],
        pooled_projections=p["pooled_prompt_embeds"],
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(64, 3),
        txt_ids=torch.zeros(p["prompt_embeds"].shape[1], 3),
    )


def sdxl_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(2, 4, 16, 16, generator=g),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(2, 7, 64, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)},
    )


def pixart_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(2, 4, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(2, 9, 32, generator=g),
        timestep=torch.tensor([500, 500]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


BUILDERS = {
    "flux": (tiny.tiny_flux_transformer, flux_inputs),
    "sdxl": (tiny.tiny_sdxl_unet, sdxl_inputs),
    "pixart": (tiny.tiny_pixart_transformer, pixart_inputs),
}

# What each family's default quantization selects in its first block (docs/models.md).
EXPECTED_W4A4 = {
    "flux": {
        "transformer_blocks.0.attn.to_qkv.linear", "transformer_blocks.0.attn.to_added_qkv.linear",
        "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out",
        "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
        "transformer_blocks.0.ff_context.net.0.proj", "transformer_blocks.0.ff_context.net.2",
        "single_transformer_blocks.0.to_qkv_mlp.linear", "single_transformer_blocks.0.proj_out",
    },
    "sdxl": {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_qkv.linear",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_kv.linear",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
    },
    "pixart": {
        "transformer_blocks.0.attn1.to_qkv.linear", "transformer_blocks.0.attn1.to_out.0",
        "transformer_blocks.0.attn2.to_q", "transformer_blocks.0.attn2.to_kv.linear",
        "transformer_blocks.0.attn2.to_out.0", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
    },
}
EXPECTED_16BIT = {
    "flux": {"x_embedder", "context_embedder", "proj_out", "norm_out.linear", "transformer_blocks.0.norm1.linear",
             "transformer_blocks.0.norm1_context.linear", "single_transformer_blocks.0.norm.linear",
             "time_text_embed.timestep_embedder.linear_1"},
    "sdxl": {"time_embedding.linear_1", "add_embedding.linear_1", "down_blocks.0.resnets.0.time_emb_proj",
             "down_blocks.1.attentions.0.proj_in", "down_blocks.1.attentions.0.proj_out"},
    "pixart": {"proj_out", "adaln_single.linear", "caption_projection.linear_1", "adaln_single.emb.timestep_embedder.linear_1"},
}


def _output(model, inputs):
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return out


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_fusion_keeps_the_function(family):
    build, inputs = BUILDERS[family]
    model = build(0)
    assert family_of(model) is FAMILIES[family]
    x = inputs(model)
    ref = _output(model, x)
    prepare(model)
    prepare(model)  # idempotent
    fused = [m for m in model.modules() if isinstance(m, SharedInputLinear)]
    assert fused and all(type(m.linear) is nn.Linear for m in fused)
    out = _output(model, x)
    # One concatenated GEMM instead of three: same products, at most a different fp32 summation order.
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert all(m._y is None for m in fused)  # every cached fused output was released


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_default_layer_selection(family):
    build, inputs = BUILDERS[family]
    model = build(0)
    prepare(model)
    model = svdq.quantize(model, progress=False)  # data-free stays available
    names = set(svdq.quantized_layers(model))
    assert EXPECTED_W4A4[family] <= names
    linear_names = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert EXPECTED_16BIT[family] <= linear_names
    assert not names & EXPECTED_16BIT[family]
    # No projection of a fused group is quantized on its own.
    assert not any(n.endswith(("to_k", "to_v", "add_k_proj", "proj_mlp")) for n in names)
    assert torch.isfinite(_output(model, inputs(model))).all()


def test_shared_input_runs_one_gemm_per_input():
    torch.manual_seed(0)
    owner = nn.Module()
    owner.a, owner.b = nn.Linear(8, 4), nn.Linear(8, 6, bias=False)
    ref_a, ref_b = copy.deepcopy(owner.a), copy.deepcopy(owner.b)
    group = fuse_linears(owner, "ab", {"a": (owner, "a"), "b": (owner, "b")})
    assert isinstance(owner.a, ProjectionSlice) and owner.b.offset == 4 and owner.b.out_features == 6
    calls = []
    group.linear.register_forward_hook(lambda *_: calls.append(1))
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(owner.a(x), ref_a(x))
    torch.testing.assert_close(owner.b(x), ref_b(x))
    assert len(calls) == 1 and group._y is None
    torch.testing.assert_close(owner.b(y), ref_b(y))  # a different input recomputes
    x.mul_(2)  # in-place change of a cached input recomputes too
    torch.testing.assert_close(owner.a(x), ref_a(x))
    assert len(calls) == 3
    assert set(owner.state_dict()) == {"ab.linear.weight", "ab.linear.bias"}  # stored once
    assert fuse_linears(owner, "ab2", {"a": (owner, "a"), "b": (owner, "b")}) is None  # already fused


def test_calibration_records_the_fused_layers():
    model = tiny.tiny_pixart_transformer(0)
    x = pixart_inputs(model)
    ref = _output(model, x)
    prepare(model)

    def calibration(m):
        for seed in range(2):
            m(**pixart_inputs(m, seed))

    svdq.quantize(model, calibration=calibration, progress=False,
                  config=svdq.QuantizeConfig(alphas=(0.3, 0.5, 0.7), exclude=FAMILIES["pixart"].exclude))
    report = model.svdq_report
    fused = [n for n in report if n.endswith(("to_qkv.linear", "to_kv.linear"))]
    assert len(fused) == 4 and all(report[n]["rel_error"] is not None for n in fused)
    # The planted outlier channels feed attn1's fused q/k/v: smoothing must have been chosen there.
    assert all(report[f"transformer_blocks.{i}.attn1.to_qkv.linear"]["alpha"] is not None for i in range(2))
    out = _output(model, x)
    assert float((out - ref).norm() / ref.norm()) < 0.1


def test_unfused_quantization_keeps_every_projection():
    model = svdq.quantize(tiny.tiny_flux_transformer(0), progress=False)  # svdq.quantize alone does not fuse
    names = set(svdq.quantized_layers(model))
    assert len(names) == 34 and "transformer_blocks.0.attn.to_q" in names


def test_checkpoint_of_fused_model_loads_into_plain_skeleton(tmp_path):
    model = tiny.tiny_sdxl_unet(0)
    prepare(model)
    model = svdq.quantize(model, progress=False)
    x = sdxl_inputs(model)
    out = _output(model, x)
    svdq.save(model, tmp_path / "unet.safetensors")
    fresh = svdq.load(tiny.tiny_sdxl_unet(1), tmp_path / "unet.safetensors")  # unfused, other weights
    assert torch.equal(_output(fresh, x), out)


def test_checkpoint_of_another_family_is_refused(tmp_path):
    model = tiny.tiny_pixart_transformer(0)
    prepare(model)
    svdq.save(svdq.quantize(model, progress=False), tmp_path / "pixart.safetensors")
    skeleton = tiny.tiny_flux_transformer(0)
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(svdq.CheckpointError, match="does not exist in FluxTransformer2DModel"):
        svdq.load(skeleton, tmp_path / "pixart.safetensors")
    # The skeleton was fused to match the checkpoint's names, then restored when loading failed.
    assert not any(isinstance(m, (SharedInputLinear, ProjectionSlice)) for m in skeleton.modules())
    after = skeleton.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
