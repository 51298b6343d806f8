"""`svdq bench --model`: one denoising step (transformer / UNet forward, batch 1) per variant.

The real architecture at full size is built from its published config with synthetic weights (no download):
constructed on the meta device, materialized directly on the GPU in bf16 (`to_empty`), then filled with
seeded random values — host memory stays low. Variants, each eager and under `torch.compile`:

    bf16    diffusers as shipped                                                     the baseline
    fp8     dynamic FP8: e4m3 `torch._scaled_mm`, per-row activation / per-channel weight scales (sm_89+)
    nf4     bitsandbytes `Linear4bit` (NF4 weight-only), when bitsandbytes is installed
    int4    torchao int4 weight-only (`Int4WeightOnlyConfig`), when torchao is installed
    svdq    `svdq.models.prepare` + `svdq.quantize(model, calibration=None)` (data-free), timed; with
            `adaln="w4a16"` (`--adaln w4a16`) the AdaLN modulation linears become W4A16 too

fp8 / nf4 / int4 replace exactly the `nn.Linear` layers svdq quantizes (the family's default exclusions:
embeddings, AdaLN modulation, final projection stay bf16) and are undone afterwards; svdq runs last (it
quantizes in place). Per row: median latency after warm-up (CUDA events), peak memory, weight memory,
speedup vs bf16 eager, and the step's GPU time split (torch.profiler kernel names: GEMM / svdq activation
quantization / attention / other) — the GEMM share bounds what faster GEMMs can buy.

Without a GPU (CPU mode): a reduced-width FLUX config (`CPU_FLUX`), fp32 and bf16 against svdq on the
`cpu` and `reference` backends, eager only unless --compile.

The generic family's models (`GENERIC_MODELS`: Qwen-Image, Wan 2.1 14B, SD3.5-large, Z-Image-Turbo, FLUX.2-dev,
Chroma1, SANA-1600M, HiDream-I1; docs/models.md) work the same way, with three differences: the model keeps the
buffers its class computes (parameters alone start on meta), its layer plan comes from one traced forward of the
benchmark's inputs (`svdq.models.generic.analyze`) before anything is swapped or quantized, and in CPU mode the
stand-in is the family's tiny transformer from `svdq.testing.families`. Their inputs are what each pipeline hands
its transformer (tests/test_bench_families.py compares them with the tiny pipelines' calls).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import CPU_MODE_NOTE
from .layers import measure

# Published configs (diffusers config.json of the hub repos), full size.
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
SDXL_UNET = dict(act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64,
                 addition_time_embed_dim=256, attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280),
                 cross_attention_dim=2048,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
                 projection_class_embeddings_input_dim=2816, sample_size=128,
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True)
PIXART_SIGMA = dict(activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=72,
                    caption_channels=4096, cross_attention_dim=1152, in_channels=4, interpolation_scale=2,
                    norm_elementwise_affine=False, norm_eps=1e-6, norm_num_groups=32, norm_type="ada_norm_single",
                    num_attention_heads=16, num_embeds_ada_norm=1000, num_layers=28, out_channels=8,
                    patch_size=2, sample_size=128, use_additional_conditions=False)
# CPU mode: FLUX.1's block structure (double + single stream, AdaLN, RoPE) at width 256, 2 + 4 blocks.
CPU_FLUX = dict(FLUX_DEV, num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=64,
                joint_attention_dim=512, pooled_projection_dim=256, axes_dims_rope=(8, 28, 28))

# The generic family's models (docs/models.md, "Generic family": the table's "published config counted"), each the
# transformer/config.json of its hub repo. Written out even where they equal the diffusers 0.42.1 class defaults
# (noted per entry), so a change of a default cannot silently change what is benchmarked; tests/
# test_bench_families.py checks every one against the table's bf16 GiB column.
# Qwen/Qwen-Image = QwenImageTransformer2DModel() defaults: 60 blocks, 24 × 128 = 3072 wide, Qwen2.5-VL-7B text 3584.
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
# Wan-AI/Wan2.1-T2V-14B-Diffusers = WanTransformer3DModel() defaults: 40 blocks, 40 × 128 = 5120, FFN 13824, UMT5 4096.
WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
# stabilityai/stable-diffusion-3.5-large (NOT the class defaults, which are SD3-medium's 18 blocks × 1152): 38 blocks,
# 38 heads × 64 = 2432 wide, QK RMSNorm, no dual-attention blocks (those are SD3.5-medium's), pos-embed grid 192.
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, dual_attention_layers=(),
                  qk_norm="rms_norm")
# Tongyi-MAI/Z-Image-Turbo = ZImageTransformer2DModel() defaults: 30 blocks + 2 noise + 2 context refiners, 3840 wide,
# Qwen3-4B text 2560.
Z_IMAGE_TURBO = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                     n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                     rope_theta=256.0, t_scale=1000.0, axes_dims=(32, 48, 48), axes_lens=(1024, 512, 512))
# black-forest-labs/FLUX.2-dev = Flux2Transformer2DModel() defaults: 8 double + 48 single blocks, 48 × 128 = 6144,
# Mistral-Small-3.1 text 3 layers × 5120 = 15360, guidance-distilled (guidance embedder).
FLUX2_DEV = dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                 num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
                 axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=True)
# lodestones/Chroma1-HD = ChromaTransformer2DModel() defaults: FLUX.1's 19 + 38 blocks, 5-layer modulation approximator.
CHROMA1 = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56),
               approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5)
# Efficient-Large-Model/Sana_1600M_1024px_diffusers = SanaTransformer2DModel() defaults: 20 blocks, 70 × 32 = 2240,
# DC-AE f32c32 latents (32 channels, 1/32 of the pixels), Gemma-2-2B text 2304.
SANA_1600M = dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                  num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                  caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1, norm_elementwise_affine=False,
                  norm_eps=1e-6)
# HiDream-ai/HiDream-I1-Full (the class has no usable defaults: patch_size / caption_channels / llama_layers are
# None): 16 double + 32 single blocks, 20 × 128 = 2560, MoE of 4 routed experts (2 active) + a shared one, T5 and
# Llama-3.1-8B text 4096 each, pooled CLIP-L + CLIP-G 2048; each block reads one of Llama's 32 layers' hidden
# states (llama_layers: the 32 layers, then the last one again for the remaining 16 blocks; it does not change
# the parameter count).
HIDREAM_I1 = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32,
                  attention_head_dim=128, num_attention_heads=20, caption_channels=(4096, 4096), text_emb_dim=2048,
                  num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(64, 32, 32),
                  max_resolution=(128, 128), llama_layers=tuple(range(32)) + (31,) * 16)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    cls: str  # diffusers class
    config: dict
    # Text tokens the denoiser receives. FLUX: T5 max_sequence_length; SDXL: CLIP 77; PixArt-Σ: T5 300; the generic
    # families: what their pipeline passes (padded pipelines: max_sequence_length; see GENERIC_MODELS).
    text_tokens: int
    family: str = ""  # generic family: its key in svdq.testing.families (tiny stand-in, call kwargs); "" hand-written
    vae_scale: int = 8  # pixels per latent pixel (spatial)
    frames: int = 1  # video frames in pixels (Wan)
    vae_temporal: int = 1  # frames per latent frame after the first (Wan's VAE: 4)

    @property
    def generic(self) -> bool:
        return bool(self.family)


MODELS = {
    "flux-dev": ModelSpec("flux-dev", "FluxTransformer2DModel", FLUX_DEV, 512),
    "flux-schnell": ModelSpec("flux-schnell", "FluxTransformer2DModel", dict(FLUX_DEV, guidance_embeds=False), 256),
    "sdxl": ModelSpec("sdxl", "UNet2DConditionModel", SDXL_UNET, 77),
    "pixart-sigma": ModelSpec("pixart-sigma", "PixArtTransformer2DModel", PIXART_SIGMA, 300),
}
# Text tokens: padded pipelines pass max_sequence_length tokens (Wan's UMT5 512, SD3.5's CLIP 77 + T5 256, FLUX.2's
# Mistral 512, Chroma's T5 512, SANA's Gemma-2 300, HiDream's T5 128 and Llama 128); Qwen-Image and Z-Image pass the
# prompt's own tokens (no padding): 128 here, a long prompt. Wan: 17 frames (5 latent frames) at res×res.
GENERIC_MODELS = {
    "qwen-image": ModelSpec("qwen-image", "QwenImageTransformer2DModel", QWEN_IMAGE, 128, "qwenimage"),
    "wan2.1-14b": ModelSpec("wan2.1-14b", "WanTransformer3DModel", WAN_14B, 512, "wan", frames=17, vae_temporal=4),
    "sd3.5-large": ModelSpec("sd3.5-large", "SD3Transformer2DModel", SD35_LARGE, 77 + 256, "sd3"),
    "z-image-turbo": ModelSpec("z-image-turbo", "ZImageTransformer2DModel", Z_IMAGE_TURBO, 128, "zimage"),
    "flux2-dev": ModelSpec("flux2-dev", "Flux2Transformer2DModel", FLUX2_DEV, 512, "flux2"),
    "chroma1": ModelSpec("chroma1", "ChromaTransformer2DModel", CHROMA1, 512, "chroma"),
    "sana-1600m": ModelSpec("sana-1600m", "SanaTransformer2DModel", SANA_1600M, 300, "sana", vae_scale=32),
    "hidream-i1": ModelSpec("hidream-i1", "HiDreamImageTransformer2DModel", HIDREAM_I1, 128, "hidream"),
}
MODELS.update(GENERIC_MODELS)


def _tiny_text_tokens(family: str) -> int:
    """Text tokens the family's tiny pipeline hands its transformer (svdq.testing.families.CALL_KWARGS)."""
    from ..testing import families as tf

    n = tf.CALL_KWARGS[family]["max_sequence_length"]
    return 77 + n if family == "sd3" else n  # SD3: CLIP's 77 tokens before T5's


