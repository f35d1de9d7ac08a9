"""Image reading and the mmcv-style keep-ratio resize shared by the ADE20k and COCO evaluations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["MMCV_MEAN", "MMCV_STD", "load_rgb", "normalize", "rescaled_size", "to_input"]

MMCV_MEAN = (123.675, 116.28, 103.53)
MMCV_STD = (58.395, 57.12, 57.375)
"""RGB mean and std (0–255 scale) of the mmdet/mmseg data preprocessors."""


def load_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB array of an image file."""
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def rescaled_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``imrescale`` with ``keep_ratio``: the largest (H', W') whose long side ≤ max(scale) and short side
    ≤ min(scale), rounded as mmcv does (``int(x · factor + 0.5)``)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def to_input(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 → normalised (1, 3, H', W') float tensor resized to ``size`` = (H', W').

    Bilinear, half-pixel centres, no antialiasing: the same sampling as OpenCV's ``INTER_LINEAR``, which mmcv
    uses (OpenCV additionally rounds the resized image to uint8 before normalising).
    """
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return normalize(x)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """(…, 3, H, W) RGB on the 0–255 scale → float32 normalised with the mmdet/mmseg mean and std."""
    mean = torch.tensor(MMCV_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(MMCV_STD, dtype=torch.float32).view(3, 1, 1)
    return (image.float() - mean) / std
