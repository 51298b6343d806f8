"""Fixtures: tiny diffusers models and pipelines with seeded synthetic weights, built offline.

`svdq.testing.tiny` — FLUX.1, SDXL and PixArt-Σ transformers/UNets at toy width (planted activation outliers)
and full pipelines with tiny text encoders and tokenizers; used by the test suite, `svdq demo`, the CPU mode of
`svdq bench` and `svdq lora inspect --model tiny`.
`svdq.testing.families` — the same for Qwen-Image, Wan, SD3.5, Z-Image, FLUX.2, Chroma, SANA and HiDream-I1
(generic family), and FLUX.1 Kontext (the tiny FLUX.1 in `FluxKontextPipeline`, with a conditioning image).

Nothing in the runtime layers or quantizer imports this package.
"""
