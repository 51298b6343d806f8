"""LoRA (diffusers / PEFT format) on generic-family models: Qwen-Image (and in Qwen-Image-Edit's pipeline, with
its conditioning image's tokens in the sequence), Z-Image, Wan, FLUX.2, SANA, HiDream-I1.

Per family, on the tiny transformer with the inputs of one real pipeline step (captured from its tiny
pipeline): an adapter on every linear of the blocks (attention projections — fused groups included — MLPs,
and the 16-bit modulation linears) loaded with `svdq.load_lora` into the quantized model must be as close
to diffusers' own 16-bit load of the same file (``load_lora_adapter``, PEFT) as the quantized base is to
the 16-bit base (ratio < 1.5, as tests/test_lora.py for FLUX.1 / SDXL / PixArt: a LoRA on the wrong rows
or columns of a fused layer gives errors of the order of its effect), must change the output (> 3 %),
and `unload_lora` must restore the quantized output bit for bit. Two adapters at once are checked against
the sum of their diffusers deltas.
"""

import copy

import pytest
import torch

import svdq
from svdq.models import generic, prepare
from svdq.testing import families as tf

RANK = 4
# Factor std per family: adapters that change the 16-bit output by ~5–10 % (a typical style LoRA).
LORA_STD = {"qwenimage": 0.05, "qwenimage-edit": 0.05, "zimage": 0.03, "wan": 0.05, "flux2": 0.08, "sana": 0.05,
            "hidream": 0.05}
LORA_FAMILIES = ("qwenimage", "qwenimage-edit", "zimage", "wan", "flux2", "sana", "hidream")


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


_CACHE = {}


def setup(family: str):
    """(16-bit transformer, quantized copy, the transformer's call arguments of one pipeline step)."""
    if family not in _CACHE:
        pipe = tf.tiny_family_pipeline(family)
        pipe.set_progress_bar_config(disable=True)
        captured = {}
        handle = pipe.transformer.register_forward_pre_hook(
            lambda _m, args, kwargs: captured.setdefault("call", (args, kwargs)), with_kwargs=True
        )
        try:
            pipe(prompt="a red fox", num_inference_steps=1, output_type="latent", **tf.call_kwargs(family))
        finally:
            handle.remove()
        full = pipe.transformer
        quant = copy.deepcopy(full)
        run_q = lambda m: run(m, captured["call"])  # noqa: E731
        generic.analyze(quant, run_q)
        family_obj = prepare(quant)
        svdq.quantize(quant, calibration=run_q, progress=False,
                      config=svdq.QuantizeConfig(alphas=(0.3, 0.5, 0.7), exclude=family_obj.exclude))
        _CACHE[family] = (full, quant, captured["call"])
    return _CACHE[family]


def run(model, call) -> torch.Tensor:
    args, kwargs = call
    with torch.no_grad():
        out = model(*args, **{**kwargs, "return_dict": False})[0]
    return torch.stack(out) if isinstance(out, (list, tuple)) else out  # Z-Image returns a list per sample


def make_peft_lora(model, seed: int, std: float = 0.05) -> dict[str, torch.Tensor]:
    """A diffusers-format adapter (``transformer.<module>.lora_A/B.weight``) on every linear in the blocks."""
    blocks = generic.find_blocks(model)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear and any(name.startswith(b + ".") for b in blocks):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(RANK, m.in_features, generator=g) * std
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, RANK, generator=g) * std
    assert sd
    return sd


def diffusers_16bit(full, loras: list[tuple[dict, float]], call) -> torch.Tensor:
    """The output with diffusers' own (PEFT) LoRA loading on the 16-bit model."""
    m = copy.deepcopy(full)
    names = []
    for i, (sd, strength) in enumerate(loras):
        m.load_lora_adapter(dict(sd), prefix="transformer", adapter_name=f"a{i}")
        names.append(f"a{i}")
    m.set_adapters(names, [s for _, s in loras])
    return run(m, call)


@pytest.mark.parametrize("family", LORA_FAMILIES)
def test_family_lora_matches_diffusers_and_unloads_exactly(family):
    full, quant, call = setup(family)
    base_16, base_q = run(full, call), run(quant, call)
    lora = make_peft_lora(full, seed=1, std=LORA_STD[family])
    ref_16 = diffusers_16bit(full, [(lora, 1.0)], call)
    assert rel(ref_16, base_16) > 0.03  # the adapter does something

    svdq.load_lora(quant, lora, name="a")
    try:
        y = run(quant, call)
        info = svdq.list_loras(quant)["a"]
        # 16-bit layers it is on: the modulation linears inside the blocks (Wan has none: a learned table) and
        # the in-block linears a class keeps 16-bit (generic.KEEP_16BIT: Z-Image's image refiner)
        plan = quant._svdq_plan
        in_block_16bit = [n for n in plan.modulation + plan.fp16 if generic._inside(n, plan.blocks)]
        assert info.format == "peft" and info.quantized_layers > 0, info
        assert info.fp16_layers == len(in_block_16bit), info
        # fused groups take their parts' adapters: fewer physical layers than adapted modules
        assert info.quantized_layers + info.fp16_layers < len(lora) // 2
    finally:
        svdq.unload_lora(quant, "a")
    assert torch.equal(run(quant, call), base_q)  # exact unload
    base_err, lora_err = rel(base_q, base_16), rel(y, ref_16)
    print(f"{family}: LoRA effect {rel(ref_16, base_16):.3f}, quantized base error {base_err:.4f}, "
          f"quantized+LoRA vs diffusers 16-bit+LoRA {lora_err:.4f}")
    assert rel(y, base_q) > 0.03
    assert lora_err < 1.5 * base_err, (lora_err, base_err)


