"""The ``"svdquant"`` diffusers quantizer: svdq models through diffusers' own ``from_pretrained`` /
``save_pretrained``.

    import svdq                                                   # registers "svdquant" with diffusers
    transformer = FluxTransformer2DModel.from_pretrained("flux-svdq")          # a quantized directory
    pipe = DiffusionPipeline.from_pretrained("pipe-with-svdq-transformer")     # its subfolder is one
    transformer.save_pretrained("copy")                                         # bit-exact round trip
    # quantize while loading (data-free, like svdq.quantize(model) without calibration):
    FluxTransformer2DModel.from_pretrained(base, subfolder="transformer",
                                           quantization_config={"quant_method": "svdquant", "rank": 32})

A quantized model directory is a normal diffusers model directory: ``config.json`` carries
``"quantization_config": {"quant_method": "svdquant", ...}`` and the weights file
(``diffusion_pytorch_model.safetensors``) is an svdq checkpoint (docs/numerics.md §3: canonical tensors and
the svdq metadata, which lists the quantized layers), readable by `svdq.load` as well.

Loading (pre-quantized): diffusers builds the 16-bit skeleton on the meta device; `SVDQuantizer` reads the
layer list from the checkpoint's metadata, fuses the skeleton's shared-input projections when the checkpoint
has them (`svdq.models.prepare`) and puts `SVDQLinear` / `SVDQWeightOnlyLinear` layers (on meta) where the
file has them; diffusers then loads every tensor as for any model; the quantizer finally materializes the
non-saved per-rank strengths, checks that nothing is left unloaded, and realigns tensors so CPU results are
bit-exact with `svdq.from_pretrained`.
"""

from __future__ import annotations

import enum
import json
import logging
import weakref
from typing import Any

import torch
from torch import nn

from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

log = logging.getLogger("svdq")

QUANT_METHOD = "svdquant"


