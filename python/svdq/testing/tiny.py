"""Small FLUX-architecture models with seeded synthetic weights: no download, runs on a CPU in seconds.

Used by `svdq demo` and the tests. Real FLUX.1 checkpoints have a few input channels with much larger
activations than the rest (the outliers SVDQuant exists for); random init has none, so `plant_outliers`
scales a few input channels of each block's activations up and the matching weight columns down — the
16-bit function is unchanged, but naive 4-bit quantization now suffers as it does on real checkpoints.
"""

from __future__ import annotations

import torch

TINY_FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=32,
    guidance_embeds=False,
    axes_dims_rope=(4, 14, 14),
)
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=1.0,
    shift_factor=0.0,
)
TEXT_TOKENS = 8


def _cast(model, dtype: torch.dtype):
    # ModelMixin.to(dtype) logs a warning about fp32-kept modules even when there are none; skip no-ops.
    return model if dtype == torch.float32 else model.to(dtype)


def _seeded_init(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)


def tiny_flux_transformer(seed: int = 0, dtype: torch.dtype = torch.float32, outliers: bool = True, **config):
    """A `FluxTransformer2DModel` with the FLUX.1 layer structure at toy width (hidden 128); keyword
    arguments override `TINY_FLUX_CONFIG` (e.g. a wider model for `svdq demo`)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**{**TINY_FLUX_CONFIG, **config})
    _seeded_init(model, seed)
    # Zero-init AdaLN (as in DiT training) would make blocks identity; keep the random init but make the
    # modulation small so activations keep a realistic scale through the blocks.
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith("norm1.linear") or name.endswith("norm1_context.linear") or name.endswith("norm.linear"):
                m.weight.mul_(0.2)
    if outliers:
        plant_outliers(model, seed)
    return _cast(model, dtype).eval()


def plant_outliers(model: torch.nn.Module, seed: int, channels: int = 4, factor: float = 30.0) -> None:
    """Give the attention and MLP inputs of every block a few heavy channels, keeping the function equal.

    Those inputs are `LayerNorm(x)·(1 + scale) + shift` with scale/shift from an AdaLN linear. Multiplying
    channel j of (1 + scale) and of shift by c (rows of the AdaLN weight/bias: scale' = c·scale + c − 1,
    shift' = c·shift) scales that input channel by c; dividing the consumers' weight column j by c undoes it.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = model.config.num_attention_heads * model.config.attention_head_dim

    def plant(adaln: torch.nn.Linear, shift_chunk: int, consumers: list[torch.nn.Linear]) -> None:
        idx = torch.randperm(hidden, generator=gen)[:channels]
        shift_rows = shift_chunk * hidden + idx
        scale_rows = (shift_chunk + 1) * hidden + idx
        adaln.weight[shift_rows] *= factor
        adaln.bias[shift_rows] *= factor
        adaln.weight[scale_rows] *= factor
        adaln.bias[scale_rows] = adaln.bias[scale_rows] * factor + (factor - 1)
        for lin in consumers:
            lin.weight[:, idx] /= factor

    with torch.no_grad():
        for block in model.transformer_blocks:
            a = block.attn
            plant(block.norm1.linear, 0, [a.to_q, a.to_k, a.to_v])
            plant(block.norm1.linear, 3, [block.ff.net[0].proj])
            plant(block.norm1_context.linear, 0, [a.add_q_proj, a.add_k_proj, a.add_v_proj])
            plant(block.norm1_context.linear, 3, [block.ff_context.net[0].proj])
        for block in model.single_transformer_blocks:
            a = block.attn
            plant(block.norm.linear, 0, [a.to_q, a.to_k, a.to_v, block.proj_mlp])


def tiny_vae(seed: int = 0, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL

    # Default init draws from the global RNG: fork it so the VAE depends on `seed` alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
    return _cast(vae, dtype).eval()


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, transformer=None):
    """A `FluxPipeline` over the tiny transformer and VAE; no text encoders (pass prompt embeddings)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(seed, dtype),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer if transformer is not None else tiny_flux_transformer(seed, dtype),
    )


def synthetic_prompts(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[dict]:
    """`n` stand-ins for encoded prompts: (prompt_embeds [1, T, 64], pooled_prompt_embeds [1, 32])."""
    gen = torch.Generator().manual_seed(seed + 1000)
    return [
        {
            "prompt_embeds": torch.randn(1, TEXT_TOKENS, TINY_FLUX_CONFIG["joint_attention_dim"], generator=gen).to(dtype),
            "pooled_prompt_embeds": torch.randn(1, TINY_FLUX_CONFIG["pooled_projection_dim"], generator=gen).to(dtype),
        }
        for _ in range(n)
    ]


# ---------------------------------------------------------------------------------------------------------
# Full tiny pipelines (text encoders + tokenizers included) for FLUX.1, SDXL and PixArt-Σ, so that
# `pipe(prompt=...)`, `pipe.save_pretrained(dir)` and `DiffusionPipeline.from_pretrained(dir)` work offline.
# Tokenizers are built in memory from a small vocabulary and written by `save_pretrained` (tokenizer.json,
# vocab.json / merges.txt); weights come from seeded initialisation. Images are 32×32 pixels.
# ---------------------------------------------------------------------------------------------------------

TINY_IMAGE_SIZE = 32  # pixels; the tiny VAE downsamples by 2, so latents are 16×16

_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.;:!?'-\"()"


def _seeded(seed: int, build):
    """Call ``build()`` with the global RNG forked and seeded: default initialisers become deterministic."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _byte_unicode_chars() -> list[str]:
    """GPT-2 / CLIP byte-level BPE alphabet: one printable unicode character per byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer():
    """A byte-level BPE `CLIPTokenizer` over single bytes (plus a few merges): any text encodes."""
    from transformers import CLIPTokenizer
    chars = _byte_unicode_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = ["t h", "th e</w>", "a n", "i n", "o n</w>"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)


def tiny_t5_tokenizer():
    """A unigram `T5Tokenizer` over single characters (and "▁"-prefixed ones)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS if c != " "] + [("▁" + c, -2.5) for c in _CHARS if c != " "]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def tiny_clip_text_encoder(tokenizer, seed: int, hidden: int = 32, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _seeded(seed, lambda: cls(config)).eval()


def tiny_t5_text_encoder(tokenizer, seed: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _seeded(seed, lambda: T5EncoderModel(config)).eval()


def tiny_flux_full_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, transformer=None):
    """A `FluxPipeline` with tiny CLIP + T5 text encoders: ``pipe(prompt=..., height=32, width=32)`` works."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    tok, tok2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(seed, dtype),
        text_encoder=_cast(tiny_clip_text_encoder(tok, seed + 11, TINY_FLUX_CONFIG["pooled_projection_dim"]), dtype),
        tokenizer=tok,
        text_encoder_2=_cast(tiny_t5_text_encoder(tok2, seed + 12, TINY_FLUX_CONFIG["joint_attention_dim"]), dtype),
        tokenizer_2=tok2,
        transformer=transformer if transformer is not None else tiny_flux_transformer(seed, dtype),
    )


TINY_SDXL_UNET_CONFIG = dict(
    sample_size=TINY_IMAGE_SIZE // 2,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),  # SDXL's config calls the head *count* attention_head_dim
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=64,  # the two text encoders' hidden states, concatenated (32 + 32)
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32,  # 6 size/crop ids · 8 + pooled text embedding (32)
    norm_num_groups=8,
)


def tiny_sdxl_unet(seed: int = 0, dtype: torch.dtype = torch.float32, outliers: bool = True):
    """An SDXL-architecture `UNet2DConditionModel` (text_time conditioning, linear transformer projections)."""
    from diffusers import UNet2DConditionModel

    unet = _seeded(seed + 21, lambda: UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG))
    if outliers:
        _plant_layernorm_outliers(unet, seed)
    return _cast(unet, dtype).eval()


def _plant_layernorm_outliers(model: torch.nn.Module, seed: int, channels: int = 4, factor: float = 30.0) -> None:
    """Like `plant_outliers`, for blocks whose attention / MLP inputs are affine LayerNorms (SDXL): scale the
    norm's weight and bias of a few channels by `factor` and divide the consumers' weight columns by it."""
    from diffusers.models.attention import BasicTransformerBlock

    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for block in [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]:
            a1, a2 = block.attn1, block.attn2
            for norm, consumers in (
                (block.norm1, [a1.to_q, a1.to_k, a1.to_v]),
                (block.norm2, [a2.to_q]),
                (block.norm3, [block.ff.net[0].proj]),
            ):
                idx = torch.randperm(norm.weight.shape[0], generator=gen)[:channels]
                norm.weight[idx] *= factor
                norm.bias[idx] *= factor
                for lin in consumers:
                    lin.weight[:, idx] /= factor


def tiny_sdxl_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, unet=None):
    """A `StableDiffusionXLPipeline` with two tiny CLIP text encoders (the second with a projection)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed, dtype),
        text_encoder=_cast(tiny_clip_text_encoder(tok, seed + 11), dtype),
        text_encoder_2=_cast(tiny_clip_text_encoder(tok2, seed + 12, with_projection=True), dtype),
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet if unet is not None else tiny_sdxl_unet(seed, dtype),
        scheduler=EulerDiscreteScheduler(),
    )


