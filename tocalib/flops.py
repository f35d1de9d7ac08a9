"""MAC accounting, analytic and measured, in the paper's convention (fvcore: 1 MAC = 1 "FLOP"), and
measured peak memory (:func:`peak_bytes`).

Counted: convolutions, linear layers, matmuls, scaled dot-product attention (QKᵀ and AV), scatter-adds
(one per source element), LayerNorm (5 per element), BatchNorm and bilinear upsampling as fvcore
counts them. Not counted, by the same convention: biases, softmax, activations, element-wise
arithmetic, masking and shape operations (:data:`NOT_MACS`).

* :func:`toca_macs` is the closed form for one :class:`~tocalib.ToCaAttention` configuration.
* :func:`count_macs` traces any module with fvcore plus tocalib's handles and **raises**
  :class:`UncountedOpError` when an operator is neither counted nor declared MAC-free, so a matmul
  that fvcore does not know can never vanish from a total. Needs ``pip install tocalib[flops]``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from tocalib.attention import ToCaAttention

__all__ = ["NOT_MACS", "UncountedOpError", "count_macs", "mac_analysis", "peak_bytes", "toca_macs"]

_MAC_FREE_NAMES = (
    "__and__",
    "__or__",
    "__xor__",
    "__not__",
    "abs",
    "add",
    "add_",
    "addcmul",
    "all",
    "any",
    "amax",
    "amin",
    "argmax",
    "bitwise_not",
    "clamp",
    "clamp_min",
    "clamp_max",
    "cos",
    "cumsum",
    "diagonal",
    "div",
    "div_",
    "dropout",
    "embedding",
    "empty_like",
    "eq",
    "exp",
    "exp_",
    "feature_dropout",
    "fill_",
    "ge",
    "gelu",
    "gt",
    "hardtanh",
    "le",
    "log",
    "log_softmax",
    "logaddexp",
    "logcumsumexp",
    "logsumexp",
    "logical_and",
    "logical_not",
    "logical_or",
    "lt",
    "max",
    "maximum",
    "mean",
    "min",
    "minimum",
    "mul",
    "mul_",
    "ne",
    "neg",
    "one_hot",
    "pow",
    "reciprocal",
    "relu",
    "relu_",
    "rsqrt",
    "sigmoid",
    "silu",
    "sin",
    "softmax",
    "sqrt",
    "square",
    "sub",
    "sum",
    "tanh",
    "tril",
    "triu",
    "cummax",
    "isinf",
    "pad",
    "unflatten",
    "where",
    "zeros_like",
    "ones_like",
    "full_like",
)
NOT_MACS: frozenset[str] = frozenset(f"aten::{name}" for name in _MAC_FREE_NAMES)
"""Operators that do no multiply-accumulate in the paper's convention (element-wise, activations,
softmax, reductions, comparisons, shape): traced, then deliberately left uncounted."""


class UncountedOpError(RuntimeError):
    """A traced operator has no MAC handle and is not declared MAC-free."""


def _shape(value: Any) -> list[int]:
    return value.type().sizes()


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::scaled_dot_product_attention``: QKᵀ (L·S·E) plus AV (L·S·Ev) per batch-head; with
    ``is_causal`` only the (query, key) pairs the causal mask keeps, Σ_t min(t + 1, S), as a causal
    kernel computes them."""
    q, k, v = (_shape(t) for t in inputs[:3])
    batch = math.prod(q[:-2])
    causal = len(inputs) > 5 and inputs[5].toIValue() is True
    queries, keys = q[-2], k[-2]
    pairs = sum(min(t + 1, keys) for t in range(queries)) if causal else queries * keys
    return batch * pairs * (q[-1] + v[-1])