@pytest.mark.parametrize("family", ["qwenimage"])
def test_two_adapters_with_strengths(family):
    full, quant, call = setup(family)
    base_16, base_q = run(full, call), run(quant, call)
    l1, l2 = make_peft_lora(full, seed=2), make_peft_lora(full, seed=3)
    ref_16 = diffusers_16bit(full, [(l1, 0.7), (l2, -0.4)], call)
    svdq.load_lora(quant, l1, name="one", strength=0.7)
    svdq.load_lora(quant, l2, name="two", strength=-0.4)
    try:
        y = run(quant, call)
    finally:
        svdq.unload_lora(quant, "one")
        svdq.unload_lora(quant, "two")
    assert torch.equal(run(quant, call), base_q)
    assert rel(y, ref_16) < 1.5 * rel(base_q, base_16)


# ---- community layouts, converted by each family's own diffusers loader (svdq.lora_formats.DIFFUSERS_LORA_LOADERS)
ALPHA = 2.0 * RANK  # scale alpha / rank = 2: a converter that dropped the alpha would be off by 2x

# Wan's original (Wan-AI repo / ComfyUI) names of the diffusers modules the converter maps
WAN_ORIGINAL = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
                "ffn.net.2": "ffn.2"}


def community_key(family: str, layout: str, name: str) -> str | None:
    """The module's name in a community LoRA layout diffusers' converter for the family accepts (None: the
    layout has no name for it)."""
    if layout == "kohya":  # kohya / sd-scripts: lora_unet_<path with _>
        return "lora_unet_" + name.replace(".", "_")
    if family == "wan":
        block, _, rest = name.partition(".")
        idx, _, sub = rest.partition(".")
        return f"diffusion_model.blocks.{idx}.{WAN_ORIGINAL[sub]}" if block == "blocks" and sub in WAN_ORIGINAL else None
    if family == "zimage":  # the original repo spells attention.to_out.0 as attention.out
        return "diffusion_model." + name.replace("attention.to_out.0", "attention.out")
    return "diffusion_model." + name


def make_community_lora(model, family: str, layout: str, seed: int) -> dict[str, torch.Tensor]:
    """An adapter in a community layout (``.lora_down`` / ``.lora_up`` / ``.alpha``) on the blocks' linears."""
    peft = make_peft_lora(model, seed, std=LORA_STD[family])
    sd = {}
    for key, t in peft.items():
        name, which = key.removeprefix("transformer.").rsplit(".lora_", 1)
        new = community_key(family, layout, name)
        if new is None:
            continue
        if which.startswith("A"):
            sd[f"{new}.lora_down.weight"] = t
            sd[f"{new}.alpha"] = torch.tensor(ALPHA)
        else:
            sd[f"{new}.lora_up.weight"] = t
    assert len(sd) > 30
    return sd


@pytest.mark.parametrize("family,layout", [("qwenimage", "comfy"), ("qwenimage", "kohya"), ("wan", "comfy"),
                                           ("zimage", "comfy")])
def test_community_lora_layouts_load_as_diffusers_reads_them(family, layout):
    from svdq.lora_formats import DIFFUSERS_LORA_LOADERS
    from diffusers.loaders import lora_pipeline

    full, quant, call = setup(family)
    base_16, base_q = run(full, call), run(quant, call)
    community = make_community_lora(full, family, layout, seed=4)
    mixin = getattr(lora_pipeline, DIFFUSERS_LORA_LOADERS[type(full).__name__])
    # what pipe.load_lora_weights does with the file (on copies: diffusers' Wan converter scales tensors in place)
    converted = mixin.lora_state_dict({k: v.clone() for k, v in community.items()})
    assert all(k.startswith("transformer.") and ".lora_" in k for k in converted)
    ref_16 = diffusers_16bit(full, [(converted, 1.0)], call)
    assert rel(ref_16, base_16) > 0.03

    before = {k: v.clone() for k, v in community.items()}
    svdq.load_lora(quant, community, name="c")
    assert all(torch.equal(community[k], v) for k, v in before.items())  # the caller's tensors are not touched
    try:
        y = run(quant, call)
        info = svdq.list_loras(quant)["c"]
        assert info.format == f"community ({mixin.__name__})" and info.quantized_layers > 0, info
    finally:
        svdq.unload_lora(quant, "c")
    assert torch.equal(run(quant, call), base_q)
    base_err, lora_err = rel(base_q, base_16), rel(y, ref_16)
    print(f"{family} {layout}: LoRA effect {rel(ref_16, base_16):.3f}, quantized+LoRA vs diffusers 16-bit+LoRA "
          f"{lora_err:.4f} (quantized base {base_err:.4f})")
    assert lora_err < 1.5 * base_err, (lora_err, base_err)
    # the alpha matters: the same file without its alphas (scale 1 instead of 2) is measurably different
    no_alpha = {k: v for k, v in community.items() if not k.endswith(".alpha")}
    svdq.load_lora(quant, no_alpha, name="n")
    try:
        assert rel(run(quant, call), ref_16) > 2 * lora_err
    finally:
        svdq.unload_lora(quant, "n")
