"""Properties of ToCaAttention, each test named by the sentence it checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tocalib import ToCaAttention, list_clusterings

SOFT = ["linear", "mlp", "conv1d", "conv2d"]
ALL = [*SOFT, "hard"]
SEQUENCE_SAFE = ["linear", "mlp", "conv1d", "hard"]  # no 2-D layout needed
PERMUTATION_EQUIVARIANT = ["linear", "mlp", "hard"]


def make(
    clustering: str | None, dim: int = 16, heads: int = 2, clusters: int = 4, seed: int = 0, **kw
) -> ToCaAttention:
    torch.manual_seed(seed)
    return ToCaAttention(dim, heads, clusters, clustering=clustering, **kw).eval()


def random_padding(batch: int, n: int, generator: torch.Generator, allow_empty: bool = False) -> torch.Tensor:
    """(B, N) bool padding mask with at least one real token per sequence unless ``allow_empty``."""
    pad = torch.rand(batch, n, generator=generator) < 0.4
    if not allow_empty:
        pad[:, 0] = False
    return pad


@st.composite
def configs(draw, clusterings=ALL, max_clusters: int = 6):
    """A random layer configuration with a matching input."""
    clustering = draw(st.sampled_from(clusterings))
    heads = draw(st.integers(1, 3))
    dim = heads * draw(st.integers(1, 6))
    clusters = draw(st.integers(0, max_clusters))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    return clustering, heads, dim, clusters, (h, w), batch, seed


@given(configs())
def test_output_and_assignment_shapes_follow_the_input(cfg):
    clustering, heads, dim, clusters, (h, w), batch, seed = cfg
    layer = make(clustering, dim, heads, clusters, seed)
    x = torch.randn(batch, h * w, dim)
    y, record = layer(x, size=(h, w), return_intermediates=True)
    assert y.shape == x.shape
    if clusters == 0:
        assert record.assignment is None
    else:
        assert record.assignment.shape == record.assignment.dense().shape == (batch, clusters, h * w)


@given(configs(clusterings=SOFT, max_clusters=6), st.booleans())
def test_every_soft_assignment_row_sums_to_one_over_the_real_tokens(cfg, padded):
    clustering, heads, dim, clusters, (h, w), batch, seed = cfg
    layer = make(clustering, dim, heads, max(clusters, 1), seed)
    gen = torch.Generator().manual_seed(seed)
    pad = random_padding(batch, h * w, gen) if padded else torch.zeros(batch, h * w, dtype=torch.bool)
    _, record = layer(
        torch.randn(batch, h * w, dim, generator=gen), size=(h, w), key_padding_mask=pad, return_intermediates=True
    )
    c = record.assignment.dense()
    torch.testing.assert_close(c.sum(-1), torch.ones(c.shape[:2]))
    assert torch.all(c.transpose(1, 2)[pad] == 0)


@given(st.integers(1, 8), st.integers(1, 40), st.integers(0, 2**16))
def test_hard_assignment_puts_each_real_token_in_exactly_one_cluster(clusters, n, seed):
    layer = make("hard", clusters=clusters, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    pad = random_padding(2, n, gen)
    _, record = layer(torch.randn(2, n, 16, generator=gen), key_padding_mask=pad, return_intermediates=True)
    assert record.assignment.form == "hard"
    c = record.assignment.dense()
    members = (c > 0).sum(1)  # (B, N) clusters per token
    assert torch.equal(members, (~pad).long())
    sums = c.sum(-1)
    nonempty = (c > 0).any(-1)
    torch.testing.assert_close(sums[nonempty], torch.ones_like(sums[nonempty]))
    assert torch.all(sums[~nonempty] == 0)


@pytest.mark.parametrize("clustering", [*SEQUENCE_SAFE, None])
@given(n=st.integers(1, 24), extra=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_appending_padding_leaves_real_tokens_unchanged(clustering, n, extra, seed):
    layer = make(clustering, clusters=0 if clustering is None else 5, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 16, generator=gen)
    garbage = 1e3 * torch.randn(2, extra, 16, generator=gen)
    pad = torch.cat([torch.zeros(2, n, dtype=torch.bool), torch.ones(2, extra, dtype=torch.bool)], dim=1)
    y_plain = layer(x)
    y_padded = layer(torch.cat([x, garbage], dim=1), key_padding_mask=pad)
    torch.testing.assert_close(y_padded[:, :n], y_plain, atol=1e-5, rtol=1e-5)


@given(h=st.integers(1, 6), w=st.integers(1, 6), extra_rows=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_conv2d_padding_rows_below_the_grid_leave_real_tokens_unchanged(h, w, extra_rows, seed):
    layer = make("conv2d", clusters=5, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, h * w, 16, generator=gen)
    garbage = 1e3 * torch.randn(2, extra_rows * w, 16, generator=gen)
    pad = torch.arange((h + extra_rows) * w).expand(2, -1) >= h * w
    y_padded = layer(torch.cat([x, garbage], dim=1), size=(h + extra_rows, w), key_padding_mask=pad)
    torch.testing.assert_close(y_padded[:, : h * w], layer(x, size=(h, w)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("clustering", [*ALL, None])
def test_an_all_padding_sequence_gives_finite_outputs_and_gradients(clustering):
    layer = make(clustering, clusters=0 if clustering is None else 4).train()
    x = torch.randn(3, 12, 16, requires_grad=True)
    pad = torch.zeros(3, 12, dtype=torch.bool)
    pad[0] = True  # nothing real in sequence 0
    pad[1, 5:] = True
    y, record = layer(x, size=(3, 4), key_padding_mask=pad, return_intermediates=True)
    assert torch.isfinite(y).all()
    if clustering is not None:
        assert torch.all(record.assignment.dense()[0] == 0)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


@pytest.mark.parametrize("clustering", [*PERMUTATION_EQUIVARIANT, None])
@given(n=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_permuting_tokens_permutes_outputs_for_layout_free_clusterings(clustering, n, seed):
    layer = make(clustering, clusters=0 if clustering is None else 5, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 16, generator=gen)
    pad = random_padding(2, n, gen)
    perm = torch.randperm(n, generator=gen)
    y = layer(x, key_padding_mask=pad)
    y_perm = layer(x[:, perm], key_padding_mask=pad[:, perm])
    torch.testing.assert_close(y_perm, y[:, perm], atol=1e-5, rtol=1e-5)


@given(n=st.integers(1, 20), heads=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_identity_assignment_with_m_equal_n_is_full_self_attention(multihead_like, n, heads, seed):
    layer = make(None, dim=16, heads=heads, clusters=n, seed=seed, cluster_norm=False)
    x = torch.randn(2, n, 16, generator=torch.Generator().manual_seed(seed))
    identity = torch.eye(n).expand(2, n, n)
    expected, _ = multihead_like(layer)(x, x, x, need_weights=False)
    torch.testing.assert_close(layer(x, assignment=identity), expected, atol=1e-5, rtol=1e-5)


@given(n=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_zero_clusters_is_full_self_attention_with_padding(multihead_like, n, seed):
    layer = make(None, clusters=0, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 16, generator=gen)
    pad = random_padding(2, n, gen)
    expected, _ = multihead_like(layer)(x, x, x, key_padding_mask=pad, need_weights=False)
    real = ~pad
    torch.testing.assert_close(layer(x, key_padding_mask=pad)[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("clustering", [*ALL, None])
def test_sdpa_path_equals_explicit_path_and_weights_are_distributions(clustering):
    clusters = 0 if clustering is None else 6
    layer = make(clustering, clusters=clusters)
    x = torch.randn(2, 20, 16)
    pad = random_padding(2, 20, torch.Generator().manual_seed(1))
    y_sdpa = layer(x, size=(4, 5), key_padding_mask=pad)
    y_explicit, record = layer(x, size=(4, 5), key_padding_mask=pad, return_intermediates=True, need_weights=True)
    torch.testing.assert_close(y_explicit, y_sdpa, atol=1e-5, rtol=1e-5)
    assert record.attn_weights.shape == (2, 2, 20, clusters or 20)
    torch.testing.assert_close(record.attn_weights.sum(-1), torch.ones(2, 2, 20))


@pytest.mark.parametrize("clustering", ALL)
def test_gradients_are_finite_and_reach_the_clustering_function(clustering):
    layer = make(clustering, clusters=6).train()
    x = torch.randn(2, 20, 16, requires_grad=True)
    layer(x, size=(4, 5)).square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in layer.clustering.parameters())


@pytest.mark.parametrize("clustering", [*ALL, None])
def test_bf16_forward_is_finite_even_with_an_all_padding_sequence(clustering):
    layer = make(clustering, clusters=0 if clustering is None else 6)
    x = torch.randn(2, 20, 16)
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[1] = True
    y32 = layer(x, size=(4, 5), key_padding_mask=pad)
    y16 = layer.to(torch.bfloat16)(x.bfloat16(), size=(4, 5), key_padding_mask=pad)
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    torch.testing.assert_close(y16[0].float(), y32[0], atol=0.1, rtol=0.1)


@pytest.mark.parametrize("clustering", ["mlp", "conv2d"])
def test_torch_compile_fullgraph_matches_eager(clustering):
    torch._dynamo.reset()
    layer = make(clustering, clusters=6)
    x = torch.randn(2, 20, 16)
    pad = random_padding(2, 20, torch.Generator().manual_seed(3))
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(
        compiled(x, size=(4, 5), key_padding_mask=pad), layer(x, size=(4, 5), key_padding_mask=pad)
    )


def test_reused_assignment_builds_the_same_clusters_as_computing_it():
    layer = make("mlp", clusters=5)
    x = torch.randn(2, 9, 16)
    y, record = layer(x, return_intermediates=True)
    torch.testing.assert_close(layer(x, assignment=record.assignment), y)
    torch.testing.assert_close(layer(x, assignment=record.assignment.dense()), y)


def test_macs_count_the_paca_tiny_first_stage_layer_by_the_papers_formula():
    n, c, m = 3136, 96, 100
    clustering = 49 * c * n + c * c * n + c * m * n
    expected = clustering + m * n * c + 2 * n * c * c + 2 * m * c * c + 2 * n * m * c + 5 * m * c
    layer = ToCaAttention(c, 2, m, clustering="conv2d")
    assert layer.macs(n) == expected
    assert ToCaAttention(c, 2, m, clustering=None).macs(n) == expected - clustering


class TestClearErrors:
    def test_wrong_rank(self):
        with pytest.raises(ValueError, match=r"shape \(B, N, C\).*flatten\(2\)"):
            make("mlp")(torch.randn(2, 16, 4, 4))

    def test_wrong_width(self):
        with pytest.raises(ValueError, match="C = dim = 16"):
            make("mlp")(torch.randn(2, 5, 8))

    def test_dim_not_divisible_by_heads(self):
        with pytest.raises(ValueError, match=r"dim \(10\) must be a positive multiple of num_heads \(3\)"):
            ToCaAttention(10, 3)

    def test_negative_clusters(self):
        with pytest.raises(ValueError, match="num_clusters must be >= 0"):
            ToCaAttention(16, 2, -1)

    def test_conv2d_without_size(self):
        with pytest.raises(ValueError, match=r"size=\(H, W\).*'mlp' or 'conv1d'"):
            make("conv2d")(torch.randn(2, 12, 16))

    def test_conv2d_size_not_matching_tokens(self):
        with pytest.raises(ValueError, match=r"H\*W=15 but x has N=12"):
            make("conv2d")(torch.randn(2, 12, 16), size=(3, 5))

    def test_assignment_of_wrong_shape(self):
        with pytest.raises(ValueError, match=r"assignment must be .* \(B, M, L\) = \(2, 4, 12\)"):
            make("mlp")(torch.randn(2, 12, 16), assignment=torch.rand(2, 5, 12))

    def test_assignment_of_wrong_dtype(self):
        with pytest.raises(ValueError, match="floating tensor"):
            make("mlp")(torch.randn(2, 12, 16), assignment=torch.ones(2, 4, 12, dtype=torch.long))

    def test_assignment_for_a_layer_without_clusters(self):
        with pytest.raises(ValueError, match="num_clusters=0"):
            make(None, clusters=0)(torch.randn(2, 12, 16), assignment=torch.rand(2, 4, 12))

    def test_mask_of_wrong_shape(self):
        with pytest.raises(ValueError, match=r"key_padding_mask must be a bool tensor of shape \(B, L\) = \(2, 12\)"):
            make("mlp")(torch.randn(2, 12, 16), key_padding_mask=torch.zeros(2, 11, dtype=torch.bool))

    def test_mask_of_wrong_dtype(self):
        with pytest.raises(ValueError, match=r"mask\.bool\(\)"):
            make("mlp")(torch.randn(2, 12, 16), key_padding_mask=torch.zeros(2, 12))

    def test_unknown_clustering_lists_the_known_ones(self):
        with pytest.raises(ValueError, match="unknown clustering 'kmeans'; known: " + ", ".join(list_clusterings())):
            ToCaAttention(16, 2, 4, clustering="kmeans")

    def test_missing_clustering_function_asks_for_an_assignment(self):
        with pytest.raises(ValueError, match="pass assignment="):
            make(None)(torch.randn(2, 12, 16))

    def test_need_weights_without_intermediates(self):
        with pytest.raises(ValueError, match="return_intermediates=True"):
            make("mlp")(torch.randn(2, 12, 16), need_weights=True)


def test_attention_scale_is_one_over_sqrt_head_dim():
    layer = make(None, clusters=0, heads=4)
    x = torch.randn(1, 3, 16)
    _, record = layer(x, return_intermediates=True, need_weights=True)
    q = layer.q(x).view(1, 3, 4, 4).transpose(1, 2)
    k = layer.k(x).view(1, 3, 4, 4).transpose(1, 2)
    expected = (q @ k.transpose(-1, -2) / math.sqrt(4)).softmax(-1)
    torch.testing.assert_close(record.attn_weights, expected)
