"""Pluggable clustering functions: tokens → clustering logits.

The protocol is small. A clustering function is an ``nn.Module`` with

* ``num_clusters`` (int, M) and ``hard`` (bool: False for a soft assignment normalised over the
  tokens, True for a one-cluster-per-token assignment pooled by scatter);
* ``causal_safe`` (bool): the logit of token s depends on tokens ≤ s only, so the function may serve
  a causal layer;
* ``causal_lookback`` (int, for causal-safe functions): how many earlier tokens the logit of token s
  reads (0 for per-token functions, k - 1 for a causal conv of width k). A causal layer's
  :meth:`~tocalib.ToCaAttention.step` keeps that many inputs in its state;
* ``forward(x, size=None, key_padding_mask=None) -> logits`` with x (B, N, C), ``size`` the token
  layout (``(H, W)`` for 2-D grids) and logits (B, M, N). Padded tokens arrive already zeroed and
  their logits are masked afterwards, so most functions can ignore the mask;
* ``macs(num_tokens) -> int``: its multiply-accumulates for one sequence of N tokens (the fvcore
  convention: convolutions and linear layers, biases and activations not counted).

Register your own with :func:`register_clustering`; ``ToCaAttention(clustering=...)`` then accepts
its name, or pass a module instance directly.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tocalib._depthwise import depthwise_conv2d
from tocalib._registry import Registry
from tocalib.pooling import SCATTER_BACKENDS
from tocalib.validation import check_int

__all__ = [
    "Clustering",
    "Conv1dClustering",
    "Conv2dClustering",
    "HardClustering",
    "LinearClustering",
    "MlpClustering",
    "build_clustering",
    "list_clusterings",
    "register_clustering",
]

_REGISTRY = Registry("clustering")


def register_clustering(name: str) -> Callable[[type], type]:
    """Class decorator: make ``clustering=name`` build this class as ``cls(dim, num_clusters, **kw)``."""
    return _REGISTRY.register(name)


def list_clusterings() -> list[str]:
    """The registered clustering names, sorted."""
    return _REGISTRY.names()


def build_clustering(
    spec: str | nn.Module,
    dim: int,
    num_clusters: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A clustering module from a registered name, or ``spec`` itself when it is already a module.

    ``device`` and ``dtype`` are PyTorch's factory arguments; a registered class receives them when given
    (the built-in ones take them; a custom one must accept them to be built that way)."""
    if isinstance(spec, nn.Module):
        if kwargs:
            raise ValueError(f"clustering_kwargs {sorted(kwargs)} cannot apply to a module instance")
        found = getattr(spec, "num_clusters", None)
        if found != num_clusters:
            raise ValueError(
                f"clustering module has num_clusters={found!r} but the layer has num_clusters="
                f"{num_clusters}; build the module with the same M"
            )
        return spec
    return _REGISTRY.build(spec, dim, num_clusters, device=device, dtype=dtype, **kwargs)


