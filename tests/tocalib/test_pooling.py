"""Assignment normalisation and pooling: dense and scatter forms agree, padding never counts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tocalib.pooling import cluster_counts, hard_assign, hard_assignment_matrix, pool, scatter_mean_pool, soft_assign


@st.composite
def hard_problems(draw):
    batch, n, clusters, channels = draw(st.integers(1, 3)), draw(st.integers(1, 40)), draw(st.integers(1, 9)), 5
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    logits = torch.randn(batch, clusters, n, generator=gen, requires_grad=True)
    x = torch.randn(batch, n, channels, generator=gen, requires_grad=True)
    keep = torch.rand(batch, n, generator=gen) > 0.3
    return logits, x, keep


@given(hard_problems())
def test_scatter_pooling_equals_the_dense_product_with_the_hard_assignment_matrix(problem):
    logits, x, keep = problem
    index, weight = hard_assign(logits, keep)
    counts = cluster_counts(index, weight, logits.shape[1])
    z_scatter = scatter_mean_pool(x, index, weight, counts)
    z_dense = pool(hard_assignment_matrix(index, weight, counts), x)
    torch.testing.assert_close(z_scatter, z_dense)
    g_scatter = torch.autograd.grad(z_scatter.square().sum(), (logits, x), retain_graph=True)
    g_dense = torch.autograd.grad(z_dense.square().sum(), (logits, x))
    for a, b in zip(g_scatter, g_dense, strict=True):
        torch.testing.assert_close(a, b)


@given(hard_problems())
def test_hard_clusters_are_the_plain_means_of_their_real_members(problem):
    logits, x, keep = problem
    index, weight = hard_assign(logits, keep)
    z = scatter_mean_pool(x, index, weight, cluster_counts(index, weight, logits.shape[1]))
    for b in range(x.shape[0]):
        for m in range(logits.shape[1]):
            members = (index[b] == m) & keep[b]
            expected = x[b, members].mean(0) if members.any() else torch.zeros(x.shape[-1])
            torch.testing.assert_close(z[b, m], expected)


@given(hard_problems())
def test_soft_assignment_is_a_distribution_over_real_tokens_and_zero_on_padding(problem):
    logits, _, keep = problem
    c = soft_assign(logits, keep)
    assert torch.all(c.transpose(1, 2)[~keep] == 0)
    has_real = keep.any(1)
    torch.testing.assert_close(c.sum(-1)[has_real], torch.ones_like(c.sum(-1)[has_real]))
    assert torch.all(c[~has_real] == 0)


def test_soft_assignment_of_bf16_logits_is_the_float32_softmax_rounded_once():
    logits = (torch.randn(2, 4, 1000) * 30).bfloat16()
    expected = soft_assign(logits.float()).bfloat16()
    assert torch.equal(soft_assign(logits), expected)


@pytest.mark.scatter
@given(hard_problems())
def test_torch_scatter_backend_agrees_with_native_torch(optional_module, problem):
    optional_module("torch_scatter", "torch-scatter is not installed (pip install tocalib[scatter])")
    logits, x, keep = problem
    index, weight = hard_assign(logits, keep)
    counts = cluster_counts(index, weight, logits.shape[1])
    native = scatter_mean_pool(x, index, weight, counts, backend="torch")
    external = scatter_mean_pool(x, index, weight, counts, backend="torch_scatter")
    torch.testing.assert_close(external, native)
    g_native = torch.autograd.grad(native.sum(), (logits, x), retain_graph=True)
    g_external = torch.autograd.grad(external.sum(), (logits, x))
    for a, b in zip(g_external, g_native, strict=True):
        torch.testing.assert_close(a, b)


def test_unknown_scatter_backend_is_named_in_the_error():
    x, index, weight = torch.randn(1, 3, 2), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3)
    with pytest.raises(ValueError, match="scatter backend 'cuda' is unknown"):
        scatter_mean_pool(x, index, weight, torch.ones(1, 2), backend="cuda")


def test_soft_assign_with_every_cluster_live_is_the_general_expression_bit_for_bit() -> None:
    """The CPU shortcut (every cluster has a token it may join) skips two passes, not a bit of the result: the
    same logits with one cluster dead (-inf everywhere) take the general path, whose other rows must agree."""
    logits = torch.randn(2, 5, 33)
    logits[0, 1, :7] = float("-inf")  # partly -inf: still live
    dead = logits.clone()
    dead[1, 3] = float("-inf")
    logits.requires_grad_()
    dead.requires_grad_()
    fast, general = soft_assign(logits), soft_assign(dead)
    assert torch.equal(general[1, 3], torch.zeros(33))  # the dead cluster: zero, not NaN
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 3] = False
    assert torch.equal(fast[keep], general[keep])
    grad = torch.randn_like(fast)
    fast_grad = torch.autograd.grad(fast, logits, grad)[0]
    general_grad = torch.autograd.grad(general, dead, grad)[0]
    assert torch.equal(fast_grad[keep], general_grad[keep]) and torch.equal(general_grad[1, 3], torch.zeros(33))
