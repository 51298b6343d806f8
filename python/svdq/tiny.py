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


def tiny_flux_transformer(seed: int = 0, dtype: torch.dtype = torch.float32, outliers: bool = True):
    """A `FluxTransformer2DModel` with the FLUX.1 layer structure at toy width (hidden 128)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**TINY_FLUX_CONFIG)
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
