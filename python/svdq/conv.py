"""`SVDQConv1x1`: a W4A4 1×1 convolution — an `SVDQLinear` over the channels of an NCHW tensor.

A 1×1 convolution with stride 1, no padding and one group is the linear layer ``y[:, n] = Σ_k W[n, k] · x[:, k] + b``
applied at every pixel, so it needs no kernel of its own: the module moves channels last, runs its `SVDQLinear`
(``.linear``) on the [B·H·W, C] rows and moves them back. It exists for SANA's GLUMBConv feed-forward
(diffusers' ``ff.conv_inverted`` / ``ff.conv_point``), which Nunchaku quantizes as W4A4 GEMMs over pixels
(`svdq.formats.nunchaku_sana`). Anything else a Conv2d can do (k×k kernels, strides, padding, groups) is not a
linear layer and is refused by `check_conv1x1`, naming the layer.

In an svdq checkpoint the layer is its inner linear layer, an ordinary quantized layer entry named ``<conv>.linear``
(tensors ``<conv>.linear.qweight`` …); `conv_for_checkpoint` wraps the 16-bit skeleton's 1×1 ``nn.Conv2d`` at
``<conv>`` from that name before the tensors are loaded (`svdq.checkpoint.load`, the diffusers quantizer), as
`svdq.models.split_input.split_for_checkpoint` rebuilds split layers. `svdq.quantize` builds the same wrapper
(`SVDQConv1x1.wrapping`, a 16-bit ``nn.Linear`` viewing the conv's weight) for the 1×1 convolutions an explicit
``include`` pattern names, and quantizes its ``.linear`` as any other layer.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import SVDQLinear

LINEAR = "linear"  # the inner layer's name: a checkpoint layer "<conv>.linear" is the 1×1 convolution "<conv>"


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
    channels-last input); every torch op downstream takes it.

    ``self.linear`` is a 16-bit ``nn.Linear`` only transiently: in a skeleton being loaded (`conv_for_checkpoint`)
    or a convolution being quantized (`wrapping`); such a module is not saved (``svdq_checkpoint_unsupported``)."""

    def __init__(self, linear: SVDQLinear | nn.Linear):
        super().__init__()
        if not isinstance(linear, SVDQLinear) and type(linear) is not nn.Linear:
            raise TypeError(f"SVDQConv1x1 holds an SVDQLinear (or a 16-bit nn.Linear), got {type(linear).__name__}")
        self.linear = linear

    @property
    def svdq_checkpoint_unsupported(self) -> str | None:
        """Why `svdq.checkpoint.contents` refuses this module (None: it saves as its ``.linear`` layer)."""
        if isinstance(self.linear, SVDQLinear):
            return None
        return ("its inner layer is a 16-bit nn.Linear (a 1×1 convolution halfway through quantization or "
                "loading); svdq checkpoints store 1×1 convolutions as quantized layers only")

    @classmethod
    def wrapping(cls, conv: nn.Module, name: str = "conv") -> "SVDQConv1x1":
        """``conv`` (a 1×1 ``nn.Conv2d``, `check_conv1x1`) as an SVDQConv1x1 holding a 16-bit ``nn.Linear`` whose
        weight is a view of the conv's [N, K, 1, 1] weight as [N, K] (and the same bias tensor): the form
        `svdq.quantize` calibrates and quantizes, and a skeleton loads (works on meta tensors)."""
        check_conv1x1(conv, name)
        w = conv.weight
        linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None, device="meta",
                           dtype=w.dtype)
        linear.weight = nn.Parameter(w.detach().reshape(conv.out_channels, conv.in_channels),
                                     requires_grad=w.requires_grad)
        if conv.bias is not None:
            linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=conv.bias.requires_grad)
        return cls(linear)

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


def conv_for_checkpoint(model: nn.Module, layer_names) -> int:
    """Wrap the skeleton's 1×1 ``nn.Conv2d`` layers that a checkpoint stores as ``<conv>.linear`` (`SVDQConv1x1.
    wrapping`), so that the checkpoint's layer entry finds an ``nn.Linear`` there; names whose owner is no
    ``nn.Conv2d`` (an ordinary ``….linear`` layer, an SVDQConv1x1 already) are left to the loader. Returns how many
    were wrapped; ValueError naming the layer for a convolution that is not a per-pixel linear layer."""
    n = 0
    for name in layer_names:
        owner, _, leaf = name.rpartition(".")
        if leaf != LINEAR or not owner:
            continue
        try:
            conv = model.get_submodule(owner)
        except AttributeError:
            continue  # the loader names the missing layer
        if not isinstance(conv, nn.Conv2d):
            continue
        try:
            wrapped = SVDQConv1x1.wrapping(conv, owner)
        except ValueError as e:
            raise ValueError(f"the checkpoint stores {name!r} as a 4-bit 1×1 convolution: {e}") from None
        parent, _, child = owner.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, wrapped)
        n += 1
    return n
