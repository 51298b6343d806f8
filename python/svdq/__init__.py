"""svdq — 4-bit (W4A4) SVDQuant inference for diffusion models.

Public API: `SVDQLinear`, `SVDQWeightOnlyLinear` (W4A16; `quantize_text_encoder`, `load_text_encoders`), `quantize`, `QuantizeConfig`, `save`, `load`, `ops`, `build_info`;
diffusers pipelines: `calibrate_pipeline`, `save_pretrained`, `from_pretrained` (per-family maps: `svdq.models`);
LoRA hot-swap: `load_lora`, `set_lora_strength`, `unload_lora`, `list_loras`.
"""

from . import ops, parallel
from .calibrate import calibrate_pipeline
from .checkpoint import CheckpointError, load, read_metadata, save
from .linear import SVDQLinear, set_act_format
from .pretrained import from_pretrained, save_pretrained
from .lora import LoraError, freeze_lora, list_loras, load_lora, lora_parameters, set_lora_strength, unload_lora
from .quantize import QuantizeConfig, quantize, quantized_layers
from .weight_only import SVDQWeightOnlyLinear, load_text_encoders, quantize_text_encoder, weight_only_layers
from .version import __version__

# Loads svdq._C when it is built, registering the "cpu" / "cuda" backends; imports without it too.
from ._native import build_info

# diffusers' own from_pretrained / save_pretrained read and write svdq models: quant_method "svdquant".
from .integrations import diffusers_quantizer as _diffusers_quantizer

_diffusers_quantizer.register()


__all__ = [
    "CheckpointError",
    "LoraError",
    "QuantizeConfig",
    "SVDQLinear",
    "SVDQWeightOnlyLinear",
    "__version__",
    "build_info",
    "calibrate_pipeline",
    "from_pretrained",
    "list_loras",
    "load",
    "load_lora",
    "lora_parameters",
    "freeze_lora",
    "set_act_format",
    "ops",
    "quantize",
    "quantized_layers",
    "read_metadata",
    "save",
    "set_lora_strength",
    "unload_lora",
    "weight_only_layers",
    "quantize_text_encoder",
    "load_text_encoders",
]
