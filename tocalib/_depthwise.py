"""A depthwise 2-D convolution whose backward pass is made of ordinary convolutions, for speed on CPUs.

PyTorch's CPU kernel for the weight gradient of a depthwise k×k convolution is slow for large kernels. The same
gradient is a grouped convolution of the padded input with the output gradient as kernel, one per image, summed:

    ∂L/∂w[c, i, j] = Σ_b Σ_{h, w} x_pad[b, c, h + i, w + j] · g[b, c, h, w],

and the input gradient is the depthwise convolution of the output gradient with the flipped kernel. Both run on
the tensors as they are: convolving the tokens' channels-last memory directly is faster than copying it to NCHW
first. Measured on a 2-core AVX-512 machine, the whole backward pass with 7×7 kernels, channels-last, 2 threads
(1 thread): ToCa's layer at 1 × 96 × 128², 14.0 ms with PyTorch's kernel against 4.9 ms (9.0 ms when this path
still copied both maps to NCHW); PaCa-Tiny's first clustering conv at 8 × 64 × 56², 13.0 (25.1) ms against 4.2
(5.7) ms; PaCa-Small's at 2 × 96 × 128², 29.6 (48.5) ms against 11.9 (15.4) ms. With 3×3 kernels PyTorch's own is
the faster one from two images on (8 × 64 × 56²: 0.9 ms against 2.9 ms). Both passes are written with
differentiable operations, so double backward works too, and the function has a forward-mode rule (``jvp``) and
a generated vmap rule, so ``torch.func`` transforms it.

:func:`depthwise_conv2d` takes this path only where it helps and changes nothing else: one image, or a batch with a
kernel of at least 49 taps, when autograd will need the weight gradient, outside autocast, tracing and compilation
(fvcore's MAC counter, ``torch.jit.trace``, ``torch.compile`` and ``torch.export`` see a plain ``F.conv2d``), on
CPU, for stride 1, dilation 1 and a padding below the kernel size.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["depthwise_conv2d"]

BATCH_MIN_TAPS = 49
"""The fewest kernel taps (kh·kw) for which a batch of two or more images takes this path: measured faster with 7×7
kernels (49 taps), slower with 3×3 (9); 5×5 was not measured on batches."""


class _DepthwiseConv2d(torch.autograd.Function):
    generate_vmap_rule = True  # forward, backward and jvp are torch operations: torch.func transforms them

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int]) -> Tensor:
        return F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, bias, padding = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None, _: None) -> Tensor:
        """Forward mode: the conv is bilinear in (x, weight), plus the bias."""
        x, weight = ctx.saved_tensors
        groups, tangent = x.shape[1], None
        for t in (
            None if x_t is None else F.conv2d(x_t, weight, padding=ctx.padding, groups=groups),
            None if weight_t is None else F.conv2d(x, weight_t, padding=ctx.padding, groups=groups),
        ):
            if t is not None:
                tangent = t if tangent is None else tangent + t
        if bias_t is not None:
            bias_term = bias_t.view(1, -1, 1, 1)
            tangent = (
                bias_term.expand(x.shape[0], -1, *_output_size(x, weight, ctx.padding))
                if tangent is None
                else tangent + bias_term
            )
        return tangent

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        (ph, pw), (kh, kw) = ctx.padding, weight.shape[-2:]
        c = grad.shape[1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight.flip(-2, -1), padding=(kh - 1 - ph, kw - 1 - pw), groups=c)
        if ctx.needs_input_grad[1]:
            # image i's channel c is group c's input, its output gradient the kernel: (H + 2ph) - H' + 1 = kh
            # positions (H' = H + 2ph - kh + 1, the output's height), so each image gives (1, C, kh, kw). The
            # tensors go in as they are: from channels-last memory (the tokens' layout) no copy is faster
            per_image = (
                F.conv2d(x[i : i + 1], grad[i].unsqueeze(1), padding=(ph, pw), groups=c) for i in range(x.shape[0])
            )
            grad_w = functools.reduce(torch.add, per_image).transpose(0, 1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def _output_size(x: Tensor, weight: Tensor, padding: tuple[int, int]) -> tuple[int, int]:
    return x.shape[-2] + 2 * padding[0] - weight.shape[-2] + 1, x.shape[-1] + 2 * padding[1] - weight.shape[-1] + 1


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
        not torch.jit.is_tracing()  # first: a traced shape test would warn
        and not torch.compiler.is_compiling()
        and x.device.type == "cpu"  # before the autocast test, which knows no "meta" device
        and not torch.is_autocast_enabled("cpu")  # autocast casts per op; the backward would mix dtypes
        and torch.is_grad_enabled()
        and conv.weight.requires_grad
        and x.dim() == 4
        and (x.shape[0] == 1 or (x.shape[0] > 1 and conv.kernel_size[0] * conv.kernel_size[1] >= BATCH_MIN_TAPS))
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
