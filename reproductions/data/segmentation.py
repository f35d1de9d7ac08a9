"""Segmentation training data: ADE20k with mmseg 1.x's train pipeline, and a small texture set for quick runs.

Randomness: every random draw comes from torch's global RNG (``torch.rand``/``torch.randint``), so seeding it
(``torch.manual_seed``, or the DataLoader's per-worker seeding) fixes the augmentations and a saved RNG state
resumes them exactly. The texture validation set is the one exception: it draws from a local generator seeded by
``(seed, index)`` so that every evaluation sees the same samples.

**ADE20k** (:class:`ADE20kTrain`), the pipeline of mmseg 1.x's ``_base_/datasets/ade20k.py`` (PaCaViT@4307018
segmentation configs):

1. RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True): a ratio r ~ U(0.5, 2.0) gives the
   target scale (int(2048 r), int(512 r)), then mmcv's keep-ratio rescale into it; image bilinear (rounded back to
   the uint8 grid, as OpenCV does), labels nearest;
2. RandomCrop(512, cat_max_ratio=0.75): a uniform crop; up to 10 redraws until the crop holds more than one class
   and the largest one covers less than 75% of its labelled (non-ignore) pixels — after 10 failed redraws the
   last crop is kept, as in mmseg. A side shorter than the crop is kept whole;
3. RandomFlip(0.5), horizontal;
4. PhotoMetricDistortion: brightness (delta 32), contrast (0.5–1.5) either first or last, saturation (0.5–1.5) and
   hue (delta 18 in OpenCV units of 2°), each applied with probability 0.5, in mmcv's order (see
   :func:`photo_metric_distortion`);
5. normalisation with mmseg's RGB mean/std, then padding at the bottom and right to crop×crop (image 0 after
   normalisation, labels 255), as mmseg's ``SegDataPreProcessor`` does.

**Textures** (:class:`TextureSegmentation`): scikit-image's bundled CC0 textures brick, grass and gravel (512×512
grayscale each). A sample's label map is a Voronoi partition of 2–6 uniform seed points, each cell a uniform
class; pixel (i, j) of class k shows texture k at (oy_k + i, ox_k + j), one offset per class and sample (train
also turns and mirrors each class's patch). Train and val read disjoint rows of every texture (0–383 and
384–511), so val measures generalisation to unseen texture, not memory of pixels. Class balance: by symmetry each
class covers a third of the pixels in expectation (the first 64 val samples at size 128, seed 0, hold 27.0%
brick, 35.5% grass, 37.5% gravel). Mean pixels: brick 111, grass 118, gravel 127 (std 26, 39, 39); the best
classifier of a single gray value (Bayes on the val rows' histograms) is right on 57.7% of pixels (chance 33.3%),
so reaching a high mIoU takes texture, i.e. context.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from tocalib.reproductions.data.ade20k import IGNORE, list_pairs, read_pair
from tocalib.reproductions.data.images import normalize, rescaled_size

__all__ = [
    "TEXTURE_CLASSES",
    "TEXTURE_ROWS",
    "ADE20kTrain",
    "TextureLayout",
    "TextureSegmentation",
    "pad_to",
    "photo_metric_distortion",
    "random_crop",
    "random_flip",
    "random_resize",
]

TEXTURE_CLASSES = ("brick", "grass", "gravel")
"""Class index → scikit-image texture (``skimage.data.<name>()``)."""

TEXTURE_ROWS = {"train": (0, 384), "val": (384, 512)}
"""Rows [start, stop) of every texture image that each split samples from; disjoint by construction."""

TEXTURE_SIZE = 512


def _uniform(low: float, high: float) -> float:
    """A float ~ U(low, high) from torch's global RNG."""
    return low + (high - low) * float(torch.rand(()))


def _coin() -> bool:
    """A fair coin from torch's global RNG."""
    return bool(torch.randint(2, ()))