def cpu_spec(name: str) -> ModelSpec:
    """The scaled-down stand-in for `name` in CPU mode (FLUX: CPU_FLUX; SDXL / PixArt-Σ: svdq.testing.tiny's configs;
    the generic families: svdq.testing.families' tiny configs, with their tiny VAEs' 2× latent scale)."""
    from ..testing import tiny

    spec = MODELS[name]
    if spec.generic:
        from ..testing import families as tf

        video = spec.frames > 1
        return ModelSpec(name, spec.cls, dict(tf.CONFIGS[spec.family]), _tiny_text_tokens(spec.family), spec.family,
                         vae_scale=2, frames=tf.VIDEO_FRAMES if video else 1, vae_temporal=2 if video else 1)
    if spec.cls == "FluxTransformer2DModel":
        return ModelSpec(name, spec.cls, dict(CPU_FLUX, guidance_embeds=spec.config["guidance_embeds"]), 64)
    if spec.cls == "UNet2DConditionModel":
        return ModelSpec(name, spec.cls, dict(tiny.TINY_SDXL_UNET_CONFIG), 16)
    return ModelSpec(name, spec.cls, dict(tiny.TINY_PIXART_CONFIG), 16)


@dataclass
class ModelConfig:
    model: str
    device: torch.device
    resolutions: tuple[int, ...]
    warmup: int = 2
    repeats: int = 5
    compile: bool = True
    compile_mode: str = "auto"  # "regional" (diffusers' compile_repeated_blocks), "full", "auto": regional if any
    compile_resolutions: tuple[int, ...] | None = None  # None: the largest resolution only (compile time)
    rank: int = 32
    adaln: str = "16bit"  # svdq variant: AdaLN modulation linears "16bit" or "w4a16" (weight-only 4-bit)
    variants: tuple[str, ...] = ("bf16", "fp8", "nf4", "int4", "svdq")
    backends: tuple[str, ...] = ()
    profile: bool = True
    seed: int = 0
    notes: list[str] = field(default_factory=list)


