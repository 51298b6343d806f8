"""LoRA hot-swap on quantized (and 16-bit) tiny FLUX / SDXL / PixArt models (svdq.lora, docs/lora.md).

References are computed independently of svdq.lora: 16-bit models with ΔW merged into the weights, and
quantized models with forward hooks that add x·(s·B·A)ᵀ at the LoRA's own module paths (for fused
projections that is the `ProjectionSlice` stand-in, so the row mapping of fused layers is checked too).
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

import svdq
from svdq.testing import tiny
from svdq.linear import SVDQLinear
from svdq.lora import LoraError
from svdq.models import ProjectionSlice

RANK = 4
# Model-level comparisons on quantized models: the reference adds the delta in fp64, svdq in fp32, so an
# activation that sits on an INT4 rounding boundary downstream may round the other way (measured: up to
# 2.5e-4). A LoRA on the wrong rows / columns or with the wrong scale changes the output by ≥ 3e-2.
# Layer-level checks (test_layer_*) use 1e-6.
QTOL = 1e-3

# ---------------------------------------------------------------------------------------------------------
# tiny models and their inputs


def _flux():
    return tiny.tiny_flux_transformer(0)


def _sdxl():
    if hasattr(tiny, "tiny_sdxl_unet"):
        return tiny.tiny_sdxl_unet(0)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(21)
    return UNet2DConditionModel(**_SDXL_FALLBACK).eval()


def _pixart():
    if hasattr(tiny, "tiny_pixart_transformer"):
        return tiny.tiny_pixart_transformer(0)
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(31)
    return PixArtTransformer2DModel(**_PIXART_FALLBACK).eval()


_SDXL_FALLBACK = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), cross_attention_dim=64,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32, norm_num_groups=8,
)  # fmt: skip
_PIXART_FALLBACK = dict(
    sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=4,
    attention_head_dim=16, cross_attention_dim=64, caption_channels=32, norm_num_groups=8,
    use_additional_conditions=False,
)  # fmt: skip


def _inputs(family: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if family == "flux":
        return dict(
            hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 8, 64), pooled_projections=r(1, 32),
            timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False,
        )  # fmt: skip
    if family == "sdxl":
        return dict(
            sample=r(1, 4, 16, 16), timestep=torch.tensor([500]), encoder_hidden_states=r(1, 8, 64),
            added_cond_kwargs={"text_embeds": r(1, 32), "time_ids": r(1, 6)}, return_dict=False,
        )  # fmt: skip
    return dict(
        hidden_states=r(1, 4, 16, 16), encoder_hidden_states=r(1, 8, 32), timestep=torch.tensor([500]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
    )  # fmt: skip


BUILDERS = {"flux": _flux, "sdxl": _sdxl, "pixart": _pixart}
PREFIX = {"flux": "transformer.", "sdxl": "unet.", "pixart": "transformer."}
# LoRA targets: attention and MLP projections (most quantized, several fused) plus layers kept 16-bit.
TARGETS = {
    "flux": ("attn.to_", "attn.add_", "ff.net", "ff_context.net", "proj_mlp", "proj_out", "context_embedder"),
    "sdxl": ("attn1.to_", "attn2.to_", "ff.net", "proj_in", "time_emb_proj"),
    "pixart": ("attn1.to_", "attn2.to_", "ff.net", "caption_projection"),
}


@pytest.fixture(scope="module", params=["flux", "sdxl", "pixart"])
def family(request):
    return request.param


_CACHE: dict[str, tuple] = {}


def models(family: str):
    """(16-bit model, quantized model) — data-free quantization, fused projections (svdq.models)."""
    if family not in _CACHE:
        full = BUILDERS[family]()
        quant = copy.deepcopy(full)
        svdq.models.prepare(quant)  # fuse shared-input projections, as calibrate_pipeline / svdq quantize do
        svdq.quantize(quant, progress=False)
        _CACHE[family] = (full, quant)
    return _CACHE[family]


def run(model, family: str, seed: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(family, seed))[0]


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------------------
# LoRA construction and independent references


# Factor std per family: adapters that change the 16-bit output by ~10 % (a typical style LoRA).
LORA_STD = {"flux": 0.05, "sdxl": 0.03, "pixart": 0.07}


def make_lora(model, family: str, seed: int, rank: int = RANK, std: float | None = None) -> dict[str, tuple]:
    """{module path: (A [r, K], B [N, r])} on the 16-bit (unfused) model's matching linears."""
    g = torch.Generator().manual_seed(seed)
    std = LORA_STD[family] if std is None else std
    out = {}
    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear and any(t in name for t in TARGETS[family]):
            a = torch.randn(rank, m.in_features, generator=g) * std
            b = torch.randn(m.out_features, rank, generator=g) * std
            out[name] = (a, b)
    assert out
    return out


