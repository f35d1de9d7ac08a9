"""Analytic MACs equal measured MACs, and their growth in N is what ToCa promises."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from tocalib import ToCaAttention
from tocalib.flops import UncountedOpError, count_macs, toca_macs

KINDS = ["linear", "mlp", "conv1d", "conv2d", "hard"]


def measured(layer: ToCaAttention, batch: int, h: int, w: int, padded: bool = False) -> int:
    x = torch.randn(batch, h * w, layer.dim)
    pad = torch.rand(batch, h * w) < 0.3 if padded else None
    return count_macs(layer.eval(), x, size=(h, w), key_padding_mask=pad)


@pytest.mark.parametrize("kind", [*KINDS, None])
@given(
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 8),
    clusters=st.integers(1, 12),
    h=st.integers(1, 8),
    w=st.integers(1, 8),
    batch=st.integers(1, 3),
    padded=st.booleans(),
)
def test_analytic_macs_equal_measured_macs(kind, heads, head_dim, clusters, h, w, batch, padded):
    dim = heads * head_dim
    layer = ToCaAttention(dim, heads, 0 if kind is None else clusters, clustering=kind or "mlp")
    assert measured(layer, batch, h, w, padded) == batch * layer.macs(h * w)


def test_analytic_macs_of_a_layer_reusing_an_assignment_equal_measured_macs():
    layer = ToCaAttention(32, 4, 10, clustering=None).eval()
    x, c = torch.randn(2, 50, 32), torch.rand(2, 10, 50).softmax(-1)
    assert count_macs(layer, x, assignment=c) == 2 * layer.macs(50) == toca_macs(50, 32, 4, 10, None, batch_size=2)


@pytest.mark.parametrize("kind", KINDS)
@given(clusters=st.integers(1, 16), w=st.integers(1, 6), h=st.integers(1, 6), step=st.integers(1, 4))
def test_measured_macs_are_exactly_linear_in_n_for_fixed_m(kind, clusters, w, h, step):
    """With N_k = (h + k·step)·w, the second difference f(N_0) − 2 f(N_1) + f(N_2) is exactly 0."""
    layer = ToCaAttention(16, 2, clusters, clustering=kind)
    f0, f1, f2 = (measured(layer, 1, h + k * step, w) for k in range(3))
    assert f0 - 2 * f1 + f2 == 0
    assert f1 > f0


@given(dim=st.sampled_from([8, 16, 24]), n=st.integers(1, 40), step=st.integers(1, 10))
def test_measured_macs_are_quadratic_in_n_for_full_attention(dim, n, step):
    """For M = 0, f(N) = 4·N·C² + 2·N²·C, so the second difference with step s is 4·C·s² and the third is 0."""
    layer = ToCaAttention(dim, 2, 0)
    f = [measured(layer, 1, n + k * step, 1) for k in range(4)]
    assert f[0] - 2 * f[1] + f[2] == 4 * dim * step**2
    assert f[3] - 3 * f[2] + 3 * f[1] - f[0] == 0


def test_paca_tiny_first_stage_layer_at_the_papers_sizes():
    for n, side in ((3136, 56), (12544, 112)):
        layer = ToCaAttention(96, 2, 100, clustering="conv2d")
        assert measured(layer, 1, side, side) == toca_macs(n, 96, 2, 100, "conv2d")


def test_an_operator_without_a_handle_fails_loudly():
    class Baddbmm(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.baddbmm(a.new_zeros(2, 3, 3), a, b)

    with pytest.raises(UncountedOpError, match="aten::baddbmm"):
        count_macs(Baddbmm(), torch.randn(2, 3, 4), torch.randn(2, 4, 3))


def test_declared_mac_free_operators_are_allowed_explicitly():
    class Cumprod(nn.Module):
        def forward(self, a: torch.Tensor) -> torch.Tensor:
            return torch.cumprod(a, dim=1)

    with pytest.raises(UncountedOpError, match="aten::cumprod"):
        count_macs(Cumprod(), torch.randn(2, 5))
    assert count_macs(Cumprod(), torch.randn(2, 5), not_macs=["aten::cumprod"]) == 0


def test_two_operand_einsum_is_counted_exactly():
    class Pool(nn.Module):
        def forward(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bmn,bnc->bmc", c, x)

    assert count_macs(Pool(), torch.randn(2, 64, 64), torch.randn(2, 64, 32)) == 2 * 64 * 64 * 32


@pytest.mark.parametrize("padding", ["same", 1])
def test_a_same_padded_convolution_counts_like_an_explicitly_padded_one(padding):
    """fvcore has no handle for ``aten::_convolution_mode`` (``padding="same"``); tocalib's counts it."""
    conv = nn.Conv2d(8, 16, 3, padding=padding, groups=2)
    assert count_macs(conv, torch.randn(2, 8, 10, 12)) == 2 * 16 * 10 * 12 * (8 // 2) * 3 * 3