def default_config(model: str, device: torch.device, **overrides) -> ModelConfig:
    import svdq

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {sorted(MODELS)}")
    avail = svdq.ops.available_backends()
    if device.type == "cuda":
        cfg = ModelConfig(model, device, (512, 1024), backends=tuple(b for b in ("cuda",) if b in avail))
    else:
        # The generic families' tiny stand-ins have 2× VAEs: 64² / 128² give CPU_FLUX's 256 / 1024 image tokens
        # (SD3's tiny position grid, pos_embed_max_size 16, ends at 64²).
        res = (256, 512) if not MODELS[model].generic else (32, 64) if MODELS[model].family == "sd3" else (64, 128)
        cfg = ModelConfig(model, device, res, warmup=1, repeats=3, compile=False, profile=False,
                          variants=("fp32", "bf16", "fp8", "nf4", "int4", "svdq"),
                          backends=tuple(b for b in ("cpu", "reference") if b in avail))
        cfg.notes.append(CPU_MODE_NOTE)
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    if cfg.adaln not in ("16bit", "w4a16"):
        raise ValueError(f"adaln must be '16bit' or 'w4a16', got {cfg.adaln!r}")
    spec = MODELS[model] if device.type == "cuda" else cpu_spec(model)
    if spec.generic:  # before minutes of building: SANA's DC-AE needs multiples of 32 pixels
        unit = spec.vae_scale * _patch(spec)
        bad = [r for r in cfg.resolutions + tuple(cfg.compile_resolutions or ()) if r % unit]
        if bad:
            raise ValueError(f"{model}: resolutions must be multiples of {unit} pixels (VAE × patch), got {bad}")
    return cfg


# ---------------------------------------------------------------------------------------------- build
def _init_(model: nn.Module, seed: int) -> None:
    """Seeded synthetic weights: Linear / Conv weights N(0, 1/fan_in), other tables N(0, 0.02), 1-D weights
    (norm scales) 1, biases 0 — activations keep a sane scale through the blocks."""
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        done = set()
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                m.weight.normal_(0.0, m.weight[0].numel() ** -0.5, generator=g)
                done.add(id(m.weight))
        for name, p in model.named_parameters():
            if id(p) in done:
                continue
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def _fix_buffers(model: nn.Module) -> None:
    """Buffers are computed values (PixArt's sin-cos position table); `to_empty` left them uninitialized."""
    from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed

    for m in model.modules():
        if isinstance(m, PatchEmbed) and getattr(m, "pos_embed", None) is not None:
            pe = get_2d_sincos_pos_embed(m.pos_embed.shape[-1], m.height, base_size=m.base_size,
                                         interpolation_scale=m.interpolation_scale, output_type="pt")
            m.pos_embed = pe.float().unsqueeze(0).to(m.pos_embed.device)
    for name, b in model.named_buffers():
        if b.is_floating_point() and not torch.isfinite(b).all():
            raise RuntimeError(f"buffer {name} has no recipe in svdq.bench.model._fix_buffers")


