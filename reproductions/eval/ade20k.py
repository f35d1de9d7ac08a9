"""ADE20k mIoU on ``ADEChallengeData2016`` (``images/validation/*.jpg`` + ``annotations/validation/*.png``).

mmseg 1.x's ADE20k test setting (reference §6.3): resize keeping the aspect ratio into (2048, 512) (short side
512 unless the long side would pass 2048), whole-image inference, logits resized bilinearly to the annotation's
size, arg-max. Labels: 150 classes with ``reduce_zero_label`` (0 = "other" is ignored, 1…150 → 0…149). mIoU is
mmseg's: per class, total intersection / total union over the dataset, then the mean over classes present in
prediction or ground truth.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.heads import EncoderDecoder
from reproductions.eval.common import load_rgb, rescaled_size, to_input

__all__ = ["NUM_CLASSES", "evaluate", "list_pairs", "load_labels"]

NUM_CLASSES = 150
IGNORE = 255


def list_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, annotation) pairs of the validation split, sorted by name."""
    images, annotations = root / "images" / "validation", root / "annotations" / "validation"
    for folder in (images, annotations):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} does not exist; expected the ADEChallengeData2016 layout images/validation/*.jpg and "
                "annotations/validation/*.png"
            )
    pairs = []
    for image in sorted(images.glob("*.jpg")):
        annotation = annotations / f"{image.stem}.png"
        if not annotation.is_file():
            raise FileNotFoundError(f"annotation {annotation} for image {image} does not exist")
        pairs.append((image, annotation))
    if not pairs:
        raise ValueError(f"{images} holds no .jpg images")
    return pairs


def load_labels(path: Path) -> np.ndarray:
    """(H, W) int64 class indices 0…149 with 255 = ignore (``reduce_zero_label``)."""
    with Image.open(path) as annotation:
        raw = np.asarray(annotation).astype(np.int64)
    if raw.ndim != 2:
        raise ValueError(f"annotation {path} must be a single-channel PNG of class ids, got shape {raw.shape}")
    return np.where(raw == 0, IGNORE, raw - 1)


@torch.no_grad()
def evaluate(
    segmentor: EncoderDecoder,
    root: Path,
    scale: tuple[int, int] = (2048, 512),
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """mIoU and pixel accuracy (aAcc), in %, of ``segmentor`` on the validation split under ``root``."""
    pairs = list_pairs(root)
    segmentor.eval()
    intersect = np.zeros(NUM_CLASSES, dtype=np.int64)
    area_pred = np.zeros(NUM_CLASSES, dtype=np.int64)
    area_label = np.zeros(NUM_CLASSES, dtype=np.int64)
    for i, (image_path, label_path) in enumerate(pairs):
        image, labels = load_rgb(image_path), load_labels(label_path)
        if labels.shape != image.shape[:2]:
            raise ValueError(f"annotation {label_path} is {labels.shape}, its image {image.shape[:2]}")
        x = to_input(image, rescaled_size(*image.shape[:2], scale))
        pred = segmentor.predict(x, size=labels.shape)[0].numpy()
        valid = labels != IGNORE
        pred, labels = pred[valid], labels[valid]
        intersect += np.bincount(pred[pred == labels], minlength=NUM_CLASSES)[:NUM_CLASSES]
        area_pred += np.bincount(pred, minlength=NUM_CLASSES)[:NUM_CLASSES]
        area_label += np.bincount(labels, minlength=NUM_CLASSES)[:NUM_CLASSES]
        if i % 100 == 0:
            log(f"      ade20k: {i + 1}/{len(pairs)} images")
    union = area_pred + area_label - intersect
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = intersect / union
    return {"mIoU": 100.0 * float(np.nanmean(iou)), "aAcc": 100.0 * float(intersect.sum() / area_label.sum())}
