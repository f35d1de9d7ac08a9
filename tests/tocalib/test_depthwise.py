"""The depthwise conv with the fast backward pass: the same values and gradients as ``nn.Conv2d`` (double backward
included), taken only where it applies, and the clustering functions built on it equal their module path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from tocalib import ToCaAttention
from tocalib._depthwise import BATCH_MIN_TAPS, _DepthwiseConv2d, depthwise_conv2d
from tocalib.clustering import Conv1dClustering, Conv2dClustering


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 6),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    kernel=st.sampled_from([1, 3, 5, 7]),
    data=st.data(),
)
def test_values_and_gradients_equal_nn_conv2d(batch, channels, height, width, kernel, data) -> None:
    padding = (data.draw(st.integers(0, kernel - 1)), data.draw(st.integers(0, kernel - 1)))
    assume(height + 2 * padding[0] >= kernel and width + 2 * padding[1] >= kernel)
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, kernel, padding=padding, groups=channels, dtype=torch.float64)
    x = torch.randn(batch, channels, height, width, dtype=torch.float64, requires_grad=True)
    y, reference = depthwise_conv2d(x, conv), conv(x)
    fast = batch == 1 or kernel * kernel >= BATCH_MIN_TAPS  # PyTorch's is faster on batches with small kernels
    assert type(y.grad_fn).__name__ == ("_DepthwiseConv2dBackward" if fast else "ConvolutionBackward0")
    y = y if fast else _DepthwiseConv2d.apply(x, conv.weight, conv.bias, padding)  # which holds for any batch
    torch.testing.assert_close(y, reference, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, conv.weight, conv.bias), grad)
    theirs = torch.autograd.grad(reference, (x, conv.weight, conv.bias), grad)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_a_batch_with_a_wide_non_square_kernel_and_an_expanded_gradient(memory_format: torch.memory_format) -> None:
    """A batch takes the path for 49 taps and more (here 5 × 11); ``sum().backward()`` hands it a stride-0 gradient."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, (5, 11), padding=(1, 4), groups=4, dtype=torch.float64)
    x = torch.randn(3, 4, 7, 12, dtype=torch.float64).to(memory_format=memory_format).requires_grad_()
    y = depthwise_conv2d(x, conv)
    assert type(y.grad_fn).__name__ == "_DepthwiseConv2dBackward"
    ours = torch.autograd.grad(y.sum(), (x, conv.weight, conv.bias))
    theirs = torch.autograd.grad(conv(x).sum(), (x, conv.weight, conv.bias))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_double_backward_is_exact(memory_format: torch.memory_format) -> None:
    """Also from channels-last memory (the tokens' layout), which the backward convolves as it is."""
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64).to(memory_format=memory_format).requires_grad_()
    weight = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for padding in ((1, 1), (0, 2)):
        function = lambda x, w, b, p=padding: _DepthwiseConv2d.apply(x, w, b, p)  # noqa: E731
        assert torch.autograd.gradcheck(function, (x, weight, bias))
        assert torch.autograd.gradgradcheck(function, (x, weight, bias))


