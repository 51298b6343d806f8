"""Tiny seeded pipelines for the diffusers families svdq covers through its generic family (test fixtures).

Like `svdq.testing.tiny`: no download, seeded weights, tiny text encoders and tokenizers built in memory, 32×32
images (Wan: 16×16, 5 frames). Families: Qwen-Image (`QwenImagePipeline`, Qwen2.5-VL text encoder), Wan 2.x
(`WanPipeline`, UMT5), SD3.5 (`StableDiffusion3Pipeline`, CLIP-L/G + T5; QK RMSNorm and one dual-attention
block as in SD3.5-medium), Z-Image (`ZImagePipeline`, Qwen3), FLUX.2 klein (`Flux2KleinPipeline`, Qwen3),
Chroma (`ChromaPipeline`, T5), SANA (`SanaPipeline`, Gemma-2, DC-AE), HiDream-I1 (`HiDreamImagePipeline`,
CLIP-L/G + T5 + Llama-3, MoE experts), and two image-conditioned pipelines with a seeded conditioning image
(`call_kwargs`): Qwen-Image-Edit (`TinyQwenImageEditPipeline`: diffusers' `QwenImageEditPipeline` with the
conditioning image kept at 32², Qwen2.5-VL's vision tower on it) and FLUX.1 Kontext (`FluxKontextPipeline`
around `svdq.testing.tiny`'s FLUX.1).

Random init has no activation outliers (real checkpoints do; they are what SVDQuant is for), so
`plant_attention_outliers` gives a few channels of every attention's value projection ×30 and divides the
matching columns of its output projection by 30: attention output channel j is a convex combination of
value channel j, so the 16-bit function is unchanged while the output projection's input now has the heavy
channels naive W4A4 suffers from (any attention module with ``to_v``/``to_out.0`` and the text stream's
``add_v_proj``/``to_add_out``: no per-family code). `plant_mlp_outliers` does the same for each MLP's
down-projection input, `plant_single_block_outliers` for single-stream blocks' shared output projection
(FLUX.1 / Chroma ``proj_out``, FLUX.2 ``attn.to_out``); `OUTLIER_CHANNELS` (8) channels each.
Modulation linears get ×3 (`MODULATION_GAIN`) and learned modulation tables std 0.3, so that the blocks carry
a real share of the output (at plain std 0.05 the gates are ~0.01 and the blocks changed the output by ~3 %:
quantization errors in them would not show). Per family, the patch embedder's gain (`EMBED_GAIN`) sets how
much of the output the blocks carry against the embedding's pass-through, and `OUTPUT_GAIN` the velocity's
scale where the tiny VAE needs it: chosen (measured, docs/models.md "The naive bound") so that on every family
calibrated W4A4 is ≥ 3 dB above the 30 dB image bound of tests/test_families.py and naive W4A4 ≥ 3 dB below it.
"""

from __future__ import annotations

import functools

import torch

from .tiny import (
    _byte_unicode_chars,
    _cast,
    _seeded,
    tiny_clip_text_encoder,
    tiny_clip_tokenizer,
    tiny_t5_text_encoder,
    tiny_t5_tokenizer,
)

IMAGE_SIZE = 32
VIDEO_SIZE, VIDEO_FRAMES = 16, 5
TEXT_HIDDEN = 32  # the tiny LLM / T5 text encoders' width
MODULATION_NAMES = ("norm", "_mod", "adaLN", "modulation", "time_proj")
MODULATION_GAIN = 3.0
GATE_STD = 0.3  # Wan / PixArt-style learned modulation tables: gates large enough that blocks matter
# The patch embedder (latent -> residual stream) of each family. Its output is the residual stream's pass-through:
# the blocks read it through a norm (scale-free) and add gated outputs to it, and the final layer reads the sum
# through a norm. Scaling the embedder by EMBED_GAIN < 1 leaves what the blocks compute unchanged and shrinks
# the pass-through, so the blocks carry more of the output (in a trained model they carry almost all of it);
# Z-Image's sandwich-normed blocks add unit-RMS branches, and there the gain is > 1 (blocks carry less).
EMBEDDERS = {"qwenimage": "img_in", "wan": "patch_embedding", "sd3": "pos_embed.proj", "zimage": "all_x_embedder.2-1",
             "flux2": "x_embedder", "chroma": "x_embedder", "sana": "patch_embed.proj", "hidream": "x_embedder.proj",
             "kontext": "x_embedder"}