def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The architecture of `spec` with synthetic weights on `device` in `dtype`, never materialized elsewhere."""
    import diffusers

    cls = getattr(diffusers, spec.cls)
    if spec.generic:
        # Parameters on meta, buffers computed by the class itself on the CPU (RoPE tables, SD3's 192² sin-cos
        # position grid, …): no per-class recipe. They are cast like from_pretrained(torch_dtype=...) casts them and
        # put back after `to_empty`, which would leave them uninitialized.
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = cls(**spec.config)
        _cast_like_from_pretrained(model, dtype)
        buffers = {name: b for name, b in model.named_buffers()}
        model = model.to_empty(device=device)
        for name, b in buffers.items():
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = b.to(device)
    else:
        with torch.device("meta"):
            model = cls(**spec.config)
        model = nn.Module.to(model, dtype).to_empty(device=device)  # cast on meta: never a full fp32 copy
    _init_(model, seed)
    if spec.generic:
        _check_buffers(model)
    else:
        _fix_buffers(model)
    return model.eval().requires_grad_(False)


def _cast_like_from_pretrained(model: nn.Module, dtype: torch.dtype) -> None:
    """Floating parameters and buffers to ``dtype``, except those of the class's ``_keep_in_fp32_modules`` (a path
    component named so), which diffusers' ``from_pretrained(torch_dtype=...)`` keeps in float32 (Wan: its RoPE,
    time embedder, norms and modulation table)."""
    keep = tuple(getattr(type(model), "_keep_in_fp32_modules", None) or ())
    for mod_name, mod in model.named_modules():
        for store in (mod._parameters, mod._buffers):
            for leaf, t in store.items():
                if t is None or not t.is_floating_point():
                    continue
                path = f"{mod_name}.{leaf}" if mod_name else leaf
                want = torch.float32 if any(k in path.split(".") for k in keep) else dtype
                if t.dtype != want:
                    cast = t.to(want)
                    store[leaf] = nn.Parameter(cast, requires_grad=False) if isinstance(t, nn.Parameter) else cast


def _check_buffers(model: nn.Module) -> None:
    for name, b in model.named_buffers():
        if b.is_floating_point() and not torch.isfinite(b).all():
            raise RuntimeError(f"{type(model).__name__}: buffer {name} is not finite after construction")


def meta_model(spec: ModelSpec) -> nn.Module:
    """The architecture of `spec` on the meta device (no memory): for counting parameters and layers."""
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, spec.cls)(**spec.config)


def make_inputs(spec: ModelSpec, model: nn.Module, res: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Keyword arguments of one batch-1 forward at res×res pixels (latents: VAE ÷8; FLUX packs 2×2)."""
    if res % 16:
        raise ValueError(f"resolution must be a multiple of 16, got {res}")
    cfg = model.config
    g = torch.Generator(device="cpu").manual_seed(1234 + res)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    t = spec.text_tokens
    if spec.generic:
        return _generic_inputs(spec, cfg, res, rnd, device, dtype)
    if spec.cls == "FluxTransformer2DModel":
        side = res // 16
        r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(r), r, c], -1).reshape(-1, 3).to(device=device, dtype=torch.float32)
        d = dict(hidden_states=rnd(1, side * side, cfg.in_channels), encoder_hidden_states=rnd(1, t, cfg.joint_attention_dim),
                 pooled_projections=rnd(1, cfg.pooled_projection_dim),
                 timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                 img_ids=img_ids, txt_ids=torch.zeros(t, 3, device=device, dtype=torch.float32))
        if cfg.guidance_embeds:
            d["guidance"] = torch.full((1,), 3.5, device=device, dtype=dtype)
        return d
    lat = res // 8
    if spec.cls == "UNet2DConditionModel":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        time_ids = torch.tensor([[res, res, 0, 0, res, res]], device=device, dtype=dtype)
        return dict(sample=rnd(1, cfg.in_channels, lat, lat), timestep=torch.tensor([500], device=device),
                    encoder_hidden_states=rnd(1, t, cfg.cross_attention_dim),
                    added_cond_kwargs={"text_embeds": rnd(1, text_dim), "time_ids": time_ids})
    return dict(hidden_states=rnd(1, cfg.in_channels, lat, lat), encoder_hidden_states=rnd(1, t, cfg.caption_channels),
                timestep=torch.tensor([500], device=device),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def latent_frames(spec: ModelSpec) -> int:
    """Latent frames of a `spec.frames`-frame video (causal video VAEs keep the first frame: 1 + (F − 1) / scale)."""
    return 1 + (spec.frames - 1) // spec.vae_temporal if spec.frames > 1 else 1


def _patch(spec: ModelSpec) -> int:
    """Latent pixels per token side: the pipeline's 2×2 packing (Qwen-Image, FLUX.2, Chroma) or the patch size."""
    if spec.family in ("qwenimage", "flux2", "chroma"):
        return 2
    p = spec.config.get("patch_size", spec.config.get("all_patch_size"))
    return int(p[-1] if isinstance(p, (tuple, list)) else p)


def _generic_inputs(spec: ModelSpec, cfg, res: int, rnd, device: torch.device, dtype: torch.dtype) -> dict:
    """What the family's diffusers pipeline passes its transformer for one batch-1, guidance-free step (the names,
    dtypes and shapes are checked against the tiny pipelines' calls, tests/test_bench_families.py): latents of a
    res×res image (Wan: `spec.frames` frames) through the family's VAE, `spec.text_tokens` text features."""
    pixel_multiple = spec.vae_scale * _patch(spec)
    if res % pixel_multiple:
        raise ValueError(f"{spec.name}: resolution must be a multiple of {pixel_multiple}, got {res}")
    lat, t, fam = res // spec.vae_scale, spec.text_tokens, spec.family
    i64 = dict(device=device, dtype=torch.int64)

    def full(value, dt=dtype):
        return torch.full((1,), value, device=device, dtype=dt)

    if fam == "qwenimage":  # latents packed 2×2 (16 → 64 channels); timestep in latents' dtype, / 1000
        side = lat // 2
        return dict(hidden_states=rnd(1, side * side, cfg.in_channels), timestep=full(0.5), guidance=None,
                    encoder_hidden_states_mask=None, encoder_hidden_states=rnd(1, t, cfg.joint_attention_dim),
                    img_shapes=[[(1, side, side)]], attention_kwargs={})
    if fam == "wan":  # UniPC's integer timesteps
        return dict(hidden_states=rnd(1, cfg.in_channels, latent_frames(spec), lat, lat),
                    timestep=torch.full((1,), 500, **i64), encoder_hidden_states=rnd(1, t, cfg.text_dim),
                    attention_kwargs=None)
    if fam == "sd3":  # [CLIP-L ‖ CLIP-G zero-padded to T5's width] then T5, along the sequence
        return dict(hidden_states=rnd(1, cfg.in_channels, lat, lat), timestep=full(500.0, torch.float32),
                    encoder_hidden_states=rnd(1, t, cfg.joint_attention_dim),
                    pooled_projections=rnd(1, cfg.pooled_projection_dim), joint_attention_kwargs=None)
    if fam == "zimage":  # per-sample lists: latents [C, 1, H, W], prompt features without padding [T, C]
        return dict(x=[rnd(cfg.in_channels, 1, lat, lat)], t=full(0.5, torch.float32),
                    cap_feats=[rnd(t, cfg.cap_feat_dim)], joint_attention_kwargs=None)
    if fam == "flux2":  # latents patchified 2×2 (32 → 128 channels); ids (t, h, w, l) int64
        side = lat // 2
        h, w = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(h), h, w, torch.zeros_like(h)], -1).reshape(1, -1, 4)
        txt_ids = torch.stack([torch.zeros(t, dtype=torch.int64)] * 3 + [torch.arange(t)], -1).unsqueeze(0)
        return dict(hidden_states=rnd(1, side * side, cfg.in_channels), timestep=full(0.5),
                    guidance=full(4.0, torch.float32) if cfg.guidance_embeds else None,
                    encoder_hidden_states=rnd(1, t, cfg.joint_attention_dim), txt_ids=txt_ids.to(device),
                    img_ids=img_ids.to(device), joint_attention_kwargs=None)
    if fam == "chroma":  # FLUX.1's packing and ids; mask over [text ‖ image] (all prompt tokens valid here)
        side = lat // 2
        r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(r), r, c], -1).reshape(-1, 3).to(device=device, dtype=dtype)
        return dict(hidden_states=rnd(1, side * side, cfg.in_channels), timestep=full(0.5),
                    encoder_hidden_states=rnd(1, t, cfg.joint_attention_dim),
                    txt_ids=torch.zeros(t, 3, device=device, dtype=dtype), img_ids=img_ids,
                    attention_mask=torch.ones(1, t + side * side, device=device, dtype=dtype),
                    joint_attention_kwargs={})
    if fam == "sana":  # DC-AE latents, patch 1; Gemma-2 features with their (all-ones) mask
        return dict(hidden_states=rnd(1, cfg.in_channels, lat, lat),
                    encoder_hidden_states=rnd(1, t, cfg.caption_channels),
                    encoder_attention_mask=torch.ones(1, t, **i64), timestep=full(500.0, torch.float32),
                    attention_kwargs=None)
    if fam == "hidream":  # T5 features, and every Llama layer's hidden states stacked [layers, B, T, C]
        t5_dim, llama_dim = cfg.caption_channels
        return dict(hidden_states=rnd(1, cfg.in_channels, lat, lat), timesteps=full(500.0, torch.float32),
                    encoder_hidden_states_t5=rnd(1, t, t5_dim),
                    encoder_hidden_states_llama3=rnd(max(cfg.llama_layers) + 1, 1, t, llama_dim),
                    pooled_embeds=rnd(1, cfg.text_emb_dim), attention_kwargs=None)
    raise ValueError(f"no input builder for generic family {fam!r} ({spec.cls})")


def tokens(spec: ModelSpec, res: int) -> str:
    if spec.generic:
        grid = res // spec.vae_scale // _patch(spec)
        if spec.frames > 1:
            return (f"{spec.frames} frames: {latent_frames(spec)} × {grid}² = {latent_frames(spec) * grid * grid} "
                    f"video + {spec.text_tokens} text tokens")
        return f"{grid * grid} image + {spec.text_tokens} text tokens"
    if spec.cls == "FluxTransformer2DModel":
        return f"{(res // 16) ** 2} image + {spec.text_tokens} text tokens"
    if spec.cls == "PixArtTransformer2DModel":
        return f"{(res // 16) ** 2} image tokens, {spec.text_tokens} caption tokens"
    return f"latent {res // 8}×{res // 8}, {spec.text_tokens} text tokens"


