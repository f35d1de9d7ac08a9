"""PVTv2 (Wang et al., "PVT v2: Improved Baselines with Pyramid Vision Transformer", CVMJ 2022).

Four stages, each an overlapping patch embedding (a strided conv + LayerNorm) followed by blocks of

    x = x + SRA(norm1(x))          spatial-reduction attention: queries are the N tokens, keys and
                                   values the tokens of a downsampled (reduced) copy of the map
    x = x + ConvFFN(norm2(x))      Linear → 3×3 depthwise conv → GELU → Linear

and a LayerNorm. Stage ``i`` runs on a (H/4·2⁻ⁱ, W/4·2⁻ⁱ) grid. SRA reduces the map by a strided
``sr_ratio × sr_ratio`` conv (cost O(N²/R²·C)); the linear variant (``pvt_v2_b2_li``) average-pools it to a
fixed 7×7 grid instead (49 keys, cost O(49·N·C)), like a ToCa layer with a fixed assignment.

Shapes: B batch, N = H·W tokens, C channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tocalib.blocks import DropPath
from tocalib.models._layers import Backbone, init_weights, stage_info
from tocalib.models._registry import register_model
from tocalib.validation import check_int

__all__ = ["PyramidVisionTransformerV2", "SpatialReductionAttention"]

LINEAR_SRA_POOL = 7
"""Side of the average-pooled key/value grid in linear SRA (7×7 = 49 keys)."""


def _tokens_to_grid(x: Tensor, size: Sequence[int]) -> Tensor:
    """(B, N, C) row-major tokens → (B, C, H, W)."""
    h, w = size
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


class SpatialReductionAttention(nn.Module):
    """PVTv2's spatial-reduction attention (SRA), or linear SRA with ``linear=True``.

    Args:
        dim: token width C; a multiple of ``num_heads``.
        num_heads: attention heads.
        sr_ratio: R, the stride of the reducing conv (keys and values come from N/R² tokens); 1 = full
            self-attention. Ignored when ``linear``.
        linear: pool the map to 7×7 (49 keys) → 1×1 conv → LayerNorm → GELU, whatever N.
        qkv_bias: bias in the q and kv projections.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, linear: bool = False, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads})")
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be >= 1, got {sr_ratio}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.linear = linear
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.reduce: nn.Module | None
        if linear:
            self.reduce = nn.Sequential(nn.AdaptiveAvgPool2d(LINEAR_SRA_POOL), nn.Conv2d(dim, dim, 1))
        elif sr_ratio > 1:
            self.reduce = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
        else:
            self.reduce = None
        self.norm = nn.LayerNorm(dim) if self.reduce is not None else nn.Identity()
        self.act = nn.GELU() if linear else nn.Identity()

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, linear={self.linear}"

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        """x (B, N, C) with layout ``size = (H, W)`` → (B, N, C)."""
        q = self.q(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, N, d)
        if isinstance(self.reduce, nn.Conv2d) and min(size) < self.reduce.kernel_size[0]:  # (the linear SRA pools)
            raise ValueError(
                f"a {size[0]}×{size[1]} feature map is smaller than this stage's spatial-reduction ratio "
                f"{self.reduce.kernel_size[0]} (the kernel of its reducing conv): use a larger input image "
                "(with PVTv2's default ratios 8, 4, 2, 1: at least 29 pixels per side)"
            )
        if self.reduce is not None:
            x = self.act(self.norm(self.reduce(_tokens_to_grid(x, size)).flatten(2).transpose(1, 2)))
        k, v = self.kv(x).unflatten(-1, (2, self.num_heads, -1)).permute(2, 0, 3, 1, 4)  # (B, heads, N', d) each
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


