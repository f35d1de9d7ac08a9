"""Classification augmentations: crop bounds, RandAugment parsing and ops, erasing boxes, mixup/cutmix targets, and
that every draw comes from torch's generator (same seed → same output, whatever Python's and numpy's state)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from tocalib.models import PretrainedCfg, create_model
from tocalib.reproductions.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RAND_AUGMENT_OPS,
    RAND_INCREASING_OPS,
    RAND_OPS,
    Compose,
    Mixup,
    Normalize,
    RandAugment,
    RandomErasing,
    RandomHorizontalFlip,
    RandomResizedCrop,
    classification_eval_transform,
    classification_train_transform,
    eval_transform,
    rand_augment_transform,
    to_tensor,
)


def _image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


# Tensors and normalisation


def test_to_tensor_gives_channels_first_values_in_unit_range_for_rgb_and_gray() -> None:
    rgb, gray = _image(5, 7), _image(5, 7, "L")
    x = to_tensor(rgb)
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 2, 3] * 255, torch.tensor(_pixels(rgb)[2, 3], dtype=torch.float32))
    y = to_tensor(gray)
    assert y.shape == (1, 5, 7)
    torch.testing.assert_close(y[0] * 255, torch.tensor(_pixels(gray), dtype=torch.float32))
    with pytest.raises(ValueError, match="'RGBA'"):
        to_tensor(rgb.convert("RGBA"))


def test_normalize_subtracts_the_mean_and_divides_by_the_std_per_channel() -> None:
    x = torch.rand(3, 4, 4)
    y = Normalize((0.1, 0.2, 0.3), (0.5, 0.25, 2.0))(x)
    torch.testing.assert_close(y[1], (x[1] - 0.2) / 0.25)
    with pytest.raises(ValueError, match="one mean/std value per image channel"):
        Normalize((0.5,), (0.5,))(x)
    with pytest.raises(ValueError, match="same number"):
        Normalize((0.5, 0.5), (0.5,))


def test_compose_applies_in_order() -> None:
    assert Compose([lambda v: v + 1, lambda v: v * 10])(2) == 30


# Evaluation transform


def _old_preprocess(image: Image.Image, crop: int, crop_pct: float) -> torch.Tensor:
    """The reference: timm's eval transform written out with numpy (the former ``imagenet.preprocess`` body)."""
    short = math.floor(crop / crop_pct)
    w, h = image.size
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = round((size[0] - crop) / 2.0), round((size[1] - crop) / 2.0)
    array = np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0
    array = (array - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize(("height", "width"), [(90, 61), (61, 90), (64, 64)])
def test_eval_transform_of_a_model_config_equals_the_reference(height: int, width: int) -> None:
    """The evaluation reads PaCa-ViT's pretrained_cfg (bicubic, crop_pct 0.9, ImageNet mean/std)."""
    image = _image(height, width, seed=height)
    expected = _old_preprocess(image, 48, 0.9)
    assert torch.equal(classification_eval_transform(48, 0.9)(image), expected)
    with torch.device("meta"):
        cfg = create_model("pacavit_tiny_p2cconv_100_0").pretrained_cfg
    assert torch.equal(eval_transform(cfg, crop=48)(image), expected)
    other = PretrainedCfg(crop_pct=1.0, interpolation="bilinear")
    assert not torch.equal(eval_transform(other, crop=48)(image), expected)


def test_eval_transform_takes_gray_images_with_one_channel_statistics() -> None:
    x = classification_eval_transform(20, 0.875, mean=(0.5,), std=(0.25,))(_image(30, 40, "L"))
    assert x.shape == (1, 20, 20)


# Random-resized crop and flip


@given(
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    scale=st.tuples(st.floats(0.01, 1.0), st.floats(0.01, 1.0)).map(sorted),
    ratio=st.tuples(st.floats(0.2, 5.0), st.floats(0.2, 5.0)).map(sorted),
    seed=st.integers(0, 2**16),
)
def test_random_resized_crop_region_respects_scale_and_ratio_or_is_the_central_fallback(
    width: int, height: int, scale: list[float], ratio: list[float], seed: int
) -> None:
    """A region lies inside the image; it is within ``scale`` and ``ratio`` up to rounding of its sides to whole
    pixels, or else it is the central crop of the whole image clamped to the ratio range."""
    crop = RandomResizedCrop(8, scale=tuple(scale), ratio=tuple(ratio))
    torch.manual_seed(seed)
    top, left, h, w = crop.get_params(width, height)
    assert top >= 0 and top + h <= height and left >= 0 and left + w <= width and h > 0 and w > 0
    area = width * height
    in_bounds = (
        (w - 0.5) * (h - 0.5) <= scale[1] * area * (1 + 1e-9)
        and (w + 0.5) * (h + 0.5) >= scale[0] * area * (1 - 1e-9)
        and (w - 0.5) / (h + 0.5) <= ratio[1]
        and (w + 0.5) / (h - 0.5) >= ratio[0]
    )
    in_ratio = width / height
    fallback_w = width if in_ratio <= ratio[1] else max(1, round(height * ratio[1]))
    fallback_h = max(1, round(width / ratio[0])) if in_ratio < ratio[0] else height
    is_fallback = (top, left, h, w) == ((height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h, fallback_w)
    assert in_bounds or is_fallback


@given(size=st.tuples(st.integers(1, 40), st.integers(1, 40)), mode=st.sampled_from(["RGB", "L"]))
def test_random_resized_crop_outputs_the_requested_height_and_width(size: tuple[int, int], mode: str) -> None:
    out = RandomResizedCrop(size)(_image(37, 53, mode))
    assert out.size == (size[1], size[0]) and out.mode == mode


def test_full_scale_square_crop_of_a_square_image_is_a_plain_resize() -> None:
    image = _image(32, 32)
    out = RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))(image)
    assert np.array_equal(_pixels(out), _pixels(image.resize((16, 16), Image.Resampling.BICUBIC)))


