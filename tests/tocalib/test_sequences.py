"""ToCa for sequences: what a causal layer refuses, cross-attention and packed variable-length batches
(the causal computation itself: test_causal.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tocalib import Assignment, ToCaAttention
from tocalib.flops import count_macs


def test_causal_layer_refuses_what_would_leak_or_is_undefined():
    with pytest.raises(ValueError, match=r"causal=True needs .* got 'conv2d'"):
        ToCaAttention(16, 2, 4, clustering="conv2d", causal=True)
    with pytest.raises(ValueError, match=r"clustering_kwargs=\{'causal': True\}"):
        ToCaAttention(16, 2, 4, clustering="conv1d", causal=True)
    with pytest.raises(ValueError, match="causal=True needs"):
        ToCaAttention(16, 2, 4, clustering="hard", causal=True)
    layer = ToCaAttention(16, 2, 4, causal=True)
    with pytest.raises(ValueError, match="takes logits, not a normalised matrix"):
        layer(torch.randn(1, 5, 16), assignment=torch.rand(1, 4, 5))
    with pytest.raises(ValueError, match="a causal layer got a soft Assignment"):
        layer(torch.randn(1, 5, 16), assignment=Assignment.from_logits(torch.randn(1, 4, 5)))
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
    clusters = layer.cluster_norm(record.assignment.dense() @ ctx)
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
    packed_out, packed = layer(torch.cat(seqs), cu_seqlens=cu_seqlens, return_intermediates=True)
    assert packed_out.shape == (sum(lengths), 16)
    for s, (seq, start) in enumerate(zip(seqs, cu_seqlens.tolist(), strict=False)):
        if len(seq):
            alone, record = layer(seq.unsqueeze(0), return_intermediates=True)
            torch.testing.assert_close(packed_out[start : start + len(seq)], alone[0], atol=1e-5, rtol=1e-5)
            expected = record.assignment.dense()[0]
            torch.testing.assert_close(packed.assignment.dense()[s, :, : len(seq)], expected, atol=1e-6, rtol=1e-5)


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


def test_full_cross_attention_over_an_all_padded_context_attends_to_all_of_it():
    """A query with no allowed key would get NaN; every query attends to the whole (zeroed) context instead,
    so every query gets the same output, for more queries than keys too."""
    layer = ToCaAttention(16, 2, 0).eval()
    x, ctx = torch.randn(1, 5, 16), torch.randn(1, 3, 16)
    pad = torch.ones(1, 3, dtype=torch.bool)
    y, record = layer(x, context=ctx, key_padding_mask=pad, return_intermediates=True, need_weights=True)
    torch.testing.assert_close(y, y[:, :1].expand_as(y))
    torch.testing.assert_close(record.attn_weights, torch.full_like(record.attn_weights, 1 / 3))