class _Method(str, enum.Enum):
    # diffusers reads ``quantization_config.quant_method.value`` (its own methods are a str Enum).
    SVDQUANT = QUANT_METHOD


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SVDQuantConfig(QuantizationConfigMixin):
    """``quantization_config`` of an svdq model (``config.json``), or the request to quantize while loading.

    rank / method / include / exclude / weight_only: as `svdq.quantize` (used when quantizing on load; for a
    saved model they record how it was made). torch_dtype: the dtype the quantized model was saved in (loading
    without ``torch_dtype`` uses it, so the round trip is exact).
    """

    def __init__(
        self,
        rank: int = 32,
        method: str = "svdquant",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        weight_only: list[str] | None = None,
        torch_dtype: str | None = None,
        svdq_version: str | None = None,
        **kwargs,
    ):
        from ..quantize import METHODS
        from ..version import __version__

        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(f"unknown svdquant quantization_config field(s): {sorted(kwargs)}")
        if method not in METHODS:
            raise ValueError(f"svdquant quantization_config: method must be one of {METHODS}, got {method!r}")
        if not isinstance(rank, int) or rank < 0:
            raise ValueError(f"svdquant quantization_config: rank must be an int >= 0, got {rank!r}")
        if torch_dtype is not None and torch_dtype not in _DTYPES:
            raise ValueError(f"svdquant quantization_config: torch_dtype must be one of {sorted(_DTYPES)}, got {torch_dtype!r}")
        self.quant_method = _Method.SVDQUANT
        self.rank = rank
        self.method = method
        self.include = None if include is None else list(include)
        self.exclude = None if exclude is None else list(exclude)
        self.weight_only = None if weight_only is None else list(weight_only)
        self.torch_dtype = torch_dtype
        self.svdq_version = svdq_version or __version__

    @classmethod
    def from_model(cls, model: nn.Module) -> "SVDQuantConfig":
        """The config describing the quantized ``model`` (what `save_pretrained` writes to config.json)."""
        from ..linear import SVDQLinear

        qc = getattr(model, "svdq_config", None)
        layer = next((m for m in model.modules() if isinstance(m, SVDQLinear)), None)
        dtype = None if layer is None else str(layer.dtype).removeprefix("torch.")
        if qc is None:
            return cls(rank=layer.rank if layer is not None else 32, torch_dtype=dtype)
        return cls(
            rank=qc.rank,
            method=qc.method,
            include=None if qc.include is None else list(qc.include),
            exclude=list(qc.exclude),
            weight_only=list(qc.weight_only),
            torch_dtype=dtype,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["quant_method"] = QUANT_METHOD
        return d

    def to_diff_dict(self) -> dict[str, Any]:
        # diffusers' repr / to_json_string call it; every field is meaningful, so the "diff" is all of them.
        return self.to_dict()


class SVDQuantizer(DiffusersQuantizer):
    """diffusers' quantizer interface for svdq (see the module docstring)."""

    requires_calibration = False
    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config: SVDQuantConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._meta: dict | None = None
        self._files: list[str] = []
        self._model_ref = None

    # ---- before loading ---------------------------------------------------------------------------------
    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and any(v == "disk" for v in device_map.values()):
            raise ValueError("svdquant models cannot be offloaded to disk (device_map 'disk')")

    def update_torch_dtype(self, torch_dtype):
        if torch_dtype is None and self.pre_quantized and self.quantization_config.torch_dtype is not None:
            # The dtype it was saved in: the whole model loads as it was (bit-exact), not in fp32.
            return _DTYPES[self.quantization_config.torch_dtype]
        return torch_dtype

    def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
        if self.pre_quantized:
            from ..checkpoint import CheckpointError, read_metadata

            self._files = [str(f) for f in checkpoint_files]
            if not self._files or not self._files[0].endswith(".safetensors"):
                raise CheckpointError(
                    f"svdquant models are stored as safetensors only; found {self._files or 'no weights file'}"
                )
            self._meta = read_metadata(self._files[0])
            self._loaded_keys = set(loaded_keys)
        return loaded_keys

    def _process_model_before_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            return  # quantized after the 16-bit weights are loaded (_process_model_after_weight_loading)
        from ..checkpoint import CheckpointError, _layer_inputs, fused_16bit_layers
        from ..conv import conv_for_checkpoint
        from ..linear import SVDQLinear
        from ..models import fused_for_checkpoint
        from ..models.split_input import split_for_checkpoint
        from ..quantize import _set_submodule
        from ..weight_only import SVDQWeightOnlyLinear

        meta = self._meta
        names = [e["name"] for e in meta["quantized_layers"]]
        # the skeleton gets the checkpoint's fused module names (hand-mapped families by their own code, any other
        # diffusers model by the names: svdq.load's rule), 16-bit fused groups included
        # (`checkpoint.fused_16bit_layers`: e.g. SANA's cross-attention to_kv, fused by the generic plan, kept 16-bit
        # by target="nunchaku")
        with fused_for_checkpoint(model, names + fused_16bit_layers(self._loaded_keys)):
            pass
        try:  # layers stored as parts on column ranges of their input (`SplitInputLinear`)
            split_for_checkpoint(model, _layer_inputs(meta))
            conv_for_checkpoint(model, names)  # 1×1 convolutions stored as "<conv>.linear" (`SVDQConv1x1`)
        except ValueError as e:
            raise CheckpointError(f"{self._files[0]}: {e}") from None
        dtypes = _stored_dtypes(self._files)
        path = self._files[0]
        for entry, kind in [(e, "quantized") for e in meta["quantized_layers"]] + [
            (e, "weight-only") for e in meta["weight_only_layers"]
        ]:
            name = entry["name"]
            try:
                target = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"{path}: {kind} layer {name!r} does not exist in {type(model).__name__}") from None
            if (target.in_features, target.out_features) != (entry["in_features"], entry["out_features"]):
                raise CheckpointError(
                    f"{path}: layer {name!r} is [{entry['in_features']} -> {entry['out_features']}] in the checkpoint "
                    f"but [{target.in_features} -> {target.out_features}] in the model"
                )
            dtype = dtypes.get(f"{name}.wscales")
            if dtype is None or not dtype.is_floating_point:
                raise CheckpointError(f"{path}: {name}.wscales is missing or not floating ({dtype})")
            if kind == "quantized":
                layer = SVDQLinear(
                    entry["in_features"], entry["out_features"], entry["rank"], entry["bias"], dtype, "meta",
                    act_shift=entry.get("act_shift", 0.0),  # shifted layers (docs/numerics.md §10.3)
                )
                # The per-rank strengths are not in the file (spec §4.1: ones): real from the start, since
                # diffusers may move the model (device_map) before the quantizer's post-processing.
                layer.lora_scales = torch.ones(entry["rank"], dtype=torch.float32)
            else:
                layer = SVDQWeightOnlyLinear(entry["in_features"], entry["out_features"], entry["bias"], dtype, "meta",
                                             zero_point=_zero_point_kind(entry.get("zero_point", False)))
            _set_submodule(model, name, layer)
        expected = set(model.state_dict().keys())
        missing, unexpected = sorted(expected - self._loaded_keys), sorted(self._loaded_keys - expected)
        if missing or unexpected:
            from ..checkpoint import _few

            raise CheckpointError(
                f"{path} does not match {type(model).__name__}: "
                + (f"missing keys {_few(missing)}" if missing else "")
                + ("; " if missing and unexpected else "")
                + (f"unexpected keys {_few(unexpected)}" if unexpected else "")
            )

    def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
        # A shifted layer's "<layer>.act_shift" (docs/numerics.md §10.3) is no parameter or buffer: the layer was
        # built with the shift from the metadata, `create_quantized_param` checks the stored value against it.
        return self.pre_quantized and param_name.endswith(".act_shift")

    def create_quantized_param(self, model, param_value, param_name, target_device, *args, **kwargs):
        from ..checkpoint import CheckpointError
        from ..linear import SVDQLinear

        layer = model.get_submodule(param_name.rpartition(".")[0])
        # diffusers may have cast the value to torch_dtype: compare in that dtype
        want = torch.tensor([getattr(layer, "act_shift", 0.0)], dtype=torch.float32).to(param_value.dtype)
        if not isinstance(layer, SVDQLinear) or param_value.numel() != 1 or not torch.equal(
            param_value.detach().reshape(1).cpu(), want
        ):
            raise CheckpointError(
                f"{self._files[0] if self._files else 'checkpoint'}: {param_name} = {param_value.tolist()} does not "
                f"match the layer's metadata act_shift ({getattr(layer, 'act_shift', None)})"
            )

    # ---- after loading ----------------------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs):
        from ..checkpoint import CheckpointError
        from ..linear import SVDQLinear
        from ..quantize import QuantizeConfig

        if not self.pre_quantized:
            import svdq

            from ..models import prepare

            qc = self.quantization_config
            prepare(model)
            svdq.quantize(
                model, rank=qc.rank, method=qc.method, include=qc.include, exclude=qc.exclude,
                weight_only=qc.weight_only, progress=False,
            )
            self.quantization_config = SVDQuantConfig.from_model(model)
            model.register_to_config(quantization_config=self.quantization_config)
            attach(model, self)
            return model
        for m in model.modules():
            if isinstance(m, SVDQLinear) and m.lora_scales.is_meta:
                # Not saved (spec §4.1: ones for the SVD branch); diffusers leaves non-persistent meta buffers be.
                m.lora_scales = torch.ones(m.rank, dtype=torch.float32, device=m.lora_down.device)
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise CheckpointError(f"{self._files[0]}: tensors not loaded into {type(model).__name__}: {left[:5]}")
        _realign(model)
        from ..pretrained import _match_buffer_dtype

        _match_buffer_dtype(model)  # non-saved buffers (PixArt's pos_embed) in the model's dtype, as saved
        for m in model.modules():
            if isinstance(m, SVDQLinear):
                m._settle() if hasattr(m, "_settle") else None  # the layout of the backend of its device
        config = self._meta.get("config")
        if config is not None:
            model.svdq_config = config if isinstance(config, QuantizeConfig) else QuantizeConfig.from_dict(config)
        attach(model, self)
        return model

    # ---- saving -----------------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, state_dict, safe_serialization=False):
        from ..checkpoint import contents

        if not safe_serialization:
            raise ValueError("svdquant models are saved as safetensors only (safe_serialization=True)")
        model = self._model_ref() if self._model_ref is not None else None
        if model is None:
            raise RuntimeError("the svdquant quantizer lost its model; call svdq.integrations.diffusers_quantizer.attach(model)")
        tensors, meta = contents(model)  # svdq's checkpoint: canonical tensors + metadata svdq.load reads
        return tensors, meta

    @property
    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model):
        raise NotImplementedError("svdquant models cannot be dequantized; load the 16-bit model instead")


