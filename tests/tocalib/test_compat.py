"""ToCaMultiheadAttention: nn.MultiheadAttention's constructor, state, calls and containers."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from tocalib import ToCaAttention, ToCaMultiheadAttention

NESTED_WARNING = r"ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning"  # PyTorch's own
LARGE_NEGATIVE = {"-inf": float("-inf"), "-1e9": -1e9, "finfo.min": torch.finfo(torch.float32).min}


def twins(**kwargs: object) -> tuple[nn.MultiheadAttention, ToCaMultiheadAttention]:
    """A random nn.MultiheadAttention and a ToCaMultiheadAttention(num_clusters=0) that loaded its weights."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(**kwargs).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_(0, 0.3)
    ours = ToCaMultiheadAttention(**kwargs, num_clusters=0).eval()
    ours.load_state_dict(mha.state_dict())
    return mha, ours


@st.composite
def mha_calls(draw: st.DrawFn) -> dict:
    """A random nn.MultiheadAttention configuration and a call of it."""
    heads = draw(st.sampled_from([1, 2, 4]))
    e = heads * draw(st.sampled_from([2, 4]))
    kdim, vdim = draw(st.sampled_from([(None, None), (e + 3, e - 1), (e, e + 2)]))
    batch_first, batched = draw(st.booleans()), draw(st.booleans())
    n, s, b = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 3))
    self_attention = kdim is None and draw(st.booleans())
    s = n if self_attention else s
    config = {
        "embed_dim": e, "num_heads": heads, "bias": draw(st.booleans()), "add_bias_kv": draw(st.booleans()),
        "add_zero_attn": draw(st.booleans()), "kdim": kdim, "vdim": vdim, "batch_first": batch_first,
    }  # fmt: skip
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def tokens(n: int, width: int) -> Tensor:
        shape = ((b, n) if batch_first else (n, b)) if batched else (n,)
        return torch.randn(*shape, width, generator=gen)

    query = tokens(n, e)
    key = query if self_attention else tokens(s, kdim or e)
    value = key if self_attention or (kdim == vdim and draw(st.booleans())) else tokens(s, vdim or e)
    padding = torch.rand(b, s, generator=gen) < 0.3
    padding[:, 0] = False  # PyTorch gives NaN rows for all-padded keys; ToCa's drop-in keeps that behaviour
    kind = draw(st.sampled_from(["none", "bool", "-inf", "-1e9", "finfo.min", "additive"]))
    kpm = None
    if kind == "bool":
        kpm = padding
    elif kind == "additive":
        kpm = torch.randn(b, s, generator=gen)
    elif kind != "none":
        kpm = torch.zeros(b, s).masked_fill(padding, LARGE_NEGATIVE[kind])
    if kpm is not None and not batched:
        kpm = kpm[0]
    mask_kind = draw(st.sampled_from(["none", "bool2d", "float2d", "float3d", "causal"]))
    attn_mask, is_causal = None, False
    if mask_kind == "bool2d":
        attn_mask = torch.rand(n, s, generator=gen) < 0.3
        attn_mask[:, 0] = False
    elif mask_kind == "float2d":
        attn_mask = torch.randn(n, s, generator=gen)
    elif mask_kind == "float3d":
        attn_mask = torch.randn((b if batched else 1) * heads, n, s, generator=gen)
    elif mask_kind == "causal" and n == s:
        attn_mask, is_causal = nn.Transformer.generate_square_subsequent_mask(n), draw(st.booleans())
    call = {
        "key_padding_mask": kpm, "need_weights": draw(st.booleans()), "attn_mask": attn_mask,
        "average_attn_weights": draw(st.booleans()), "is_causal": is_causal,
    }  # fmt: skip
    return {"config": config, "inputs": (query, key, value), "call": call}


@pytest.mark.filterwarnings(r"ignore:Support for mismatched key_padding_mask and attn_mask:UserWarning")  # PyTorch's
@settings(max_examples=60)
@given(case=mha_calls())
def test_with_no_clusters_it_is_nn_multihead_attention(case):
    mha, ours = twins(**case["config"])
    try:
        expected, expected_weights = mha(*case["inputs"], **case["call"])
    except (RuntimeError, AssertionError) as refused:  # a combination PyTorch itself refuses: so do we
        with pytest.raises(type(refused)):
            ours(*case["inputs"], **case["call"])
        return
    out, weights = ours(*case["inputs"], **case["call"])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, equal_nan=True)
    if expected_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, expected_weights, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("kdim", [None, 12])