TINY_PIXART_CONFIG = dict(
    sample_size=TINY_IMAGE_SIZE // 2,
    patch_size=2,
    in_channels=4,
    out_channels=8,  # learned sigma, as PixArt-Σ
    num_layers=2,
    num_attention_heads=4,
    attention_head_dim=16,
    cross_attention_dim=64,
    caption_channels=32,
    norm_num_groups=8,
    use_additional_conditions=False,
)


def tiny_pixart_transformer(seed: int = 0, dtype: torch.dtype = torch.float32, outliers: bool = True):
    """A PixArt-Σ-architecture `PixArtTransformer2DModel` (AdaLN-single, T5 caption projection) at width 64."""
    from diffusers import PixArtTransformer2DModel

    model = _seeded(seed + 31, lambda: PixArtTransformer2DModel(**TINY_PIXART_CONFIG))
    if outliers:
        _plant_adaln_single_outliers(model, seed)
    return _cast(model, dtype).eval()


def _plant_adaln_single_outliers(model, seed: int, channels: int = 4, factor: float = 30.0) -> None:
    """PixArt's self-attention input is ``LN(x)·(1 + table[1] + t[1]) + table[0] + t[0]``, with ``t`` the
    shared AdaLN-single output: scaling the shift/scale rows of both by c (scale: c·s + c − 1) scales the
    input channel by c; the q/k/v weight columns are divided by c (same channels in every block)."""
    gen = torch.Generator().manual_seed(seed + 3)
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    idx = torch.randperm(hidden, generator=gen)[:channels]
    lin = model.adaln_single.linear
    with torch.no_grad():
        lin.weight[idx] *= factor  # shift rows (chunk 0)
        lin.bias[idx] *= factor
        lin.weight[hidden + idx] *= factor  # scale rows (chunk 1)
        lin.bias[hidden + idx] *= factor
        for block in model.transformer_blocks:
            block.scale_shift_table[0, idx] *= factor
            block.scale_shift_table[1, idx] = block.scale_shift_table[1, idx] * factor + (factor - 1)
            for proj in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v):
                proj.weight[:, idx] /= factor