def _matmul_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::matmul``, also with ``out=`` (fvcore's own handle takes exactly two inputs) and broadcast
    batch dimensions: batch · n · k · m multiply-accumulates."""
    a, b = (_shape(t) for t in inputs[:2])
    if len(b) == 1:  # (..., n, k) @ (k,), or (k,) @ (k,)
        return math.prod(a)
    if len(a) == 1:  # (k,) @ (..., k, m)
        return math.prod(b)
    batch = math.prod(torch.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])))
    return batch * a[-2] * a[-1] * b[-1]


def _einsum_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """Exact ``aten::einsum`` of two operands: the product of the sizes of all distinct indices
    (fvcore's own handle estimates it through numpy's contraction path and can be off)."""
    equation = inputs[0].toIValue().replace(" ", "")
    operands = inputs[1].node().inputs()
    terms = equation.split("->")[0].split(",")
    if len(terms) != 2 or "." in equation:
        raise UncountedOpError(f"einsum {equation!r}: only two-operand einsums without '...' have a MAC handle")
    sizes: dict[str, int] = {}
    for term, operand in zip(terms, operands, strict=True):
        sizes.update(zip(term, _shape(operand), strict=True))
    return math.prod(sizes.values())


def _convolution_mode_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::_convolution_mode`` (a conv with ``padding="same"``/``"valid"``, which fvcore does not
    count): one MAC per output element and weight entry of its group, like any convolution."""
    return math.prod(_shape(outputs[0])) * math.prod(_shape(inputs[1])[1:])


def _scatter_add_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """``index_add``/``scatter_add`` (self, dim, index, source): one accumulate per source element."""
    return math.prod(_shape(inputs[3]))


_HANDLES = {
    "aten::scaled_dot_product_attention": _sdpa_macs,
    "aten::matmul": _matmul_macs,
    "aten::einsum": _einsum_macs,
    "aten::_convolution_mode": _convolution_mode_macs,
    "aten::index_add": _scatter_add_macs,
    "aten::index_add_": _scatter_add_macs,
    "aten::scatter_add": _scatter_add_macs,
    "aten::scatter_add_": _scatter_add_macs,
}


class _Call(nn.Module):
    """Binds keyword arguments so that fvcore, which passes positional inputs only, can trace, and returns
    the tensors of the output (the tracer takes no records such as :class:`~tocalib.ToCaIntermediates`)."""

    def __init__(self, module: nn.Module, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.module = module
        # the tracer bakes keyword arguments in as constants, which it refuses for tensors that require grad
        self.kwargs = {k: v.detach() if callable(getattr(v, "detach", None)) else v for k, v in kwargs.items()}

    def forward(self, *args: Any) -> tuple[torch.Tensor, ...]:
        return tuple(_tensors(self.module(*args, **self.kwargs)))


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    """Every tensor in ``value``: itself, or inside tuples, lists, dicts and dataclasses, in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _tensors(getattr(value, field.name))


def mac_analysis(
    module: nn.Module,
    *args: Any,
    not_macs: Iterable[str] = (),
    handles: Mapping[str, Callable[[list[Any], list[Any]], Any]] | None = None,
    **kwargs: Any,
) -> Any:
    """An fvcore ``FlopCountAnalysis`` of ``module(*args, **kwargs)`` with tocalib's handles.

    The module is traced as it is (call ``.eval()`` first for inference counts). Module names in
    ``by_module()`` carry a leading ``module.``. ``handles`` add or replace fvcore handles (op name →
    ``handle(inputs, outputs)``), e.g. to count an operator in another tool's convention. Raises
    :class:`UncountedOpError` if any traced operator is neither counted nor in :data:`NOT_MACS` ∪ ``not_macs``.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
            from fvcore.nn import FlopCountAnalysis
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("measured MAC counts need fvcore: `pip install tocalib[flops]`") from err
    analysis = FlopCountAnalysis(_Call(module, kwargs), tuple(args)).set_op_handle(**_HANDLES, **(handles or {}))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    analysis.total()
    ignored = NOT_MACS | frozenset(not_macs)
    missing = {op: n for op, n in analysis.unsupported_ops().items() if op not in ignored}
    if missing:
        raise UncountedOpError(
            f"these traced operators have no MAC handle and are not declared MAC-free: {missing}; "
            "register a handle with analysis.set_op_handle, or pass not_macs=[...] if they do no MACs"
        )
    return analysis


def count_macs(
    module: nn.Module,
    *args: Any,
    not_macs: Iterable[str] = (),
    handles: Mapping[str, Callable[[list[Any], list[Any]], Any]] | None = None,
    **kwargs: Any,
) -> int:
    """Measured MACs of ``module(*args, **kwargs)`` (fvcore plus tocalib's handles) for the whole batch, e.g.
    ``count_macs(model.eval(), torch.ones(1, 3, 224, 224))`` (the ``macs(N)`` methods count one sequence).
    See :func:`mac_analysis`."""
    return int(mac_analysis(module, *args, not_macs=not_macs, handles=handles, **kwargs).total())


def toca_macs(
    num_tokens: int,
    dim: int,
    num_heads: int,
    num_clusters: int,
    clustering: str | None = "mlp",
    *,
    cluster_norm: bool = True,
    batch_size: int = 1,
    clustering_kwargs: dict[str, Any] | None = None,
    causal: bool = False,
    chunk_size: int = 64,
) -> int:
    """Closed-form MACs of a :class:`~tocalib.ToCaAttention` forward pass on ``batch_size``
    sequences of ``num_tokens`` tokens. ``clustering=None`` means the assignment is given (a block
    that reuses an earlier one); ``num_clusters=0`` is full self-attention; ``causal`` and
    ``chunk_size`` as in the layer.

    >>> toca_macs(3136, 96, 2, 100, "conv2d")
    223769472
    """
    layer = ToCaAttention(
        dim, num_heads, num_clusters, clustering, cluster_norm=cluster_norm, clustering_kwargs=clustering_kwargs,
        causal=causal, chunk_size=chunk_size, device="meta",
    )  # fmt: skip
    return batch_size * layer.macs(num_tokens)


def peak_bytes(call: Callable[[], Any]) -> int:
    """High-water mark of the CPU allocations made during ``call()``, in bytes above the level before it
    (from ``torch.profiler``'s memory events), e.g. the peak memory of one training step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak
