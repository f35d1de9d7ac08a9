"""Malformed arguments and edge cases of the core: a TypeError or ValueError that names the argument, or a
correct finite result; never NaN, never a raw internal error."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tocalib import ToCaAttention, ToCaMultiheadAttention, build_clustering
from tocalib.pooling import cluster_counts, hard_assign, scatter_mean_pool, soft_assign

NOT_INTS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=3), st.none(), st.just([2])
)


@settings(max_examples=40, deadline=None)
@given(argument=st.sampled_from(["dim", "num_heads", "num_clusters", "chunk_size"]), value=NOT_INTS)
def test_integer_arguments_of_the_layer_must_be_ints(argument: str, value: object) -> None:
    kwargs = {"dim": 16, "num_heads": 2, "num_clusters": 4, "chunk_size": 8, argument: value}
    with pytest.raises(TypeError, match=f"{argument} must be an int"):
        ToCaAttention(**kwargs)


@pytest.mark.parametrize(("argument", "value"), [("dim", 0), ("num_heads", 0), ("num_clusters", -1), ("chunk_size", 0)])
def test_integer_arguments_below_their_minimum_are_named(argument: str, value: int) -> None:
    kwargs = {"dim": 16, "num_heads": 2, "num_clusters": 4, "chunk_size": 8, argument: value}
    with pytest.raises(ValueError, match=f"{argument} must be >= "):
        ToCaAttention(**kwargs)


def test_numpy_integers_are_ints() -> None:
    np = pytest.importorskip("numpy")
    layer = ToCaAttention(np.int64(16), np.int32(2), np.int64(4))
    assert layer.num_clusters == 4 and type(layer.num_clusters) is int


@settings(max_examples=30, deadline=None)
@given(clusters=NOT_INTS, clustering=st.sampled_from(["linear", "mlp", "conv1d", "conv2d", "hard"]))
def test_clusterings_and_the_drop_in_name_their_bad_arguments(clusters: object, clustering: str) -> None:
    with pytest.raises(TypeError, match="num_clusters must be an int"):
        build_clustering(clustering, 16, clusters)
    with pytest.raises(TypeError, match="num_clusters must be an int"):
        ToCaMultiheadAttention(16, 2, num_clusters=clusters)


@given(tokens=st.integers(max_value=-1))
def test_a_negative_number_of_tokens_has_no_cost(tokens: int) -> None:
    layer = ToCaAttention(16, 2, 4)
    with pytest.raises(ValueError, match="num_tokens must be >= 0"):
        layer.macs(tokens)
    with pytest.raises(ValueError, match="context_tokens must be >= 0"):
        layer.macs(4, context_tokens=tokens)


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool, torch.uint8])
def test_integer_inputs_are_refused_with_the_fix(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor .* use x\.float\(\)"):
        ToCaAttention(16, 2, 4)(torch.ones(1, 3, 16, dtype=dtype))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        ToCaAttention(16, 2, 4)([[0.0] * 16])


@pytest.mark.parametrize(("size", "error", "message"), [
    ((-2, -2), ValueError, r"size\[0\] must be >= 1"),
    ((2.0, 2), TypeError, r"size\[0\] must be an int, got float"),
    ((2, "2"), TypeError, r"size\[1\] must be an int, got str"),
    ((3, 3), ValueError, "gives H\\*W=9 but x has N=4"),
])  # fmt: skip
def test_a_bad_grid_size_is_named(size: tuple, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        ToCaAttention(16, 2, 4, clustering="conv2d")(torch.randn(1, 4, 16), size=size)


def test_cu_seqlens_must_be_a_tensor() -> None:
    with pytest.raises(TypeError, match=r"got a list; wrap it with torch\.tensor"):
        ToCaAttention(16, 2, 4)(torch.randn(3, 16), cu_seqlens=[0, 3])


@pytest.mark.parametrize(("clusters", "kind"), [(0, "mlp"), (4, "mlp"), (4, "hard"), (0, "causal"), (4, "causal")])
@pytest.mark.parametrize(("batch", "tokens"), [(2, 0), (0, 5), (0, 0)])
def test_empty_sequences_and_batches_give_empty_results(clusters: int, kind: str, batch: int, tokens: int) -> None:
    layer = ToCaAttention(16, 2, clusters, clustering="hard" if kind == "hard" else "mlp", causal=kind == "causal")
    x = torch.randn(batch, tokens, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == (batch, tokens, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape
    packed = layer(torch.randn(0, 16), cu_seqlens=torch.tensor([0, 0, 0]))
    assert packed.shape == (0, 16)
    mixed = layer(torch.randn(3, 16), cu_seqlens=torch.tensor([0, 0, 3]))
    assert mixed.shape == (3, 16) and mixed.isfinite().all()
    if kind == "causal":
        step, _ = layer.step(torch.randn(batch, 1, 16))
        assert step.shape == (batch, 1, 16) and step.isfinite().all()


class DeadCluster(nn.Module):
    """A custom clustering whose first cluster may take no token at all (-inf logits everywhere)."""

    num_clusters = 3

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, size: object = None, key_padding_mask: object = None) -> torch.Tensor:
        logits = self.proj(x).transpose(1, 2)
        return torch.cat([torch.full_like(logits[:, :1], float("-inf")), logits[:, 1:]], dim=1)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_a_cluster_that_takes_no_token_is_zero_not_nan(norm: bool, padded: bool) -> None:
    layer = ToCaAttention(16, 2, 3, clustering=DeadCluster(), cluster_norm=norm)
    x = torch.randn(2, 7, 16, requires_grad=True)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 4:] = padded
    y, record = layer(x, key_padding_mask=mask, return_intermediates=True)
    assignment = record.assignment.dense()
    assert torch.equal(assignment[:, 0], torch.zeros_like(assignment[:, 0]))
    assert torch.allclose(assignment[:, 1:].sum(-1), torch.ones(2, 2))
    y.sum().backward()
    assert y.isfinite().all() and x.grad.isfinite().all()
    assert all(p.grad.isfinite().all() for p in layer.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hard_clustering_stays_finite_in_half_precision_for_large_inputs(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layer = ToCaAttention(16, 2, 4, clustering="hard").to(dtype)
    x = (torch.randn(2, 300, 16) * 1e4).to(dtype)
    index, weight = hard_assign(layer.clustering(x))
    counts = cluster_counts(index, weight, 4)
    means = scatter_mean_pool(x, index, weight, counts)
    exact = scatter_mean_pool(x.double(), index, weight.double(), counts)
    assert means.dtype == dtype and torch.allclose(means.double(), exact, rtol=1e-2, atol=1.0)
    y = layer(x)
    assert y.dtype == dtype and y.isfinite().all()


@pytest.mark.parametrize(
    "build", [lambda: ToCaAttention(16, 2, 4), lambda: ToCaMultiheadAttention(16, 2, num_clusters=4)]
)
def test_torchscript_is_refused_with_what_to_use_instead(build: Callable[[], nn.Module]) -> None:
    with pytest.raises(TypeError, match=r"use torch\.compile .* torch\.export"):
        torch.jit.script(build())


@pytest.mark.parametrize(("make", "found"), [
    (lambda a: a * 3, "row sums from 3"),
    (lambda a: a - 0.5 / a.shape[-1], "a minimum of -"),
    (lambda a: torch.rand_like(a), "row sums from"),
])  # fmt: skip
def test_a_given_assignment_must_be_a_distribution_over_the_tokens(make, found: str) -> None:
    layer = ToCaAttention(16, 2, 4, clustering=None)
    x, good = torch.randn(2, 9, 16), torch.randn(2, 4, 9).softmax(-1)
    with pytest.raises(ValueError, match=f"sum to 1 over the real tokens .* {found}.*check_assignment = False"):
        layer(x, assignment=make(good))
    layer.check_assignment = False
    assert layer(x, assignment=make(good)).shape == x.shape


def test_a_given_assignment_may_leave_padding_and_clusters_empty() -> None:
    layer = ToCaAttention(16, 2, 4, clustering=None)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    logits = torch.randn(2, 4, 9).masked_fill(mask.unsqueeze(1), float("-inf"))
    assignment = logits.softmax(-1)
    assignment[0, 2] = 0.0  # a cluster nobody joins
    assignment[1, :, 6:] = 0.3  # weight on padding is ignored: the rows sum to 1 over the real tokens
    y = layer(torch.randn(2, 9, 16), key_padding_mask=mask, assignment=assignment)
    assert y.isfinite().all()


def test_soft_assign_empties_only_clusters_no_token_may_join_and_keeps_nan_visible() -> None:
    logits = torch.randn(1, 3, 5)
    logits[0, 0] = float("-inf")
    logits[0, 1] = float("nan")
    assignment = soft_assign(logits)
    assert torch.equal(assignment[0, 0], torch.zeros(5))
    assert assignment[0, 1].isnan().all()  # bad input is not hidden
    assert torch.equal(assignment[0, 2], logits[0, 2].softmax(-1))
