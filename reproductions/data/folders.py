"""Classification datasets: an image-folder tree (ImageNet layout) and Fashion-MNIST from its IDX files.

* :class:`ImageFolder` reads ``root/<class>/<image>``; class indices are the sorted folder names (torchvision's
  order; for ImageNet the standard order of the 1000 synsets). Items are ``(transform(RGB image), label)``.
* :class:`FashionMNIST` reads the four IDX gz files of Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist/``) and keeps a whole split in memory as one uint8 tensor. Items are
  ``(transform('L' Pillow image, 28 × 28), label)``, so the Pillow transforms of :mod:`.transforms` apply
  unchanged (with one-value mean/std: :data:`FASHION_MNIST_MEAN`, :data:`FASHION_MNIST_STD`).

With ``transform=None`` an item's image is the Pillow image itself.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_STD",
    "IMAGE_SUFFIXES",
    "CorruptImageError",
    "FashionMNIST",
    "ImageFolder",
    "load_image",
    "read_idx",
    "scan_image_folder",
]

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
"""File suffixes (any case) that :class:`ImageFolder` reads; other files in a class folder are ignored."""

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
"""Pixel mean and std of the Fashion-MNIST training images on the [0, 1] scale."""


class CorruptImageError(ValueError):
    """An image file that Pillow cannot decode; the message names the file."""


def load_image(path: Path, mode: str = "RGB") -> Image.Image:
    """The image at ``path``, decoded and converted to ``mode``; :class:`CorruptImageError` names a file that
    cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise CorruptImageError(f"cannot decode image {path} ({error}); replace or remove the file") from error


def scan_image_folder(root: Path | str) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, (image path, class index) pairs) of ``root/<class>/<image>``; classes and files sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} does not exist or is not a folder; expected {root}/<class>/<image> files"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} holds no class folders; expected the images sorted into {root}/<class>/<image>")
    samples = []
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(
                f"class folder {root / name} holds no images; accepted suffixes: {', '.join(IMAGE_SUFFIXES)}"
            )
        samples += [(f, index) for f in files]
    return classes, samples


class ImageFolder(Dataset):
    """Images under ``root/<class>/<image>`` → ``(transform(RGB Pillow image), class index)``.

    ``classes``: the sorted class folder names (index = position); ``samples``: (path, class index) per image,
    sorted by class then file name. Construction fails on a missing root, no class folders or an empty class
    folder; a file that cannot be decoded raises :class:`CorruptImageError` when its item is loaded.
    """

    def __init__(self, root: Path | str, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.root = Path(root)
        self.transform = transform
        self.classes, self.samples = scan_image_folder(self.root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = load_image(path)
        return (image if self.transform is None else self.transform(image)), label


_IDX_UBYTE = 0x08


def read_idx(path: Path | str) -> np.ndarray:
    """The uint8 array stored in an IDX file (``.gz`` files are decompressed).

    Format: magic ``00 00 08 d`` (unsigned bytes, d dimensions), d big-endian uint32 sizes, then the data in C
    order. A file that is not gzip when named ``.gz``, has a bad magic, another element type or a data length
    that does not match its sizes raises ValueError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist")
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as file:
            data = bytearray(file.read())
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path} is not a readable IDX .gz file ({error}); download or reinstall it") from error
    if len(data) < 4 or data[0:2] != b"\0\0":
        raise ValueError(f"{path} is not an IDX file: it must start with the magic bytes 00 00 08 <dims>")
    if data[2] != _IDX_UBYTE:
        raise ValueError(f"{path} holds IDX element type 0x{data[2]:02x}; only unsigned bytes (0x08) are supported")
    dims = data[3]
    header = 4 + 4 * dims
    if dims == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions; an IDX array has at least 1")
    if len(data) < header:
        raise ValueError(f"{path}: IDX header declares {dims} dimensions but the file is too short for their sizes")
    shape = struct.unpack(f">{dims}I", data[4:header])
    expected = math.prod(shape)
    if len(data) - header != expected:
        kind = "truncated" if len(data) - header < expected else "has trailing bytes"
        raise ValueError(
            f"{path} is {kind}: shape {shape} needs {expected} data bytes, the file holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST (Zalando, 10 classes, 60,000 train / 10,000 test 28 × 28 grayscale images).

    ``root`` holds ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``; ``split`` is ``"train"`` or ``"test"``.
    ``images``: (N, 28, 28) uint8 tensor, ``targets``: (N,) int64. Items are ``(transform(image), label)`` with
    the image an 'L' Pillow image (28 × 28).
    """

    CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

    def __init__(
        self,
        root: Path | str = FASHION_MNIST_ROOT,
        split: str = "train",
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r} must be 'train' or 'test'")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Fashion-MNIST folder {self.root} does not exist; install the data with "
                "`apt-get install dataset-fashion-mnist` (files under /usr/share/datasets/fashion-mnist) or pass "
                "the folder that holds the IDX .gz files"
            )
        prefix = "train" if split == "train" else "t10k"
        image_file = self.root / f"{prefix}-images-idx3-ubyte.gz"
        label_file = self.root / f"{prefix}-labels-idx1-ubyte.gz"
        missing = [str(f) for f in (image_file, label_file) if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST {split} split: missing {', '.join(missing)}; expected the IDX .gz files of Debian's "
                "dataset-fashion-mnist package in that folder"
            )
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3:
            raise ValueError(f"{image_file} holds an array of shape {images.shape}; expected (N, H, W) images")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{label_file} holds {labels.shape} labels for {images.shape[0]} images in {image_file}")
        if labels.size and labels.max() >= len(self.CLASSES):
            raise ValueError(f"{label_file} holds label {labels.max()}; Fashion-MNIST labels are 0–9")
        self.split = split
        self.transform = transform
        self.images = torch.from_numpy(images)
        self.targets = torch.from_numpy(labels).long()

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names, index = label."""
        return self.CLASSES

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index].numpy())
        return (image if self.transform is None else self.transform(image)), int(self.targets[index])