EMBED_GAIN = {"qwenimage": 0.05, "wan": 0.3, "zimage": 2.5, "flux2": 0.3, "chroma": 0.4, "hidream": 0.3, "kontext": 0.07}
# The final projection (velocity out) of each family, and its gain: at std 0.05 the tiny models predict velocities
# of RMS ~0.6 where a trained flow model's v = noise - x0 has RMS >= 1 (the noise's). Qwen-Image's tiny VAE decodes
# with low contrast (two seeds' images 20 dB apart, the others' 13-16 dB): its velocity is scaled up (×3.5: RMS ~2).
OUTPUT_LAYERS = {"qwenimage": "proj_out"}
OUTPUT_GAIN = {"qwenimage": 3.5}
OUTLIER_CHANNELS = 8

CONFIGS = {
    "qwenimage": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                      num_attention_heads=4, joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(8, 12, 12)),
    "wan": dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16,
                out_channels=16, text_dim=TEXT_HIDDEN, freq_dim=32, ffn_dim=256, num_layers=2, rope_max_seq_len=32),
    "sd3": dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=32,
                num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64,
                out_channels=16, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"),
    "zimage": dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=128, n_layers=2,
                   n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=TEXT_HIDDEN, axes_dims=[8, 12, 12],
                   axes_lens=[64, 32, 32]),
    "flux2": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
                  num_attention_heads=4, joint_attention_dim=3 * TEXT_HIDDEN, timestep_guidance_channels=32,
                  axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False),
    "chroma": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
                   num_attention_heads=4, joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(4, 14, 14),
                   approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1),
    # SANA: linear attention (ReLU kernel) self-attention, cross-attention to Gemma-2 features, GLUMBConv MLP
    # (1x1 / depthwise convolutions: not linear layers, they stay 16-bit); DC-AE latents (4 channels here).
    "sana": dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=4,
                 attention_head_dim=32, num_cross_attention_heads=4, cross_attention_head_dim=32,
                 cross_attention_dim=128, caption_channels=TEXT_HIDDEN, sample_size=16),
    # HiDream-I1: FLUX-like dual / single stream blocks with MoE SwiGLU experts (2 of 4 routed per token) and
    # per-block Llama-3 hidden states; text widths: T5 TEXT_HIDDEN, Llama TEXT_HIDDEN, pooled CLIP-L + CLIP-G.
    "hidream": dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=2,
                    attention_head_dim=32, num_attention_heads=4, caption_channels=[TEXT_HIDDEN, TEXT_HIDDEN],
                    text_emb_dim=2 * TEXT_HIDDEN, num_routed_experts=4, num_activated_experts=2,
                    axes_dims_rope=(8, 12, 12), max_resolution=(32, 32), llama_layers=(0, 1, 1)),
}
CLASSES = {
    "qwenimage": "QwenImageTransformer2DModel",
    "wan": "WanTransformer3DModel",
    "sd3": "SD3Transformer2DModel",
    "zimage": "ZImageTransformer2DModel",
    "flux2": "Flux2Transformer2DModel",
    "chroma": "ChromaTransformer2DModel",
    "sana": "SanaTransformer2DModel",
    "hidream": "HiDreamImageTransformer2DModel",
}
FAMILIES = tuple(CONFIGS)  # the generic family's
# Pipelines of hand-written families that need their own fixture: FLUX.1 Kontext (the FLUX.1 transformer,
# image-conditioned through `FluxKontextPipeline`: the input image's latents join the token sequence).
# Qwen-Image-Edit: Qwen-Image's transformer in `QwenImageEditPipeline` (the conditioning image's latents join the
# token sequence; the image also goes through Qwen2.5-VL's vision tower into the prompt embedding).
PIPELINE_FAMILIES = FAMILIES + ("qwenimage-edit", "kontext")
CONDITIONED = ("qwenimage-edit", "kontext")  # pipelines that take a conditioning image (`call_kwargs` adds it)
# Keyword arguments every pipeline call of the family needs (sizes; FLUX.2 klein's text layers for 2-layer LLMs).
CALL_KWARGS = {
    "qwenimage": dict(height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=64),
    "wan": dict(height=VIDEO_SIZE, width=VIDEO_SIZE, num_frames=VIDEO_FRAMES, max_sequence_length=32),
    "sd3": dict(height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=32),
    # Z-Image-Turbo (the published config counted in docs/models.md) is CFG-distilled and run with guidance 0
    # (diffusers' own example); the pipeline's default CFG 5 (pred = pos + 5·(pos − neg)) multiplies the tiny
    # model's velocity error ~2.5× (docs/models.md, "Z-Image").
    "zimage": dict(height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=32, guidance_scale=0.0),
    "flux2": dict(height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=32, text_encoder_out_layers=(0, 1, 2)),
    "chroma": dict(height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=32),
    # no "complex human instruction" (SANA's default prepends a ~300-token system prompt to every prompt)
    # use_resolution_binning=False: the pipeline would snap 32² to its 512² aspect bin and resize the image back
    "sana": dict(height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=32, complex_human_instruction=None,
                 use_resolution_binning=False),
    # HiDream-I1-Dev / -Fast (CFG-distilled) run with guidance 0; -Full's CFG 5: see docs/models.md ("HiDream")
    "hidream": dict(height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=32, guidance_scale=0.0),
    # the edit pipeline's conditioning size is kept at the tiny size by `TinyQwenImageEditPipeline`
    "qwenimage-edit": dict(height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=64),
    # Kontext: the pipeline would resize the conditioning image to ~1 MP (`_auto_resize`) and the output to
    # `max_area`; both kept at the tiny size. The image is added by `call_kwargs`.
    "kontext": dict(height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=32, max_area=IMAGE_SIZE ** 2,
                    _auto_resize=False),
}


def condition_image(seed: int = 0):
    """A seeded 32×32 RGB conditioning image (smooth colour ramps plus noise) for FLUX.1 Kontext and
    Qwen-Image-Edit."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed + 3)
    ramp = torch.linspace(0, 1, IMAGE_SIZE)
    rgb = torch.stack([ramp[None, :].expand(IMAGE_SIZE, -1), ramp[:, None].expand(-1, IMAGE_SIZE),
                       torch.full((IMAGE_SIZE, IMAGE_SIZE), 0.5)], -1)
    rgb = (rgb + 0.1 * torch.randn(rgb.shape, generator=g)).clamp(0, 1)
    return Image.fromarray((rgb * 255).round().to(torch.uint8).numpy())


def call_kwargs(family: str) -> dict:
    """Keyword arguments for a call of ``family``'s tiny pipeline: `CALL_KWARGS` plus, for image-conditioned
    pipelines, a fresh conditioning image."""
    kwargs = dict(CALL_KWARGS[family])
    if family in CONDITIONED:
        kwargs["image"] = condition_image()
    return kwargs


def tiny_transformer(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, outliers: bool = True,
                     gains: bool = True):
    """The family's diffusers transformer at toy width, seeded, with planted outliers; ``gains=False`` leaves
    the patch embedder and final projection at the plain init (no `EMBED_GAIN` / `OUTPUT_GAIN`: the blocks carry
    less of the output — for tests whose tolerances were measured on that fixture)."""
    import diffusers

    if family not in CONFIGS:
        raise ValueError(f"unknown tiny family {family!r}; choose from {sorted(CONFIGS)}")
    cls = getattr(diffusers, CLASSES[family])
    model = _seeded(seed + 41, lambda: cls(**CONFIGS[family]))
    _scale_init(model, seed)
    if gains:
        scale_embedder(model, family)
    if outliers:
        plant_attention_outliers(model, seed, OUTLIER_CHANNELS)
        plant_mlp_outliers(model, seed, OUTLIER_CHANNELS)
        plant_single_block_outliers(model, seed, OUTLIER_CHANNELS)
    return _cast(model, dtype).eval()


def tiny_kontext_transformer(seed: int = 0, dtype: torch.dtype = torch.float32, outliers: bool = True):
    """`svdq.testing.tiny`'s FLUX.1 transformer (its q/k/v and MLP-input outliers) with this module's patch
    embedder gain and single-block outliers."""
    from .tiny import tiny_flux_transformer

    model = tiny_flux_transformer(seed, torch.float32, outliers=outliers)
    scale_embedder(model, "kontext")
    if outliers:
        plant_single_block_outliers(model, seed, OUTLIER_CHANNELS)
    return _cast(model, dtype).eval()


def scale_embedder(model: torch.nn.Module, family: str) -> None:
    """Multiply the family's patch embedder by `EMBED_GAIN` and its final projection by `OUTPUT_GAIN` (weights
    and biases; see there)."""
    for names, gains in ((EMBEDDERS, EMBED_GAIN), (OUTPUT_LAYERS, OUTPUT_GAIN)):
        gain = gains.get(family, 1.0)
        if gain != 1.0:
            layer = model.get_submodule(names[family])
            with torch.no_grad():
                layer.weight.mul_(gain)
                if layer.bias is not None:
                    layer.bias.mul_(gain)


def _scale_init(model: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Seeded N(0, std) weights (diffusers zero-inits some output layers: blocks would be identities)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
            elif "scale_shift_table" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * GATE_STD)
        # Modulation linears (shift / scale / gate from the timestep): at std 0.05 the gates are ~0.01 and
        # the blocks add a few percent to the output; real models' blocks do the work, so make them matter.
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and any(k in name for k in MODULATION_NAMES) and "norm_out" not in name:
                m.weight.mul_(MODULATION_GAIN)


def plant_attention_outliers(model: torch.nn.Module, seed: int, channels: int = 4, factor: float = 30.0) -> None:
    """Scale ``channels`` rows of each attention's value projection by ``factor`` and divide the output
    projection's matching input columns by it (same function; heavy channels in the output projection's input)."""
    from ..models.generic import is_attention

    gen = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for attn in [m for m in model.modules() if is_attention(m)]:
            for v_name, out in (("to_v", _first(getattr(attn, "to_out", None))), ("add_v_proj", getattr(attn, "to_add_out", None))):
                v = getattr(attn, v_name, None)
                if not isinstance(v, torch.nn.Linear) or not isinstance(out, torch.nn.Linear):
                    continue
                if out.in_features != v.out_features:
                    continue
                idx = torch.randperm(v.out_features, generator=gen)[:channels]
                v.weight[idx] *= factor
                if v.bias is not None:
                    v.bias[idx] *= factor
                out.weight[:, idx] /= factor


def plant_mlp_outliers(model: torch.nn.Module, seed: int, channels: int = 4, factor: float = 30.0) -> None:
    """Heavy channels at the input of each MLP's down projection (the "massive activations" of real DiT
    MLPs): rows of the up projection ×``factor`` and the down projection's columns ÷``factor``. Exact for a
    gated (SwiGLU) MLP's linear branch; through a GELU it changes the function (GELU(c·z)/c ≈ ReLU(z)),
    which a fixture may — activations keep their scale."""
    gen = torch.Generator().manual_seed(seed + 7)
    pairs = []
    for m in model.modules():
        net = getattr(m, "net", None)
        if isinstance(net, torch.nn.ModuleList) and len(net) >= 3 and isinstance(getattr(net[0], "proj", None), torch.nn.Linear) \
                and isinstance(net[2], torch.nn.Linear):
            pairs.append((net[0].proj, net[2], 1))  # diffusers FeedForward (GELU / GEGLU: the first half feeds)
        elif all(isinstance(getattr(m, a, None), torch.nn.Linear) for a in ("w1", "w2", "w3")):
            pairs.append((m.w3, m.w2, 1))  # SwiGLU: silu(w1 x) * (w3 x) -> w2
        elif isinstance(getattr(m, "linear_in", None), torch.nn.Linear) and isinstance(getattr(m, "linear_out", None), torch.nn.Linear):
            pairs.append((m.linear_in, m.linear_out, 2))  # FLUX.2 SwiGLU: one up projection, [gate | value] halves
    with torch.no_grad():
        for up, down, halves in pairs:
            idx = torch.randperm(down.in_features, generator=gen)[:channels]
            rows = idx + (down.in_features if halves == 2 else 0)  # FLUX.2: scale the value half (linear)
            if up.out_features < rows.max() + 1:
                continue
            up.weight[rows] *= factor
            if up.bias is not None:
                up.bias[rows] *= factor
            down.weight[:, idx] /= factor


def plant_single_block_outliers(model: torch.nn.Module, seed: int, channels: int = 4, factor: float = 30.0) -> None:
    """Heavy channels at the output projection of single-stream blocks, whose attention and MLP share one
    output projection over ``[attention | MLP]`` (not covered by the two functions above): FLUX.1 / Chroma
    (``attn.to_v`` and ``proj_mlp`` -> ``proj_out``) and FLUX.2 (``attn.to_qkv_mlp_proj`` rows
    ``[q | k | v | gate | value]`` -> ``attn.to_out``). Value channels: exact (as `plant_attention_outliers`);
    FLUX.2's SwiGLU value half: exact; FLUX.1's GELU MLP: approximately (as `plant_mlp_outliers`)."""
    gen = torch.Generator().manual_seed(seed + 9)
    with torch.no_grad():
        for m in model.modules():
            attn = getattr(m, "attn", None)
            if isinstance(getattr(m, "proj_mlp", None), torch.nn.Linear) and isinstance(getattr(m, "proj_out", None), torch.nn.Linear) \
                    and isinstance(getattr(attn, "to_v", None), torch.nn.Linear):
                inner, out = attn.to_v.out_features, m.proj_out
                pairs = [(attn.to_v, 0, 0, inner), (m.proj_mlp, 0, inner, m.proj_mlp.out_features)]
            elif isinstance(getattr(m, "to_qkv_mlp_proj", None), torch.nn.Linear) and isinstance(getattr(m, "to_out", None), torch.nn.Linear):
                inner, out = m.inner_dim, m.to_out
                hidden = out.in_features - inner
                pairs = [(m.to_qkv_mlp_proj, 2 * inner, 0, inner), (m.to_qkv_mlp_proj, 3 * inner + hidden, inner, hidden)]
            else:
                continue
            for up, row0, col0, width in pairs:  # rows row0 + idx of `up` feed columns col0 + idx of `out`
                idx = torch.randperm(width, generator=gen)[:channels]
                up.weight[row0 + idx] *= factor
                if up.bias is not None:
                    up.bias[row0 + idx] *= factor
                out.weight[:, col0 + idx] /= factor


def _first(m):
    if isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)):
        return m[0] if len(m) else None
    return m


# --- tokenizers and text encoders ----------------------------------------------------------------------------

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def tiny_qwen2_tokenizer(vision: bool = False):
    """A byte-level BPE `Qwen2Tokenizer` (single bytes plus a few merges) with Qwen's special tokens and a
    minimal chat template, built in memory (`save_pretrained` writes it as tokenizer.json). ``vision``: also
    Qwen2.5-VL's image markers (`VISION_TOKENS`), which Qwen-Image-Edit's prompt template uses."""
    from transformers import Qwen2Tokenizer

    chars = _byte_unicode_chars()
    merges = [("Ġ", "t"), ("t", "h"), ("h", "e"), ("Ġt", "he"), ("a", "n"), ("i", "n")]
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    extra = VISION_TOKENS if vision else ()
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + extra:
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", *extra],
        model_max_length=1024,
    )
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def tiny_qwen25_vl_text_encoder(tokenizer, seed: int, hidden: int = TEXT_HIDDEN):
    """`Qwen2_5_VLForConditionalGeneration` with 2 text layers and a 2-layer vision tower (width 16; used by
    Qwen-Image-Edit, whose tokenizer has `VISION_TOKENS`)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    n = len(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS} if VISION_TOKENS[0] in tokenizer.get_vocab() else None
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=n, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                         rope_theta=1e6),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden),
        # the image / video marker ids must exist in the tiny vocabulary (without VISION_TOKENS they are never
        # produced by text)
        **(dict(image_token_id=n - 1, video_token_id=n - 2, vision_start_token_id=n - 3, vision_end_token_id=n - 4)
           if ids is None else
           dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])),
    )
    return _seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(config)).eval()


