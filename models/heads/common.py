"""Building blocks shared by the dense heads: mmcv-style ``ConvModule``, resizing and input checks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvModule", "check_features", "resize", "seg_cross_entropy"]

IGNORE_INDEX = 255
"""Label value that carries no loss (mmseg's ``ignore_index``)."""


class ConvModule(nn.Module):
    """Conv2d → optional BatchNorm → optional ReLU, with mmcv's state-dict names ``conv.*`` and ``bn.*``.

    As in mmcv (``bias="auto"``) the convolution has a bias only when no norm follows it.
    (B, in_channels, H, W) -> (B, out_channels, H', W').
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        padding: int = 0,
        norm: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=not norm)
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.activate = nn.ReLU() if act else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.activate is not None:
            x = self.activate(x)
        return x


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of (B, C, H, W) to ``size`` = (H', W') with ``align_corners=False`` (mmseg's ``resize``)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def check_features(features: Sequence[Tensor], in_channels: Sequence[int], owner: str) -> None:
    """Raise a clear error unless ``features`` are len(in_channels) NCHW maps with those channel counts."""
    if len(features) != len(in_channels):
        raise ValueError(
            f"{owner} expects {len(in_channels)} feature maps (strides 4, 8, 16, 32), got {len(features)}; "
            "pass the backbone's features-only output"
        )
    for i, (feat, channels) in enumerate(zip(features, in_channels, strict=True)):
        if feat.dim() != 4 or feat.shape[1] != channels:
            raise ValueError(
                f"{owner}: feature map {i} must be (B, {channels}, H, W), got {tuple(feat.shape)}; "
                f"construct the head with in_channels matching the backbone's dims"
            )


def seg_cross_entropy(logits: Tensor, labels: Tensor, weight: float, avg_non_ignore: bool = False) -> Tensor:
    """``weight`` × pixel-wise cross-entropy, as mmseg's ``CrossEntropyLoss`` with ``ignore_index=255``.

    logits (B, L, h, w) are bilinearly resized to the labels' (B, H, W) size first. Ignored pixels contribute 0;
    the sum is divided by the number of all pixels, or of the non-ignored ones with ``avg_non_ignore`` (a batch
    with no labelled pixel then gives 0, not NaN).
    """
    if labels.dim() != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be (B, H, W) with B = {logits.shape[0]}, got {tuple(labels.shape)}")
    logits = resize(logits, labels.shape[-2:])
    per_pixel = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX, reduction="none")
    count = (labels != IGNORE_INDEX).sum() if avg_non_ignore else torch.tensor(labels.numel())
    return weight * per_pixel.sum() / count.clamp(min=1)