@pytest.mark.parametrize("add_bias_kv", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_the_state_and_attributes_are_those_of_nn_multihead_attention(kdim, add_bias_kv, bias):
    config = {"embed_dim": 16, "num_heads": 4, "kdim": kdim, "vdim": kdim, "add_bias_kv": add_bias_kv, "bias": bias}
    mha = nn.MultiheadAttention(**config)
    for clusters in (0, 5):
        ours = ToCaMultiheadAttention(**config, num_clusters=clusters)
        assert isinstance(ours, nn.MultiheadAttention)
        theirs = {k: tuple(v.shape) for k, v in mha.state_dict().items()}
        mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        extra = {k for k in mine if k.startswith(("clustering.", "cluster_norm."))}
        assert (len(extra) > 0) == (clusters > 0) and {k: v for k, v in mine.items() if k not in extra} == theirs
        for name in ("embed_dim", "num_heads", "head_dim", "dropout", "batch_first", "_qkv_same_embed_dim", "kdim"):
            assert getattr(ours, name) == getattr(mha, name), name
        assert (ours.in_proj_bias is None) == (not bias) and (ours.bias_k is None) == (not add_bias_kv)
    mha.load_state_dict(ToCaMultiheadAttention(**config, num_clusters=0).state_dict())  # and back


def test_factory_kwargs_are_honoured():
    layer = ToCaMultiheadAttention(16, 4, num_clusters=5, dtype=torch.float64)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    meta = ToCaMultiheadAttention(16, 4, num_clusters=5, device="meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    core = ToCaAttention(16, 4, 5, clustering="conv1d", device="meta", dtype=torch.float16)
    assert {(p.device.type, p.dtype) for p in core.parameters()} == {("meta", torch.float16)}


def test_a_trained_mha_converts_to_toca_with_only_the_clusters_fresh():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    toca = ToCaMultiheadAttention.from_mha(mha, num_clusters=5)
    assert toca.num_clusters == 5 and toca.batch_first
    torch.testing.assert_close(toca.in_proj_weight, mha.in_proj_weight)
    missing, unexpected = ToCaMultiheadAttention(16, 4, num_clusters=5).load_state_dict(mha.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith(("clustering.", "cluster_norm.")) for k in missing)
    plain = ToCaMultiheadAttention.from_mha(mha.eval(), num_clusters=0)
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(plain(x, x, x)[0], mha(x, x, x)[0])


def toca_twin(layer: ToCaMultiheadAttention) -> ToCaAttention:
    """The core layer with the drop-in's weights."""
    core = ToCaAttention(
        layer.embed_dim, layer.num_heads, layer.num_clusters, layer.clustering, causal=layer.causal,
        norm_eps=layer.cluster_norm.eps,
    ).eval()  # fmt: skip
    q, k, v = layer.in_proj_weight.chunk(3)
    bq, bk, bv = layer.in_proj_bias.chunk(3)
    with torch.no_grad():
        for linear, w, bias in ((core.q, q, bq), (core.k, k, bk), (core.v, v, bv)):
            linear.weight.copy_(w)
            linear.bias.copy_(bias)
        core.proj.load_state_dict(layer.out_proj.state_dict())
        core.cluster_norm.load_state_dict(layer.cluster_norm.state_dict())
    return core


def test_with_clusters_it_is_toca_with_the_mha_weights():
    torch.manual_seed(0)
    layer = ToCaMultiheadAttention(16, 4, num_clusters=5, batch_first=True).eval()
    core = toca_twin(layer)
    x, memory = torch.randn(2, 9, 16), torch.randn(2, 13, 16)
    torch.testing.assert_close(layer(x, x, x)[0], core(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x, memory, memory)[0], core(x, context=memory), atol=1e-5, rtol=1e-5)
    causal, _ = layer(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(9), need_weights=False)
    core.causal = True
    torch.testing.assert_close(causal, core(x), atol=1e-5, rtol=1e-5)


def test_with_clusters_large_negative_float_masks_all_mean_padding_and_int_masks_raise():
    torch.manual_seed(0)
    layer = ToCaMultiheadAttention(16, 4, num_clusters=5, batch_first=True).eval()
    x = torch.randn(2, 9, 16)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 5:] = True
    expected, weights = layer(x, x, x, key_padding_mask=pad)
    for value in LARGE_NEGATIVE.values():
        out, _ = layer(x, x, x, key_padding_mask=torch.zeros(2, 9).masked_fill(pad, value))
        torch.testing.assert_close(out, expected)
    garbage = torch.cat([x[1:, :5], 100 * torch.randn(1, 4, 16)], dim=1)  # what padding holds never matters
    padded, _ = layer(x[:1], garbage, garbage, key_padding_mask=pad[1:])
    torch.testing.assert_close(padded, layer(x[:1], x[1:, :5], x[1:, :5])[0])
    with pytest.raises(AssertionError, match="only bool and floating types of key_padding_mask are supported"):
        layer(x, x, x, key_padding_mask=pad.int())
    biased, _ = layer(x, x, x, key_padding_mask=torch.randn(2, 9))  # a float mask shifts the clustering logits
    assert not torch.allclose(biased, layer(x, x, x)[0]) and weights.shape == (2, 9, 5)


def test_with_clusters_separate_values_are_pooled_with_the_keys_assignment():
    torch.manual_seed(0)
    layer = ToCaMultiheadAttention(16, 4, num_clusters=5, kdim=12, vdim=10, batch_first=True).eval()
    query, key, value = torch.randn(2, 7, 16), torch.randn(2, 11, 12), torch.randn(2, 11, 10)
    out, weights = layer(query, key, value, average_attn_weights=False)
    assignment = layer.clustering(key).softmax(-1)  # (B, M, S) from the keys
    keys, values = layer.cluster_norm(assignment @ key), layer.value_norm(assignment @ value)
    expected, _ = nn.functional.multi_head_attention_forward(
        query.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), 16, 4, None, layer.in_proj_bias, None,
        None, False, 0.0, layer.out_proj.weight, layer.out_proj.bias, training=False, use_separate_proj_weight=True,
        q_proj_weight=layer.q_proj_weight, k_proj_weight=layer.k_proj_weight, v_proj_weight=layer.v_proj_weight,
    )  # fmt: skip
    torch.testing.assert_close(out, expected.transpose(0, 1))
    assert weights.shape == (2, 4, 7, 5)