def tiny_pixart_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, transformer=None):
    """A `PixArtSigmaPipeline` with a tiny T5 encoder. Call it with ``use_resolution_binning=False``
    (binning is defined for the real sample sizes only)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    tok = tiny_t5_tokenizer()
    return PixArtSigmaPipeline(
        tokenizer=tok,
        text_encoder=_cast(tiny_t5_text_encoder(tok, seed + 13, TINY_PIXART_CONFIG["caption_channels"]), dtype),
        vae=tiny_vae(seed, dtype),
        transformer=transformer if transformer is not None else tiny_pixart_transformer(seed, dtype),
        scheduler=DPMSolverMultistepScheduler(),
    )


TINY_PIPELINES = {"flux": tiny_flux_full_pipeline, "sdxl": tiny_sdxl_pipeline, "pixart": tiny_pixart_pipeline}


def tiny_pipeline(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The tiny full pipeline of ``family`` ("flux", "sdxl" or "pixart")."""
    if family not in TINY_PIPELINES:
        raise ValueError(f"unknown tiny pipeline family {family!r}; choose from {sorted(TINY_PIPELINES)}")
    return TINY_PIPELINES[family](seed, dtype)


def tiny_model_inputs(family: str, seed: int = 0) -> dict:
    """Seeded keyword inputs for one forward of the tiny ``family`` denoiser ("flux", "sdxl", "pixart")."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if family == "flux":
        return dict(hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 8, 64), pooled_projections=r(1, 32),
                    timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                    return_dict=False)
    if family == "sdxl":
        return dict(sample=r(1, 4, 16, 16), timestep=torch.tensor([500]), encoder_hidden_states=r(1, 8, 64),
                    added_cond_kwargs={"text_embeds": r(1, 32), "time_ids": r(1, 6)}, return_dict=False)
    if family == "pixart":
        return dict(hidden_states=r(1, 4, 16, 16), encoder_hidden_states=r(1, 8, 32), timestep=torch.tensor([500]),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    raise ValueError(f"no tiny inputs for family {family!r} (flux, sdxl, pixart)")
