"""Classification augmentations on Pillow images and torch tensors: the DeiT/timm recipe of PaCaViT@4307018
imagenet_vit_adamw.yml.

Training (:func:`classification_train_transform`): random-resized crop (bicubic) → horizontal flip → RandAugment
``rand-m9-mstd0.5-inc1`` → [0, 1] tensor → normalise → random erasing (prob 0.25, per-pixel noise). Batches are
then mixed by :class:`Mixup` (mixup 0.8 / cutmix 1.0, switch 0.5, label smoothing 0.1). Evaluation
(:func:`classification_eval_transform`): resize the shorter side to ``floor(size / crop_pct)`` (bicubic), centre
crop, normalise.

Every transform takes RGB or single-channel ('L') images; give ``mean``/``std`` one value per channel, e.g.
``(0.2860,)``/``(0.3530,)`` for Fashion-MNIST.

**Randomness.** Every random draw comes from torch's global (CPU) generator — ``torch.rand``, ``torch.randint``,
``torch.randn`` and :class:`torch.distributions.Beta` — never from Python's ``random`` or ``numpy.random``. Saving
and restoring ``torch.get_rng_state()`` therefore reproduces the augmentation exactly, also for :class:`Mixup` on
CUDA tensors (its draws are made on the CPU).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch import Tensor

from tocalib.models import PretrainedCfg

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RAND_AUGMENT_OPS",
    "RAND_INCREASING_OPS",
    "RAND_OPS",
    "Compose",
    "Mixup",
    "Normalize",
    "RandAugment",
    "RandomErasing",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "ResizeCenterCrop",
    "classification_eval_transform",
    "classification_train_transform",
    "eval_transform",
    "rand_augment_transform",
    "to_tensor",
]

IMAGENET_MEAN, IMAGENET_STD = PretrainedCfg.mean, PretrainedCfg.std  # the defaults of a model's pretrained_cfg

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _resampling(name: str, allowed: Sequence[str] = tuple(_RESAMPLING)) -> Image.Resampling:
    if name not in allowed:
        raise ValueError(f"interpolation={name!r} is not supported; use one of {', '.join(map(repr, allowed))}")
    return _RESAMPLING[name]


def _rand() -> float:
    """One uniform draw in [0, 1) from torch's global generator."""
    return float(torch.rand(()))


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * _rand()


def _randint(low: int, high: int) -> int:
    """A uniform integer in [low, high] (both ends included) from torch's global generator."""
    return int(torch.randint(low, high + 1, ()))


def _pair(size: int | tuple[int, int], name: str) -> tuple[int, int]:
    """``size`` as (height, width)."""
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"{name}={size!r} must be a positive int or a (height, width) pair of positive ints")
    return pair  # type: ignore[return-value]


def _check_range(value: Sequence[float], name: str, low: float = -math.inf, high: float = math.inf) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name}={tuple(value)!r} must be a (min, max) pair with {low} <= min <= max <= {high}")


class Compose:
    """Apply ``transforms`` in order: ``Compose([f, g])(x) == g(f(x))``."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Any) -> Any:
        for transform in self.transforms:
            x = transform(x)
        return x

    def __repr__(self) -> str:
        return "Compose(\n" + "".join(f"  {t!r},\n" for t in self.transforms) + ")"


def to_tensor(image: Image.Image) -> Tensor:
    """An RGB or 'L' Pillow image (W × H) → float32 tensor (C, H, W) in [0, 1], C = 3 or 1."""
    if image.mode not in ("RGB", "L"):
        raise ValueError(f"to_tensor takes 'RGB' or 'L' images, got mode {image.mode!r}; convert it first")
    array = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
    if array.ndim == 2:
        array = array[:, :, None]
    return array.permute(2, 0, 1).contiguous().to(torch.float32).div_(255.0)


class Normalize:
    """(C, H, W) float tensor → ``(x - mean) / std`` per channel; ``mean``/``std`` hold one value per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need the same number (> 0) of channels")
        if any(s <= 0 for s in std):
            raise ValueError(f"std {tuple(std)} must be positive")
        self.mean_values, self.std_values = tuple(mean), tuple(std)
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, x: Tensor) -> Tensor:
        if x.ndim != 3 or x.shape[0] != len(self.mean):
            raise ValueError(
                f"Normalize with {len(self.mean)} channel(s) got a tensor of shape {tuple(x.shape)}; expected "
                f"({len(self.mean)}, H, W): give one mean/std value per image channel"
            )
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean_values}, std={self.std_values})"