def _zero_point_kind(value) -> bool | str:
    """A weight-only layer's "zero_point" metadata (svdq.checkpoint): true = integer zero points, "float" = float
    offsets, absent / false = symmetric; anything else is a corrupt config."""
    if value is True or value is False or value == "float":
        return value
    raise ValueError(f"svdq quantization_config: weight-only layer zero_point={value!r} (expected true, false or \"float\")")


def _stored_dtypes(files: list[str]) -> dict[str, torch.dtype]:
    """{tensor key: dtype} from the safetensors headers (nothing is read but the headers)."""
    from safetensors import safe_open

    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I8": torch.int8,
             "I32": torch.int32, "U8": torch.uint8, "I64": torch.int64, "F64": torch.float64, "BOOL": torch.bool}
    out = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                if k.endswith(".wscales"):
                    out[k] = names.get(h.get_slice(k).get_dtype())
    return out


def _realign(model: nn.Module, alignment: int = 64) -> None:
    """Copy tensors that sit at unaligned addresses into fresh allocations (as `svdq.load` does): CPU BLAS picks
    its code path by alignment, and the loaded model must compute exactly what the saved one did."""
    with torch.no_grad():
        for m in model.modules():
            for group in (m._parameters, m._buffers):
                for k, t in group.items():
                    if t is not None and t.numel() and t.device.type == "cpu" and t.data_ptr() % alignment:
                        if isinstance(t, nn.Parameter):
                            t.data = t.data.clone()
                        else:
                            group[k] = t.clone()


