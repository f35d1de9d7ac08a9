"""mmseg's UPerHead (PPM + FPN fusion; Xiao et al. 2018) and the FCN auxiliary head, with mmseg key names."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tocalib.models.heads.common import ConvModule, check_features, resize, seg_cross_entropy

__all__ = ["FCNHead", "UPerHead"]


class _ClassifierMixin(nn.Module):
    """``dropout`` + ``conv_seg`` classifier and the cross-entropy loss shared by the mmseg-style heads."""

    dropout: nn.Dropout2d
    conv_seg: nn.Conv2d
    loss_weight: float

    def classify(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(x))

    def loss(self, features: Sequence[Tensor], labels: Tensor, prefix: str = "decode") -> dict[str, Tensor]:
        """``{prefix}.loss_ce``: weighted cross-entropy of the logits against (B, H, W) labels (255 ignored)."""
        return {f"{prefix}.loss_ce": seg_cross_entropy(self(features), labels, self.loss_weight)}


class UPerHead(_ClassifierMixin):
    """UPerNet decode head: a pyramid-pooling module on the last map, a top-down FPN, fusion at 1/4.

    Args:
        in_channels: channels of the four backbone maps (strides 4, 8, 16, 32).
        num_classes: output classes.
        channels: width of every internal map (512).
        pool_scales: PPM output sizes.
        dropout: Dropout2d rate before ``conv_seg``.
        loss_weight: weight of its cross-entropy loss.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int = 150,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.loss_weight = loss_weight
        top = self.in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(top, channels, 1)) for scale in pool_scales
        )
        self.bottleneck = ConvModule(top + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in self.in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(self.in_channels) * channels, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def _pyramid_pooling(self, x: Tensor) -> Tensor:
        pooled = [resize(module(x), x.shape[-2:]) for module in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Logits (B, num_classes, H/4, W/4) from the four (B, C_i, H/2^(i+2), W/2^(i+2)) maps."""
        check_features(features, self.in_channels, type(self).__name__)
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features, strict=False)]
        laterals.append(self._pyramid_pooling(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals, strict=False)]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        return self.classify(self.fpn_bottleneck(torch.cat([resize(o, size) for o in outs], dim=1)))


class FCNHead(_ClassifierMixin):
    """mmseg's FCNHead as the auxiliary head: ``num_convs`` 3×3 ConvModules on one backbone map, no concat.

    Args:
        in_channels: channels of the four backbone maps; the head reads map ``in_index``.
        in_index: which map (2 = stride 16, "stage 3").
        num_classes: output classes.
        channels: conv width (256).
        num_convs: number of 3×3 ConvModules (1).
        dropout: Dropout2d rate before ``conv_seg``.
        loss_weight: weight of its cross-entropy loss (0.4).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_index: int = 2,
        num_classes: int = 150,
        channels: int = 256,
        num_convs: int = 1,
        dropout: float = 0.1,
        loss_weight: float = 0.4,
    ) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.in_index = in_index
        self.loss_weight = loss_weight
        widths = [self.in_channels[in_index]] + [channels] * num_convs
        self.convs = nn.Sequential(*(ConvModule(a, b, 3, padding=1) for a, b in itertools.pairwise(widths)))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Logits (B, num_classes, h, w) at the resolution of map ``in_index``."""
        check_features(features, self.in_channels, type(self).__name__)
        return self.classify(self.convs(features[self.in_index]))
