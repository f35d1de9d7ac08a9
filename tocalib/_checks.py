"""Input validation for :class:`tocalib.ToCaAttention`: what was wrong, what was expected, how to fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from tocalib.attention import ToCaAttention


def _check_tokens(name: str, t: Tensor, dim: int) -> None:
    if t.dim() != 3 or t.shape[-1] != dim:
        raise ValueError(
            f"{name} must have shape (B, N, C) with C = dim = {dim}, got {tuple(t.shape)}; for an image feature "
            f"map (B, C, H, W) pass x.flatten(2).transpose(1, 2) and size=(H, W); for packed sequences pass cu_seqlens"
        )


def check_inputs(
    layer: ToCaAttention, x: Tensor, context: Tensor | None, key_padding_mask: Tensor | None, assignment: Tensor | None
) -> Tensor | None:
    """Validate a forward call; return ``keep`` (B, L) bool (True = real clustered token) or None."""
    _check_tokens("x", x, layer.dim)
    source = x
    if context is not None:
        _check_tokens("context", context, layer.dim)
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"context has batch size {context.shape[0]} but x has {x.shape[0]}; they must match")
        if layer.causal:
            raise ValueError("causal=True is self-attention only: a context has no order relative to x")
        source = context
    b, length, _ = source.shape
    if assignment is not None:
        if layer.num_clusters == 0:
            raise ValueError("assignment= was given but this layer has num_clusters=0 (plain self-attention)")
        if layer.causal:
            raise ValueError("a causal layer computes per-prefix assignments itself: it cannot take assignment=")
        if tuple(assignment.shape) != (b, layer.num_clusters, length) or not assignment.is_floating_point():
            raise ValueError(
                f"assignment must be a floating tensor of shape (B, M, L) = {(b, layer.num_clusters, length)}, "
                f"got {assignment.dtype} {tuple(assignment.shape)}"
            )
    if key_padding_mask is None:
        return None
    if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (b, length):
        raise ValueError(
            f"key_padding_mask must be a bool tensor of shape (B, L) = {(b, length)} over the clustered tokens, with "
            f"True = padding, got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}; convert with `mask.bool()`"
        )
    return ~key_padding_mask