def random_resize(
    image: torch.Tensor, labels: torch.Tensor, scale: tuple[int, int], ratio_range: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """mmcv ``RandomResize(scale, ratio_range, keep_ratio=True)`` of a (3, H, W) float image on the 0–255 scale
    and its (H, W) int64 labels → (3, H', W') and (H', W'). Image bilinear (half-pixel centres, no antialiasing,
    rounded to integers as OpenCV's uint8 resize does), labels nearest."""
    ratio = _uniform(*ratio_range)
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    size = rescaled_size(image.shape[-2], image.shape[-1], target)
    if size == tuple(image.shape[-2:]):
        return image, labels
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0].round().clamp(0, 255)
    labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, labels


def _crop_box(height: int, width: int, crop: int) -> tuple[int, int]:
    """A uniform top-left corner (y, x) of a crop×crop window (a side shorter than ``crop`` gives 0)."""
    y = int(torch.randint(max(height - crop, 0) + 1, ()))
    x = int(torch.randint(max(width - crop, 0) + 1, ()))
    return y, x


def random_crop(
    image: torch.Tensor, labels: torch.Tensor, crop: int, cat_max_ratio: float = 1.0, ignore_index: int = IGNORE
) -> tuple[torch.Tensor, torch.Tensor]:
    """mmseg ``RandomCrop(crop, cat_max_ratio)`` of a (C, H, W) image and (H, W) labels → (C, h, w) and (h, w)
    with h = min(H, crop), w = min(W, crop).

    With ``cat_max_ratio < 1`` the window is redrawn up to 10 times until it holds at least two classes and the
    largest covers less than ``cat_max_ratio`` of its non-ignore pixels; after 10 failures the last draw is kept.
    """
    height, width = labels.shape
    y, x = _crop_box(height, width, crop)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            window = labels[y : y + crop, x : x + crop]
            counts = torch.bincount(window[window != ignore_index])
            counts = counts[counts > 0]
            if counts.numel() > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio:
                break
            y, x = _crop_box(height, width, crop)
    return image[:, y : y + crop, x : x + crop], labels[y : y + crop, x : x + crop]


