"""Swin Transformer (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021).

A 4×4 patch embedding, then four stages of blocks

    x = x + W-MSA(norm1(x))        multi-head self-attention inside non-overlapping w×w windows, with a
                                   learned relative position bias; every second block shifts the map by
                                   ⌊w/2⌋ first (SW-MSA) so that windows exchange information
    x = x + MLP(norm2(x))          Linear(C, 4C) → GELU → Linear(4C, C)

with a patch merging (2×2 neighbours concatenated → LayerNorm → Linear(4C, 2C)) between stages. Maps of any
size work: they are zero-padded to a multiple of w (after ``norm1``, as Swin's dense-prediction backbone does),
and a map that fits in one window is not shifted. Tokens stay channels-last, (B, H, W, C), inside the stages.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tocalib.blocks import DropPath
from tocalib.models._layers import Backbone, init_weights, stage_info
from tocalib.models._registry import register_model
from tocalib.validation import check_int

__all__ = ["SwinTransformer", "WindowAttention"]

SHIFT_MASK_VALUE = -100.0
"""Additive attention bias between tokens that a shifted window brings together from different regions."""


def _relative_position_index(window_size: int) -> Tensor:
    """(w², w²) long: the row of the (2w-1)² bias table for each (query, key) pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # (2, w²)
    relative = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)  # (2, w², w²) in [0, 2w-2]
    return relative[0] * (2 * window_size - 1) + relative[1]