def tiny_qwen3_text_encoder(tokenizer, seed: int, hidden: int = TEXT_HIDDEN, causal_lm: bool = False):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                         max_position_embeddings=1024)
    cls = Qwen3ForCausalLM if causal_lm else Qwen3Model
    return _seeded(seed, lambda: cls(config)).eval()


def tiny_gemma2_text_encoder(tokenizer, seed: int, hidden: int = TEXT_HIDDEN):
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                          max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                          attn_implementation="eager")
    return _seeded(seed, lambda: Gemma2Model(config)).eval()


def tiny_llama_text_encoder(tokenizer, seed: int, hidden: int = TEXT_HIDDEN):
    """`LlamaForCausalLM` with 2 layers (HiDream reads its per-layer hidden states)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id)
    return _seeded(seed, lambda: LlamaForCausalLM(config)).eval()


def tiny_umt5_text_encoder(tokenizer, seed: int, d_model: int = TEXT_HIDDEN):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                        num_heads=4, relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    return _seeded(seed, lambda: UMT5EncoderModel(config)).eval()


def tiny_qwen2_vl_processor(tokenizer):
    """A `Qwen2VLProcessor` for images only, with Qwen2.5-VL's default image preprocessing (14-pixel patches, 2×2
    merges: a 32² image is upscaled to its 56² minimum, 16 patches -> 4 image tokens in the prompt).

    transformers checks the class of every processor argument, and the base class of its video processors
    needs torchvision (not a dependency here): a subclass skips the check for the absent video processor
    (Qwen-Image-Edit passes images only)."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer,
                                     chat_template=_CHAT_TEMPLATE)