@pytest.mark.parametrize(
    ("add_bias_kv", "add_zero_attn", "entries"), [(True, False, 6), (False, True, 6), (True, True, 7)]
)
def test_with_clusters_bias_kv_and_zero_attn_add_entries_to_the_clusters(add_bias_kv, add_zero_attn, entries):
    layer = ToCaMultiheadAttention(16, 4, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, num_clusters=5)
    x = torch.randn(9, 2, 16)
    assert layer(x, x, x)[1].shape == (2, 9, entries)
    with pytest.raises(ValueError, match="without add_bias_kv and add_zero_attn"):
        layer(x, x, x, is_causal=True)


def test_with_clusters_unbatched_inputs_and_the_causal_masks_pytorch_passes():
    torch.manual_seed(0)
    layer = ToCaMultiheadAttention(16, 4, num_clusters=5).eval()
    x = torch.randn(9, 16)  # (L, E)
    out, weights = layer(x, x, x)
    torch.testing.assert_close(out, layer(x[:, None], x[:, None], x[:, None])[0][:, 0])
    assert weights.shape == (9, 5)
    causal = [
        layer(x, x, x, is_causal=True)[0],
        layer(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(9))[0],
        layer(x, x, x, attn_mask=torch.ones(9, 9, dtype=torch.bool).triu(1))[0],
        layer(x, x, x, attn_mask=torch.zeros(4, 9, 9).masked_fill(torch.ones(9, 9).triu(1).bool(), -1e9))[0],
    ]
    for other in causal[1:]:
        torch.testing.assert_close(other, causal[0])
    prefix = x[:4]
    torch.testing.assert_close(layer(prefix, prefix, prefix, is_causal=True)[0], causal[0][:4], atol=1e-5, rtol=1e-5)


def test_with_clusters_what_toca_cannot_honour_is_refused_clearly():
    layer = ToCaMultiheadAttention(16, 4, num_clusters=5, batch_first=True)
    x, memory = torch.randn(2, 7, 16), torch.randn(2, 9, 16)
    with pytest.raises(ValueError, match="an attn_mask can only be the causal mask"):
        layer(x, x, x, attn_mask=torch.zeros(7, 7, dtype=torch.bool).fill_diagonal_(True))
    with pytest.raises(ValueError, match="an attn_mask can only be the causal mask"):
        layer(x, memory, memory, attn_mask=torch.zeros(7, 9))
    with pytest.raises(ValueError, match="causal attention is self-attention"):
        layer(x, x.clone(), x.clone(), is_causal=True)
    with pytest.raises(ValueError, match="clustering_kwargs=\\{'causal': True\\}"):
        ToCaMultiheadAttention(16, 4, num_clusters=5, clustering="conv1d")(x, x, x, is_causal=True)
    with pytest.raises(TypeError, match=r"num_clusters must be an int, got float 2\.5"):
        ToCaMultiheadAttention(16, 4, num_clusters=2.5)
    with pytest.raises(ValueError, match="num_clusters must be >= 0, got -1"):
        ToCaMultiheadAttention(16, 4, num_clusters=-1)


