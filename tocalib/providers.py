"""Assignment providers ("teachers"): small networks that compute cluster assignments for ToCa layers.

The protocol (:class:`AssignmentProvider`) is small. A provider is an ``nn.Module`` with

* ``num_clusters``: a tuple, M_g for each group g of layers it feeds (a stage of a hierarchical model,
  or a group of consecutive blocks of a :class:`~tocalib.ToCaStack`); 0 gives no assignment;
* ``causal`` (bool): the assignment of token s depends on tokens ≤ s only, and it is given as logits
  (the causal form of :class:`~tocalib.Assignment`), which every causal layer renormalises per prefix;
* ``forward(x, *, size=None, key_padding_mask=None) -> Provided``: tokens x (B, N, C) with their layout
  and padding → one :class:`~tocalib.Assignment` per group (and, for a teacher that has them, its
  per-group features and grid sizes);
* ``macs(num_tokens, size=None) -> int``: its multiply-accumulates on one sequence (fvcore's convention).

Two generic teachers are built in: :class:`Conv1dTeacher` for sequences (a dilated ConvMixer-style stack,
with a ``causal=True`` form that only looks left) and :class:`Conv2dTeacher` for grids (the ConvMixer-FPN
of PaCa-ViT: bottom-up ConvMixer levels with strided transitions, a top-down FPN, one 1×1 cluster head per
level). Register your own with :func:`register_provider`; :func:`build_provider` builds one by name.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tocalib._registry import Registry
from tocalib.pooling import Assignment
from tocalib.validation import check_int

__all__ = [
    "AssignmentProvider",
    "BlurConv2d",
    "Conv1dTeacher",
    "Conv2dTeacher",
    "ConvMixerLayer",
    "Provided",
    "build_provider",
    "list_providers",
    "register_provider",
]

_REGISTRY = Registry("provider")


def register_provider(name: str) -> Callable[[type], type]:
    """Class decorator: make ``build_provider(name, ...)`` build this class (an :class:`AssignmentProvider`)."""
    register = _REGISTRY.register(name)

    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, AssignmentProvider)):
            raise TypeError(f"a provider must subclass tocalib.AssignmentProvider, got {cls!r}")
        return register(cls)

    return decorate


def list_providers() -> list[str]:
    """The registered provider names, sorted."""
    return _REGISTRY.names()


def build_provider(
    name: str, *args: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None, **kwargs: Any
) -> AssignmentProvider:
    """The provider registered as ``name``, built with these arguments (and PyTorch's factory kwargs)."""
    return _REGISTRY.build(name, *args, device=device, dtype=dtype, **kwargs)


@dataclass
class Provided:
    """What a provider computed for one input.

    Attributes:
        assignments: one :class:`~tocalib.Assignment` per group (None where M_g = 0): (B, M_g, N_g).
        features: per group (B, N_g, C_g) features, for a teacher whose model uses them (PaCa-ViT adds
            them to its stage outputs), else None.
        sizes: per group the grid (H_g, W_g) of a 2-D teacher, else None.
    """

    assignments: list[Assignment | None]
    features: list[Tensor] | None = None
    sizes: list[tuple[int, int]] | None = None


class AssignmentProvider(nn.Module, abc.ABC):
    """The provider protocol as a base class (see the module docstring)."""

    causal: bool = False
    num_clusters: tuple[int, ...]

    @abc.abstractmethod
    def forward(
        self, x: Tensor, *, size: Sequence[int] | None = None, key_padding_mask: Tensor | None = None
    ) -> Provided:
        """Tokens x (B, N, C) → one assignment per group."""

    @abc.abstractmethod
    def macs(self, num_tokens: int, size: Sequence[int] | None = None) -> int:
        """Multiply-accumulates of one call on one sequence of ``num_tokens`` tokens (laid out as ``size``)."""


def _clusters(num_clusters: int | Sequence[int]) -> tuple[int, ...]:
    values = (num_clusters,) if isinstance(num_clusters, int) else tuple(num_clusters)
    if not values:
        raise ValueError("num_clusters needs at least one group")
    return tuple(check_int(f"num_clusters[{g}]", m, 0) for g, m in enumerate(values))


class _Mixer1d(nn.Module):
    """One ConvMixer layer on a sequence (B, N, C), token-local norms (so padding and causality hold):
    x + LN(GELU(dwconv_k,d(x))), then LN(GELU(Linear(x)))."""

    def __init__(self, dim: int, kernel_size: int, dilation: int, causal: bool, factory: dict[str, Any]) -> None:
        super().__init__()
        reach = (kernel_size - 1) * dilation
        self.pad = (reach, 0) if causal else (reach // 2, reach - reach // 2)
        self.conv = nn.Conv1d(dim, dim, kernel_size, dilation=dilation, groups=dim, **factory)
        self.norm1 = nn.LayerNorm(dim, **factory)
        self.mix = nn.Linear(dim, dim, **factory)
        self.norm2 = nn.LayerNorm(dim, **factory)

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        mixed = self.conv(F.pad(x.transpose(1, 2), self.pad)).transpose(1, 2)
        x = x + self.norm1(F.gelu(mixed))
        x = self.norm2(F.gelu(self.mix(x)))
        return x if keep is None else x * keep.unsqueeze(-1)  # padding stays zero for the next conv


@register_provider("conv1d")
class Conv1dTeacher(AssignmentProvider):
    """A lightweight CNN teacher for sequences: an input LayerNorm, then groups of dilated ConvMixer layers;
    after group g, a linear head gives its M_g cluster logits.

    Args:
        dim: token width C.
        num_clusters: M per group (an int: one group).
        depths: ConvMixer layers per group (an int applies to every group).
        kernel_size: the depthwise conv's width k (odd).
        dilation: the dilation grows by this factor from layer to layer (1, d, d², … within the teacher),
            so the receptive field grows exponentially with depth.
        causal: pad only on the left, so token s sees tokens ≤ s; the assignments are then causal (logits).
        device, dtype: PyTorch's factory kwargs.

    Padding (``key_padding_mask``) is zeroed after every layer, so padding appended at the end of a sequence
    changes no real token's assignment.
    """

    def __init__(
        self,
        dim: int,
        num_clusters: int | Sequence[int],
        depths: int | Sequence[int] = 2,
        kernel_size: int = 7,
        dilation: int = 2,
        causal: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.dim = check_int("dim", dim, 1)
        self.num_clusters = _clusters(num_clusters)
        groups = len(self.num_clusters)
        depths = (depths,) * groups if isinstance(depths, int) else tuple(depths)
        if len(depths) != groups:
            raise ValueError(f"depths {depths} needs one entry per group of num_clusters {self.num_clusters}")
        self.depths = tuple(check_int(f"depths[{g}]", d, 0) for g, d in enumerate(depths))
        if check_int("kernel_size", kernel_size, 1) % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.kernel_size, self.causal = kernel_size, causal
        dilation = check_int("dilation", dilation, 1)
        self.norm = nn.LayerNorm(dim, **factory)
        self.layers = nn.ModuleList(
            _Mixer1d(dim, kernel_size, dilation**i, causal, factory) for i in range(sum(self.depths))
        )
        self.heads = nn.ModuleList(nn.Linear(dim, m, **factory) if m else nn.Identity() for m in self.num_clusters)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_clusters={self.num_clusters}, depths={self.depths}, causal={self.causal}"

    def forward(
        self, x: Tensor, *, size: Sequence[int] | None = None, key_padding_mask: Tensor | None = None
    ) -> Provided:
        """Tokens x (B, N, C) → one (B, M_g, N) assignment per group (logits when causal)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be tokens (B, N, C) with C = {self.dim}, got {tuple(x.shape)}")
        keep = None if key_padding_mask is None else ~key_padding_mask
        h = self.norm(x if keep is None else x * keep.unsqueeze(-1))
        h = h if keep is None else h * keep.unsqueeze(-1)
        layers, assignments = iter(self.layers), []
        for depth, m, head in zip(self.depths, self.num_clusters, self.heads, strict=True):
            for _ in range(depth):
                h = next(layers)(h, keep)
            logits = head(h).transpose(1, 2) if m else None
            assignments.append(None if logits is None else Assignment.from_logits(logits, keep, causal=self.causal))
        return Provided(assignments)

    def macs(self, num_tokens: int, size: Sequence[int] | None = None) -> int:
        """The norms (5 per element), the depthwise convs (k per element), the mixing layers and the heads."""
        n, c = check_int("num_tokens", num_tokens, 0), self.dim
        per_layer = n * c * self.kernel_size + n * c * c + 10 * n * c
        return 5 * n * c + len(self.layers) * per_layer + n * c * sum(self.num_clusters)


class _Residual(nn.Module):
    """``x + fn(x)``; the wrapped module is ``fn`` (state-dict prefix ``fn.``)."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) + x


class ConvMixerLayer(nn.Sequential):
    """(B, C, H, W) → (B, C, H, W): ``Residual(dw k×k → GELU → BN) → 1×1 conv → GELU → BN`` (Trockman and
    Kolter, "Patches are all you need?", 2022). Keys: ``0.fn.0`` (depthwise conv), ``0.fn.2`` (BN), ``1``
    (1×1 conv), ``3`` (BN)."""

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__(
            _Residual(
                nn.Sequential(
                    nn.Conv2d(dim, dim, kernel_size, groups=dim, padding=kernel_size // 2, **factory),
                    nn.GELU(),
                    nn.BatchNorm2d(dim, **factory),
                )
            ),
            nn.Conv2d(dim, dim, 1, **factory),
            nn.GELU(),
            nn.BatchNorm2d(dim, **factory),
        )

    @property
    def depthwise(self) -> nn.Conv2d:
        """The depthwise k×k convolution."""
        return self[0].fn[0]


class BlurConv2d(nn.Module):
    """A fixed depthwise 3×3 binomial blur ([1,2,1]ᵀ[1,2,1]/16, stride 1) followed by ``conv``.

    (B, C_in, H, W) → (B, C_out, H', W'). The blur kernel is the persistent buffer ``blur_filter``
    of shape (C_in, 1, 3, 3), one copy per input channel (as MosaicML Composer's ``BlurConv2d`` with
    ``blur_first=True``, which PaCa-ViT's teacher uses).
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 3,
        stride: int = 2,
        padding: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        taps = torch.tensor([1.0, 2.0, 1.0], **factory)
        self.register_buffer("blur_filter", (torch.outer(taps, taps) / 16).repeat(in_chans, 1, 1, 1))
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size, stride=stride, padding=padding, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.conv2d(x, self.blur_filter, padding=1, groups=self.blur_filter.shape[0]))


@register_provider("conv2d")
class Conv2dTeacher(AssignmentProvider):
    """A ConvMixer-FPN teacher for grids (the clustering teacher of PaCa-ViT, Grainger et al. 2023, Sec. 3.3).

    Levels i = 1..L (state-dict names are 1-based, as in PaCa-ViT's checkpoints)::

        bottom-up   outs[1] = block1(x)             outs[i] = block_i(transition_{i-1}(outs[i-1]))
        top-down    fpn[L]  = outs[L]               fpn[i]  = fpn_i(outs[i] + lateral_i(upsample(fpn[i+1])))
        clusters    assignment[i] = softmax over the H_i·W_i positions of to_clusters_i(fpn[i])

    A transition is a 3×3 stride-``s`` conv (after a binomial blur with ``blur=True``, as PaCa) → GELU → BN;
    a lateral is 1×1 conv → GELU → BN. Level i has ``ceil(H_{i-1} / s)`` × ``ceil(W_{i-1} / s)`` positions.

    Args:
        embed_dims: channels C_i per level; level 1 must match the input tokens.
        depths: ConvMixer layers per level.
        num_clusters: M_i per level; 0 builds no ``to_clusters`` layer and yields no assignment.
        kernel_size: depthwise kernel of the ConvMixer layers.
        stride: the transitions' stride.
        blur: blur before each strided transition conv.
        device, dtype: PyTorch's factory kwargs.

    ``forward`` takes the level-1 tokens (B, H·W, C_1) with ``size=(H, W)``, and returns the assignments,
    the bottom-up features (B, H_i·W_i, C_i) and the level sizes. BatchNorm mixes positions across the
    batch, so it takes no padding mask.
    """

    def __init__(
        self,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_clusters: Sequence[int],
        kernel_size: int = 7,
        stride: int = 2,
        blur: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not len(embed_dims) == len(depths) == len(num_clusters):
            raise ValueError(
                f"embed_dims {tuple(embed_dims)}, depths {tuple(depths)} and num_clusters {tuple(num_clusters)} "
                "need one entry per level"
            )
        factory = {"device": device, "dtype": dtype}
        self.num_levels = len(embed_dims)
        self.embed_dims = tuple(check_int(f"embed_dims[{i}]", c, 1) for i, c in enumerate(embed_dims))
        self.depths = tuple(check_int(f"depths[{i}]", d, 0) for i, d in enumerate(depths))
        self.num_clusters = _clusters(num_clusters)
        if check_int("kernel_size", kernel_size, 1) % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the ConvMixer layers keep the map size), got {kernel_size}")
        self.kernel_size, self.stride = kernel_size, check_int("stride", stride, 1)
        for i, (dim, depth, clusters) in enumerate(zip(embed_dims, depths, self.num_clusters, strict=True), start=1):
            layers = (ConvMixerLayer(dim, kernel_size, **factory) for _ in range(depth))
            self.add_module(f"block{i}", nn.Sequential(*layers))
            if i < self.num_levels:
                wider = embed_dims[i]
                conv = (
                    BlurConv2d(dim, wider, stride=stride, **factory)
                    if blur
                    else nn.Conv2d(dim, wider, 3, stride=stride, padding=1, **factory)
                )
                self.add_module(f"transition{i}", nn.Sequential(conv, nn.GELU(), nn.BatchNorm2d(wider, **factory)))
                lateral = nn.Sequential(nn.Conv2d(wider, dim, 1, **factory), nn.GELU(), nn.BatchNorm2d(dim, **factory))
                self.add_module(f"lateral{i}", lateral)
                self.add_module(f"fpn{i}", ConvMixerLayer(dim, kernel_size, **factory))
            if clusters:
                self.add_module(f"to_clusters{i}", nn.Conv2d(dim, clusters, 1, **factory))

    def forward(
        self, x: Tensor, *, size: Sequence[int] | None = None, key_padding_mask: Tensor | None = None
    ) -> Provided:
        """Level-1 tokens x (B, H·W, C_1) on the grid ``size=(H, W)`` → the assignments (B, M_i, H_i·W_i), each
        row a softmax over the positions (None where M_i = 0), the features (B, H_i·W_i, C_i) and the sizes."""
        if key_padding_mask is not None:
            raise ValueError("Conv2dTeacher works on whole grids: it takes no key_padding_mask")
        if size is None or len(size) != 2 or x.dim() != 3 or size[0] * size[1] != x.shape[1]:
            raise ValueError(
                f"Conv2dTeacher needs tokens (B, H*W, C) and size=(H, W), got x {tuple(x.shape)} and size={size!r}"
            )
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *size)
        outs = []
        for i in range(1, self.num_levels + 1):
            if i > 1:
                x = getattr(self, f"transition{i - 1}")(x)
            x = getattr(self, f"block{i}")(x)
            outs.append(x)
        fpn = outs[-1]
        fpn_outs = [fpn]
        for i in range(self.num_levels - 1, 0, -1):
            up = F.interpolate(fpn, size=outs[i - 1].shape[-2:], mode="bilinear", align_corners=False)
            fpn = getattr(self, f"fpn{i}")(outs[i - 1] + getattr(self, f"lateral{i}")(up))
            fpn_outs.insert(0, fpn)
        assignments = [
            Assignment.from_logits(getattr(self, f"to_clusters{i}")(level).flatten(2)) if clusters else None
            for i, (level, clusters) in enumerate(zip(fpn_outs, self.num_clusters, strict=True), start=1)
        ]
        features = [out.flatten(2).transpose(1, 2) for out in outs]
        return Provided(assignments, features, [tuple(out.shape[-2:]) for out in outs])

    def level_sizes(self, size: Sequence[int]) -> list[tuple[int, int]]:
        """The (H_i, W_i) of every level for a level-1 grid ``size``."""
        sizes = [(size[0], size[1])]
        for _ in range(self.num_levels - 1):
            sizes.append(tuple((side - 1) // self.stride + 1 for side in sizes[-1]))
        return sizes

    def macs(self, num_tokens: int, size: Sequence[int] | None = None) -> int:
        """fvcore's count: convolutions, BatchNorm (2 per element: its scale and shift) and bilinear
        upsampling (4 per output element), on the level-1 grid ``size``."""
        if size is None or size[0] * size[1] != num_tokens:
            raise ValueError(f"Conv2dTeacher.macs needs the grid size=(H, W) of its {num_tokens} tokens")
        positions = [h * w for h, w in self.level_sizes(size)]
        k2 = self.kernel_size**2
        total = 0
        for i, (dim, n) in enumerate(zip(self.embed_dims, positions, strict=True)):
            mixer = n * dim * (k2 + dim + 4)  # depthwise conv, 1×1 conv, two BatchNorms
            total += self.depths[i] * mixer + n * dim * self.num_clusters[i]
            if i + 1 < self.num_levels:
                wider, coarse = self.embed_dims[i + 1], positions[i + 1]
                blur = 9 * n * dim if isinstance(getattr(self, f"transition{i + 1}")[0], BlurConv2d) else 0
                total += blur + coarse * wider * (9 * dim + 2)  # the strided conv and its BatchNorm
                total += 4 * n * wider + n * dim * (wider + 2) + mixer  # upsample, lateral conv + BN, fpn layer
        return total