def test_random_resized_crop_rejects_reversed_ranges() -> None:
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCrop(8, scale=(0.9, 0.1))
    with pytest.raises(ValueError, match="interpolation='cubic'"):
        RandomResizedCrop(8, interpolation="cubic")


def test_horizontal_flip_mirrors_at_p1_and_keeps_at_p0() -> None:
    image = _image(6, 9)
    assert np.array_equal(_pixels(RandomHorizontalFlip(1.0)(image)), _pixels(image)[:, ::-1])
    assert RandomHorizontalFlip(0.0)(image) is image


# RandAugment


def test_rand_augment_config_string_sets_the_recipe_parameters() -> None:
    aug = rand_augment_transform("rand-m9-mstd0.5-inc1", (124, 116, 104))
    assert (aug.magnitude, aug.magnitude_std, aug.num_ops, aug.prob, aug.magnitude_max) == (9.0, 0.5, 2, 0.5, 10.0)
    assert aug.ops == RAND_INCREASING_OPS and len(aug.ops) == 15
    assert aug.img_mean == (124, 116, 104)


def test_rand_augment_config_string_reads_every_key_and_timm_defaults() -> None:
    aug = rand_augment_transform("rand-n3-m12.5-mmax20-p0.25-inc0-mstd101", (0,))
    assert (aug.num_ops, aug.magnitude, aug.magnitude_max, aug.prob) == (3, 12.5, 20.0, 0.25)
    assert aug.magnitude_std == math.inf and aug.ops == RAND_OPS
    default = rand_augment_transform("rand", (0,))
    assert (default.magnitude, default.num_ops, default.magnitude_std, default.prob) == (10.0, 2, 0.0, 0.5)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("rnd-m9", "must start with 'rand'"),
        ("rand-m9-x3", "bad token 'x3'"),
        ("rand-m", "bad token 'm'"),
        ("rand-m9--inc1", "bad token ''"),
        ("rand-mstd-0.5", "bad token 'mstd'"),
        ("rand-m9-m8", "sets 'm' twice"),
        ("rand-inc2", "'inc' is 0 or 1"),
        ("rand-n1.5", "'n' takes an integer"),
        ("rand-p1.5", "prob in"),
    ],
)
def test_rand_augment_rejects_bad_config_strings(config: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rand_augment_transform(config, (0, 0, 0))


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("name", sorted(RAND_AUGMENT_OPS))
@pytest.mark.parametrize("magnitude", [0.0, 10.0])
def test_every_op_runs_on_rgb_and_gray_images_and_keeps_size_and_mode(name: str, mode: str, magnitude: float) -> None:
    aug = RandAugment([name], magnitude=magnitude, num_ops=1, prob=1.0, img_mean=(1, 2, 3) if mode == "RGB" else (9,))
    out = aug(_image(13, 17, mode))
    assert out.size == (17, 13) and out.mode == mode


def _always(name: str, magnitude: float = 10.0, mean: tuple[int, ...] = (7, 8, 9)) -> RandAugment:
    return RandAugment([name], magnitude=magnitude, num_ops=1, prob=1.0, img_mean=mean)


def test_increasing_ops_at_full_magnitude_have_timm_strength() -> None:
    image = _image(16, 16)
    pixels = _pixels(image)
    assert np.array_equal(_pixels(_always("SolarizeIncreasing")(image)), 255 - pixels)  # threshold 256 - 256 = 0
    assert np.array_equal(_pixels(_always("PosterizeIncreasing", 0.0)(image)), pixels & 0xF0)  # 4 - 0 bits kept
    assert not _pixels(_always("PosterizeIncreasing")(image)).any()  # 4 - 4 bits kept: black
    added = np.where(pixels < 128, np.minimum(pixels + 110, 255), pixels)
    assert np.array_equal(_pixels(_always("SolarizeAdd")(image)), added)


def test_translate_moves_by_045_of_the_width_and_fills_with_img_mean() -> None:
    image = Image.new("RGB", (20, 4), (200, 200, 200))
    torch.manual_seed(0)
    out = _pixels(_always("TranslateXRel")(image))
    filled = np.all(out == (7, 8, 9), axis=-1)
    assert filled.sum(axis=1).tolist() == [9] * 4  # 0.45 × 20 columns, on one side
    assert filled[:, 0].all() or filled[:, -1].all()


def test_rotate_fills_the_corners_with_img_mean_on_gray_images() -> None:
    out = _pixels(_always("Rotate", mean=(40,))(Image.new("L", (32, 32), 255)))
    assert out[0, 0] == out[-1, -1] == 40 and out[16, 16] == 255


def test_rand_augment_with_zero_probability_is_the_identity() -> None:
    image = _image(20, 20)
    assert rand_augment_transform("rand-m9-mstd0.5-inc1-p0", (0, 0, 0))(image) is image


def test_rand_augment_fill_must_match_the_image_channels() -> None:
    with pytest.raises(ValueError, match="img_mean"):
        _always("Rotate", mean=(1, 2, 3))(_image(8, 8, "L"))


@given(seed=st.integers(0, 2**16))
def test_magnitude_noise_stays_within_zero_and_magnitude_max(seed: int) -> None:
    aug = RandAugment(magnitude=9.0, magnitude_std=5.0, magnitude_max=10.0)
    torch.manual_seed(seed)
    draws = [aug._sample_magnitude() for _ in range(50)]
    assert all(0.0 <= m <= 10.0 for m in draws) and len(set(draws)) > 1


# Random erasing


def test_random_erasing_with_zero_probability_is_the_identity() -> None:
    x = torch.randn(3, 8, 8)
    assert RandomErasing(0.0)(x) is x


@given(seed=st.integers(0, 2**16), size=st.tuples(st.integers(8, 48), st.integers(8, 48)), count=st.integers(1, 3))
def test_random_erasing_changes_boxes_whose_area_fraction_is_in_range(
    seed: int, size: tuple[int, int], count: int
) -> None:
    height, width = size
    x = torch.full((3, height, width), 7.0)
    torch.manual_seed(seed)
    out = RandomErasing(1.0, mode="const", count=count)(x)
    assert torch.equal(x, torch.full_like(x, 7.0))  # the input is left alone
    erased = (out == 0).all(0)
    assert torch.equal(erased, (out == 0).any(0))  # every channel erased together
    rounding = count * (0.5 * (height + width) + 0.25)  # each box's sides are rounded to whole pixels
    assert float(erased.sum()) <= height * width / 3 + rounding
    if count == 1 and erased.any():
        rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert int(erased.sum()) == h * w and h < height and w < width  # one box, strictly smaller than the image
        assert (h + 0.5) * (w + 0.5) >= 0.02 * height * width and (h - 0.5) * (w - 0.5) <= height * width / 3


def test_random_erasing_of_a_square_image_always_fits_a_box_with_the_right_values() -> None:
    torch.manual_seed(0)
    x = torch.full((3, 32, 32), 7.0)
    pixel = RandomErasing(1.0, mode="pixel", log_ratio=(math.log(0.5), math.log(2)))(x)
    changed = (pixel != 7.0).all(0)
    assert changed.any() and len(torch.unique(pixel[0][changed])) == int(changed.sum())  # per-pixel noise
    rand = RandomErasing(1.0, mode="rand", log_ratio=(math.log(0.5), math.log(2)))(x)
    changed = (rand != 7.0).any(0)
    per_channel = rand[:, changed]
    assert changed.any() and torch.equal(per_channel, per_channel[:, :1].expand_as(per_channel))


def test_random_erasing_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode='noise'"):
        RandomErasing(mode="noise")
    with pytest.raises(ValueError, match="area"):
        RandomErasing(area=(0.5, 0.1))
    with pytest.raises(ValueError, match=r"\(C, H, W\) float"):
        RandomErasing(1.0)(torch.zeros(1, 3, 4, 4))


# Mixup / cutmix


def _batch(batch: int, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample i is the constant image i + 1, with label i (all distinct)."""
    x = torch.arange(1, batch + 1, dtype=torch.float32)[:, None, None, None].expand(batch, 3, 12, 10).clone()
    return x, torch.arange(batch) % classes


@given(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 9),
    mixup_alpha=st.sampled_from([0.0, 0.2, 0.8]),
    cutmix_alpha=st.sampled_from([0.0, 1.0]),
    smoothing=st.sampled_from([0.0, 0.1]),
)
def test_mixup_targets_are_distributions_weighted_by_lambda_in_unit_range(
    seed: int, batch: int, mixup_alpha: float, cutmix_alpha: float, smoothing: float
) -> None:
    if mixup_alpha == cutmix_alpha == 0:
        cutmix_alpha = 1.0
    mix = Mixup(mixup_alpha, cutmix_alpha, label_smoothing=smoothing, num_classes=10)
    x, target = _batch(batch)
    torch.manual_seed(seed)
    mixed, soft = mix(x, target)
    assert mixed.shape == x.shape and soft.shape == (batch, 10) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(1), torch.ones(batch))
    off = smoothing / 10
    lam = (soft[0, 0] - off) / (1 - smoothing) if batch > 1 else torch.tensor(1.0)
    assert -1e-6 <= float(lam) <= 1 + 1e-6
    middle = batch // 2
    if batch % 2:  # an odd batch's middle sample is its own partner
        torch.testing.assert_close(mixed[middle], x[middle])
        assert float(soft[middle, middle]) == pytest.approx(1 - smoothing + off)


@given(seed=st.integers(0, 2**16), batch=st.sampled_from([2, 4, 6]))
def test_cutmix_pastes_one_box_from_the_flipped_batch_and_weights_targets_by_its_area(seed: int, batch: int) -> None:
    x, target = _batch(batch)
    torch.manual_seed(seed)
    mixed, soft = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=10)(x, target)
    pasted = mixed != x
    assert torch.equal(pasted, pasted[:1, :1].expand_as(pasted))  # one box, the same for every sample and channel
    assert torch.equal(mixed[pasted], x.flip(0)[pasted])
    box = pasted[0, 0]
    if box.any():
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        assert int(box.sum()) == int(rows[-1] - rows[0] + 1) * int(cols[-1] - cols[0] + 1)
    for i in range(batch):
        partner = batch - 1 - i
        assert float(soft[i, partner]) == pytest.approx(float(box.float().mean()), abs=1e-6)
        assert float(soft[i, i]) == pytest.approx(1 - float(box.float().mean()), abs=1e-6)


def test_mixup_blends_images_and_targets_with_the_same_lambda() -> None:
    x, target = _batch(4)
    torch.manual_seed(3)
    mixed, soft = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=10)(x, target)
    lam = soft[0, 0]
    assert 0 < float(lam) < 1
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))


def test_label_smoothing_values_are_exact_without_mixing() -> None:
    x, target = _batch(4)
    mixed, soft = Mixup(prob=0.0, label_smoothing=0.1, num_classes=10)(x, target)
    assert torch.equal(mixed, x)
    expected = torch.full((4, 10), 0.1 / 10)
    expected[torch.arange(4), target] = 1 - 0.1 + 0.1 / 10
    assert torch.equal(soft, expected)


def test_mixup_rejects_bad_arguments_and_inputs() -> None:
    with pytest.raises(ValueError, match="not both 0"):
        Mixup(0.0, 0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        Mixup(label_smoothing=1.0)
    mix = Mixup(num_classes=10)
    x, target = _batch(4)
    with pytest.raises(ValueError, match="int64"):
        mix(x, target.int())
    with pytest.raises(ValueError, match="outside"):
        mix(x, target + 7)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        mix(x[0], target)


# The pipelines and the randomness contract


@pytest.mark.parametrize(("mode", "mean", "std"), [("RGB", IMAGENET_MEAN, IMAGENET_STD), ("L", (0.286,), (0.353,))])
def test_train_transform_gives_normalised_tensors_of_the_crop_size(mode: str, mean: tuple, std: tuple) -> None:
    transform = classification_train_transform(24, mean=mean, std=std, re_prob=0.0)
    x = transform(_image(40, 30, mode))
    assert x.shape == (len(mean), 24, 24) and x.dtype == torch.float32
    lowest = min((0 - m) / s for m, s in zip(mean, std, strict=True))
    assert float(x.min()) >= lowest - 1e-6


def test_same_torch_seed_gives_the_same_augmentation_whatever_python_and_numpy_random_do() -> None:
    transform = classification_train_transform(32, re_prob=1.0)
    mix = Mixup(num_classes=10)
    images = [_image(50, 40, seed=k) for k in range(4)]

    def run(other_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        random.seed(other_seed)
        np.random.seed(other_seed)
        x = torch.stack([transform(image) for image in images])
        return mix(x, torch.arange(4))

    torch.manual_seed(5)
    first = run(1)
    state = torch.get_rng_state()
    after = run(2)
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(first, run(3), strict=True))
    torch.set_rng_state(state)
    assert all(torch.equal(a, b) for a, b in zip(after, run(4), strict=True))
    assert not torch.equal(first[0], after[0])