def test_the_drop_in_decodes_with_the_same_state():
    torch.manual_seed(0)
    for clusters in (4, 0):
        mha = ToCaMultiheadAttention(16, 2, causal=True, num_clusters=clusters).eval()
        x = torch.randn(9, 2, 16)  # (L, B, E): batch_first=False
        full, _ = mha(x, x, x, is_causal=True, need_weights=False)
        head, state = mha.step(x[:4])
        tail, _ = mha.step(x[4:], state)
        torch.testing.assert_close(torch.cat([head, tail]), full, atol=1e-5, rtol=1e-5)


# ---- PyTorch's containers -------------------------------------------------------------------------------


def encoder(clusters: int, *, swap_after: bool, layers: int = 2) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    attention = ToCaMultiheadAttention(16, 4, dropout=0.0, batch_first=True, num_clusters=clusters)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    if not swap_after:
        layer.self_attn = attention
    stack = nn.TransformerEncoder(layer, num_layers=layers)
    if swap_after:
        for block in stack.layers:
            block.self_attn = ToCaMultiheadAttention(16, 4, batch_first=True, num_clusters=clusters)
    return stack


PADDED = torch.arange(12).expand(3, -1) >= torch.tensor([[12], [7], [3]])


@pytest.mark.filterwarnings(NESTED_WARNING)
@pytest.mark.parametrize("mode", ["train", "eval", "no_grad", "inference_mode"])
@pytest.mark.parametrize("swap_after", [False, True])
@pytest.mark.parametrize("clusters", [0, 5])
def test_in_pytorchs_encoder_padding_never_matters_and_the_fast_path_equals_the_slow_one(clusters, swap_after, mode):
    stack = encoder(clusters, swap_after=swap_after).train(mode == "train")
    x = torch.randn(3, 12, 16)
    context = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}.get(mode)
    with context if context is not None else torch.enable_grad():
        y = stack(x, src_key_padding_mask=PADDED)
        alone = stack(x[2:, :3])
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = stack(x, src_key_padding_mask=PADDED)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    real = ~PADDED
    torch.testing.assert_close(y[2:, :3], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[real], slow[real], atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings(NESTED_WARNING)
def test_with_no_clusters_pytorchs_encoder_gives_what_it_gives_with_its_own_attention():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    theirs = nn.TransformerEncoder(layer, num_layers=2).eval()
    ours = nn.TransformerEncoder(layer, num_layers=2).eval()
    for block, reference in zip(ours.layers, theirs.layers, strict=True):
        block.self_attn = ToCaMultiheadAttention.from_mha(reference.self_attn, num_clusters=0)
    x = torch.randn(3, 12, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, src_key_padding_mask=PADDED), theirs(x, src_key_padding_mask=PADDED))


@pytest.mark.filterwarnings(NESTED_WARNING)
@pytest.mark.parametrize("clusters", [0, 5])
@pytest.mark.parametrize("train", [False, True])
def test_in_pytorchs_decoder_and_transformer_self_and_cross_attention_work(clusters, train):
    torch.manual_seed(0)
    model = nn.Transformer(16, 4, 1, 1, dim_feedforward=32, dropout=0.0, batch_first=True)
    model.decoder.layers[0].self_attn = ToCaMultiheadAttention(16, 4, batch_first=True, num_clusters=clusters)
    model.decoder.layers[0].multihead_attn = ToCaMultiheadAttention(16, 4, batch_first=True, num_clusters=clusters)
    model.encoder.layers[0].self_attn = ToCaMultiheadAttention(16, 4, batch_first=True, num_clusters=clusters)
    model.train(train)
    src, tgt = torch.randn(2, 10, 16), torch.randn(2, 6, 16)
    src_pad = torch.arange(10).expand(2, -1) >= torch.tensor([[10], [4]])
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    y = model(
        src, tgt, tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=src_pad, memory_key_padding_mask=src_pad
    )
    short = model(src[1:, :4], tgt[1:, :3], tgt_mask=causal[:3, :3], tgt_is_causal=True)  # no padding, fewer targets
    torch.testing.assert_close(y[1:, :3], short, atol=1e-5, rtol=1e-5)  # causal targets, padding-invariant memory
    if train:
        y.sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_importing_the_drop_in_imports_no_other_attention_library():
    assert ToCaMultiheadAttention.__module__ == "tocalib.compat"
    assert not {"x_transformers", "timm", "transformers", "xformers"} & set(sys.modules)