def test_the_plain_conv_runs_where_the_fast_path_does_not_apply() -> None:
    """No grad, a frozen weight, the meta device, tracing, a batch with a kernel under 49 taps, no image at all, an
    unbatched map, a stride or a non-depthwise conv: the module itself."""
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    assert type(depthwise_conv2d(x, conv).grad_fn).__name__ == "_DepthwiseConv2dBackward"
    with torch.no_grad():
        assert depthwise_conv2d(x, conv).grad_fn is None
    conv.weight.requires_grad_(False)
    assert type(depthwise_conv2d(x, conv).grad_fn).__name__ == "ConvolutionBackward0"
    conv.weight.requires_grad_(True)
    with torch.device("meta"):  # shapes only (the counting of Mask R-CNN's heads): the module, no device error
        meta_conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        assert depthwise_conv2d(torch.empty(1, 4, 8, 8), meta_conv).shape == (1, 4, 8, 8)

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return depthwise_conv2d(t, self.conv)

    with pytest.warns(DeprecationWarning):  # torch.jit.trace is how fvcore counts MACs
        traced = torch.jit.trace(Wrapped(), (x,))
    graph = str(traced.inlined_graph)
    assert "aten::_convolution" in graph and "PythonOp" not in graph
    assert type(depthwise_conv2d(x.expand(2, -1, -1, -1), conv).grad_fn).__name__ == "ConvolutionBackward0"
    wide = nn.Conv2d(4, 4, 7, padding=3, groups=4)  # a batch with a 7×7 kernel takes the fast path
    assert type(depthwise_conv2d(x.expand(2, -1, -1, -1), wide).grad_fn).__name__ == "_DepthwiseConv2dBackward"
    assert type(depthwise_conv2d(x[:0], wide).grad_fn).__name__ == "ConvolutionBackward0"  # no image at all
    unbatched = depthwise_conv2d(x[0], wide)  # (C, H, W): the module's own unbatched path
    assert type(unbatched.grad_fn).__name__ == "SqueezeBackward1" and torch.equal(unbatched, wide(x[0]))
    for other in (
        nn.Conv2d(4, 4, 3, stride=2, groups=4),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=3, groups=4),
    ):
        assert type(depthwise_conv2d(x, other).grad_fn).__name__ == "ConvolutionBackward0"


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kind", [Conv2dClustering, Conv1dClustering])
def test_conv_clustering_equals_its_modules(kind, batch: int) -> None:
    """The fast path (token layout, linear 1×1s, the depthwise backward) gives the modules' logits and gradients
    (fp64: to rounding)."""
    torch.manual_seed(0)
    clustering = kind(12, 5, dtype=torch.float64)
    x = torch.randn(batch, 6 * 7, 12, dtype=torch.float64, requires_grad=True)
    logits = clustering(x, size=(6, 7))
    tokens = x.transpose(1, 2)
    grid = tokens.reshape(batch, 12, 6, 7) if kind is Conv2dClustering else tokens
    reference = clustering.clustering(grid).flatten(2)
    torch.testing.assert_close(logits, reference, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(logits)
    params = [x, *clustering.parameters()]
    for a, b in zip(
        torch.autograd.grad(logits, params, grad), torch.autograd.grad(reference, params, grad), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_mac_count_of_the_layer_is_unchanged_by_the_fast_path(optional_module) -> None:
    """fvcore traces the modules: its count equals the analytic one."""
    optional_module("fvcore", "MAC counting")
    from tocalib.flops import mac_analysis

    layer = ToCaAttention(32, 2, 10, "conv2d")
    x = torch.randn(1, 64, 32)

    class Grid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.layer(t, size=(8, 8))

    assert mac_analysis(Grid(), x).total() == layer.macs(64)


def test_autocast_takes_the_plain_conv() -> None:
    """Under CPU autocast the conv runs in bf16 on fp32 weights; the plain conv handles the dtypes both ways."""
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = depthwise_conv2d(x, conv)
    assert type(y.grad_fn).__name__ != "_DepthwiseConv2dBackward"
    y.float().sum().backward()
    assert conv.weight.grad is not None and x.grad is not None


def test_torch_func_transforms_and_forward_mode() -> None:
    """torch.func's grad, jvp, vmap and jacrev, and forward-mode dual numbers, through the fast path: the plain
    conv's results (fp64)."""
    from torch.func import grad, jacrev, jvp, vmap

    torch.manual_seed(0)
    weight = torch.randn(3, 1, 3, 3, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64)
    ours = lambda x, w, b: _DepthwiseConv2d.apply(x, w, b, (1, 1))  # noqa: E731
    theirs = lambda x, w, b: torch.nn.functional.conv2d(x, w, b, padding=1, groups=3)  # noqa: E731
    for argnums in (0, 1, 2):
        a = grad(lambda *t: ours(*t).square().sum(), argnums=argnums)(x, weight, bias)
        b = grad(lambda *t: theirs(*t).square().sum(), argnums=argnums)(x, weight, bias)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    tangents = (torch.randn_like(x), torch.randn_like(weight), torch.randn_like(bias))
    for mask in ((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)):
        tangent = tuple(t * m for t, m in zip(tangents, mask, strict=True))
        a, b = jvp(ours, (x, weight, bias), tangent)[1], jvp(theirs, (x, weight, bias), tangent)[1]
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    images = torch.randn(4, 1, 3, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(
        vmap(lambda t: ours(t, weight, bias))(images), vmap(lambda t: theirs(t, weight, bias))(images)
    )
    torch.testing.assert_close(jacrev(ours)(x, weight, bias), jacrev(theirs)(x, weight, bias), rtol=1e-12, atol=1e-12)
    tokens = torch.randn(1, 20, 3, dtype=torch.float64)  # the clustering's layout: a channels-last view of tokens

    def on_tokens(conv2d):
        return lambda t, w: (
            conv2d(t.view(1, 5, 4, 3).permute(0, 3, 1, 2), w, bias).permute(0, 2, 3, 1).reshape(1, 20, 3)
        )

    a = jacrev(on_tokens(ours), argnums=(0, 1))(tokens, weight)
    b = jacrev(on_tokens(theirs), argnums=(0, 1))(tokens, weight)
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    conv = nn.Conv2d(3, 3, 3, padding=1, groups=3, dtype=torch.float64)
    import torch.autograd.forward_ad as forward_ad

    with forward_ad.dual_level():
        y = depthwise_conv2d(forward_ad.make_dual(x, tangents[0]), conv)
        expected = torch.nn.functional.conv2d(tangents[0], conv.weight, padding=1, groups=3)
        torch.testing.assert_close(forward_ad.unpack_dual(y).tangent, expected, rtol=1e-12, atol=1e-12)
