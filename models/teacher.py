"""PaCa-ViT's clustering teacher: a ConvMixer-FPN CNN that provides one assignment per stage.

The teacher (``PaCaTeacher_ConvMixer`` in PaCaViT@4307018 paca_vit.py) reads the backbone's stem output and returns

* ``assignments[i]``: (B, M_i, H_i·W_i), softmax over the H_i·W_i positions, fed to **every** block of
  stage i (None where M_i = 0);
* ``features[i]``: (B, H_i·W_i, C_i), the bottom-up ConvMixer outputs, which the backbone adds to its
  stage output before the stage norm.

Levels i = 1..4 (state-dict names are 1-based, as in the official checkpoints)::

    bottom-up   outs[1] = block1(stem)            outs[i] = block_i(transition_{i-1}(outs[i-1]))
    top-down    fpn[4]  = outs[4]                 fpn[i]  = fpn_i(outs[i] + lateral_i(upsample(fpn[i+1])))
    clusters    assignment[i] = softmax_HW(to_clusters_i(fpn[i]))

A ConvMixer layer is ``Residual(dw k×k → GELU → BN) → 1×1 → GELU → BN``; a transition is a binomial
blur (a fixed buffer ``blur_filter``, saved in the state dict) then a 3×3 stride-2 conv → GELU → BN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BlurConv2d", "ConvMixerFPNTeacher", "ConvMixerLayer"]


class _Residual(nn.Module):
    """``x + fn(x)``; the wrapped module is ``fn`` (state-dict prefix ``fn.``)."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) + x


class ConvMixerLayer(nn.Sequential):
    """(B, C, H, W) → (B, C, H, W): ``Residual(dw k×k → GELU → BN) → 1×1 conv → GELU → BN``.

    Keys: ``0.fn.0`` (depthwise conv), ``0.fn.2`` (BN), ``1`` (1×1 conv), ``3`` (BN).
    """

    def __init__(self, dim: int, kernel_size: int = 7) -> None:
        super().__init__(
            _Residual(
                nn.Sequential(
                    nn.Conv2d(dim, dim, kernel_size, groups=dim, padding=kernel_size // 2),
                    nn.GELU(),
                    nn.BatchNorm2d(dim),
                )
            ),
            nn.Conv2d(dim, dim, 1),
            nn.GELU(),
            nn.BatchNorm2d(dim),
        )


class BlurConv2d(nn.Module):
    """A fixed depthwise 3×3 binomial blur ([1,2,1]ᵀ[1,2,1]/16, stride 1) followed by ``conv``.

    (B, C_in, H, W) → (B, C_out, H', W'). The blur kernel is the persistent buffer ``blur_filter``
    of shape (C_in, 1, 3, 3), one copy per input channel, as in the official checkpoints (the
    layer follows MosaicML Composer's ``BlurConv2d`` with ``blur_first=True``).
    """

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("blur_filter", (torch.outer(taps, taps) / 16).repeat(in_chans, 1, 1, 1))
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size, stride=stride, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.conv2d(x, self.blur_filter, padding=1, groups=self.blur_filter.shape[0]))


class ConvMixerFPNTeacher(nn.Module):
    """PaCa's ConvMixer-FPN clustering teacher (an assignment provider for the backbone's stages).

    Args:
        embed_dims: channels C_i per level; level 1 must match the stem output.
        depths: ConvMixer layers per level (2,2,2,2 for Tiny/Small, 2,2,4,2 for Base).
        num_clusters: M_i per level; 0 builds no ``to_clusters`` layer and yields no assignment.
        kernel_size: depthwise kernel of the ConvMixer layers.
    """

    def __init__(
        self,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_clusters: Sequence[int],
        kernel_size: int = 7,
    ) -> None:
        super().__init__()
        if not len(embed_dims) == len(depths) == len(num_clusters):
            raise ValueError(
                f"embed_dims {tuple(embed_dims)}, depths {tuple(depths)} and num_clusters {tuple(num_clusters)} "
                "need one entry per level"
            )
        self.num_levels = len(embed_dims)
        self.num_clusters = tuple(num_clusters)
        for i, (dim, depth, clusters) in enumerate(zip(embed_dims, depths, num_clusters, strict=True), start=1):
            self.add_module(f"block{i}", nn.Sequential(*(ConvMixerLayer(dim, kernel_size) for _ in range(depth))))
            if i < self.num_levels:
                wider = embed_dims[i]
                self.add_module(
                    f"transition{i}", nn.Sequential(BlurConv2d(dim, wider), nn.GELU(), nn.BatchNorm2d(wider))
                )
                self.add_module(f"lateral{i}", nn.Sequential(nn.Conv2d(wider, dim, 1), nn.GELU(), nn.BatchNorm2d(dim)))
                self.add_module(f"fpn{i}", ConvMixerLayer(dim, kernel_size))
            if clusters:
                self.add_module(f"to_clusters{i}", nn.Conv2d(dim, clusters, 1))

    def forward(self, x: Tensor) -> tuple[list[Tensor | None], list[Tensor]]:
        """Assignments and features for every level.

        Args:
            x: (B, C_1, H_1, W_1) the backbone's stem output.

        Returns:
            ``(assignments, features)``: ``assignments[i]`` (B, M_i, H_i·W_i), each row a softmax
            over positions (None where M_i = 0); ``features[i]`` (B, H_i·W_i, C_i).
        """
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
        assignments: list[Tensor | None] = [
            getattr(self, f"to_clusters{i}")(level).flatten(2).softmax(dim=-1) if clusters else None
            for i, (level, clusters) in enumerate(zip(fpn_outs, self.num_clusters, strict=True), start=1)
        ]
        return assignments, [out.flatten(2).transpose(1, 2) for out in outs]
