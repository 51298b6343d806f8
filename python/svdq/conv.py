"""`SVDQConv1x1`: a W4A4 1×1 convolution — an `SVDQLinear` over the channels of an NCHW tensor.

A 1×1 convolution with stride 1, no padding and one group is the linear layer ``y[:, n] = Σ_k W[n, k] · x[:, k] + b``
applied at every pixel, so it needs no kernel of its own: the module moves channels last, runs its `SVDQLinear`
(``.linear``) on the [B·H·W, C] rows and moves them back. It exists for SANA's GLUMBConv feed-forward
(diffusers' ``ff.conv_inverted`` / ``ff.conv_point``), which Nunchaku quantizes as W4A4 GEMMs over pixels
(`svdq.formats.nunchaku_sana`). Anything else a Conv2d can do (k×k kernels, strides, padding, groups) is not a
linear layer and is refused by `check_conv1x1`, naming the layer.

svdq's checkpoint format has no convolution layer kind, so a model holding one cannot be saved with `svdq.save` /
`save_pretrained` (``svdq_checkpoint_unsupported``, read by `svdq.checkpoint.contents`, names it).
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import SVDQLinear


def check_conv1x1(conv: nn.Module, name: str = "conv") -> None:
    """ValueError naming ``name`` unless ``conv`` is an ``nn.Conv2d`` that is a per-pixel linear layer: kernel
    1×1, stride 1, padding 0, one group (dilation and padding mode then change nothing)."""
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{name}: {type(conv).__name__} is not an nn.Conv2d: SVDQConv1x1 replaces 1×1 "
                         f"convolutions only")
    bad = []
    if tuple(conv.kernel_size) != (1, 1):
        bad.append(f"kernel_size={tuple(conv.kernel_size)}")
    if tuple(conv.stride) != (1, 1):
        bad.append(f"stride={tuple(conv.stride)}")
    # "same" / "valid" mean no padding at all for a 1×1 kernel
    if not isinstance(conv.padding, str) and tuple(conv.padding) != (0, 0):
        bad.append(f"padding={conv.padding}")
    if conv.groups != 1:
        bad.append(f"groups={conv.groups}")
    if bad:
        raise ValueError(
            f"{name}: Conv2d({conv.in_channels}, {conv.out_channels}, {', '.join(bad)}) is not a per-pixel linear "
            f"layer; SVDQConv1x1 holds 1×1, stride-1, unpadded, ungrouped convolutions only"
        )


class SVDQConv1x1(nn.Module):
    """y = conv1x1(x) for x [B, C_in, H, W] → [B, C_out, H, W], computed by ``self.linear`` (an `SVDQLinear`
    [C_in → C_out]) on the channels-last rows. The output is a channels-last view (as ``nn.Conv2d`` gives for a
    channels-last input); every torch op downstream takes it."""

    svdq_checkpoint_unsupported = (
        "a 4-bit 1×1 convolution (SVDQConv1x1, e.g. SANA's ff.conv_inverted / ff.conv_point loaded from a Nunchaku "
        "file) has no layer kind in svdq's checkpoint format; keep the Nunchaku file and load it again instead"
    )

    def __init__(self, linear: SVDQLinear):
        super().__init__()
        if not isinstance(linear, SVDQLinear):
            raise TypeError(f"SVDQConv1x1 holds an SVDQLinear, got {type(linear).__name__}")
        self.linear = linear

    @classmethod
    def replacing(cls, conv: nn.Module, linear: SVDQLinear, name: str = "conv") -> "SVDQConv1x1":
        """The module that takes ``conv``'s place, computing with ``linear``; ValueError naming ``name`` when
        ``conv`` is not a 1×1 convolution (`check_conv1x1`) or its channels / bias do not match ``linear``."""
        check_conv1x1(conv, name)
        if (conv.in_channels, conv.out_channels) != (linear.in_features, linear.out_features):
            raise ValueError(
                f"{name}: Conv2d({conv.in_channels} -> {conv.out_channels}) cannot take an SVDQLinear "
                f"[{linear.in_features} -> {linear.out_features}]"
            )
        if (conv.bias is None) != (linear.bias is None):
            raise ValueError(f"{name}: the convolution {'has no' if conv.bias is None else 'has a'} bias, the "
                             f"SVDQLinear {'has one' if conv.bias is None else 'has none'}")
        return cls(linear)

    @staticmethod
    def weight_matrix(conv: nn.Conv2d, name: str = "conv") -> torch.Tensor:
        """``conv``'s weight [C_out, C_in, 1, 1] as the [N, K] matrix of its linear layer (a view, exact)."""
        check_conv1x1(conv, name)
        return conv.weight.view(conv.out_channels, conv.in_channels)

    @property
    def in_channels(self) -> int:
        return self.linear.in_features

    @property
    def out_channels(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"SVDQConv1x1 [{self.in_channels} -> {self.out_channels}] expects [B, {self.in_channels}, "
                             f"H, W] inputs, got {got}")
        return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(1, 1)"