# --- VAEs ------------------------------------------------------------------------------------------------------

def _vae_kl(seed: int, latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    from .tiny import TINY_VAE_CONFIG

    return _seeded(seed + 7, lambda: AutoencoderKL(**{**TINY_VAE_CONFIG, "latent_channels": latent_channels, **extra})).eval()


def _vae_wan(seed: int):
    from diffusers import AutoencoderKLWan

    return _seeded(seed + 7, lambda: AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1,
                                                      temperal_downsample=[True], scale_factor_temporal=2,
                                                      scale_factor_spatial=2)).eval()


def _vae_qwen(seed: int):
    from diffusers import AutoencoderKLQwenImage

    return _seeded(seed + 7, lambda: AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1,
                                                            temperal_downsample=[False])).eval()


def _vae_flux2(seed: int):
    from diffusers import AutoencoderKLFlux2

    return _seeded(seed + 7, lambda: AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=IMAGE_SIZE, mid_block_add_attention=False)).eval()


def _vae_dc(seed: int):
    """A 2-level DC-AE (SANA's autoencoder): 32² images → 4 × 16² latents."""
    from diffusers import AutoencoderDC

    return _seeded(seed + 7, lambda: AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407)).eval()


# --- pipelines -------------------------------------------------------------------------------------------------

