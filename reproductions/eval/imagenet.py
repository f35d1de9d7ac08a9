"""ImageNet-1k top-1 on a validation folder sorted into class folders (``val/n01440764/*.JPEG`` …).

Preprocessing is timm's evaluation transform for ``crop_pct=0.9`` (reference §6.1): resize the shorter side to
``floor(224 / 0.9) = 248`` with bicubic interpolation (Pillow, as torchvision does for PIL images), center-crop
224, scale to [0, 1] and normalise with the ImageNet mean and std. Class indices are the sorted folder names, as
in torchvision's ``ImageFolder`` (the standard order of the 1000 synsets).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "evaluate", "list_images", "preprocess"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def list_images(root: Path) -> list[tuple[Path, int]]:
    """(image path, class index) for every image under ``root/<class>/``; classes in sorted order."""
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet val folder {root} does not exist; expected {root}/<class>/<image>")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} holds no class folders; expected the val images sorted into {root}/<class>/<image>")
    samples = []
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"class folder {root / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        samples += [(f, index) for f in files]
    return samples


def preprocess(path: Path, crop: int = 224, crop_pct: float = 0.9) -> torch.Tensor:
    """One image → normalised (3, crop, crop) tensor (timm's eval transform)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        short = math.floor(crop / crop_pct)
        w, h = image.size
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = round((size[0] - crop) / 2.0), round((size[1] - crop) / 2.0)
        image = image.crop((left, top, left + crop, top + crop))
        array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _batches(samples: list[tuple[Path, int]], size: int) -> Iterator[list[tuple[Path, int]]]:
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    root: Path,
    crop: int = 224,
    crop_pct: float = 0.9,
    batch_size: int = 32,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) of a classifier on ``root``."""
    samples = list_images(root)
    model.eval()
    correct1 = correct5 = 0
    for i, batch in enumerate(_batches(samples, batch_size)):
        images = torch.stack([preprocess(path, crop, crop_pct) for path, _ in batch])
        labels = torch.tensor([label for _, label in batch])
        logits = model(images)
        if labels.max() >= logits.shape[1]:
            raise ValueError(f"{root} has more class folders than the model's {logits.shape[1]} outputs")
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top5[:, 0] == labels).sum())
        correct5 += int((top5 == labels[:, None]).any(dim=1).sum())
        if i % 50 == 0:
            log(f"      imagenet: {min((i + 1) * batch_size, len(samples))}/{len(samples)} images")
    return {"top1": 100.0 * correct1 / len(samples), "top5": 100.0 * correct5 / len(samples)}
