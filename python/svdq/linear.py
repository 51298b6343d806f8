"""`SVDQLinear`: the drop-in W4A4 replacement for `nn.Linear` (docs/numerics.md)."""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .decompose import Decomposition, decompose
from .ops.reference import GROUP_SIZE, padded_k

# Buffers in the canonical checkpoint layout (spec §3), in the order they are saved.
STORED_TENSORS = ("qweight", "wscales", "smooth", "lora_down", "lora_up")


def weight_standin(out_features: int, in_features: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A NaN [out_features, in_features] tensor holding one element (see `SVDQLinear.weight`)."""
    return torch.full((), float("nan"), dtype=dtype, device=device).expand(out_features, in_features)


class SVDQLinear(nn.Module):
    """y = W4A4(x/λ) + (x · lora_down · lora_scales) · lora_upᵀ + bias.

    Buffers (canonical layout, spec §3): ``qweight`` int8 [N, Kp/2], ``wscales`` [N, Kp/64], ``smooth`` [K],
    ``lora_down`` [K, r], ``lora_up`` [N, r], ``bias`` [N] (or None). ``lora_scales`` fp32 [r] is the per-rank
    strength of the low-rank branch (ones for the SVD part; LoRA adapters set their own); it is not saved.
    The backend (``svdq.ops``) is picked per call from the input's device.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 32,
        bias: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        act_format: str = "int4",
    ):
        super().__init__()
        # How activations are quantized at run time (not stored with the weights: both formats read the same
        # checkpoint): "int4" = W4A4 (spec §4), "fp8" = W4A8 (spec §8). Per call: `svdq.ops.use_act_format`.
        self.act_format = ops.check_act_format(act_format)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"SVDQLinear needs positive sizes, got in={in_features} out={out_features}")
        if not dtype.is_floating_point:
            raise ValueError(f"SVDQLinear dtype must be a floating dtype, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        kp = padded_k(in_features)
        f = dict(dtype=dtype, device=device)
        self.register_buffer("qweight", torch.zeros(out_features, kp // 2, dtype=torch.int8, device=device))
        self.register_buffer("wscales", torch.zeros(out_features, kp // GROUP_SIZE, **f))
        self.register_buffer("smooth", torch.ones(in_features, **f))
        self.register_buffer("lora_down", torch.zeros(in_features, rank, **f))
        self.register_buffer("lora_up", torch.zeros(out_features, rank, **f))
        self.register_buffer("bias", torch.zeros(out_features, **f) if bias else None)
        self.register_buffer("lora_scales", torch.ones(rank, dtype=torch.float32, device=device), persistent=False)
        self._prepared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def rank(self) -> int:
        return self.lora_down.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.wscales.dtype

    # ---- the nn.Linear surface: what diffusers and user code read off a Linear -----------------------------
    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def weight(self) -> torch.Tensor:
        """nn.Linear's ``weight`` metadata for code that reads it (diffusers casts inputs to
        ``to_q.weight.dtype``, checks ``.device`` / ``.shape``): a [out_features, in_features] tensor of the
        compute dtype on the layer's device. Its values are NaN (one stored element, expanded): the 4-bit weight
        is not a dense matrix, so arithmetic with this stand-in is loudly wrong instead of silently so, and
        writes to it raise."""
        return weight_standin(self.out_features, self.in_features, self.dtype, self.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 32, smooth: torch.Tensor | None = None) -> "SVDQLinear":
        """Quantize ``linear`` (data-free when ``smooth`` is None). The rank is padded to a multiple of 16."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        dec = decompose(linear.weight, rank, smooth)
        return cls.from_decomposition(dec, linear.bias)

    @classmethod
    def from_decomposition(cls, dec: Decomposition, bias: torch.Tensor | None) -> "SVDQLinear":
        n, k = dec.lora_up.shape[0], dec.smooth.shape[0]
        layer = cls(k, n, dec.rank, bias is not None, dec.wscales.dtype, dec.wscales.device)
        with torch.no_grad():
            for name in STORED_TENSORS:
                getattr(layer, name).copy_(getattr(dec, name))
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def set_lowrank(self, lora_down: torch.Tensor, lora_up: torch.Tensor, lora_scales: torch.Tensor) -> None:
        """Replace the whole low-rank branch (used by LoRA hot-swap); the 4-bit tensors are not touched."""
        r = lora_down.shape[1]
        if lora_down.shape != (self.in_features, r) or lora_up.shape != (self.out_features, r):
            raise ValueError(
                f"low-rank branch shapes {tuple(lora_down.shape)}, {tuple(lora_up.shape)} do not fit a "
                f"[{self.in_features} -> {self.out_features}] layer"
            )
        if lora_scales.shape != (r,):
            raise ValueError(f"lora_scales must have shape ({r},), got {tuple(lora_scales.shape)}")
        self.lora_down = lora_down.to(self.dtype).contiguous()
        self.lora_up = lora_up.to(self.dtype).contiguous()
        self.lora_scales = lora_scales.to(torch.float32).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"SVDQLinear expects inputs with last dimension {self.in_features}, got shape {tuple(x.shape)}"
            )
        backend = ops.select_backend(x.device)
        if backend.name == "cuda" and self.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"SVDQLinear [{self.in_features} -> {self.out_features}] stores {self.dtype}; the CUDA kernels run "
                "bf16/fp16 layers: convert the model once with model.to(torch.bfloat16) (or torch.float16), e.g. a "
                "checkpoint quantized in fp32 on a CPU"
            )
        if x.numel() == 0:  # M = 0 (any leading dims), as nn.Linear allows: no kernel launch, an empty result
            return x.new_empty((*x.shape[:-1], self.out_features))
        # Any stride, as nn.Linear takes (transposed / sliced views): the kernels read dense rows of K.
        x = x.contiguous()
        qweight, wscales = self._weights_for(backend)
        scales = None if self.rank == 0 else self.lora_scales
        act_format = ops.act_format_override() or self.act_format
        return ops.svdq_linear(
            x, qweight, wscales, self.smooth, self.lora_down, self.lora_up, self.bias, scales, backend=backend.name,
            act_format=act_format,
        )

    def _weights_for(self, backend: ops.Backend) -> tuple[torch.Tensor, torch.Tensor]:
        """The 4-bit weights in ``backend``'s layout, repacked once per backend and device."""
        cached = self._prepared.get(backend.name)
        if cached is None or cached[0].device != self.qweight.device:
            cached = backend.prepare_weight(self.qweight, self.wscales)
            self._prepared[backend.name] = cached
        return cached

    def _apply(self, fn, recurse=True):
        self._prepared = {}
        result = super()._apply(fn, recurse)
        # `.to(dtype)` converts every floating buffer; the per-rank strengths are fp32 by spec (§4.1).
        self.lora_scales = self.lora_scales.to(torch.float32)
        return result

    def _load_from_state_dict(self, *args, **kwargs):
        self._prepared = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def weight_bytes(self) -> int:
        """Bytes of the stored weights (4-bit + scales + smoothing + low-rank + bias)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, dtype={self.dtype}"
            + (f", act_format={self.act_format}" if self.act_format != "int4" else "")
        )


def set_act_format(model: nn.Module, act_format: str, include: str | tuple[str, ...] = "*") -> int:
    """Set ``act_format`` ("int4" | "fp8") on the `SVDQLinear` layers of ``model`` whose qualified names match
    an fnmatch pattern of ``include``; returns how many layers were set (0 raises: a pattern that matches
    nothing is a mistake)."""
    import fnmatch

    ops.check_act_format(act_format)
    patterns = (include,) if isinstance(include, str) else tuple(include)
    hits = [m for name, m in model.named_modules()
            if isinstance(m, SVDQLinear) and any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not hits:
        raise ValueError(f"set_act_format: no SVDQLinear layer of the model matches {patterns}")
    for m in hits:
        m.act_format = act_format
    return len(hits)