def tiny_family_pipeline(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, transformer=None):
    """The tiny full diffusers pipeline of ``family`` (see `PIPELINE_FAMILIES`); call it with
    `call_kwargs(family)`."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    if family == "qwenimage-edit":
        tok = tiny_qwen2_tokenizer(vision=True)
        processor = tiny_qwen2_vl_processor(tok)
        tr = transformer if transformer is not None else tiny_transformer("qwenimage", seed, dtype)
        return _tiny_edit_pipeline_class()(
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=_cast(_vae_qwen(seed), dtype),
            text_encoder=_cast(tiny_qwen25_vl_text_encoder(tok, seed + 11), dtype), tokenizer=tok,
            processor=processor, transformer=tr)
    if family == "kontext":
        from .tiny import tiny_flux_full_pipeline

        tr = transformer if transformer is not None else tiny_kontext_transformer(seed, dtype)
        return diffusers.FluxKontextPipeline(**tiny_flux_full_pipeline(seed, dtype, tr).components)
    if family not in CONFIGS:
        raise ValueError(f"unknown tiny family {family!r}; choose from {sorted(PIPELINE_FAMILIES)}")
    tr = transformer if transformer is not None else tiny_transformer(family, seed, dtype)
    sched = FlowMatchEulerDiscreteScheduler()
    if family == "qwenimage":
        tok = tiny_qwen2_tokenizer()
        parts = dict(vae=_vae_qwen(seed), text_encoder=tiny_qwen25_vl_text_encoder(tok, seed + 11), tokenizer=tok)
        cls = diffusers.QwenImagePipeline
    elif family == "wan":
        from diffusers import UniPCMultistepScheduler

        tok = tiny_t5_tokenizer()
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
        parts = dict(vae=_vae_wan(seed), text_encoder=tiny_umt5_text_encoder(tok, seed + 11), tokenizer=tok)
        cls = diffusers.WanPipeline
    elif family == "sd3":
        tok, tok2, tok3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(), tiny_t5_tokenizer()
        parts = dict(
            vae=_vae_kl(seed, 16),
            text_encoder=tiny_clip_text_encoder(tok, seed + 11, with_projection=True),
            tokenizer=tok,
            text_encoder_2=tiny_clip_text_encoder(tok2, seed + 12, with_projection=True),
            tokenizer_2=tok2,
            text_encoder_3=tiny_t5_text_encoder(tok3, seed + 13, 64),
            tokenizer_3=tok3,
        )
        cls = diffusers.StableDiffusion3Pipeline
    elif family == "zimage":
        tok = tiny_qwen2_tokenizer()
        parts = dict(vae=_vae_kl(seed, 16), text_encoder=tiny_qwen3_text_encoder(tok, seed + 11), tokenizer=tok)
        cls = diffusers.ZImagePipeline
    elif family == "flux2":
        tok = tiny_qwen2_tokenizer()
        parts = dict(vae=_vae_flux2(seed), text_encoder=tiny_qwen3_text_encoder(tok, seed + 11, causal_lm=True),
                     tokenizer=tok)
        cls = diffusers.Flux2KleinPipeline
    elif family == "chroma":
        tok = tiny_t5_tokenizer()
        parts = dict(vae=_vae_kl(seed, 4), text_encoder=tiny_t5_text_encoder(tok, seed + 11, TEXT_HIDDEN), tokenizer=tok)
        cls = diffusers.ChromaPipeline
    elif family == "sana":
        # SanaPipeline takes any tokenizer with a pad token (it types Gemma's): the tiny byte-level BPE one
        tok = tiny_qwen2_tokenizer()
        parts = dict(vae=_vae_dc(seed), text_encoder=tiny_gemma2_text_encoder(tok, seed + 11), tokenizer=tok)
        cls = diffusers.SanaPipeline
    else:  # hidream
        from transformers import PreTrainedTokenizerFast

        tok, tok2, tok3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(), tiny_t5_tokenizer()
        # tokenizer_4 must be a fast tokenizer (the pipeline sets pad = eos on it): the tiny Qwen2 BPE's backend
        tok4 = PreTrainedTokenizerFast(tokenizer_object=tiny_qwen2_tokenizer().backend_tokenizer,
                                       eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=1024)
        parts = dict(
            vae=_vae_kl(seed, 4),
            text_encoder=tiny_clip_text_encoder(tok, seed + 11, with_projection=True),
            tokenizer=tok,
            text_encoder_2=tiny_clip_text_encoder(tok2, seed + 12, with_projection=True),
            tokenizer_2=tok2,
            text_encoder_3=tiny_t5_text_encoder(tok3, seed + 13, TEXT_HIDDEN),
            tokenizer_3=tok3,
            text_encoder_4=tiny_llama_text_encoder(tok4, seed + 14),
            tokenizer_4=tok4,
        )
        cls = diffusers.HiDreamImagePipeline
    parts = {k: (_cast(v, dtype) if isinstance(v, torch.nn.Module) else v) for k, v in parts.items()}
    pipe = cls(scheduler=sched, transformer=tr, **parts)
    if family == "hidream":
        # HiDream rescales every request to the area of its default size (128 latents² → 1 MP): make that 32²
        pipe.default_sample_size = IMAGE_SIZE // pipe.vae_scale_factor
    return pipe


@functools.cache
def _tiny_edit_pipeline_class():
    import diffusers

    class TinyQwenImageEditPipeline(diffusers.QwenImageEditPipeline):
        """`QwenImageEditPipeline` whose conditioning image keeps the tiny size.

        diffusers' pipeline resizes the conditioning image to ~1 MP whatever ``height`` / ``width`` say
        (``calculate_dimensions(1024 * 1024, ratio)`` in ``pipeline_qwenimage_edit``, no argument changes it):
        ~4096 image tokens plus ~5000 vision patches per call, far beyond a CPU test. During a call of this class
        (only), that module's ``calculate_dimensions`` computes for `condition_area` instead; everything else —
        VAE encoding of the image, its latents joining the token sequence, its RoPE grid (``img_shapes``), the
        vision tower's prompt embedding — is diffusers' code unchanged. Not thread-safe (a module global is
        swapped for the duration of the call): a test fixture.
        """

        condition_area = IMAGE_SIZE ** 2

        def __call__(self, *args, **kwargs):
            from unittest import mock

            from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as module

            original = module.calculate_dimensions
            with mock.patch.object(module, "calculate_dimensions",
                                   lambda _area, ratio: original(self.condition_area, ratio)):
                return super().__call__(*args, **kwargs)

    return TinyQwenImageEditPipeline


def __getattr__(name):  # the class is built on first use (diffusers is imported lazily)
    if name == "TinyQwenImageEditPipeline":
        return _tiny_edit_pipeline_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def with_transformer(pipe, transformer):
    """A new pipeline of ``pipe``'s class with the same components and fixture settings, and ``transformer``."""
    fresh = type(pipe)(**{**pipe.components, "transformer": transformer})
    if hasattr(pipe, "default_sample_size"):
        fresh.default_sample_size = pipe.default_sample_size
    return fresh