def attach(model: nn.Module, quantizer: SVDQuantizer | None = None) -> nn.Module:
    """Make an svdq-quantized diffusers model a diffusers quantized model: ``quantization_config`` in its
    config, ``hf_quantizer`` set (so ``model.save_pretrained`` writes the svdq checkpoint), and diffusers' LoRA
    API routed to svdq (`svdq.integrations.diffusers_lora`). Idempotent; no-op for non-diffusers models."""
    if not hasattr(model, "register_to_config"):
        return model
    if quantizer is None:
        quantizer = SVDQuantizer(SVDQuantConfig.from_model(model), pre_quantized=True)
    else:
        quantizer.quantization_config = SVDQuantConfig.from_model(model)
    quantizer._model_ref = weakref.ref(model)
    model.register_to_config(quantization_config=quantizer.quantization_config)
    model.hf_quantizer = quantizer
    model.quantization_method = quantizer.quantization_config.quant_method
    # diffusers refuses `.to(dtype)` on "quantized" models; svdq layers convert (fp32 checkpoint → bf16 for CUDA).
    model.is_quantized = False
    from .diffusers_lora import install

    install(model)
    return model


def register() -> None:
    """Add "svdquant" to diffusers' quantizer tables (idempotent; done when svdq is imported)."""
    from diffusers.quantizers import auto

    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = SVDQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = SVDQuantConfig
