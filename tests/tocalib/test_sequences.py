"""ToCa for sequences: causal, cross-attention and packed variable-length batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tocalib import ToCaAttention
from tocalib.flops import count_macs

CAUSAL_CLUSTERINGS = [("mlp", {}), ("linear", {}), ("conv1d", {"causal": True, "kernel_size": 3})]


def causal_layer(
    clustering: str, kwargs: dict, chunk: int, cluster_norm: bool = True, clusters: int = 4, seed: int = 0
) -> ToCaAttention:
    torch.manual_seed(seed)
    return ToCaAttention(
        16, 2, clusters, clustering, clustering_kwargs=kwargs, causal=True, chunk_size=chunk, cluster_norm=cluster_norm
    ).eval()


def prefix_reference(layer: ToCaAttention, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Brute force: position t's output is the non-causal layer's output at t when run on x[:, :t+1]."""
    layer.causal = False
    try:
        outs = [
            layer(x[:, : t + 1], key_padding_mask=None if pad is None else pad[:, : t + 1])[:, t]
            for t in range(x.shape[1])
        ]
    finally:
        layer.causal = True
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize(("clustering", "kwargs"), CAUSAL_CLUSTERINGS)
@pytest.mark.parametrize("cluster_norm", [True, False])
@settings(max_examples=10)
@given(n=st.integers(1, 14), chunk=st.sampled_from([1, 3, 5, 64]), seed=st.integers(0, 2**16))
def test_causal_output_equals_the_brute_force_prefix_reference(clustering, kwargs, cluster_norm, n, chunk, seed):
    layer = causal_layer(clustering, kwargs, chunk, cluster_norm, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 16, generator=gen)
    pad = torch.rand(2, n, generator=gen) < 0.3
    real = ~pad
    torch.testing.assert_close(layer(x)[:, :], prefix_reference(layer, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        layer(x, key_padding_mask=pad)[real], prefix_reference(layer, x, pad)[real], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(("clustering", "kwargs"), [*CAUSAL_CLUSTERINGS, (None, {})])
def test_no_output_depends_on_a_later_token(clustering, kwargs):
    """∂y_t/∂x_s = 0 for every s > t, and ≠ 0 for s ≤ t (the test can tell a leak from nothing)."""
    layer = causal_layer(clustering or "mlp", kwargs, chunk=3, clusters=0 if clustering is None else 4)
    x = torch.randn(1, 9, 16, requires_grad=True)
    y = layer(x)
    probe = torch.randn(16)  # a random read-out of y_t, so no dependence can cancel out
    influence = torch.stack(
        [torch.autograd.grad(y[0, t] @ probe, x, retain_graph=True)[0][0].abs().sum(-1) for t in range(9)]
    )  # (t, s)
    future = torch.ones(9, 9, dtype=torch.bool).triu(1)
    assert torch.all(influence[future] == 0)
    assert torch.all(influence[~future] > 0)


def test_causal_full_attention_is_pytorchs_causal_attention(multihead_like):
    torch.manual_seed(0)
    layer = ToCaAttention(16, 2, 0, causal=True).eval()
    mha = multihead_like(layer)
    x = torch.randn(2, 11, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(11)
    expected, _ = mha(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cluster_norm", [True, False])
def test_causal_weights_are_per_position_distributions_and_match_sdpa(cluster_norm):
    layer = causal_layer("mlp", {}, chunk=4, cluster_norm=cluster_norm)
    x = torch.randn(2, 10, 16)
    y, record = layer(x, return_intermediates=True, need_weights=True)
    assert record.attn_weights.shape == (2, 2, 10, 4)
    torch.testing.assert_close(record.attn_weights.sum(-1), torch.ones(2, 2, 10))
    torch.testing.assert_close(y, layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cluster_norm", [True, False])
@pytest.mark.parametrize("chunk", [1, 4, 8])
def test_causal_macs_are_analytic_and_exactly_linear_in_n(cluster_norm, chunk):
    """With N_k = k·chunk, f(N_1) − 2 f(N_2) + f(N_3) = 0: the cost is linear in N for fixed M and chunk."""
    layer = causal_layer("mlp", {}, chunk=chunk, cluster_norm=cluster_norm)
    f = []
    for k in (1, 2, 3):
        n = k * chunk
        measured = count_macs(layer, torch.randn(1, n, 16))
        assert measured == layer.macs(n)
        f.append(measured)
    assert f[0] - 2 * f[1] + f[2] == 0 and f[1] > f[0]
    assert count_macs(layer, torch.randn(1, 7, 16)) == layer.macs(7)  # a ragged last chunk too


def test_causal_layer_refuses_what_would_leak_or_is_undefined():
    with pytest.raises(ValueError, match=r"causal=True needs .* got 'conv2d'"):
        ToCaAttention(16, 2, 4, clustering="conv2d", causal=True)
    with pytest.raises(ValueError, match=r"clustering_kwargs=\{'causal': True\}"):
        ToCaAttention(16, 2, 4, clustering="conv1d", causal=True)
    with pytest.raises(ValueError, match="causal=True needs"):
        ToCaAttention(16, 2, 4, clustering="hard", causal=True)
    layer = causal_layer("mlp", {}, chunk=4)
    with pytest.raises(ValueError, match="cannot take assignment="):
        layer(torch.randn(1, 5, 16), assignment=torch.rand(1, 4, 5))
    with pytest.raises(ValueError, match="self-attention only"):
        layer(torch.randn(1, 5, 16), context=torch.randn(1, 6, 16))


@given(n=st.integers(1, 12), length=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_cross_toca_is_attention_from_x_to_the_clusters_of_the_context(multihead_like, n, length, seed):
    torch.manual_seed(seed)
    layer = ToCaAttention(16, 2, 5, clustering="mlp").eval()
    x, ctx = torch.randn(2, n, 16), torch.randn(2, length, 16)
    pad = torch.rand(2, length) < 0.3
    pad[:, 0] = False
    y, record = layer(x, context=ctx, key_padding_mask=pad, return_intermediates=True)
    assert y.shape == (2, n, 16) and record.assignment.shape == (2, 5, length)
    clusters = layer.cluster_norm(record.assignment @ ctx)
    expected, _ = multihead_like(layer)(x, clusters, clusters, need_weights=False)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    garbage = torch.cat([ctx, 1e3 * torch.randn(2, 3, 16)], dim=1)
    longer_pad = torch.cat([pad, torch.ones(2, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(layer(x, context=garbage, key_padding_mask=longer_pad), y, atol=1e-5, rtol=1e-5)


def test_cross_full_attention_is_pytorchs_cross_attention_and_costs_are_analytic(multihead_like):
    torch.manual_seed(0)
    layer = ToCaAttention(16, 2, 0).eval()
    x, ctx = torch.randn(2, 7, 16), torch.randn(2, 13, 16)
    pad = torch.zeros(2, 13, dtype=torch.bool)
    pad[1, 6:] = True
    expected, _ = multihead_like(layer)(x, ctx, ctx, key_padding_mask=pad, need_weights=False)
    torch.testing.assert_close(layer(x, context=ctx, key_padding_mask=pad), expected, atol=1e-5, rtol=1e-5)
    assert count_macs(layer, x, context=ctx) == 2 * layer.macs(7, context_tokens=13)
    toca = ToCaAttention(16, 2, 5, clustering="conv1d").eval()
    assert count_macs(toca, x, context=ctx) == 2 * toca.macs(7, context_tokens=13)


def test_cross_inputs_are_checked():
    layer = ToCaAttention(16, 2, 5)
    with pytest.raises(ValueError, match="context must have shape"):
        layer(torch.randn(2, 7, 16), context=torch.randn(2, 7, 8))
    with pytest.raises(ValueError, match="context has batch size 3 but x has 2"):
        layer(torch.randn(2, 7, 16), context=torch.randn(3, 7, 16))
    with pytest.raises(ValueError, match=r"\(B, L\) = \(2, 9\) over the clustered tokens"):
        layer(
            torch.randn(2, 7, 16), context=torch.randn(2, 9, 16), key_padding_mask=torch.zeros(2, 7, dtype=torch.bool)
        )


@pytest.mark.parametrize(
    ("clustering", "kwargs"), [("mlp", {}), ("linear", {}), ("conv1d", {}), ("hard", {}), ("mlp", {"causal": True})]
)
@settings(max_examples=10)
@given(lengths=st.lists(st.integers(0, 12), min_size=1, max_size=5).filter(any), seed=st.integers(0, 2**16))
def test_packed_sequences_give_the_padded_result(clustering, kwargs, lengths, seed):
    torch.manual_seed(seed)
    layer = ToCaAttention(16, 2, 4, clustering, **kwargs).eval()
    seqs = [torch.randn(n, 16) for n in lengths]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    packed_out, packed_c = layer(torch.cat(seqs), cu_seqlens=cu_seqlens, return_assignment=True)
    assert packed_out.shape == (sum(lengths), 16)
    for s, (seq, start) in enumerate(zip(seqs, cu_seqlens.tolist(), strict=False)):
        if len(seq):
            alone, c = layer(seq.unsqueeze(0), return_assignment=True)
            torch.testing.assert_close(packed_out[start : start + len(seq)], alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(packed_c[s, :, : len(seq)], c[0], atol=1e-6, rtol=1e-5)


def test_packed_inputs_are_checked():
    layer = ToCaAttention(16, 2, 4)
    x = torch.randn(10, 16)
    with pytest.raises(ValueError, match="end at T = 10"):
        layer(x, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="1-D int tensor"):
        layer(x, cu_seqlens=torch.tensor([0.0, 10.0]))
    with pytest.raises(ValueError, match=r"packed x must have shape \(T, C\)"):
        layer(x.unsqueeze(0), cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="do not combine it with key_padding_mask"):
        layer(x, cu_seqlens=torch.tensor([0, 10]), key_padding_mask=torch.zeros(1, 10, dtype=torch.bool))
