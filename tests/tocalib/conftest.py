"""Fixtures shared by the core's tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from tocalib import ToCaAttention


def _multihead_with_weights_of(layer: ToCaAttention) -> nn.MultiheadAttention:
    """PyTorch's own MultiheadAttention carrying the layer's q/k/v/proj weights (batch_first, eval)."""
    mha = nn.MultiheadAttention(layer.dim, layer.num_heads, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([layer.q.weight, layer.k.weight, layer.v.weight]))
        mha.in_proj_bias.copy_(torch.cat([layer.q.bias, layer.k.bias, layer.v.bias]))
        mha.out_proj.load_state_dict(layer.proj.state_dict())
    return mha


@pytest.fixture(scope="session")
def multihead_like() -> Callable[[ToCaAttention], nn.MultiheadAttention]:
    return _multihead_with_weights_of