class ResizeCenterCrop:
    """Pillow image → (size × size) Pillow image: resize the shorter side to ``floor(size / crop_pct)``, keeping
    the aspect ratio (the longer side is truncated to an int), then crop the centre (timm's eval transform)."""

    def __init__(self, size: int = 224, crop_pct: float = 0.9, interpolation: str = "bicubic") -> None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct={crop_pct} must be in (0, 1]")
        self.size = _pair(size, "size")[0]
        self.crop_pct = crop_pct
        self.interpolation = interpolation
        self._resample = _resampling(interpolation)

    def __call__(self, image: Image.Image) -> Image.Image:
        short = math.floor(self.size / self.crop_pct)
        w, h = image.size
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        image = image.resize(size, self._resample)
        left, top = round((size[0] - self.size) / 2.0), round((size[1] - self.size) / 2.0)
        return image.crop((left, top, left + self.size, top + self.size))

    def __repr__(self) -> str:
        return f"ResizeCenterCrop(size={self.size}, crop_pct={self.crop_pct}, interpolation={self.interpolation!r})"


class RandomResizedCrop:
    """Crop a random region and resize it to ``size`` ((height, width) or an int for a square), torchvision's
    semantics: up to 10 tries drawing the area fraction uniformly in ``scale`` and the aspect ratio w/h
    log-uniformly in ``ratio``; the first region that fits the image is used. If none fits, the central crop of
    the whole image, clamped to the ratio range (and to at least one pixel), is used."""

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
    ) -> None:
        self.size = _pair(size, "size")
        _check_range(scale, "scale", 0.0, 1.0)
        _check_range(ratio, "ratio", 0.0)
        if scale[1] == 0 or ratio[0] == 0:
            raise ValueError(f"scale={scale} and ratio={ratio} need a positive maximum scale and minimum ratio")
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.interpolation = interpolation
        self._resample = _resampling(interpolation)

    def get_params(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width) of a region of a ``width × height`` image."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * _uniform(*self.scale)
            aspect = math.exp(_uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return _randint(0, height - h), _randint(0, width - w), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, max(1, round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = max(1, round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image) -> Image.Image:
        top, left, h, w = self.get_params(*image.size)
        return image.crop((left, top, left + w, top + h)).resize((self.size[1], self.size[0]), self._resample)

    def __repr__(self) -> str:
        return (
            f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"interpolation={self.interpolation!r})"
        )


class RandomHorizontalFlip:
    """Mirror a Pillow image left–right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"p={p} must be a probability in [0, 1]")
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if _rand() < self.p else image

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


# RandAugment (timm's variant). An op gets the image, its level = magnitude / 10 (1.0 at the usual maximum
# magnitude 10; more when ``magnitude_max`` allows magnitudes above 10), the fill colour and the resampling
# filter of geometric ops. Signed ops flip their sign with probability 1/2.

_LEVEL_DENOM = 10.0
_Fill = int | tuple[int, ...]
_Op = Callable[[Image.Image, float, _Fill, Image.Resampling], Image.Image]


def _signed(value: float) -> float:
    return -value if _rand() > 0.5 else value


def _affine(image: Image.Image, matrix: tuple[float, ...], fill: _Fill, resample: Image.Resampling) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def _posterize(image: Image.Image, bits: int) -> Image.Image:
    """Keep the ``bits`` most significant bits of each value; 0 bits leaves black (Pillow >= 12 refuses 0)."""
    if bits >= 8:
        return image
    return ImageOps.posterize(image, bits) if bits > 0 else Image.new(image.mode, image.size)


def _solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return image.point(lut * len(image.getbands()))


def _enhance(kind: Callable[[Image.Image], Any], increasing: bool) -> _Op:
    def op(image: Image.Image, level: float, fill: _Fill, resample: Image.Resampling) -> Image.Image:
        factor = max(0.1, 1.0 + _signed(0.9 * level)) if increasing else 1.8 * level + 0.1
        return kind(image).enhance(factor)

    return op


RAND_AUGMENT_OPS: dict[str, _Op] = {
    "AutoContrast": lambda image, level, fill, resample: ImageOps.autocontrast(image),
    "Equalize": lambda image, level, fill, resample: ImageOps.equalize(image),
    "Invert": lambda image, level, fill, resample: ImageOps.invert(image),
    "Rotate": lambda image, level, fill, resample: image.rotate(
        _signed(30.0 * level), resample=resample, fillcolor=fill
    ),
    "Posterize": lambda image, level, fill, resample: _posterize(image, int(4 * level)),
    "PosterizeIncreasing": lambda image, level, fill, resample: _posterize(image, 4 - int(4 * level)),
    "Solarize": lambda image, level, fill, resample: ImageOps.solarize(image, int(256 * level)),
    "SolarizeIncreasing": lambda image, level, fill, resample: ImageOps.solarize(image, 256 - int(256 * level)),
    "SolarizeAdd": lambda image, level, fill, resample: _solarize_add(image, int(110 * level)),
    "Color": _enhance(ImageEnhance.Color, increasing=False),
    "ColorIncreasing": _enhance(ImageEnhance.Color, increasing=True),
    "Contrast": _enhance(ImageEnhance.Contrast, increasing=False),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast, increasing=True),
    "Brightness": _enhance(ImageEnhance.Brightness, increasing=False),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness, increasing=True),
    "Sharpness": _enhance(ImageEnhance.Sharpness, increasing=False),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness, increasing=True),
    "ShearX": lambda image, level, fill, resample: _affine(
        image, (1, _signed(0.3 * level), 0, 0, 1, 0), fill, resample
    ),
    "ShearY": lambda image, level, fill, resample: _affine(
        image, (1, 0, 0, _signed(0.3 * level), 1, 0), fill, resample
    ),
    "TranslateXRel": lambda image, level, fill, resample: _affine(
        image, (1, 0, _signed(0.45 * level) * image.size[0], 0, 1, 0), fill, resample
    ),
    "TranslateYRel": lambda image, level, fill, resample: _affine(
        image, (1, 0, 0, 0, 1, _signed(0.45 * level) * image.size[1]), fill, resample
    ),
}
"""Every RandAugment op by timm's name: ``(image, level, fill, resample) -> image``, level = magnitude / 10."""

_COMMON_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate")
_GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_OPS = (
    *_COMMON_OPS,
    *("Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness"),
    *_GEOMETRIC_OPS,
)
"""timm's default RandAugment ops (``inc0``): the colour ops get stronger *or weaker* as the magnitude grows."""
RAND_INCREASING_OPS = (
    *_COMMON_OPS,
    *("PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing"),
    *("BrightnessIncreasing", "SharpnessIncreasing"),
    *_GEOMETRIC_OPS,
)
"""timm's ``inc1`` ops: every op's strength increases with the magnitude (the recipe of imagenet_vit_adamw.yml)."""


class RandAugment:
    """timm's RandAugment on RGB or 'L' Pillow images (size and mode are kept).

    Per image: draw ``num_ops`` ops uniformly *with replacement* from ``ops``; apply each with probability
    ``prob``, at a magnitude drawn as ``magnitude + N(0, magnitude_std)`` (``magnitude_std = inf``: uniform in
    [0, magnitude]) and clipped to [0, magnitude_max]. Geometric ops (rotate, shear, translate) fill uncovered
    pixels with ``img_mean`` (0–255, one value per channel, or one value for all) and resample with
    ``interpolation`` ('nearest', 'bilinear' or 'bicubic').
    """

    def __init__(
        self,
        ops: Sequence[str] = RAND_INCREASING_OPS,
        magnitude: float = 9.0,
        num_ops: int = 2,
        magnitude_std: float = 0.0,
        magnitude_max: float = 10.0,
        prob: float = 0.5,
        img_mean: Sequence[int] = tuple(round(255 * m) for m in IMAGENET_MEAN),
        interpolation: str = "bilinear",
    ) -> None:
        unknown = [name for name in ops if name not in RAND_AUGMENT_OPS]
        if unknown or not ops:
            raise ValueError(
                f"ops={list(ops)!r}: unknown {unknown}; pick a non-empty list from {list(RAND_AUGMENT_OPS)}"
            )
        if num_ops < 1 or magnitude < 0 or magnitude_std < 0 or magnitude_max <= 0 or not 0 <= prob <= 1:
            raise ValueError(
                f"RandAugment needs num_ops >= 1, magnitude >= 0, magnitude_std >= 0, magnitude_max > 0 and prob in "
                f"[0, 1]; got num_ops={num_ops}, magnitude={magnitude}, magnitude_std={magnitude_std}, "
                f"magnitude_max={magnitude_max}, prob={prob}"
            )
        if not img_mean or not all(0 <= v <= 255 for v in img_mean):
            raise ValueError(f"img_mean={tuple(img_mean)!r} must hold 0–255 fill values (one, or one per channel)")
        self.ops = tuple(ops)
        self.magnitude = float(magnitude)
        self.num_ops = int(num_ops)
        self.magnitude_std = float(magnitude_std)
        self.magnitude_max = float(magnitude_max)
        self.prob = float(prob)
        self.img_mean = tuple(int(v) for v in img_mean)
        self.interpolation = interpolation
        self._resample = _resampling(interpolation, ("nearest", "bilinear", "bicubic"))

    def _fill(self, image: Image.Image) -> _Fill:
        bands = len(image.getbands())
        if len(self.img_mean) not in (1, bands):
            raise ValueError(
                f"RandAugment img_mean={self.img_mean} has {len(self.img_mean)} values for a {image.mode!r} image; "
                f"give one value or one per channel ({bands})"
            )
        return self.img_mean[0] if bands == 1 else self.img_mean * (bands // len(self.img_mean))

    def _sample_magnitude(self) -> float:
        magnitude = self.magnitude
        if self.magnitude_std == math.inf:
            magnitude = _uniform(0.0, magnitude)
        elif self.magnitude_std > 0:
            magnitude += self.magnitude_std * float(torch.randn(()))
        return min(max(magnitude, 0.0), self.magnitude_max)

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.mode not in ("RGB", "L"):
            raise ValueError(f"RandAugment takes 'RGB' or 'L' images, got mode {image.mode!r}; convert it first")
        fill = self._fill(image)
        for index in torch.randint(len(self.ops), (self.num_ops,)).tolist():
            if _rand() >= self.prob:
                continue
            level = self._sample_magnitude() / _LEVEL_DENOM
            image = RAND_AUGMENT_OPS[self.ops[index]](image, level, fill, self._resample)
        return image

    def __repr__(self) -> str:
        return (
            f"RandAugment(n={self.num_ops}, m={self.magnitude}, mstd={self.magnitude_std}, mmax={self.magnitude_max}, "
            f"p={self.prob}, ops={list(self.ops)}, img_mean={self.img_mean}, interpolation={self.interpolation!r})"
        )


_RAND_KEYS = ("m", "n", "mstd", "mmax", "inc", "p")
_RAND_TOKEN = re.compile(r"([a-z]+)(\d+(?:\.\d*)?|\.\d+)")


def rand_augment_transform(config_str: str, img_mean: Sequence[int], interpolation: str = "bilinear") -> RandAugment:
    """A :class:`RandAugment` from timm's config string, e.g. ``"rand-m9-mstd0.5-inc1"``.

    Tokens after ``rand``, separated by ``-``, each a key and a number: ``m`` magnitude (default 10), ``n`` ops per
    image (2), ``mstd`` std of the magnitude noise (0; above 100 means uniform in [0, m]), ``mmax`` magnitude
    upper bound (10), ``inc`` 1 for the increasing op set (0), ``p`` probability of each op (0.5). ``img_mean``:
    fill of geometric ops, 0–255 per channel (timm: ``round(255 * mean)``).
    """
    example = "e.g. 'rand-m9-mstd0.5-inc1'"
    head, *tokens = config_str.split("-")
    if head != "rand":
        raise ValueError(f"RandAugment config {config_str!r} must start with 'rand' ({example})")
    args: dict[str, float] = {}
    for token in tokens:
        match = _RAND_TOKEN.fullmatch(token)
        if match is None or match[1] not in _RAND_KEYS:
            raise ValueError(
                f"RandAugment config {config_str!r}: bad token {token!r}; expected one of the keys "
                f"{', '.join(_RAND_KEYS)} followed by a number ({example})"
            )
        key, value = match[1], float(match[2])
        if key in args:
            raise ValueError(f"RandAugment config {config_str!r} sets {key!r} twice; keep one")
        if key in ("n", "inc") and value != int(value):
            raise ValueError(f"RandAugment config {config_str!r}: {key!r} takes an integer, got {match[2]!r}")
        if key == "inc" and value not in (0, 1):
            raise ValueError(f"RandAugment config {config_str!r}: 'inc' is 0 or 1, got {match[2]!r}")
        args[key] = value
    mstd = args.get("mstd", 0.0)
    return RandAugment(
        ops=RAND_INCREASING_OPS if args.get("inc", 0) else RAND_OPS,
        magnitude=args.get("m", _LEVEL_DENOM),
        num_ops=int(args.get("n", 2)),
        magnitude_std=math.inf if mstd > 100 else mstd,
        magnitude_max=args.get("mmax", _LEVEL_DENOM),
        prob=args.get("p", 0.5),
        img_mean=img_mean,
        interpolation=interpolation,
    )


class RandomErasing:
    """timm's random erasing on one normalised (C, H, W) float tensor, returning a new tensor when it erases.

    With probability ``probability``, erase ``k`` boxes, k uniform in [1, ``count``]; each box gets up to 10 tries
    drawing its area fraction uniformly in ``area`` (divided by k) and log(h / w) uniformly in ``log_ratio``, and
    is kept if it fits strictly inside the image. Erased values: ``"pixel"`` N(0, 1) per pixel and channel,
    ``"rand"`` N(0, 1) per channel, ``"const"`` zeros.
    """

    def __init__(
        self,
        probability: float = 0.25,
        mode: str = "pixel",
        count: int = 1,
        area: tuple[float, float] = (0.02, 1 / 3),
        log_ratio: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
    ) -> None:
        if not 0 <= probability <= 1:
            raise ValueError(f"probability={probability} must be in [0, 1]")
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"mode={mode!r} must be 'pixel', 'rand' or 'const'")
        if count < 1:
            raise ValueError(f"count={count} must be >= 1 (the largest number of boxes per image)")
        _check_range(area, "area", 0.0, 1.0)
        _check_range(log_ratio, "log_ratio")
        self.probability = probability
        self.mode = mode
        self.count = count
        self.area = tuple(area)
        self.log_ratio = tuple(log_ratio)

    def _values(self, channels: int, h: int, w: int, like: Tensor) -> Tensor:
        if self.mode == "pixel":
            return torch.randn(channels, h, w, dtype=like.dtype).to(like.device)
        if self.mode == "rand":
            return torch.randn(channels, 1, 1, dtype=like.dtype).to(like.device)
        return torch.zeros(channels, 1, 1, dtype=like.dtype, device=like.device)

    def __call__(self, x: Tensor) -> Tensor:
        if x.ndim != 3 or not x.is_floating_point():
            raise ValueError(f"RandomErasing takes one (C, H, W) float tensor, got {x.dtype} {tuple(x.shape)}")
        if _rand() >= self.probability:
            return x
        x = x.clone()
        channels, height, width = x.shape
        count = _randint(1, self.count)
        for _ in range(count):
            for _attempt in range(10):
                target_area = _uniform(*self.area) * height * width / count
                aspect = math.exp(_uniform(*self.log_ratio))
                h = round(math.sqrt(target_area * aspect))
                w = round(math.sqrt(target_area / aspect))
                if w < width and h < height:
                    top, left = _randint(0, height - h), _randint(0, width - w)
                    x[:, top : top + h, left : left + w] = self._values(channels, h, w, x)
                    break
        return x

    def __repr__(self) -> str:
        return (
            f"RandomErasing(probability={self.probability}, mode={self.mode!r}, count={self.count}, "
            f"area={self.area}, log_ratio={self.log_ratio})"
        )


class Mixup:
    """timm's batch-mode mixup/cutmix with label smoothing: ``mixup(x, target) -> (x_mixed, soft_target)``.

    ``x`` (B, C, H, W) float, ``target`` (B,) int64 class indices → mixed (B, C, H, W) (a new tensor; the input is
    left alone) and (B, num_classes) float32 targets whose rows sum to 1. The batch is mixed with its reverse
    ``x.flip(0)``. With probability ``prob`` the batch is mixed, by cutmix with probability ``switch_prob`` when
    both alphas are > 0 (else by the one enabled); λ ~ Beta(α, α) of the chosen method. Mixup: ``λ x + (1 - λ)
    x.flip(0)``. Cutmix: a box of ``int(sqrt(1 - λ) · side)`` per side (halved each way around a uniform centre,
    clipped to the image) is pasted from ``x.flip(0)``, and λ becomes 1 - box area / image area. Targets:
    ``λ smooth(y) + (1 - λ) smooth(y.flip(0))``, smooth = ``label_smoothing / num_classes`` off the class and
    ``1 - label_smoothing`` more on it.

    Any batch size works: with an odd B the middle sample is its own partner, so it keeps its image and label.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0 or mixup_alpha == cutmix_alpha == 0:
            raise ValueError(
                f"mixup_alpha={mixup_alpha} and cutmix_alpha={cutmix_alpha} must be >= 0 and not both 0; to train "
                "without mixing, leave Mixup out and smooth the labels in the loss"
            )
        if not 0 <= prob <= 1 or not 0 <= switch_prob <= 1:
            raise ValueError(f"prob={prob} and switch_prob={switch_prob} must be probabilities in [0, 1]")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes

    def _params(self) -> tuple[float, bool]:
        """(λ, use cutmix) for one batch; λ = 1 means no mixing."""
        if _rand() >= self.prob:
            return 1.0, False
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or _rand() < self.switch_prob)
        alpha = torch.tensor(self.cutmix_alpha if cutmix else self.mixup_alpha, dtype=torch.float64)
        return float(torch.distributions.Beta(alpha, alpha).sample()), cutmix

    def _box(self, height: int, width: int, lam: float) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the cutmix box for λ."""
        cut = math.sqrt(1.0 - lam)
        half_h, half_w = int(height * cut) // 2, int(width * cut) // 2
        cy, cx = _randint(0, height - 1), _randint(0, width - 1)
        return max(cy - half_h, 0), min(cy + half_h, height), max(cx - half_w, 0), min(cx + half_w, width)

    def smooth(self, target: Tensor) -> Tensor:
        """(B,) int64 class indices → (B, num_classes) float32 label-smoothed one-hot targets."""
        off = self.label_smoothing / self.num_classes
        soft = torch.full((len(target), self.num_classes), off, dtype=torch.float32, device=target.device)
        return soft.scatter_(1, target[:, None], 1.0 - self.label_smoothing + off)

    def __call__(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"Mixup takes x of shape (B, C, H, W), float; got {x.dtype} {tuple(x.shape)}")
        if target.shape != (x.shape[0],) or target.dtype != torch.int64:
            raise ValueError(
                f"Mixup takes target (B,) = ({x.shape[0]},) int64 class indices; got {target.dtype} "
                f"{tuple(target.shape)}"
            )
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.num_classes):
            raise ValueError(f"target holds class indices outside [0, {self.num_classes}); check num_classes")
        lam, cutmix = self._params()
        if lam < 1.0 and cutmix:
            top, bottom, left, right = self._box(x.shape[2], x.shape[3], lam)
            x = x.clone()
            x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (x.shape[2] * x.shape[3])
        elif lam < 1.0:
            x = lam * x + (1.0 - lam) * x.flip(0)
        soft = self.smooth(target)
        return x, lam * soft + (1.0 - lam) * soft.flip(0)

    def __repr__(self) -> str:
        return (
            f"Mixup(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, "
            f"switch_prob={self.switch_prob}, label_smoothing={self.label_smoothing}, num_classes={self.num_classes})"
        )


def classification_train_transform(
    size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
    interpolation: str = "bicubic",
) -> Compose:
    """The DeiT training pipeline of imagenet_vit_adamw.yml: Pillow image (RGB, or 'L' with one-value
    ``mean``/``std``) → normalised
    float32 (C, size, size) tensor.

    Random-resized crop (``scale``, ratio 3/4–4/3, ``interpolation``) → horizontal flip (``hflip``) → RandAugment
    from ``auto_augment`` (None: off), filling with ``round(255 * mean)`` and resampling with ``interpolation``
    as timm does when the train interpolation is fixed → tensor → normalise → random erasing (``re_prob`` 0:
    off).
    """
    steps: list[Callable[[Any], Any]] = [RandomResizedCrop(size, scale=scale, interpolation=interpolation)]
    if hflip > 0:
        steps.append(RandomHorizontalFlip(hflip))
    if auto_augment:
        img_mean = tuple(min(255, round(255 * m)) for m in mean)
        steps.append(rand_augment_transform(auto_augment, img_mean, interpolation))
    steps += [to_tensor, Normalize(mean, std)]
    if re_prob > 0:
        steps.append(RandomErasing(re_prob, mode=re_mode, count=re_count))
    return Compose(steps)


def classification_eval_transform(
    size: int = 224,
    crop_pct: float = 0.9,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
) -> Compose:
    """timm's evaluation pipeline: Pillow image → :class:`ResizeCenterCrop` → normalised float32 (C, size, size)."""
    return Compose([ResizeCenterCrop(size, crop_pct, interpolation), to_tensor, Normalize(mean, std)])


def eval_transform(cfg: PretrainedCfg, crop: int | None = None) -> Compose:
    """:func:`classification_eval_transform` for a model's ``cfg``: its crop ratio, mean/std and interpolation, the
    crop ``cfg.input_size`` unless ``crop`` is given."""
    size = cfg.input_size[-1] if crop is None else crop
    return classification_eval_transform(size, cfg.crop_pct, cfg.mean, cfg.std, cfg.interpolation)