# ---------------------------------------------------------------------------------------------- variants
def quantized_layer_names(model: nn.Module) -> list[str]:
    """The unfused nn.Linear layers svdq quantizes by default (the family's exclusions apply)."""
    from ..models import family_of
    from ..quantize import DEFAULT_EXCLUDE

    fam = family_of(model)
    exclude = fam.exclude if fam else DEFAULT_EXCLUDE
    return [n for n, m in model.named_modules()
            if type(m) is nn.Linear and not any(fnmatch.fnmatchcase(n, p) for p in exclude)]


def adaln_bytes(model: nn.Module, dtype: torch.dtype) -> dict:
    """The family's AdaLN modulation linears (still `nn.Linear`): how many, and their bytes in `dtype` vs as
    W4A16 (`SVDQWeightOnlyLinear`: INT4 + one `dtype` scale per 64 weights + bias)."""
    from ..models import family_of
    from ..ops.reference import GROUP_SIZE, padded_k

    fam = family_of(model)
    patterns = fam.adaln if fam else ()
    layers = [m for n, m in model.named_modules()
              if type(m) is nn.Linear and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    b16 = sum((m.in_features + (m.bias is not None)) * m.out_features * dtype.itemsize for m in layers)
    b4 = sum(m.out_features * (padded_k(m.in_features) // 2 + padded_k(m.in_features) // GROUP_SIZE * dtype.itemsize
                               + (m.bias is not None) * dtype.itemsize) for m in layers)
    return {"layers": len(layers), "patterns": list(patterns), "bytes_16bit": b16, "bytes_w4a16": b4}


class FP8Linear(nn.Module):
    """Dynamic FP8 (e4m3): weights per output channel at load, activations per row at run time (amax / 448),
    one `torch._scaled_mm` with bias. Activation quantization is a separate pass, as in torchao's dynamic FP8."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        ws = (w.abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12)
        self.register_buffer("w8", (w / ws).to(torch.float8_e4m3fn))  # [N, K]
        self.register_buffer("wscale", ws.t().contiguous())  # [1, N] fp32
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xs = (x2.abs().amax(dim=1, keepdim=True).float() / 448.0).clamp(min=1e-12)
        x8 = (x2 / xs).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(x8, self.w8.t(), scale_a=xs, scale_b=self.wscale, bias=self.bias, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def _nf4_factory():
    import bitsandbytes as bnb

    def make(lin: nn.Linear) -> nn.Module:
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                compute_dtype=lin.weight.dtype, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4")
        new.weight = new.weight.to(lin.weight.device)  # quantizes
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.detach(), requires_grad=False)
        return new

    return make


def _int4_factory():
    import torchao.quantization as tq

    cfg = tq.Int4WeightOnlyConfig(group_size=128) if hasattr(tq, "Int4WeightOnlyConfig") else tq.int4_weight_only(128)

    def make(lin: nn.Linear) -> nn.Module:
        new = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        new.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.detach(), requires_grad=False)
        tq.quantize_(new, cfg)
        return new

    return make


def _variant_unavailable(variant: str, device: torch.device) -> str | None:
    """Why `variant` cannot run here, or None."""
    if variant == "fp8":
        if device.type != "cuda":
            return "GPU only (torch._scaled_mm e4m3 needs an sm_89+ GPU)"
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            return f"no FP8 tensor cores on sm_{cap[0]}{cap[1]}"
    if variant in ("nf4", "int4"):
        pkg = "bitsandbytes" if variant == "nf4" else "torchao"
        try:
            __import__(pkg)
        except Exception as e:  # noqa: BLE001
            return f"{pkg} not installed ({type(e).__name__}); `pip install {pkg}` to compare"
        if device.type != "cuda":
            return f"GPU only ({pkg}'s 4-bit kernels)"
    return None


@contextlib.contextmanager
def swapped(model: nn.Module, names: list[str], make) -> list[str]:
    """Replace the named layers by make(layer) (layers it refuses keep 16-bit) and put them back on exit."""
    originals, skipped = [], []
    try:
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            lin = getattr(parent, attr)
            try:
                new = make(lin)
            except Exception as e:  # noqa: BLE001  (a shape the kernel cannot take stays 16-bit)
                skipped.append(f"{name}: {type(e).__name__}")
                continue
            originals.append((parent, attr, lin))
            setattr(parent, attr, new)
        yield skipped
    finally:
        for parent, attr, lin in originals:
            setattr(parent, attr, lin)


# ---------------------------------------------------------------------------------------------- measurement
def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once; bitsandbytes' quant state included)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        for u in _leaves(t):
            key = (u.untyped_storage().data_ptr(), u.dtype, u.numel()) if u.device.type != "meta" else id(u)
            if key not in seen:
                seen.add(key)
                total += u.numel() * u.element_size()
    for m in model.modules():  # bitsandbytes keeps absmax / code on the parameter's quant_state
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            for v in vars(qs).values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
    return total


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor storage reachable from ``model``'s modules: parameters, buffers and any
    tensor kept in a module attribute (also inside dicts, lists and tuples: caches such as a repacked copy of
    the weights). Meta tensors hold nothing. The CPU counterpart of the CUDA allocator's figure (issue 12)."""
    storages: dict[tuple, int] = {}

    def visit(obj, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            for u in _leaves(obj):
                if u.device.type != "meta":
                    st = u.untyped_storage()
                    storages[(u.device, st.data_ptr())] = max(storages.get((u.device, st.data_ptr()), 0), st.nbytes())
        elif depth < 4 and isinstance(obj, dict):
            for v in obj.values():
                visit(v, depth + 1)
        elif depth < 4 and isinstance(obj, (list, tuple, set)):
            for v in obj:
                visit(v, depth + 1)

    for m in model.modules():
        for name, v in vars(m).items():
            if name != "_modules":
                visit(v, 0)
    return sum(storages.values())


def _leaves(t: torch.Tensor):
    """Plain tensors inside a tensor subclass (torchao's packed weights), else the tensor itself."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, nn.Parameter):
        return [t]
    names, _ = flatten()
    out = []
    for n in names:
        out += _leaves(getattr(t, n))
    return out


GEMM_KEYS = ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_", "ampere_", "wgmma", "kgemm", "mm_kernel",
             "matmul", "splitk", "int4", "_mm", "addmm")  # cuBLAS / CUTLASS / Triton mm templates / svdq / bnb
ATTN_KEYS = ("flash", "fmha", "attention", "cudnn", "sdpa", "attn")
QACT_KEYS = ("quantize_act", "reduce_splits")


def kernel_category(name: str) -> str | None:
    """"gemm" | "quantize_act" | "attention" | "other" for a GPU kernel name; None for runtime API entries."""
    k = name.lower()
    if k.startswith(("memcpy", "memset")):
        return "other"
    if k.startswith("aten::") or (k.startswith("cuda") and not k.startswith("cudnn")):  # runtime API calls
        return None
    if any(s in k for s in QACT_KEYS):
        return "quantize_act"
    if any(s in k for s in ATTN_KEYS):  # before GEMM: memory-efficient attention kernels are named fmha_cutlass*
        return "attention"
    return "gemm" if any(s in k for s in GEMM_KEYS) else "other"


def time_split(model, inputs: dict) -> dict | None:
    """Fraction of one step's GPU kernel time in GEMMs, svdq activation quantization, attention, the rest."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(**inputs, return_dict=False)
        torch.cuda.synchronize()
    split = {"gemm": 0.0, "quantize_act": 0.0, "attention": 0.0, "other": 0.0}
    for e in prof.events():
        if str(getattr(e, "device_type", "")).lower().find("cuda") < 0:
            continue
        us = e.time_range.elapsed_us()  # a kernel event: its GPU duration
        cat = kernel_category(e.name)
        if cat is not None:
            split[cat] += us
    total = sum(split.values())
    if total <= 0:
        return None
    return {**{c: round(v / total, 4) for c, v in split.items()}, "total_ms": round(total / 1e3, 3)}


def step_rows(cfg: ModelConfig, spec: ModelSpec, model: nn.Module, variant: str, dtype: torch.dtype, log,
              backend: str | None = None, extra: dict | None = None) -> list[dict]:
    """Time one step per resolution, eager and (cfg.compile) compiled."""
    import svdq

    rows = []
    modes = ("eager", "compiled") if cfg.compile else ("eager",)
    wbytes = weight_bytes(model)
    def ctx():  # a fresh context each time (generator context managers are single-use)
        return svdq.ops.use_backend(backend) if backend else contextlib.nullcontext()

    gpu = cfg.device.type == "cuda"
    # Measured memory of the variant as loaded (issue 12 item 5), beside the state-dict sum `weight_bytes`:
    # on a GPU the caching allocator's live bytes before any input exists (weights as the backends hold them);
    # on the CPU every tensor storage reachable from the model (`resident_bytes`), taken after the steps below.
    if gpu:
        torch.cuda.synchronize(cfg.device)
        torch.cuda.empty_cache()
        loaded = torch.cuda.memory_allocated(cfg.device)
    for mode in modes:
        resolutions = cfg.resolutions
        if mode == "compiled":
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            resolutions = cfg.compile_resolutions or (max(cfg.resolutions),)
            try:
                fn, how = compiled(model, cfg.compile_mode)
            except Exception as e:  # noqa: BLE001
                for res in resolutions:
                    rows.append({"variant": variant, "backend": backend, "mode": mode, "res": res, "status": "error",
                                 "note": f"compile setup: {type(e).__name__}: {str(e)[:200]}"})
                continue
        else:
            fn, how = model, "eager"
        for res in resolutions:
            row = {"variant": variant, "backend": backend, "mode": mode, "compile": how, "res": res,
                   "tokens": tokens(spec, res),
                   "dtype": str(dtype).replace("torch.", ""), "weight_bytes": wbytes, **(extra or {})}
            try:
                inputs = make_inputs(spec, model, res, cfg.device, dtype)
                with ctx(), torch.no_grad():
                    t0 = time.perf_counter()
                    fn(**inputs, return_dict=False)
                    if gpu:
                        torch.cuda.synchronize()
                    row["first_call_s"] = round(time.perf_counter() - t0, 3)  # compilation for `compiled`
                    times = measure(lambda: fn(**inputs, return_dict=False), cfg.device, cfg.warmup, cfg.repeats)
                    row.update(status="ok", median_ms=round(statistics.median(times), 3),
                               times_ms=[round(t, 3) for t in times])
                    if gpu:
                        torch.cuda.reset_peak_memory_stats(cfg.device)
                        before = torch.cuda.memory_allocated(cfg.device)
                        fn(**inputs, return_dict=False)
                        torch.cuda.synchronize()
                        row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(cfg.device)
                        row["resident_bytes"] = before  # weights as the backend holds them + inputs
                        row["activation_peak_bytes"] = row["peak_mem_bytes"] - before
                        # the output was dropped: anything left beyond `before` stays after every step (a leak)
                        row["allocated_after_step_bytes"] = torch.cuda.memory_allocated(cfg.device)
                        row["loaded_bytes"] = loaded
                        row["loaded_how"] = "torch.cuda.memory_allocated after load, before inputs"
                    else:
                        row["loaded_bytes"] = resident_bytes(model)
                        row["loaded_how"] = "tensor storages reachable from the model after the steps"
                        if cfg.profile:
                            row["time_split"] = time_split(fn, inputs)
                    if mode == "compiled":  # graph breaks fall back to eager between graphs: say how many
                        c = torch._dynamo.utils.counters
                        row["dynamo"] = {"frames": c["frames"].get("total", 0),
                                         "unique_graphs": c["stats"].get("unique_graphs", 0),
                                         "graph_break_resumes": sum(c["resumes"].values()),
                                         "unsupported": sum(c["unimplemented"].values())}
            except Exception as e:  # noqa: BLE001  (one variant failing must not lose the others)
                row.update(status="error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            rows.append(row)
            log(f"  {variant}{'[' + backend + ']' if backend else ''} {mode} {res}²: "
                + (f"{row['median_ms']:.1f} ms (first call {row['first_call_s']:.1f} s)" if row["status"] == "ok"
                   else row["note"]))
        if mode == "compiled":
            uncompile(model)
    return rows


def compiled(model: nn.Module, mode: str):
    """(callable, description): regional compilation of the repeated blocks (diffusers'
    `compile_repeated_blocks`: each distinct block compiled once, reused 19 + 38 times on FLUX — far less
    compile time, close to full-graph speed) or `torch.compile` of the whole model."""
    blocks = getattr(model, "_repeated_blocks", None) or []
    if mode == "regional" and not blocks:
        raise ValueError(f"{type(model).__name__} has no _repeated_blocks for regional compilation")
    if mode in ("regional", "auto") and blocks:
        model.compile_repeated_blocks(dynamic=False)
        return model, f"regional ({', '.join(blocks)})"
    return torch.compile(model, dynamic=False), "full model"


def uncompile(model: nn.Module) -> None:
    """Undo `compile_repeated_blocks` (module.compile) so the next variant starts eager, and drop caches."""
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    torch._dynamo.reset()


def run_model(cfg: ModelConfig, log=print) -> dict:
    """Every variant of cfg.model on this device; returns {"config", "model", "rows", "quantization", "notes"}."""
    import svdq
    from ..decompose import EXACT_SVD_MAX_DIM

    gpu = cfg.device.type == "cuda"
    spec = MODELS[cfg.model] if gpu else cpu_spec(cfg.model)
    base_dtype = torch.bfloat16 if gpu else torch.float32
    t0 = time.perf_counter()
    model = build_model(spec, cfg.device, base_dtype, cfg.seed)
    if gpu:
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    nparams = sum(p.numel() for p in model.parameters())
    log(f"built {spec.cls} ({cfg.model}{', CPU-mode width' if not gpu else ''}): {nparams / 1e9:.3f} B params, "
        f"{weight_bytes(model) / 2**30:.2f} GiB in {str(base_dtype)[6:]}, {build_s:.1f} s")
    plan = None
    if spec.generic:
        # The generic family's layer plan (which linears are W4A4 / modulation / 16-bit, fused groups) comes from
        # one traced forward (svdq.models.generic.analyze) of the benchmark's own inputs at the smallest resolution.
        # It is stored on the model: quantized_layer_names / adaln_bytes / prepare / quantize below all use it, so
        # fp8 / nf4 / int4 swap exactly the layers svdq quantizes.
        from ..models import generic

        res0 = min(cfg.resolutions)
        t0 = time.perf_counter()
        gp = generic.analyze(model, lambda m: m(**make_inputs(spec, m, res0, cfg.device, base_dtype),
                                                return_dict=False))
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the trace's recorded inputs are gone
        plan = {"traced_at_res": res0, "seconds": round(time.perf_counter() - t0, 2), "blocks": len(gp.blocks),
                "w4a4": len(gp.w4a4), "modulation": len(gp.modulation), "fp16": len(gp.fp16),
                "fused_groups": len(gp.groups),
                "quantized_after_fusion": len(gp.quantized_names())}
        log(f"  generic plan (one traced forward at {res0}²): {len(gp.w4a4)} W4A4 linears in {len(gp.groups)} fused "
            f"groups, {len(gp.modulation)} modulation, {len(gp.fp16)} 16-bit, {plan['seconds']:.1f} s")
    names = quantized_layer_names(model)
    rows, quant = [], {}
    for variant in cfg.variants:
        why = _variant_unavailable(variant, cfg.device)
        if why is not None:
            rows.append({"variant": variant, "status": "skipped", "note": why})
            log(f"  {variant}: skipped ({why})")
            continue
        if variant in ("bf16", "fp32"):
            dtype = torch.bfloat16 if variant == "bf16" else torch.float32
            m = model if dtype == base_dtype else copy.deepcopy(model).to(dtype)
            rows += step_rows(cfg, spec, m, variant, dtype, log)
            del m
        elif variant in ("fp8", "nf4", "int4"):
            make = {"fp8": lambda: FP8Linear, "nf4": _nf4_factory, "int4": _int4_factory}[variant]()
            with swapped(model, names, make) as skipped:
                extra = {"note": f"{len(names) - len(skipped)} of {len(names)} linear layers swapped"
                                 + (f"; kept 16-bit: {skipped[:3]}" if skipped else "")}
                if gpu:
                    torch.cuda.empty_cache()
                rows += step_rows(cfg, spec, model, variant, base_dtype, log, extra=extra)
        elif variant == "svdq":
            target = model if gpu else copy.deepcopy(model)  # GPU: in place, last (memory); CPU: a copy
            adaln = adaln_bytes(target, base_dtype)
            model_bytes = weight_bytes(target)
            weight_only = adaln["patterns"] if cfg.adaln == "w4a16" else None
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            svdq.models.prepare(target)
            svdq.quantize(target, calibration=None, rank=cfg.rank, progress=False, weight_only=weight_only)
            if gpu:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            # Measured right after quantization (the model as a user holds it): the allocator on a GPU (the
            # bf16 originals were replaced in place and freed), reachable tensor storages on the CPU.
            resident_after_load = torch.cuda.memory_allocated(cfg.device) if gpu else resident_bytes(target)
            layers = svdq.quantized_layers(target)
            quant = {"seconds": round(time.perf_counter() - t0, 2), "layers": len(layers), "rank": cfg.rank,
                     "method": "svdquant, data-free (calibration=None), randomized SVD above "
                               f"{EXACT_SVD_MAX_DIM} dims",
                     "device": str(cfg.device), "dtype": str(base_dtype).replace("torch.", ""),
                     # the replaced layers alone (16-bit weights + bias vs 4-bit + scales + smooth + low-rank + bias)
                     "linear_bytes_16bit": sum((m.in_features + (m.bias is not None)) * m.out_features
                                               * base_dtype.itemsize for m in layers.values()),
                     "linear_bytes_svdq": sum(m.weight_bytes() for m in layers.values())}
            quant["linear_weight_ratio"] = round(quant["linear_bytes_16bit"] / max(quant["linear_bytes_svdq"], 1), 3)
            # Whole model (parameters + buffers) with the AdaLN linears in 16-bit and as W4A16, whichever ran.
            svdq_bytes = weight_bytes(target)
            saved = adaln["bytes_16bit"] - adaln["bytes_w4a16"]
            by_option = ({"16bit": svdq_bytes, "w4a16": svdq_bytes - saved} if cfg.adaln == "16bit"
                         else {"16bit": svdq_bytes + saved, "w4a16": svdq_bytes})
            quant.update(adaln=cfg.adaln, adaln_layers=adaln["layers"], adaln_bytes_16bit=adaln["bytes_16bit"],
                         adaln_bytes_w4a16=adaln["bytes_w4a16"], model_bytes_baseline=model_bytes,
                         model_bytes_svdq_adaln_16bit=by_option["16bit"], model_bytes_svdq_adaln_w4a16=by_option["w4a16"],
                         model_weight_ratio_adaln_16bit=round(model_bytes / by_option["16bit"], 3),
                         model_weight_ratio_adaln_w4a16=round(model_bytes / by_option["w4a16"], 3),
                         resident_after_load_bytes=resident_after_load,
                         resident_how="torch.cuda.memory_allocated" if gpu else "reachable tensor storages",
                         resident_over_state_dict=round(resident_after_load / svdq_bytes, 4))
            log(f"  svdq: quantized {len(layers)} layers (data-free, rank {cfg.rank}, AdaLN {cfg.adaln}) in "
                f"{quant['seconds']:.1f} s")
            if not cfg.backends:
                why = f"no svdq backend runs on {cfg.device.type} here (available: {svdq.ops.available_backends()})"
                rows.append({"variant": "svdq", "status": "skipped", "note": why})
                log(f"  svdq: skipped ({why})")
            for be in cfg.backends:
                rows += step_rows(cfg, spec, target, "svdq", base_dtype, log, backend=be,
                                  extra={"note": f"rank {cfg.rank}, data-free, AdaLN {cfg.adaln}"})
            del target
        else:
            raise ValueError(f"unknown variant {variant!r}")
    prefer = ("bf16", "fp32") if gpu else ("fp32", "bf16")
    measured = {r["variant"] for r in rows if r.get("status") == "ok"}
    _speedups(rows, next((v for v in prefer if v in measured), prefer[0]))
    return {
        "config": {"model": cfg.model, "class": spec.cls, "architecture": {k: (list(v) if isinstance(v, tuple) else v)
                                                                          for k, v in spec.config.items()},
                   "text_tokens": spec.text_tokens, "resolutions": list(cfg.resolutions), "batch": 1,
                   **({"frames": spec.frames} if spec.frames > 1 else {}),
                   "warmup": cfg.warmup, "repeats": cfg.repeats, "compile": cfg.compile,
                   "compile_mode": cfg.compile_mode, "rank": cfg.rank, "adaln": cfg.adaln,
                   "backends": list(cfg.backends), "variants": list(cfg.variants), "seed": cfg.seed,
                   "weights": "synthetic (seeded), no download"},
        "model": {"params": nparams, "build_seconds": round(build_s, 2), "quantized_linear_layers": len(names),
                  **({"generic_plan": plan} if plan else {})},
        "quantization": quant,
        "rows": rows,
        "targets": _targets(rows, quant) if gpu and spec.cls == "FluxTransformer2DModel" else {},
        "notes": list(cfg.notes),
    }


def _speedups(rows: list[dict], baseline: str) -> None:
    base = {(r["res"], r["mode"]): r["median_ms"] for r in rows
            if r["variant"] == baseline and r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        eager = base.get((r["res"], "eager"))
        same = base.get((r["res"], r["mode"]))
        r["baseline"] = f"{baseline} eager"
        if eager:
            r["speedup_vs_baseline"] = round(eager / r["median_ms"], 3)
        if same:
            r["speedup_vs_baseline_same_mode"] = round(same / r["median_ms"], 3)
        b = next((x for x in rows if x["variant"] == baseline and x.get("weight_bytes")), None)
        if b:
            r["weight_ratio_vs_baseline"] = round(b["weight_bytes"] / r["weight_bytes"], 3)


def _targets(rows: list[dict], quant: dict | None = None, res: int = 1024) -> dict:
    """Issue 7's targets for FLUX at 1024²: svdq eager ≥ 1.3× bf16 eager, svdq compiled ≤ FP8 compiled
    latency, svdq weights ≤ bf16 / 3.5 (whole transformer; the quantized layers alone reported beside)."""
    def get(variant, mode):
        return next((r for r in rows if r["variant"] == variant and r.get("mode") == mode and r.get("res") == res
                     and r.get("status") == "ok"), None)

    def get_loaded(variant):
        return next((r["loaded_bytes"] for r in rows if r["variant"] == variant and r.get("loaded_bytes")), None)

    out = {}
    b, s = get("bf16", "eager"), get("svdq", "eager")
    if b and s:
        out["svdq_eager_speedup_ge_1.3"] = {"value": round(b["median_ms"] / s["median_ms"], 3),
                                            "pass": b["median_ms"] / s["median_ms"] >= 1.3}
        out["svdq_weights_le_bf16_over_3.5"] = {"value": round(b["weight_bytes"] / s["weight_bytes"], 3),
                                                "pass": b["weight_bytes"] / s["weight_bytes"] >= 3.5}
    if quant and quant.get("linear_weight_ratio"):
        out["svdq_quantized_layers_weights_le_bf16_over_3.5"] = {"value": quant["linear_weight_ratio"],
                                                                 "pass": quant["linear_weight_ratio"] >= 3.5}
    # Measured (issue 12 item 5): the allocator's bytes after load, bf16 model vs svdq model, and the absolute
    # FLUX.1-dev goal (≤ 6.5 GiB with W4A16 AdaLN; bf16 22.2 GiB).
    mb, ms = get_loaded("bf16"), (quant or {}).get("resident_after_load_bytes")
    if mb and ms:
        out["svdq_resident_le_bf16_over_3.5_measured"] = {"value": round(mb / ms, 3), "pass": mb / ms >= 3.5}
    if ms and (quant or {}).get("adaln") == "w4a16":
        out["svdq_resident_after_load_le_6.5GiB"] = {"value": round(ms / 2**30, 3), "pass": ms <= 6.5 * 2**30}
    for opt in ("16bit", "w4a16"):  # whole transformer, per AdaLN option (one ran, the other is arithmetic)
        v = (quant or {}).get(f"model_weight_ratio_adaln_{opt}")
        if v:
            out[f"svdq_weights_le_bf16_over_3.5_adaln_{opt}"] = {"value": v, "pass": v >= 3.5}
    f, sc = get("fp8", "compiled"), get("svdq", "compiled")
    if f and sc:
        out["svdq_compiled_le_fp8_compiled_ms"] = {"value": [sc["median_ms"], f["median_ms"]],
                                                   "pass": sc["median_ms"] <= f["median_ms"]}
    return out