class Clustering(nn.Module, abc.ABC):
    """The clustering protocol as a base class (see the module docstring): subclasses implement
    :meth:`forward` and :meth:`macs`."""

    hard: bool = False
    causal_safe: bool = False
    causal_lookback: int | None = None

    def __init__(self, dim: int, num_clusters: int) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, 1)
        self.num_clusters = check_int("num_clusters", num_clusters, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_clusters={self.num_clusters}"

    @abc.abstractmethod
    def forward(self, x: Tensor, size: Sequence[int] | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        """Tokens x (B, N, C), their layout ``size`` and padding → clustering logits (B, M, N)."""

    @abc.abstractmethod
    def macs(self, num_tokens: int) -> int:
        """Multiply-accumulates of one call on one sequence of ``num_tokens`` tokens."""


@register_clustering("linear")
class LinearClustering(Clustering):
    """One linear map per token: logits = W x, W (M, C), no bias."""

    causal_safe = True
    causal_lookback = 0

    def __init__(
        self, dim: int, num_clusters: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(dim, num_clusters)
        self.clustering = nn.Sequential(nn.Linear(dim, num_clusters, bias=False, device=device, dtype=dtype))

    def forward(self, x: Tensor, size: Sequence[int] | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        return self.clustering(x).transpose(1, 2)

    def macs(self, num_tokens: int) -> int:
        return num_tokens * self.dim * self.num_clusters


@register_clustering("mlp")
class MlpClustering(Clustering):
    """PaCa's ``P2CMlp``: Linear(C, hidden) → GELU → Linear(hidden, M), both with bias.

    ``hidden`` defaults to 4·C (PaCa uses the block's MLP ratio). Needs no layout, so it suits text,
    audio, time series and sets.
    """

    causal_safe = True
    causal_lookback = 0

    def __init__(
        self,
        dim: int,
        num_clusters: int,
        hidden_dim: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_clusters)
        self.hidden_dim = hidden_dim or 4 * dim
        factory = {"device": device, "dtype": dtype}
        self.clustering = nn.Sequential(
            nn.Linear(dim, self.hidden_dim, **factory), nn.GELU(), nn.Linear(self.hidden_dim, num_clusters, **factory)
        )

    def forward(self, x: Tensor, size: Sequence[int] | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        return self.clustering(x).transpose(1, 2)

    def macs(self, num_tokens: int) -> int:
        return num_tokens * self.hidden_dim * (self.dim + self.num_clusters)


class _ConvClustering(Clustering):
    """depthwise k-conv → GELU → 1×1 conv → GELU → 1×1 conv to M (no bias), over a 1-D or 2-D layout.

    Keys follow PaCa's ``P2CConv2d``: ``clustering.{0,2,4}``. Only the first conv mixes neighbours,
    so zeroed padding appended at the end of a sequence changes no real token's logits.
    """

    spatial_dims: int

    def __init__(
        self,
        dim: int,
        num_clusters: int,
        kernel_size: int = 7,
        padding: int | tuple[int, ...] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_clusters)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.kernel_size = kernel_size
        conv = partial(nn.Conv1d if self.spatial_dims == 1 else nn.Conv2d, device=device, dtype=dtype)
        self.clustering = nn.Sequential(
            conv(dim, dim, kernel_size, padding=kernel_size // 2 if padding is None else padding, groups=dim),
            nn.GELU(),
            conv(dim, dim, 1),
            nn.GELU(),
            conv(dim, num_clusters, 1, bias=False),
        )

    def macs(self, num_tokens: int) -> int:
        taps = self.kernel_size**self.spatial_dims
        return num_tokens * self.dim * (taps + self.dim + self.num_clusters)

    def _pointwise(self, mixed: Tensor) -> Tensor:
        """The depthwise conv's output as (B, N, C) tokens → (B, M, N) logits: GELU, 1×1 conv, GELU, 1×1 conv.

        The 1×1 convs run as linear maps on the token layout (their weights viewed as matrices): the same
        numbers as the convs, faster on CPUs, where PyTorch's 1×1 conv backward is an im2col path.
        """
        _, act1, pointwise, act2, out = self.clustering
        hidden = act2(F.linear(act1(mixed), pointwise.weight.flatten(1), pointwise.bias))
        logits = torch.matmul(out.weight.flatten(1), hidden.transpose(1, 2))  # (B, M, N) contiguous, for the softmax
        return logits if out.bias is None else logits + out.bias.unsqueeze(-1)


@register_clustering("conv1d")
class Conv1dClustering(_ConvClustering):
    """Convolutional clustering along a sequence (B, N, C); needs no ``size``.

    ``causal=True`` pads only on the left, so token s's logits see tokens s - k + 1 … s: the
    function may then serve a causal layer.
    """

    spatial_dims = 1

    def __init__(
        self,
        dim: int,
        num_clusters: int,
        kernel_size: int = 7,
        causal: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_clusters, kernel_size, padding=0 if causal else None, device=device, dtype=dtype)
        self.causal = self.causal_safe = causal
        self.causal_lookback = kernel_size - 1 if causal else None

    def forward(self, x: Tensor, size: Sequence[int] | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        tokens = x.transpose(1, 2)
        if self.causal:
            tokens = F.pad(tokens, (self.kernel_size - 1, 0))
        if torch.jit.is_tracing():  # the modules as they are, so that fvcore counts every MAC where it was
            return self.clustering(tokens)
        return self._pointwise(self.clustering[0](tokens).transpose(1, 2))


@register_clustering("conv2d")
class Conv2dClustering(_ConvClustering):
    """PaCa's ``P2CConv2d`` on a 2-D grid: needs ``size=(H, W)`` with H·W = N (row-major tokens)."""

    spatial_dims = 2

    def forward(self, x: Tensor, size: Sequence[int] | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        b, n, c = x.shape
        if size is None or len(size) != 2:
            raise ValueError(
                f"conv2d clustering needs the token layout size=(H, W) with H*W == N (N={n}), got "
                f"size={size!r}; pass size=(H, W), or use clustering='mlp' or 'conv1d' for sequences"
            )
        h, w = (check_int(f"size[{i}]", side, 1) for i, side in enumerate(size))
        if h * w != n:
            raise ValueError(f"size={tuple(size)} gives H*W={h * w} but x has N={n} tokens; they must match")
        if torch.jit.is_tracing():  # the modules as they are, so that fvcore counts every MAC where it was
            return self.clustering(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2)
        grid = x.unflatten(1, (h, w)).permute(0, 3, 1, 2)  # (B, C, H, W), a channels-last view: no copy
        mixed = depthwise_conv2d(grid, self.clustering[0])  # channels-last too, so back to tokens is a view
        return self._pointwise(mixed.permute(0, 2, 3, 1).flatten(1, 2))


@register_clustering("hard")
class HardClustering(Clustering):
    """Hard assignment: every token joins the cluster with its highest logit (softmax over clusters).

    The logits come from any base clustering (``base``: a registered name or a module; default
    ``"mlp"``). The layer pools each cluster as the mean of its members with a scatter, in O(N·C)
    (see :mod:`tocalib.pooling`); the straight-through rule carries gradients to the base.
    """

    hard = True

    def __init__(
        self,
        dim: int,
        num_clusters: int,
        base: str | nn.Module = "mlp",
        scatter_backend: str = "torch",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(dim, num_clusters)
        if scatter_backend not in SCATTER_BACKENDS:
            raise ValueError(f"scatter_backend must be one of {SCATTER_BACKENDS}, got {scatter_backend!r}")
        factory = {} if isinstance(base, nn.Module) else {"device": device, "dtype": dtype}
        self.base = build_clustering(base, dim, num_clusters, **factory, **base_kwargs)
        self.scatter_backend = scatter_backend

    def forward(self, x: Tensor, size: Sequence[int] | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        return self.base(x, size=size, key_padding_mask=key_padding_mask)

    def macs(self, num_tokens: int) -> int:
        return self.base.macs(num_tokens)