def to_peft(lora: dict, prefix: str) -> dict[str, torch.Tensor]:
    sd = {}
    for name, (a, b) in lora.items():
        sd[f"{prefix}{name}.lora_A.weight"] = a.clone()
        sd[f"{prefix}{name}.lora_B.weight"] = b.clone()
    return sd


def merged(full, loras: list[tuple[dict, float]]):
    """16-bit reference: W ← W + Σ s·B·A."""
    m = copy.deepcopy(full)
    with torch.no_grad():
        for lora, s in loras:
            for name, (a, b) in lora.items():
                m.get_submodule(name).weight += s * (b.double() @ a.double()).float()
    return m


def reference_hooks(model, loras: list[tuple[dict, float]]):
    """Quantized reference: y ← y + s·x·(B·A)ᵀ at every LoRA module path (fp64 delta)."""
    handles = []
    for lora, s in loras:
        for name, (a, b) in lora.items():
            def hook(_m, args, out, a=a, b=b, s=s):
                return out + (s * (args[0].double() @ a.double().T @ b.double().T)).to(out.dtype)

            target = model.get_submodule(name)
            handles.append(target.register_forward_hook(hook))
            if isinstance(target, ProjectionSlice):
                # diffusers' own fused path (FLUX double blocks, SDXL / PixArt attention) calls the fused group
                # directly, not the stand-in: add the delta to this projection's rows of the group's output.
                lo, hi = target.offset, target.offset + target.out_features

                def group_hook(_m, args, out, a=a, b=b, s=s, lo=lo, hi=hi):
                    out = out.clone()
                    out[..., lo:hi] += (s * (args[0].double() @ a.double().T @ b.double().T)).to(out.dtype)
                    return out

                handles.append(target.fused.register_forward_hook(group_hook))
    return handles


def with_hooks(model, family, loras):
    handles = reference_hooks(model, loras)
    try:
        return run(model, family)
    finally:
        for h in handles:
            h.remove()


def storage(model) -> dict:
    """data_ptr and a copy of every quantized layer's 4-bit tensors."""
    return {
        n: (m.qweight.data_ptr(), m.wscales.data_ptr(), m.qweight.clone(), m.wscales.clone())
        for n, m in model.named_modules()
        if isinstance(m, SVDQLinear)
    }


def assert_storage_unchanged(before: dict, model) -> None:
    after = {n: m for n, m in model.named_modules() if isinstance(m, SVDQLinear)}
    assert before.keys() == after.keys()
    for n, (pq, pw, q, w) in before.items():
        m = after[n]
        assert m.qweight.data_ptr() == pq and m.wscales.data_ptr() == pw, n
        assert torch.equal(m.qweight, q) and torch.equal(m.wscales, w), n


# ---------------------------------------------------------------------------------------------------------
# accuracy


def test_quantized_lora_is_exact_delta_and_as_close_as_base(family):
    full, quant = models(family)
    lora = make_lora(full, family, seed=1)
    sd = to_peft(lora, PREFIX[family])
    base_q, base_16 = run(quant, family), run(full, family)

    name = svdq.load_lora(quant, sd, name="a")
    try:
        y = run(quant, family)
        info = svdq.list_loras(quant)["a"]
        assert info.quantized_layers > 0 and info.fp16_layers > 0, info
        # every fused group is one layer: fewer physical layers than LoRA modules
        assert info.quantized_layers + info.fp16_layers < len(lora)
    finally:
        svdq.unload_lora(quant, name)
    ref_q = with_hooks(quant, family, [(lora, 1.0)])
    assert rel(y, ref_q) < QTOL, rel(y, ref_q)
    assert rel(y, base_q) > 0.03  # the adapter does something

    # The 16-bit path (forward hooks on nn.Linear) equals the merged weights.
    ref_16 = run(merged(full, [(lora, 1.0)]), family)
    fp = copy.deepcopy(full)
    svdq.load_lora(fp, sd, name="a")
    assert rel(run(fp, family), ref_16) < 1e-5

    # Quantized + LoRA is as close to 16-bit + LoRA as the base quantized model is to 16-bit.
    base_err, lora_err = rel(base_q, base_16), rel(y, ref_16)
    # (measured ratios: flux 1.07, sdxl ~1.2, pixart ~1.2; a LoRA landing on the wrong rows or columns gives
    # errors of the order of the adapter's effect, ≥ 2× the base error here)
    assert lora_err < 1.5 * base_err, (lora_err, base_err)
    assert torch.equal(run(quant, family), base_q)


