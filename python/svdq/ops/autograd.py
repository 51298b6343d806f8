"""Backward of the quantized layer (docs/numerics.md §9): gradients through `SVDQLinear` on every backend.

The forward is the backend's own (`svdq.ops.svdq_linear`, bit for bit what inference computes). The backward
is plain PyTorch on the tensors' device, so it is the same for the reference, CPU and CUDA backends:

- **Activation quantizer: straight-through estimator (STE).** ``Q(x̂) = s_a · round(x̂ / s_a)`` has derivative
  0 almost everywhere; the STE takes ``dQ/dx̂ = 1`` (the usual choice for quantization-aware training and
  QLoRA). With ``x̂ = x / λ`` and ``s_a = amax / 7`` no code is ever clamped, so the STE's identity needs no
  clipping mask. The weight is a constant: ``Ŵ = q_w · s_w`` (dequantized, spec §2.4).
- So, with g = dL/dy (fp32) and ``a = (x · lora_down) ⊙ lora_scales``:

      dL/dx         = (g · Ŵ[:, :K]) / λ  +  ((g · lora_up) ⊙ lora_scales) · lora_downᵀ
      dL/dlora_down = xᵀ · ((g · lora_up) ⊙ lora_scales)
      dL/dlora_up   = gᵀ · C(a)                       (C: the rounding to the compute dtype, as forward)
      dL/dlora_scales = Σ_m (x · lora_down) ⊙ (g · lora_up)
      dL/dbias      = Σ_m g
      dL/dλ         = −Σ_m (g · Ŵ[:, :K]) ⊙ x / λ²   (STE again)

  computed in fp32 and returned in each input's dtype. The dense Ŵ is rebuilt in backward (one [N, K] fp32
  temporary per layer at a time), never kept.
- Not differentiable: ``qweight`` / ``wscales`` (integer codes and their scales; a clear error if asked), and a
  second derivative (``create_graph=True``: a clear error).
"""

from __future__ import annotations

from typing import Callable

import torch

from .reference import GROUP_SIZE, unpack_int4


def dequantize(qweight: torch.Tensor, wscales: torch.Tensor, in_features: int) -> torch.Tensor:
    """Canonical qweight int8 [N, Kp/2] and wscales [N, Kp/64] → Ŵ = q_w · s_w, fp32 [N, K] (exact)."""
    n = qweight.shape[0]
    q = unpack_int4(qweight).to(torch.float32).view(n, -1, GROUP_SIZE)
    w = (q * wscales.to(torch.float32).unsqueeze(-1)).view(n, -1)
    return w[:, :in_features]


class _SVDQLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, smooth, lora_down, lora_up, bias, lora_scales, forward_fn, weights_fn):
        ctx.weights_fn = weights_fn
        ctx.has_bias, ctx.has_scales = bias is not None, lora_scales is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, smooth, lora_down, lora_up, lora_scales if lora_scales is not None else x.new_empty(0))
        return forward_fn(x, smooth, lora_down, lora_up, bias, lora_scales)

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():  # autograd runs backward in grad mode only for create_graph=True
            raise RuntimeError(
                "SVDQLinear has no second derivative (backward with create_graph=True, double backward): the "
                "4-bit layer's backward uses the straight-through estimator, which is first-order only"
            )
        x, smooth, down, up, scales = ctx.saved_tensors
        f32 = torch.float32
        k = x.shape[-1]
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(f32)
        x2 = x.reshape(-1, k).to(f32)
        lam = smooth.to(f32)
        qweight, wscales = ctx.weights_fn()
        w_hat = dequantize(qweight, wscales, k)  # [N, K]
        g_main = g @ w_hat  # dL/dx̂ under the STE, [M, K]
        need = ctx.needs_input_grad
        grad_x = grad_smooth = grad_down = grad_up = grad_bias = grad_scales = None
        r = down.shape[1]
        s = scales.to(f32) if ctx.has_scales else torch.ones(r, dtype=f32, device=x.device)
        u = g @ up.to(f32) if r else g.new_zeros(g.shape[0], 0)  # [M, r]
        if need[0]:
            gx = g_main / lam
            if r:
                gx = gx + (u * s) @ down.to(f32).T
            grad_x = gx.reshape(x.shape).to(x.dtype)
        if need[1]:
            grad_smooth = (-(g_main * x2) / (lam * lam)).sum(0).to(smooth.dtype)
        if need[2] and r:
            grad_down = (x2.T @ (u * s)).to(down.dtype)
        if need[3] or need[5]:
            xd = x2 @ down.to(f32) if r else g.new_zeros(g.shape[0], 0)
            if need[3] and r:
                act = (xd * s).to(grad_y.dtype).to(f32)  # C(a): the forward's rounding of lora_act
                grad_up = (g.T @ act).to(up.dtype)
            if need[5] and ctx.has_scales:
                grad_scales = (xd * u).sum(0).to(scales.dtype)
        if need[4] and ctx.has_bias:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_smooth, grad_down, grad_up, grad_bias, grad_scales, None, None


def needs_grad(*tensors) -> bool:
    """Whether a call on these tensors must record a graph (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def svdq_linear(
    x: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor | None,
    lora_scales: torch.Tensor | None,
    *,
    forward_fn: Callable,
    weights_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    qweight: torch.Tensor | None = None,
    wscales: torch.Tensor | None = None,
) -> torch.Tensor:
    """The layer with a backward (module docstring).

    forward_fn(x, smooth, lora_down, lora_up, bias, lora_scales) → y: the backend's forward (no graph).
    weights_fn() → canonical (qweight, wscales), called in backward only. qweight / wscales: the resident
    tensors, checked not to require grad (they cannot get one).
    """
    for name, t in (("qweight", qweight), ("wscales", wscales)):
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"SVDQLinear: {name} cannot have a gradient (4-bit codes and their scales are fixed); train the "
                "low-rank branch or a LoRA adapter instead (svdq.lora.lora_parameters), and set "
                f"{name}.requires_grad_(False)"
            )
    return _SVDQLinearFunction.apply(x, smooth, lora_down, lora_up, bias, lora_scales, forward_fn, weights_fn)


class _WeightOnlyFunction(torch.autograd.Function):
    """W4A16 (spec §7) with a backward: the layer's own forward (fused int4 kernels have no derivative),
    ``dL/dx = g · Ŵ``, ``dL/dbias = Σ g`` (the weight is a constant)."""

    @staticmethod
    def forward(ctx, x, bias, forward_fn, weight_fn):
        ctx.weight_fn, ctx.x_shape, ctx.x_dtype = weight_fn, x.shape, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return forward_fn(x)

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():
            raise RuntimeError("SVDQWeightOnlyLinear has no second derivative (create_graph=True)")
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(torch.float32)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ ctx.weight_fn().to(torch.float32)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None


def weight_only_linear(x: torch.Tensor, bias, forward_fn: Callable, weight_fn: Callable[[], torch.Tensor]):
    """`forward_fn(x)` (run without a graph) with the backward of ``x · Ŵᵀ + bias``; weight_fn() → Ŵ [N, K]."""
    return _WeightOnlyFunction.apply(x, bias, forward_fn, weight_fn)