class ConvFeedForward(nn.Module):
    """Linear → (ReLU if ``linear``) → 3×3 depthwise conv → GELU → Linear, on (B, N, C) tokens."""

    def __init__(self, dim: int, hidden_dim: int, linear: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.relu = nn.ReLU() if linear else nn.Identity()
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        """x (B, N, C) with layout ``size = (H, W)`` → (B, N, C)."""
        x = self.relu(self.fc1(x))
        x = self.dwconv(_tokens_to_grid(x, size)).flatten(2).transpose(1, 2)
        return self.fc2(self.act(x))


class PvtBlock(nn.Module):
    """Pre-norm transformer block: SRA then ConvFFN, each with a residual."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, linear: bool, eps: float, drop_path: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, linear)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = ConvFeedForward(dim, int(dim * mlp_ratio), linear)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        """x (B, N, C) → (B, N, C)."""
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x), size))


class OverlapPatchEmbed(nn.Module):
    """A strided conv with ``kernel_size // 2`` padding (neighbouring patches overlap), then LayerNorm."""

    def __init__(self, in_chans: int, dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size, stride=stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, C_in, H, W) → tokens (B, N', C) and their layout (H', W')."""
        x = self.proj(x)
        size = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), size


class PyramidVisionTransformerV2(Backbone):
    """The PVTv2 backbone and classifier.

    Args:
        embed_dims: channels of the four stages.
        depths: blocks per stage.
        num_heads: heads per stage.
        mlp_ratios: ConvFFN hidden width / C per stage.
        sr_ratios: SRA reduction R per stage (ignored with ``linear``).
        linear: linear SRA (7×7 pooled keys) and a ReLU in the FFN, as in PVTv2-b2-li.
        num_classes: classifier outputs; 0 for no head (``forward`` then returns pooled features).
        in_chans: input image channels.
        features_only: ``forward`` returns the ``out_indices`` stage maps (B, C_i, H/2^(i+2), W/2^(i+2)) instead of
            logits (and builds no head).
        out_indices: the stages ``forward`` returns with ``features_only``.
        eps: LayerNorm eps inside the blocks and after each stage.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
    """

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        depths: Sequence[int] = (3, 4, 6, 3),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        linear: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        eps: float = 1e-6,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        in_chans, num_classes = check_int("in_chans", in_chans, 1), check_int("num_classes", num_classes, 0)
        per_stage = (embed_dims, depths, num_heads, mlp_ratios, sr_ratios)
        if any(len(values) != 4 for values in per_stage):
            raise ValueError("embed_dims, depths, num_heads, mlp_ratios and sr_ratios need one value per stage (4)")
        self.features_only, self.out_indices = features_only, tuple(out_indices)
        self.feature_info = stage_info(embed_dims, [f"norms.{i}" for i in range(4)])
        self.patch_embeds = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.norms = nn.ModuleList()
        previous = in_chans
        rates = iter(torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist())
        for i, (dim, depth, heads, mlp_ratio, sr_ratio) in enumerate(zip(*per_stage, strict=True)):
            kernel_size, stride = (7, 4) if i == 0 else (3, 2)
            self.patch_embeds.append(OverlapPatchEmbed(previous, dim, kernel_size, stride))
            blocks = (PvtBlock(dim, heads, mlp_ratio, sr_ratio, linear, eps, next(rates)) for _ in range(depth))
            self.stages.append(nn.ModuleList(blocks))
            self.norms.append(nn.LayerNorm(dim, eps=eps))
            previous = dim
        self.head = nn.Linear(previous, num_classes) if num_classes and not features_only else None
        self.apply(init_weights)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Images (B, C_in, H, W) → the four stage maps, stage i of shape (B, C_i, H_i, W_i)."""
        maps = []
        for embed, blocks, norm in zip(self.patch_embeds, self.stages, self.norms, strict=True):
            x, size = embed(x)
            for block in blocks:
                x = block(x, size)
            x = _tokens_to_grid(norm(x), size)
            maps.append(x)
        return maps


_CONFIGS: dict[str, dict[str, Any]] = {
    "pvt_v2_b0": {"embed_dims": (32, 64, 160, 256), "depths": (2, 2, 2, 2)},
    "pvt_v2_b1": {"embed_dims": (64, 128, 320, 512), "depths": (2, 2, 2, 2)},
    "pvt_v2_b2": {"embed_dims": (64, 128, 320, 512), "depths": (3, 4, 6, 3)},
    "pvt_v2_b2_li": {"embed_dims": (64, 128, 320, 512), "depths": (3, 4, 6, 3), "linear": True},
}
"""Per-variant settings; all share heads (1, 2, 5, 8), MLP ratios (8, 8, 4, 4) and SR ratios (8, 4, 2, 1)."""


def _create(name: str, pretrained: bool, overrides: dict[str, Any]) -> PyramidVisionTransformerV2:
    """Build ``name`` from its table entry overridden by ``overrides`` (random init: no checkpoints here)."""
    if pretrained:
        raise ValueError(f"{name} is a benchmark baseline with random init; no pretrained weights can be loaded")
    return PyramidVisionTransformerV2(**{**_CONFIGS[name], **overrides})


@register_model
def pvt_v2_b0(pretrained: bool = False, **overrides: Any) -> PyramidVisionTransformerV2:
    """PVTv2-b0: 3.7M params, 0.6 GMACs at 224² (paper: 3.4M / 0.6G, see the tests)."""
    return _create("pvt_v2_b0", pretrained, overrides)


@register_model
def pvt_v2_b1(pretrained: bool = False, **overrides: Any) -> PyramidVisionTransformerV2:
    """PVTv2-b1: 14.0M params, 2.1 GMACs at 224²."""
    return _create("pvt_v2_b1", pretrained, overrides)


@register_model
def pvt_v2_b2(pretrained: bool = False, **overrides: Any) -> PyramidVisionTransformerV2:
    """PVTv2-b2: 25.4M params, 4.0 GMACs at 224²."""
    return _create("pvt_v2_b2", pretrained, overrides)


@register_model
def pvt_v2_b2_li(pretrained: bool = False, **overrides: Any) -> PyramidVisionTransformerV2:
    """PVTv2-b2-li (linear SRA): 22.6M params, 3.9 GMACs at 224²."""
    return _create("pvt_v2_b2_li", pretrained, overrides)
