"""ADE20k's ``ADEChallengeData2016`` layout (``images/<split>/*.jpg`` + ``annotations/<split>/*.png``): pairs,
labels and the validation set, read as mmseg 1.x does (PaCaViT@4307018 segmentation configs).

Labels: 150 classes with ``reduce_zero_label`` (0 = "other" is ignored, 1…150 → 0…149). :class:`ADE20kVal` is the
test setting: resize keeping the aspect ratio into (2048, 512) (short side 512 unless the long side would pass
2048), labels at the annotation's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from tocalib.reproductions.data.images import load_rgb, rescaled_size, to_input

__all__ = ["IGNORE", "NUM_CLASSES", "ADE20kVal", "list_pairs", "load_labels", "read_pair"]

NUM_CLASSES = 150
IGNORE = 255


def list_pairs(root: Path, split: str = "validation") -> list[tuple[Path, Path]]:
    """(image, annotation) pairs of ``split`` (``"training"`` or ``"validation"``), sorted by name."""
    images, annotations = root / "images" / split, root / "annotations" / split
    for folder in (images, annotations):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} does not exist; expected the ADEChallengeData2016 layout images/{split}/*.jpg and "
                f"annotations/{split}/*.png"
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
    """(H, W) int64 class indices 0…149 with 255 = ignore: mmseg's ``reduce_zero_label`` (raw 0 = "other" and
    raw 255 become 255, raw 1…150 become 0…149)."""
    with Image.open(path) as annotation:
        raw = np.asarray(annotation).astype(np.int64)
    if raw.ndim != 2:
        raise ValueError(f"annotation {path} must be a single-channel PNG of class ids, got shape {raw.shape}")
    return np.where((raw == 0) | (raw == IGNORE), IGNORE, raw - 1)


def read_pair(image_path: Path, annotation_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB image and its (H, W) int64 labels (see :func:`load_labels`). A file that cannot be
    decoded, or an annotation whose size differs from its image, raises an error naming the file(s)."""
    arrays = []
    for path, read in ((image_path, load_rgb), (annotation_path, load_labels)):
        try:
            arrays.append(read(path))
        except FileNotFoundError:
            raise
        except (OSError, Image.DecompressionBombError) as error:
            raise OSError(f"cannot decode {path} ({error}); the file is corrupt: re-extract or remove it") from error
    image, labels = arrays
    if labels.shape != image.shape[:2]:
        raise ValueError(
            f"annotation {annotation_path} is {labels.shape}, its image {image_path} {image.shape[:2]}; the pair must "
            "have the same height and width"
        )
    return image, labels


class ADE20kVal(Dataset):
    """ADE20k validation pairs for whole-image evaluation: ``(image (3, H', W') resized keeping the aspect ratio
    into ``scale``, labels (H, W) int64 at the annotation's size, 255 = ignore)``."""

    def __init__(self, root: Path, scale: tuple[int, int] = (2048, 512)) -> None:
        self.pairs = list_pairs(root)
        self.scale = scale

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, labels = read_pair(*self.pairs[index])
        return to_input(image, rescaled_size(*image.shape[:2], self.scale))[0], torch.from_numpy(labels)
