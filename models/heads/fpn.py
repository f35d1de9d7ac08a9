"""mmdet's FPN neck (Lin et al. 2017) for Mask R-CNN: 1×1 laterals, nearest top-down, 3×3 outputs, P6 by max-pool."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from tocalib.models.heads.common import ConvModule, check_features

__all__ = ["FPN"]


class FPN(nn.Module):
    """Feature pyramid with mmdet's key names ``lateral_convs.{k}.conv`` and ``fpn_convs.{k}.conv``.

    Args:
        in_channels: channels of the backbone maps (strides 4, 8, 16, 32).
        out_channels: width of every pyramid level (256).
        num_outs: levels returned; those beyond the inputs come from stride-2 max-pooling (kernel 1) of the
            last level (``add_extra_convs=False``).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, num_outs: int = 5) -> None:
        super().__init__()
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs must be >= len(in_channels) = {len(in_channels)}, got {num_outs}")
        self.in_channels = list(in_channels)
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1, norm=False, act=False) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3, padding=1, norm=False, act=False) for _ in in_channels
        )

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """``num_outs`` maps (B, out_channels, H/s, W/s) at strides 4, 8, 16, 32, 64 from the backbone maps."""
        check_features(features, self.in_channels, type(self).__name__)
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals, strict=True)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs
