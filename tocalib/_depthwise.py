"""A depthwise 2-D convolution whose backward pass is two ordinary convolutions, for speed on CPUs.

PyTorch's CPU kernel for the weight gradient of a depthwise k×k convolution is slow (on a 2-core AVX-512 machine,
82 ms for 96 channels on a 128×128 map with k = 7, ten times its forward). The same gradient is a grouped
convolution of the padded input with the output gradient as kernel,

    ∂L/∂w[c, i, j] = Σ_{b, h, w} x_pad[b, c, h + i, w + j] · g[b, c, h, w],

which runs in about a quarter of that time; the input gradient is the depthwise convolution of the output gradient
with the flipped kernel. Both are written with differentiable operations, so double backward works too.

:func:`depthwise_conv2d` takes this path only where it helps and changes nothing else: when autograd will need the
weight gradient, outside tracing and compilation (fvcore's MAC counter, ``torch.jit.trace``, ``torch.compile`` and
``torch.export`` see a plain ``F.conv2d``), on CPU, for stride 1, dilation 1 and a padding below the kernel size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["depthwise_conv2d"]


class _DepthwiseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        (ph, pw), (kh, kw) = ctx.padding, weight.shape[-2:]
        b, c = grad.shape[:2]
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight.flip(-2, -1), padding=(kh - 1 - ph, kw - 1 - pw), groups=c)
        if ctx.needs_input_grad[1]:
            padded = F.pad(x, (pw, pw, ph, ph)).transpose(0, 1)  # (C, B, H + 2ph, W + 2pw)
            stacked = padded.reshape(1, c * b, *padded.shape[-2:])  # channel c's B images are group c's inputs
            # (H + 2ph) - H' + 1 = kh positions (H' = H + 2ph - kh + 1, the output's height): (1, C, kh, kw)
            grad_w = F.conv2d(stacked, grad.transpose(0, 1), groups=c).transpose(0, 1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def _padding(padding: int | tuple[int, ...] | str, kernel: tuple[int, int]) -> tuple[int, int] | None:
    if isinstance(padding, str):
        return (kernel[0] // 2, kernel[1] // 2) if padding == "same" and kernel[0] % 2 and kernel[1] % 2 else None
    pair = (padding, padding) if isinstance(padding, int) else tuple(padding)
    return pair if len(pair) == 2 else None


def depthwise_conv2d(x: Tensor, conv: torch.nn.Conv2d) -> Tensor:
    """``conv(x)`` for a depthwise ``nn.Conv2d`` (groups = in = out channels), with the fast backward pass where
    it applies (see the module docstring).

    Args:
        x: (B, C, H, W).
        conv: the convolution, whose weight is (C, 1, kh, kw).

    Returns:
        (B, C, H', W'), equal to ``conv(x)``.
    """
    padding = _padding(conv.padding, conv.kernel_size)
    fast = (
        torch.is_grad_enabled()
        and conv.weight.requires_grad
        and x.device.type == "cpu"
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and conv.groups == conv.in_channels == conv.out_channels
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and padding is not None
        and all(0 <= p < k for p, k in zip(padding, conv.kernel_size, strict=True))
    )
    if not fast:
        return conv(x)
    assert padding is not None
    return _DepthwiseConv2d.apply(x, conv.weight, conv.bias, padding)
