"""torch.compile, torch.export and ONNX export with a dynamic sequence length (the drop-in: test_compat.py)."""

from __future__ import annotations

import io

import pytest
import torch

from tocalib import ToCaAttention


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


class _Grid(torch.nn.Module):
    """A feature map through conv2d ToCa, its size taken from the input as PaCa-ViT does."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = ToCaAttention(16, 2, 4, clustering="conv2d")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        _, _, h, w = image.shape
        return self.attn(image.flatten(2).transpose(1, 2), size=(h, w))


def test_torch_export_with_a_dynamic_grid_keeps_the_size_symbolic():
    torch.manual_seed(0)
    model = _Grid().eval()
    h, w = torch.export.Dim("h", min=4, max=64), torch.export.Dim("w", min=4, max=64)
    program = torch.export.export(model, (torch.randn(1, 16, 8, 8),), dynamic_shapes={"image": {2: h, 3: w}})
    image = torch.randn(1, 16, 6, 10)
    torch.testing.assert_close(program.module()(image), model(image), atol=1e-5, rtol=1e-5)


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