def random_flip(image: torch.Tensor, labels: torch.Tensor, prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror a (C, H, W) image and its (H, W) labels left–right with probability ``prob``."""
    if float(torch.rand(())) < prob:
        return image.flip(-1), labels.flip(-1)
    return image, labels


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] → (3, H, W) HSV, each in [0, 1] (hue as a fraction of the full turn)."""
    r, g, b = rgb.unbind(0)
    value, argmax = rgb.max(0)
    chroma = value - rgb.min(0).values
    safe = chroma.clamp(min=1e-12)
    sector = torch.where(
        argmax == 0, ((g - b) / safe) % 6, torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    hue = (sector / 6).where(chroma > 0, 0.0)
    saturation = chroma / value.clamp(min=1e-12)
    return torch.stack([hue, saturation, value])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rgb_to_hsv`: (3, H, W) HSV in [0, 1] → (3, H, W) RGB in [0, 1]. Channel n (R, G, B)
    is v − v·s·clamp(min(k, 4 − k), 0, 1) with k = (5, 3, 1)[n] + 6h mod 6."""
    hue, saturation, value = hsv[0:1], hsv[1:2], hsv[2:3]
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype).view(3, 1, 1) + 6 * hue) % 6
    return value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1)


def photo_metric_distortion(
    image: torch.Tensor,
    brightness_delta: float = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> torch.Tensor:
    """mmseg ``PhotoMetricDistortion`` of a (3, H, W) RGB float image on the 0–255 integer grid → same shape.

    Order: brightness (+δ, δ ~ U(−32, 32)); a coin picks whether contrast (×α, α ~ U(0.5, 1.5)) comes now or last;
    saturation (S ×α, α ~ U(0.5, 1.5)); hue (H + δ with integer δ in [−18, 18) in OpenCV's 2° units); contrast if
    it was put last. Each step happens with probability 0.5. Like mmcv, brightness and contrast clip to [0, 255] and
    truncate to integers; the HSV steps compute in float and round the result (OpenCV keeps uint8 HSV in between).
    """
    if _coin():
        image = (image + _uniform(-brightness_delta, brightness_delta)).clamp(0, 255).floor()
    contrast_first = _coin()
    if contrast_first and _coin():
        image = (image * _uniform(*contrast_range)).clamp(0, 255).floor()
    if _coin():
        hsv = _rgb_to_hsv(image / 255)
        hsv[1] = (hsv[1] * _uniform(*saturation_range)).clamp(0, 1)
        image = (_hsv_to_rgb(hsv) * 255).round().clamp(0, 255)
    if _coin():
        hsv = _rgb_to_hsv(image / 255)
        hsv[0] = (hsv[0] + int(torch.randint(-hue_delta, hue_delta, ())) / 180) % 1
        image = (_hsv_to_rgb(hsv) * 255).round().clamp(0, 255)
    if not contrast_first and _coin():
        image = (image * _uniform(*contrast_range)).clamp(0, 255).floor()
    return image


def pad_to(
    image: torch.Tensor, labels: torch.Tensor, size: int, ignore_index: int = IGNORE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a (C, h, w) image with 0 and its (h, w) labels with ``ignore_index`` at the bottom and right to
    (C, size, size) and (size, size); h, w ≤ size."""
    height, width = labels.shape
    if height > size or width > size:
        raise ValueError(f"cannot pad a {height}×{width} map to {size}×{size}: crop it first")
    pad = (0, size - width, 0, size - height)
    return F.pad(image, pad, value=0.0), F.pad(labels, pad, value=ignore_index)


class ADE20kTrain(Dataset):
    """ADE20k (``ADEChallengeData2016``) with mmseg 1.x's default train pipeline (module docstring).

    ``root`` holds ``images/<split>/*.jpg`` and ``annotations/<split>/*.png``; labels use ``reduce_zero_label``
    (150 classes, 255 = ignore). Item ``i`` → ``(image (3, crop, crop) float32, labels (crop, crop) int64)``,
    freshly augmented on each access from torch's global RNG.
    """

    def __init__(
        self,
        root: Path | str,
        split: str = "training",
        crop: int = 512,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
    ) -> None:
        if crop < 1:
            raise ValueError(f"crop must be a positive size in pixels, got {crop}")
        if min(scale) < 1:
            raise ValueError(f"scale must be two positive sizes (long, short), got {scale}")
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low ≤ high, got {ratio_range}")
        if not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1] (1 turns the check off), got {cat_max_ratio}")
        self.root = Path(root)
        self.pairs = list_pairs(self.root, split)
        self.crop, self.scale, self.ratio_range, self.cat_max_ratio = (
            crop,
            tuple(scale),
            tuple(ratio_range),
            cat_max_ratio,
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_np, labels_np = read_pair(*self.pairs[index])
        image = torch.from_numpy(image_np).permute(2, 0, 1).float()
        labels = torch.from_numpy(labels_np)
        image, labels = random_resize(image, labels, self.scale, self.ratio_range)
        image, labels = random_crop(image, labels, self.crop, self.cat_max_ratio)
        image, labels = random_flip(image, labels)
        image = photo_metric_distortion(image)
        return pad_to(normalize(image), labels, self.crop)


@functools.cache
def _textures() -> torch.Tensor:
    """(3, 512, 512) uint8: scikit-image's brick, grass and gravel, in :data:`TEXTURE_CLASSES` order."""
    try:
        from skimage import data
    except ImportError as error:
        raise ImportError(
            "TextureSegmentation needs scikit-image's bundled textures: pip install scikit-image (or install this "
            "project's `train` extra: pip install -e '.[train]')"
        ) from error
    images = [torch.from_numpy(getattr(data, name)()) for name in TEXTURE_CLASSES]
    for name, image in zip(TEXTURE_CLASSES, images, strict=True):
        if image.shape != (TEXTURE_SIZE, TEXTURE_SIZE) or image.dtype != torch.uint8:
            raise RuntimeError(
                f"skimage.data.{name}() is {tuple(image.shape)} {image.dtype}, expected 512×512 uint8; this "
                "scikit-image version ships different textures"
            )
    return torch.stack(images)


@dataclass(frozen=True)
class TextureLayout:
    """Everything random about one texture sample (K = len(TEXTURE_CLASSES)).

    ``labels`` (size, size) int64 class map; ``offsets`` (K, 2) int64 top-left (row, column) in texture k of the
    size×size patch that class k shows; ``turns`` (K,) int64 quarter turns (``torch.rot90``) and ``mirrored``
    (K,) bool left–right flips applied to each patch, flip first (both zero for val).
    """

    labels: torch.Tensor
    offsets: torch.Tensor
    turns: torch.Tensor
    mirrored: torch.Tensor


class TextureSegmentation(Dataset):
    """Voronoi mosaics of three scikit-image textures (module docstring); a fast stand-in for ADE20k.

    ``split="train"``: ``length`` samples per epoch, each drawn fresh from torch's global RNG (the index only sets
    the epoch length; ``seed`` is unused). ``split="val"``: ``length`` fixed samples, sample ``i`` drawn from a
    local generator seeded from ``(seed, i)``. Item → ``(image (3, size, size) float32, labels (size, size) int64 in
    0…2)``; the gray texture is replicated to RGB and normalised with mmseg's mean/std.
    """

    def __init__(self, split: str = "train", size: int = 128, length: int = 1000, seed: int = 0) -> None:
        if split not in TEXTURE_ROWS:
            raise ValueError(f"split must be one of {sorted(TEXTURE_ROWS)}, got {split!r}")
        start, stop = TEXTURE_ROWS[split]
        if not 1 <= size <= stop - start:
            raise ValueError(
                f"size={size} does not fit the {stop - start} texture rows of split {split!r} (rows {start}–"
                f"{stop - 1}); use 1 ≤ size ≤ {stop - start}"
            )
        if length < 1:
            raise ValueError(f"length must be ≥ 1 (samples per epoch / in the val set), got {length}")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        self.split, self.size, self.length, self.seed = split, size, length, seed
        # torch's CPU generator keeps only 32 bits of a seed: sample i uses (base + i) mod 2**32, distinct per index
        self._base_seed = int(torch.randint(2**32, (), generator=torch.Generator().manual_seed(seed)))
        self.textures = _textures()

    def __len__(self) -> int:
        return self.length

    def layout(self, index: int) -> TextureLayout:
        """The random choices behind sample ``index`` (fresh global-RNG draws for train, fixed for val)."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is out of range for a TextureSegmentation of length {self.length}")
        generator = None
        if self.split == "val":
            generator = torch.Generator().manual_seed((self._base_seed + index) % 2**32)
        size, classes = self.size, len(TEXTURE_CLASSES)
        start, stop = TEXTURE_ROWS[self.split]
        num_points = int(torch.randint(2, 7, (), generator=generator))
        points = torch.rand(num_points, 2, generator=generator) * size
        cell_class = torch.randint(classes, (num_points,), generator=generator)
        rows = torch.randint(start, stop - size + 1, (classes,), generator=generator)
        columns = torch.randint(TEXTURE_SIZE - size + 1, (classes,), generator=generator)
        if self.split == "train":
            turns = torch.randint(4, (classes,), generator=generator)
            mirrored = torch.randint(2, (classes,), generator=generator).bool()
        else:
            turns = torch.zeros(classes, dtype=torch.int64)
            mirrored = torch.zeros(classes, dtype=torch.bool)
        centres = torch.arange(size, dtype=torch.float32) + 0.5
        grid = torch.stack(torch.meshgrid(centres, centres, indexing="ij"), dim=-1)  # (size, size, 2)
        nearest = ((grid[:, :, None, :] - points) ** 2).sum(-1).argmin(-1)  # (size, size)
        return TextureLayout(cell_class[nearest], torch.stack([rows, columns], dim=1), turns, mirrored)

    def render(self, layout: TextureLayout) -> torch.Tensor:
        """(size, size) uint8 gray image of a layout: each pixel shows its class's (turned, mirrored) patch."""
        size = self.size
        image = torch.zeros(size, size, dtype=torch.uint8)
        for k in range(len(TEXTURE_CLASSES)):
            row, column = (int(v) for v in layout.offsets[k])
            patch = self.textures[k, row : row + size, column : column + size]
            if layout.mirrored[k]:
                patch = patch.flip(-1)
            patch = torch.rot90(patch, int(layout.turns[k]), dims=(0, 1))
            image = torch.where(layout.labels == k, patch, image)
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        layout = self.layout(index)
        gray = self.render(layout).float()
        return normalize(gray.expand(3, -1, -1)), layout.labels
