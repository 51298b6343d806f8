"""`SplitInputLinear`: one linear layer stored as independently quantized layers on consecutive column ranges of
its input, y = Σ_i parts[i](x[..., c_i : c_i + k_i]).

Nunchaku's FLUX.1 single blocks hold ``proj_out`` this way (``out_proj`` on the attention half of its input, the
shifted ``mlp_fc2`` on the MLP half: the two halves' activations have different ranges, and only the MLP half is
≥ −0.171875 after GELU). svdq builds it for models loaded from such files and for models quantized for Nunchaku's
runtime (`svdq.quantize(..., target="nunchaku")`, `svdq.formats.nunchaku_target`).

In an svdq checkpoint the parts are ordinary layers named ``<layer>.parts.<i>``; `split_for_checkpoint` rebuilds the
split on a 16-bit skeleton from those names and the parts' ``in_features`` before the tensors are loaded.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

_PART = re.compile(r"^(.+)\.parts\.(\d+)$")


class SplitInputLinear(nn.Module):
    """y = Σ_i parts[i](x[..., c_i : c_i + k_i]) over consecutive column ranges of x. The sum is taken in the
    parts' output dtype, in order (part 0 first): two rounded outputs added, not one layer's rounding."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        if not parts or len({p.out_features for p in parts}) != 1:
            raise ValueError(f"SplitInputLinear: parts need one common out_features, got {[p.out_features for p in parts]}")
        self.parts = nn.ModuleList(parts)
        self.in_features = sum(p.in_features for p in parts)
        self.out_features = parts[0].out_features

    @property
    def sizes(self) -> list[int]:
        return [p.in_features for p in self.parts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SplitInputLinear expects inputs with last dimension {self.in_features}, got {tuple(x.shape)}")
        y, start = None, 0
        for part in self.parts:
            out = part(x[..., start : start + part.in_features])
            y = out if y is None else y + out
            start += part.in_features
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, sizes={self.sizes}"


def split_linear(model: nn.Module, name: str, sizes: list[int]) -> SplitInputLinear:
    """Replace the `nn.Linear` ``name`` of ``model`` by a `SplitInputLinear` of `nn.Linear` column slices of
    ``sizes`` (weights copied exactly; the bias, if any, on part 0 only, so the sum is the same linear map).
    Works on meta skeletons. ValueError naming the layer when it is no `nn.Linear` or the sizes do not add up."""
    linear = model.get_submodule(name)
    if type(linear) is not nn.Linear:
        raise ValueError(f"cannot split {name!r}: it is a {type(linear).__name__}, not an nn.Linear")
    if sum(sizes) != linear.in_features or any(s <= 0 for s in sizes):
        raise ValueError(f"cannot split {name!r} [{linear.in_features} -> {linear.out_features}] into input columns {sizes}")
    parts, start = [], 0
    w = linear.weight.detach()
    for i, size in enumerate(sizes):
        part = nn.Linear(size, linear.out_features, bias=i == 0 and linear.bias is not None,
                         device=w.device, dtype=w.dtype)
        part.weight = nn.Parameter(w[:, start : start + size].clone(), requires_grad=linear.weight.requires_grad)
        if part.bias is not None:
            part.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        parts.append(part)
        start += size
    split = SplitInputLinear(parts)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, split)
    return split


def split_sizes(layers: Iterable[tuple[str, int]]) -> dict[str, list[int]]:
    """{split layer: its parts' in_features in order} from (name, in_features) pairs of a checkpoint's layers,
    for the names ``<layer>.parts.<i>``; ValueError when a layer's part indices are not 0 … n−1."""
    found: dict[str, dict[int, int]] = {}
    for name, k in layers:
        m = _PART.match(name)
        if m:
            found.setdefault(m.group(1), {})[int(m.group(2))] = k
    sizes = {}
    for layer, parts in found.items():
        if sorted(parts) != list(range(len(parts))):
            raise ValueError(f"layer {layer!r} is stored as parts {sorted(parts)}; expected parts 0 … {len(parts) - 1} "
                             f"(every part of a split layer is a quantized layer of the checkpoint)")
        sizes[layer] = [parts[i] for i in range(len(parts))]
    return sizes


def split_for_checkpoint(model: nn.Module, layers: Iterable[tuple[str, int]]) -> int:
    """Split the skeleton's `nn.Linear` layers that a checkpoint stores as parts (`split_sizes`); layers already
    split the same way are left as they are. Returns how many were split; ValueError naming the layer otherwise."""
    n = 0
    for name, sizes in split_sizes(layers).items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"split layer {name!r} of the checkpoint does not exist in {type(model).__name__}") from None
        if isinstance(current, SplitInputLinear):
            if current.sizes != sizes:
                raise ValueError(f"{name!r} is split into input columns {current.sizes} in the model, {sizes} in the checkpoint")
            continue
        split_linear(model, name, sizes)
        n += 1
    return n