def test_two_adapters_strength_swap_and_unload(family):
    full, quant = models(family)
    l1, l2 = make_lora(full, family, seed=2), make_lora(full, family, seed=3, rank=8)
    base = run(quant, family)
    # references on the bare quantized model, computed before any adapter is loaded
    refs = [with_hooks(quant, family, loras) for loras in ([(l1, 0.7), (l2, -0.3)], [(l1, 0.2), (l2, -0.3)], [(l1, 0.2)])]
    before = storage(quant)
    originals = {n: (m.lora_down, m.lora_up, m.lora_scales) for n, m in quant.named_modules() if isinstance(m, SVDQLinear)}

    svdq.load_lora(quant, to_peft(l1, PREFIX[family]), name="one", strength=0.7)
    svdq.load_lora(quant, to_peft(l2, PREFIX[family]), name="two", strength=-0.3)
    assert list(svdq.list_loras(quant)) == ["one", "two"]
    y = run(quant, family)
    assert rel(y, refs[0]) < QTOL
    # each adapter's block is padded to a multiple of 16 columns
    for n, m in quant.named_modules():
        if isinstance(m, SVDQLinear) and m.rank != originals[n][0].shape[1]:
            assert (m.rank - originals[n][0].shape[1]) % 16 == 0
    assert_storage_unchanged(before, quant)

    branch = {n: (m.lora_down.data_ptr(), m.lora_up.data_ptr()) for n, m in quant.named_modules() if isinstance(m, SVDQLinear)}
    svdq.set_lora_strength(quant, "one", 0.2)
    y2 = run(quant, family)
    assert rel(y2, y) > 1e-3
    assert rel(y2, refs[1]) < QTOL
    assert svdq.list_loras(quant)["one"].strength == 0.2
    # a strength change rewrites lora_scales only: no 4-bit or branch tensor is reallocated
    assert branch == {n: (m.lora_down.data_ptr(), m.lora_up.data_ptr()) for n, m in quant.named_modules() if isinstance(m, SVDQLinear)}
    assert_storage_unchanged(before, quant)

    svdq.unload_lora(quant, "two")
    assert rel(run(quant, family), refs[2]) < QTOL
    svdq.unload_lora(quant, "one")
    assert svdq.list_loras(quant) == {}
    assert torch.equal(run(quant, family), base)  # bit-exact
    for n, m in quant.named_modules():
        if isinstance(m, SVDQLinear):
            # the original branch tensors are back: the same storage (no copy) and the same values
            for now, orig in zip((m.lora_down, m.lora_up, m.lora_scales), originals[n]):
                assert now.data_ptr() == orig.data_ptr() and torch.equal(now, orig), n
    assert_storage_unchanged(before, quant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_branch_is_base_plus_exact_delta(dtype):
    """One quantized layer (odd sizes) and one fused layer: y = y_base + s·x·(B·A)ᵀ per adapter."""
    from svdq.models import fuse_linears

    g = torch.Generator().manual_seed(11)
    owner = torch.nn.Module()
    owner.to_q, owner.to_k, owner.to_v = (torch.nn.Linear(77, n) for n in (26, 37, 13))
    owner.single = torch.nn.Linear(77, 37)
    owner.to(dtype)  # (not SVDQLinear.to(dtype): that would cast the fp32 lora_scales too)
    fuse_linears(owner, "to_qkv", {c: (owner, c) for c in ("to_q", "to_k", "to_v")})
    owner.to_qkv.linear = SVDQLinear.from_linear(owner.to_qkv.linear, rank=16)
    owner.single = SVDQLinear.from_linear(owner.single, rank=16)
    x = torch.randn(5, 77, generator=g).to(dtype)
    lora = {n: (torch.randn(3, 77, generator=g), torch.randn(m.out_features, 3, generator=g)) for n, m in
            (("to_q", owner.to_q), ("to_v", owner.to_v), ("single", owner.single))}  # fmt: skip
    sd = {**to_peft(lora, ""), "single.alpha": torch.tensor(6.0)}
    with torch.no_grad():
        base = {n: owner.get_submodule(n)(x) for n in ("to_q", "to_k", "to_v", "single")}
        svdq.load_lora(owner, sd, name="a", strength=0.5)
        out = {n: owner.get_submodule(n)(x) for n in base}
    assert owner.to_qkv.linear.rank == 16 + 16  # q and v: 6 columns, one block padded to 16
    scales = owner.to_qkv.linear.lora_scales[16:]
    assert torch.equal(scales, torch.tensor([0.5] * 6 + [0.0] * 10))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for n in base:
        s = 0.5 * (2.0 if n == "single" else 1.0)  # alpha 6 / rank 3 for "single"
        delta = s * (x.double() @ lora[n][0].double().T @ lora[n][1].double().T) if n in lora else 0
        ref = base[n].double() + delta
        assert rel(out[n].double(), ref) < tol, n
    svdq.unload_lora(owner, "a")
    with torch.no_grad():
        assert all(torch.equal(owner.get_submodule(n)(x), base[n]) for n in base)


def test_unload_restores_16bit_layers_bit_exactly():
    full, _ = models("flux")
    fp = copy.deepcopy(full)
    base = run(fp, "flux")
    svdq.load_lora(fp, to_peft(make_lora(full, "flux", seed=4), "transformer."), name="x")
    assert not torch.equal(run(fp, "flux"), base)
    svdq.unload_lora(fp, "x")
    assert torch.equal(run(fp, "flux"), base)
    assert all(not m._forward_hooks for m in fp.modules())


# ---------------------------------------------------------------------------------------------------------
# formats


def _kohya_flux(lora: dict, alpha_ratio: float) -> dict[str, torch.Tensor]:
    """sd-scripts FLUX names (BFL layout): q/k/v as one ``img_attn_qkv`` LoRA of rank 3r, block-diagonal up."""
    sd = {}

    def put(key, a, b):
        sd[f"{key}.lora_down.weight"] = a.clone()
        sd[f"{key}.lora_up.weight"] = b.clone()
        sd[f"{key}.alpha"] = torch.tensor(alpha_ratio * a.shape[0])

    blocks = {int(n.split(".")[1]) for n in lora if n.startswith("transformer_blocks.")}
    for i in blocks:
        p = f"transformer_blocks.{i}"
        for side, qkv, proj, ff in (
            ("img", ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.to_out.0", "ff"),
            ("txt", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "attn.to_add_out", "ff_context"),
        ):
            parts = [lora[f"{p}.{n}"] for n in qkv]
            a = torch.cat([pa for pa, _ in parts])
            b = torch.block_diag(*[pb for _, pb in parts])
            put(f"lora_unet_double_blocks_{i}_{side}_attn_qkv", a, b)
            put(f"lora_unet_double_blocks_{i}_{side}_attn_proj", *lora[f"{p}.{proj}"])
            put(f"lora_unet_double_blocks_{i}_{side}_mlp_0", *lora[f"{p}.{ff}.net.0.proj"])
            put(f"lora_unet_double_blocks_{i}_{side}_mlp_2", *lora[f"{p}.{ff}.net.2"])
    for n, (a, b) in lora.items():
        if n.startswith("single_transformer_blocks.") and n.endswith("proj_out"):
            put(f"lora_unet_single_blocks_{n.split('.')[1]}_linear2", a, b)
    return sd


def _kohya_names(lora: dict, alpha_ratio: float, prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    """kohya keys spelled from diffusers module paths (``.`` → ``_``)."""
    sd = {}
    for n, (a, b) in lora.items():
        k = prefix + n.replace(".", "_")
        sd[f"{k}.lora_down.weight"] = a.clone()
        sd[f"{k}.lora_up.weight"] = b.clone()
        sd[f"{k}.alpha"] = torch.tensor(alpha_ratio * a.shape[0])
    return sd


FLUX_KOHYA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
    "ff_context.net.2", "single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out",
)  # fmt: skip


def test_peft_and_kohya_files_give_identical_outputs(family, tmp_path):
    full, quant = models(family)
    lora = make_lora(full, family, seed=5)
    if family == "flux":  # the BFL layout has no names for some diffusers layers (e.g. to_q without qkv)
        lora = {
            n: w
            for n, w in lora.items()
            if n.endswith(FLUX_KOHYA_TARGETS) and (n.startswith("transformer_blocks.") or n.endswith("proj_out"))
        }
        kohya = _kohya_flux(lora, 0.5)
    else:
        kohya = _kohya_names(lora, 0.5)
    peft_file = tmp_path / "peft.safetensors"
    meta = {"lora_adapter_metadata": json.dumps({f"{PREFIX[family]}r": RANK, f"{PREFIX[family]}lora_alpha": RANK / 2})}
    save_file(to_peft(lora, PREFIX[family]), str(peft_file), metadata=meta)
    kohya_file = tmp_path / "kohya.safetensors"
    save_file(kohya, str(kohya_file))

    outs = {}
    for f in (peft_file, kohya_file):
        name = svdq.load_lora(quant, f)
        assert name == f.stem
        outs[name] = run(quant, family)
        svdq.unload_lora(quant, name)
    assert svdq.list_loras(quant) == {}
    assert torch.equal(outs["peft"], outs["kohya"])
    assert rel(outs["peft"], with_hooks(quant, family, [(lora, 0.5)])) < QTOL


def test_kohya_fused_qkv_with_shared_down_uses_one_block():
    """An sd-scripts qkv adapter with a dense up matrix gives q, k and v the same A: one shared block."""
    full, quant = models("flux")
    g = torch.Generator().manual_seed(6)
    a = torch.randn(RANK, 128, generator=g) * 0.15
    b = torch.randn(3 * 128, RANK, generator=g) * 0.15
    sd = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": a,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": b,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(float(RANK)),
    }
    layer = quant.get_submodule("transformer_blocks.0.attn.to_qkv.linear")
    r0 = layer.rank
    svdq.load_lora(quant, sd, name="qkv")
    try:
        assert layer.rank == r0 + 16  # shared down: rank r padded to 16, not 3r
        y = run(quant, "flux")
    finally:
        svdq.unload_lora(quant, "qkv")
    lora = {f"transformer_blocks.0.attn.to_{c}": (a, b[i * 128 : (i + 1) * 128]) for i, c in enumerate("qkv")}
    assert rel(y, with_hooks(quant, "flux", [(lora, 1.0)])) < QTOL


# ---------------------------------------------------------------------------------------------------------
# errors, text encoders, limits


def test_bad_keys_strict_and_non_strict(caplog):
    full, quant = models("flux")
    lora = make_lora(full, "flux", seed=7)
    sd = to_peft(lora, "transformer.")
    bad = {f"transformer.blocks.{i}.nope.lora_A.weight": torch.zeros(RANK, 128) for i in range(7)}
    bad |= {k.replace("lora_A", "lora_B"): torch.zeros(128, RANK) for k in bad}
    base = run(quant, "flux")
    ref = with_hooks(quant, "flux", [(lora, 1.0)])
    with pytest.raises(LoraError) as e:
        svdq.load_lora(quant, {**sd, **bad}, name="bad")
    msg = str(e.value)
    assert "blocks.0.nope" in msg and "(7 in all)" in msg and "nothing applied" in msg
    assert svdq.list_loras(quant) == {} and torch.equal(run(quant, "flux"), base)

    with caplog.at_level(logging.WARNING, logger="svdq"):
        svdq.load_lora(quant, {**sd, **bad}, name="bad", strict=False)
    try:
        assert "7 key(s) match no layer" in caplog.text
        assert len(svdq.list_loras(quant)["bad"].skipped) == 7
        assert rel(run(quant, "flux"), ref) < QTOL
    finally:
        svdq.unload_lora(quant, "bad")

    with pytest.raises(LoraError, match="do not fit"):  # a LoRA for another model width
        svdq.load_lora(quant, {"transformer.proj_out.lora_A.weight": torch.zeros(2, 64),
                               "transformer.proj_out.lora_B.weight": torch.zeros(16, 2)})  # fmt: skip
    with pytest.raises(LoraError, match="already loaded"):
        svdq.load_lora(quant, sd, name="dup")
        svdq.load_lora(quant, sd, name="dup")
    svdq.unload_lora(quant, "dup")
    with pytest.raises(LoraError, match="no LoRA named"):
        svdq.set_lora_strength(quant, "missing", 1.0)
    assert torch.equal(run(quant, "flux"), base)


def test_rank_limit_is_checked_before_anything_changes():
    full, quant = models("flux")
    base = run(quant, "flux")
    sd = to_peft(make_lora(full, "flux", seed=8, rank=500), "transformer.")
    with pytest.raises(LoraError, match="MAX_RANK"):
        svdq.load_lora(quant, sd, name="huge")
    assert svdq.list_loras(quant) == {} and torch.equal(run(quant, "flux"), base)


@pytest.mark.skipif(not hasattr(tiny, "tiny_flux_full_pipeline"), reason="needs svdq.testing.tiny text encoders")
def test_text_encoder_keys_need_the_pipeline(caplog):
    pipe = tiny.tiny_flux_full_pipeline(0)
    svdq.models.prepare(pipe.transformer)
    svdq.quantize(pipe.transformer, progress=False)
    te = pipe.text_encoder
    encoder = getattr(te, "text_model", te).encoder  # transformers 5 dropped the text_model level
    q = encoder.layers[0].self_attn.q_proj
    g = torch.Generator().manual_seed(9)
    sd = to_peft(make_lora(tiny.tiny_flux_transformer(0), "flux", seed=9), "transformer.")
    sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.randn(RANK, q.in_features, generator=g)
    sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.randn(q.out_features, RANK, generator=g)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        te_base = te(ids)[0]

    with caplog.at_level(logging.WARNING, logger="svdq"):
        svdq.load_lora(pipe.transformer, sd, name="t")  # transformer only: TE keys reported, not an error
    assert "text-encoder" in caplog.text and svdq.list_loras(pipe.transformer)["t"].skipped
    svdq.unload_lora(pipe.transformer, "t")

    svdq.load_lora(pipe, sd, name="t")
    info = svdq.list_loras(pipe)["t"]
    assert info.text_encoder_modules == 1 and not info.skipped
    with torch.no_grad():
        assert rel(te(ids)[0], te_base) > 1e-3
    svdq.unload_lora(pipe, "t")
    with torch.no_grad():
        assert torch.equal(te(ids)[0], te_base)


def test_cli_inspect(tmp_path, capsys):
    from svdq.cli import main

    full, _ = models("flux")
    f = tmp_path / "style.safetensors"
    sd = to_peft(make_lora(full, "flux", seed=10), "transformer.")
    sd["transformer.nowhere.lora_A.weight"] = torch.zeros(RANK, 8)
    sd["transformer.nowhere.lora_B.weight"] = torch.zeros(8, RANK)
    save_file(sd, str(f))
    assert main(["lora", "inspect", str(f), "--model", "tiny:flux"]) == 0
    out = capsys.readouterr().out
    assert "peft" in out and "nowhere" in out and "to_qkv" in out and "16-bit" in out
    assert main(["lora", "inspect", str(f), "--model", "tiny:flux", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unmatched"] == ["nowhere"]
