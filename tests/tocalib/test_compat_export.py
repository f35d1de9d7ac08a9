"""Drop-in use where nn.MultiheadAttention is expected, and export with a dynamic sequence length."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from tocalib import ToCaAttention, ToCaMultiheadAttention


def test_same_call_and_return_convention_as_multihead_attention():
    torch.manual_seed(0)
    mha = ToCaMultiheadAttention(32, 4, num_clusters=6).eval()  # batch_first=False, as PyTorch's default
    x = torch.randn(11, 2, 32)  # (N, B, C)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, 7:] = True
    out, weights = mha(x, x, x, key_padding_mask=pad)
    assert out.shape == (11, 2, 32) and weights.shape == (2, 11, 6)
    expected = mha.toca(x.transpose(0, 1), key_padding_mask=pad).transpose(0, 1)
    torch.testing.assert_close(out, expected)
    _, per_head = mha(x, x, x, key_padding_mask=pad, average_attn_weights=False)
    torch.testing.assert_close(per_head.mean(1), weights)
    assert mha(x, x, x, need_weights=False)[1] is None
    additive = torch.zeros(2, 11).masked_fill(pad, float("-inf"))
    torch.testing.assert_close(mha(x, x, x, key_padding_mask=additive)[0], out)


def test_cross_attention_when_query_and_key_differ():
    torch.manual_seed(0)
    mha = ToCaMultiheadAttention(32, 4, batch_first=True, num_clusters=6).eval()
    query, memory = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    out, weights = mha(query, memory, memory)
    torch.testing.assert_close(out, mha.toca(query, context=memory))
    assert weights.shape == (2, 5, 6)


@pytest.mark.parametrize("train", [False, True])
def test_replaces_self_attn_inside_pytorchs_encoder_layer(train):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    layer.self_attn = ToCaMultiheadAttention(32, 4, batch_first=True, num_clusters=6)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).train(train)
    x = torch.randn(3, 20, 32)
    pad = torch.arange(20).expand(3, -1) >= torch.tensor([[20], [12], [4]])
    y = encoder(x, src_key_padding_mask=pad)
    assert y.shape == x.shape and torch.isfinite(y).all()
    alone = encoder(x[2:, :4])  # the 4-token sequence without its padding gives the same outputs
    torch.testing.assert_close(y[2:, :4], alone, atol=1e-5, rtol=1e-5)


def test_a_causal_layer_takes_the_causal_mask_that_decoders_pass():
    torch.manual_seed(0)
    mha = ToCaMultiheadAttention(32, 4, batch_first=True, num_clusters=6, causal=True).eval()
    x = torch.randn(2, 7, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(7)
    out, _ = mha(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    torch.testing.assert_close(out, mha.toca(x))
    torch.testing.assert_close(mha(x, x, x, attn_mask=mask.isinf(), need_weights=False)[0], out)


def test_what_toca_cannot_do_is_refused_clearly():
    x = torch.randn(2, 7, 32)
    mha = ToCaMultiheadAttention(32, 4, batch_first=True, num_clusters=6)
    with pytest.raises(ValueError, match="same tensor as key and value"):
        mha(x, x, x.clone())
    with pytest.raises(ValueError, match=r"causal=True\)"):
        mha(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(7))
    causal = ToCaMultiheadAttention(32, 4, batch_first=True, num_clusters=6, causal=True)
    with pytest.raises(ValueError, match=r"the only attn_mask ToCa takes is the \(7, 7\) causal mask"):
        causal(x, x, x, attn_mask=torch.zeros(7, 7, dtype=torch.bool))


def test_importing_the_compat_layer_imports_no_other_attention_library():
    assert ToCaMultiheadAttention.__module__ == "tocalib.compat"
    assert not {"x_transformers", "timm", "transformers", "xformers"} & set(__import__("sys").modules)


def _seq_layer(**kw) -> ToCaAttention:
    torch.manual_seed(0)
    return ToCaAttention(32, 4, 8, clustering="mlp", **kw).eval()


def test_torch_compile_fullgraph_with_a_dynamic_sequence_length():
    torch._dynamo.reset()
    layer = _seq_layer()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for n in (17, 40):
        x = torch.randn(2, n, 32)
        torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-5)


def test_torch_export_with_a_dynamic_sequence_length_and_padding_mask():
    layer = _seq_layer()
    n = torch.export.Dim("n", min=2, max=4096)
    x, pad = torch.randn(2, 16, 32), torch.zeros(2, 16, dtype=torch.bool)
    program = torch.export.export(
        layer, (x,), {"key_padding_mask": pad}, dynamic_shapes={"x": {1: n}, "key_padding_mask": {1: n}}
    )
    for length in (5, 33):
        x = torch.randn(2, length, 32)
        pad = torch.arange(length).expand(2, -1) >= torch.tensor([[length], [3]])
        expected = layer(x, key_padding_mask=pad)
        torch.testing.assert_close(program.module()(x, key_padding_mask=pad), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings(
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"
)  # torch.onnx's own
def test_onnx_export_runs_in_onnxruntime_at_other_lengths(optional_module):
    for module in ("onnx", "onnxscript"):
        optional_module(module, "ONNX export needs the export extra: pip install tocalib[export]")
    onnxruntime = optional_module("onnxruntime", "ONNX export needs the export extra: pip install tocalib[export]")
    layer = _seq_layer()
    n = torch.export.Dim("n", min=2, max=4096)
    program = torch.onnx.export(layer, (torch.randn(2, 16, 32),), dynamo=True, dynamic_shapes={"x": {1: n}})
    buffer = io.BytesIO()
    program.save(buffer)
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for length in (7, 50):
        x = torch.randn(2, length, 32)
        (out,) = session.run(None, {name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), layer(x), atol=1e-4, rtol=1e-4)