def _windows(x: Tensor, window_size: int) -> Tensor:
    """(B, H, W, C) with H, W multiples of w → (B, nW, w², C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, -1, window_size * window_size, c)


def _merge_windows(windows: Tensor, window_size: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`_windows`: (B, nW, w², C) → (B, H, W, C)."""
    b, _, _, c = windows.shape
    x = windows.view(b, height // window_size, width // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


@functools.lru_cache(maxsize=32)
def _shift_mask(height: int, width: int, window_size: int, shift: int) -> Tensor:
    """(nW, w², w²) additive mask for a map shifted by ``shift``: 0 inside a region, -100 across regions.

    Cached per padded map size; built without autograd so that it enters a trace as a constant.
    """
    with torch.no_grad():
        rows = torch.arange(height)
        cols = torch.arange(width)
        # Region of each row (col): 0 before the last window, 1 in its first part, 2 in the wrapped-around part.
        row_region = (rows >= height - window_size).long() + (rows >= height - shift).long()
        col_region = (cols >= width - window_size).long() + (cols >= width - shift).long()
        region = (row_region[:, None] * 3 + col_region[None, :])[None, :, :, None]  # (1, H, W, 1)
        region = _windows(region, window_size)[0, :, :, 0]  # (nW, w²)
        different = region[:, :, None] != region[:, None, :]
        return different.float() * SHIFT_MASK_VALUE


class WindowAttention(nn.Module):
    """Multi-head self-attention within w×w windows, with a relative position bias table.

    Args:
        dim: token width C; a multiple of ``num_heads``.
        num_heads: attention heads.
        window_size: w.
        qkv_bias: bias in the qkv projection.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads})")
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", _relative_position_index(window_size), persistent=False)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, window_size={self.window_size}"

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, nW, w², C) windows; ``mask`` (nW, w², w²) additive or None → (B, nW, w², C)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(3, 0, 1, 4, 2, 5)  # (B, nW, h, w², d)
        length = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(length, length, self.num_heads).permute(2, 0, 1)  # (heads, w², w²)
        if mask is not None:
            bias = bias + mask.unsqueeze(1)  # (nW, heads, w², w²)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(2, 3).flatten(3))


class SwinBlock(nn.Module):
    """A (shifted-)window attention block on a channels-last map (B, H, W, C)."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, shift: int, mlp_ratio: float, eps: float, drop_path: float
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def extra_repr(self) -> str:
        return f"shift={self.shift}"

    def forward(self, x: Tensor) -> Tensor:
        """x (B, H, W, C) → (B, H, W, C)."""
        _, height, width, _ = x.shape
        w = self.window_size
        shift = self.shift if max(height, width) > w else 0  # one window sees everything: nothing to shift
        y = self.norm1(x)
        pad_h, pad_w = -height % w, -width % w
        if pad_h or pad_w:
            y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = height + pad_h, width + pad_w
        mask = None
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
            mask = _shift_mask(padded_h, padded_w, w, shift).to(y.device)
        y = _merge_windows(self.attn(_windows(y, w), mask), w, padded_h, padded_w)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + self.drop_path(y[:, :height, :width])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2×2 neighbours concatenated → LayerNorm(4C) → Linear(4C, 2C, no bias): (B, H, W, C) → (B, ⌈H/2⌉, ⌈W/2⌉, 2C)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, H, W, C) → (B, ⌈H/2⌉, ⌈W/2⌉, 2C); odd sides are zero-padded first."""
        if x.shape[1] % 2 or x.shape[2] % 2:
            x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinTransformer(Backbone):
    """The Swin Transformer backbone and classifier.

    Args:
        embed_dim: channels of stage 1 (doubled at every later stage).
        depths: blocks per stage.
        num_heads: heads per stage.
        window_size: w.
        mlp_ratio: MLP hidden width / C.
        patch_size: side of the non-overlapping patch embedding.
        num_classes: classifier outputs; 0 for no head (``forward`` then returns pooled features).
        in_chans: input image channels.
        features_only: ``forward`` returns the ``out_indices`` stage maps (B, C_i, H_i, W_i), each after its own
            LayerNorm, instead of logits (and builds no head).
        out_indices: the stages ``forward`` returns with ``features_only``.
        eps: LayerNorm eps.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        patch_size: int = 4,
        num_classes: int = 1000,
        in_chans: int = 3,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        eps: float = 1e-5,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        in_chans, num_classes = check_int("in_chans", in_chans, 1), check_int("num_classes", num_classes, 0)
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} need one value per stage")
        self.features_only, self.out_indices = features_only, tuple(out_indices)
        self.feature_info = stage_info(
            [embed_dim * 2**i for i in range(len(depths))], [f"stages.{i}" for i in range(len(depths))]
        )
        channels = self.feature_info.channels()
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(embed_dim, eps=eps)
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        rates = iter(torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist())
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            dim = channels[i]
            shifts = [0 if j % 2 == 0 else window_size // 2 for j in range(depth)]
            blocks = (SwinBlock(dim, heads, window_size, s, mlp_ratio, eps, next(rates)) for s in shifts)
            self.stages.append(nn.Sequential(*blocks))
            last = i == len(depths) - 1
            self.downsamples.append(nn.Identity() if last else PatchMerging(dim, eps))
        out_dims = channels if features_only else channels[-1:]
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=eps) for dim in out_dims)
        self.head = nn.Linear(channels[-1], num_classes) if num_classes and not features_only else None
        self.apply(init_weights)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Images (B, C_in, H, W) → the four stage maps (B, C_i, ⌈H/2^(i+2)⌉, ⌈W/2^(i+2)⌉). With ``features_only``
        each is normed by its own LayerNorm; otherwise (timm's classification layout, one final norm) the first
        three are the blocks' outputs and the last is normed. Sides that are not a multiple of the patch size are
        zero-padded."""
        patch = self.patch_embed.stride[0]
        if x.shape[2] % patch or x.shape[3] % patch:
            x = F.pad(x, (0, -x.shape[3] % patch, 0, -x.shape[2] % patch))
        x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 1))  # (B, ⌈H/4⌉, ⌈W/4⌉, C)
        maps = []
        last = len(self.stages) - 1
        for i, (blocks, downsample) in enumerate(zip(self.stages, self.downsamples, strict=True)):
            x = blocks(x)
            if self.features_only or i == last:
                maps.append(self.norms[i if self.features_only else 0](x).permute(0, 3, 1, 2))
            else:
                maps.append(x.permute(0, 3, 1, 2))
            x = downsample(x)
        return maps


_CONFIGS: dict[str, dict[str, Any]] = {
    "swin_tiny_patch4_window7_224": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)},
}


@register_model
def swin_tiny_patch4_window7_224(pretrained: bool = False, **overrides: Any) -> SwinTransformer:
    """Swin-T: 28.3M params, 4.5 GMACs at 224² (random init: no checkpoints here)."""
    if pretrained:
        raise ValueError("swin_tiny_patch4_window7_224 is a benchmark baseline; no pretrained weights can be loaded")
    return SwinTransformer(**{**_CONFIGS["swin_tiny_patch4_window7_224"], **overrides})
