"""Segmentation training data: the ADE20k train pipeline on a tiny generated layout, its transforms, and the
scikit-image texture set (shapes, determinism, disjoint train/val rows, exact texture pixels)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from tocalib.reproductions.data.images import MMCV_MEAN, MMCV_STD, rescaled_size
from tocalib.reproductions.data.segmentation import (
    TEXTURE_CLASSES,
    TEXTURE_ROWS,
    ADE20kTrain,
    TextureSegmentation,
    _hsv_to_rgb,
    _rgb_to_hsv,
    photo_metric_distortion,
    random_crop,
    random_resize,
)

MEAN = torch.tensor(MMCV_MEAN).view(3, 1, 1)
STD = torch.tensor(MMCV_STD).view(3, 1, 1)


def _denormalize(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) normalised → (3, H, W) on the 0–255 scale, rounded."""
    return (image * STD + MEAN).round()


def _ade(root: Path, raw_labels: list[np.ndarray], images: list[np.ndarray] | None = None) -> Path:
    """An ADEChallengeData2016 training split with one jpg/png pair per label map (raw ids, 0 = other)."""
    for k, raw in enumerate(raw_labels):
        name = f"ADE_train_{k:08d}"
        image = np.random.default_rng(k).integers(0, 256, (*raw.shape, 3), dtype=np.uint8)
        if images is not None:
            image = images[k]
        for folder, array, suffix in (("images", image, "jpg"), ("annotations", raw.astype(np.uint8), "png")):
            path = root / folder / "training" / f"{name}.{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path, quality=95) if suffix == "jpg" else Image.fromarray(array).save(path)
    return root


def _blocks(height: int, width: int, seed: int, low: int = 0) -> np.ndarray:
    """Raw ADE ids low…150 in 10×10 blocks (so crops can hold several classes)."""
    coarse = np.random.default_rng(seed).integers(low, 151, (-(-height // 10), -(-width // 10)))
    return np.kron(coarse, np.ones((10, 10), dtype=np.int64))[:height, :width]


@pytest.fixture
def ade_root(tmp_path: Path) -> Path:
    return _ade(tmp_path / "ADEChallengeData2016", [_blocks(60, 80, seed) for seed in range(3)])


def test_ade_items_have_crop_shapes_and_label_values(ade_root: Path) -> None:
    dataset = ADE20kTrain(ade_root, crop=32, scale=(96, 48))
    assert len(dataset) == 3
    torch.manual_seed(0)
    for index in range(3):
        image, labels = dataset[index]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert labels.shape == (32, 32) and labels.dtype == torch.int64
        values = set(labels.unique().tolist())
        assert values <= set(range(150)) | {255}
        assert len(values - {255}) >= 2


def test_ade_pads_with_ignore_and_zero_when_the_resized_image_is_smaller_than_the_crop(tmp_path: Path) -> None:
    """60×80 into scale (40, 24) at ratio 1 → 24×32 (factor 0.4); the crop is 32, so rows 24–31 are padding."""
    root = _ade(tmp_path / "ade", [_blocks(60, 80, 0, low=1)])
    assert rescaled_size(60, 80, (40, 24)) == (24, 32)
    dataset = ADE20kTrain(root, crop=32, scale=(40, 24), ratio_range=(1.0, 1.0))
    torch.manual_seed(1)
    image, labels = dataset[0]
    assert bool((labels[24:] == 255).all()) and bool((image[:, 24:] == 0).all())
    assert bool((labels[:24] != 255).all()), "raw ids 1…150 hold no ignore pixel, so only padding is 255"
    assert bool((image[:, :24] != 0).any())


def test_ade_is_deterministic_under_torch_manual_seed(ade_root: Path) -> None:
    dataset = ADE20kTrain(ade_root, crop=32, scale=(96, 48))
    draws = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        draws.append([dataset[i] for i in range(3)])
    for (a_img, a_lab), (b_img, b_lab) in zip(draws[0], draws[1], strict=True):
        assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    assert any(not torch.equal(a[0], c[0]) for a, c in zip(draws[0], draws[2], strict=True))


def test_ade_image_and_labels_move_together(tmp_path: Path) -> None:
    """Left half gray 200 with raw id 2 (class 1), right half gray 50 with raw id 1 (class 0). Every photometric
    step keeps gray gray and brightness order, so class 1 pixels stay brighter than class 0 pixels wherever
    resize, crop and flip put them; over seeds the bright class shows up on both sides (flips happen)."""
    raw = np.ones((60, 80), dtype=np.int64)
    raw[:, :40] = 2
    image = np.where(raw[..., None] == 2, 200, 50).astype(np.uint8).repeat(3, axis=2)
    root = _ade(tmp_path / "ade", [raw], [image])
    dataset = ADE20kTrain(root, crop=32, scale=(80, 60), ratio_range=(0.9, 1.1))
    sides = set()
    for seed in range(12):
        torch.manual_seed(seed)
        image_t, labels = dataset[0]
        gray = _denormalize(image_t)
        assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
        bright, dark = gray[0][labels == 1], gray[0][labels == 0]
        if bright.numel() and dark.numel():
            assert bright.median() > dark.median()
            sides.add(bool(labels[:, 0].eq(1).any()))
    assert sides == {True, False}


def test_random_resize_follows_mmcv_keep_ratio_and_keeps_label_values() -> None:
    """Ratio fixed at 1.5: target (int(96·1.5), int(48·1.5)) = (144, 72), so 60×80 → 72×96."""
    image = torch.rand(3, 60, 80) * 255
    labels = torch.from_numpy(_blocks(60, 80, 0)).long()
    out_image, out_labels = random_resize(image, labels, (96, 48), (1.5, 1.5))
    assert out_image.shape == (3, 72, 96) and out_labels.shape == (72, 96)
    assert set(out_labels.unique().tolist()) <= set(labels.unique().tolist())
    assert torch.equal(out_image, out_image.round()) and float(out_image.min()) >= 0 and float(out_image.max()) <= 255


def test_cat_max_ratio_is_respected_when_a_crop_allows_it() -> None:
    """64×64, class 0 left and class 1 right of column 32, crop 32: a crop passes when it holds 9–23 columns of
    class 1 (15 of 33 offsets). With the check every seed's crop passes; without it many do not."""
    labels = torch.zeros(64, 64, dtype=torch.long)
    labels[:, 32:] = 1
    image = labels[None].float()

    def largest_share(cat_max_ratio: float, seed: int) -> float:
        torch.manual_seed(seed)
        crop_image, crop_labels = random_crop(image, labels, 32, cat_max_ratio)
        assert torch.equal(crop_image[0], crop_labels.float())
        return float(torch.bincount(crop_labels.flatten(), minlength=2).max()) / crop_labels.numel()

    assert all(largest_share(0.75, seed) < 0.75 for seed in range(20))
    assert sum(largest_share(1.0, seed) >= 0.75 for seed in range(20)) >= 5


def test_cat_max_ratio_counts_only_labelled_pixels() -> None:
    """A crop that is half ignore and half class 0 is one class (100% of labelled pixels): it cannot pass, so the
    pass needs the class-1 columns on the right."""
    labels = torch.full((32, 96), 255, dtype=torch.long)
    labels[:, 32:64] = 0
    labels[:, 64:] = 1
    for seed in range(10):
        torch.manual_seed(seed)
        _, crop_labels = random_crop(labels[None].float(), labels, 32, 0.75)
        counts = torch.bincount(crop_labels[crop_labels != 255], minlength=2)
        assert int((counts > 0).sum()) == 2 and float(counts.max() / counts.sum()) < 0.75


@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 48), st.integers(0, 2**16))
def test_random_crop_shape_and_alignment(height: int, width: int, crop: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, (height, width), generator=gen)
    torch.manual_seed(seed)
    image, out = random_crop(labels[None].float().repeat(2, 1, 1), labels, crop, 0.75)
    assert out.shape == (min(height, crop), min(width, crop)) and image.shape == (2, *out.shape)
    assert torch.equal(image[1], out.float())


def test_photometric_distortion_keeps_gray_gray_and_the_uint8_grid() -> None:
    gray = torch.arange(256, dtype=torch.float32).view(1, 16, 16).repeat(3, 1, 1)
    color = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)).mul(255).round()
    changed = 0
    for seed in range(16):
        torch.manual_seed(seed)
        out = photo_metric_distortion(gray)
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
        out_color = photo_metric_distortion(color)
        for result in (out, out_color):
            assert torch.equal(result, result.round()) and float(result.min()) >= 0 and float(result.max()) <= 255
        changed += not torch.equal(out_color, color)
    assert changed >= 12


def test_hsv_of_known_colours() -> None:
    rgb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5], [0.5, 0.5, 0.5]]).T[:, :, None]
    hsv = _rgb_to_hsv(rgb)[:, :, 0].T
    expected = torch.tensor([[0.0, 1.0, 1.0], [1 / 3, 1.0, 1.0], [2 / 3, 1.0, 0.5], [0.0, 0.0, 0.5]])
    torch.testing.assert_close(hsv, expected)


@given(st.integers(0, 2**16))
def test_hsv_round_trip(seed: int) -> None:
    """HSV → RGB undoes RGB → HSV."""
    rgb = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(_hsv_to_rgb(_rgb_to_hsv(rgb)), rgb, atol=1e-6, rtol=0)


def test_missing_ade_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"images/training does not exist.*images/training/\*\.jpg"):
        ADE20kTrain(tmp_path / "ADEChallengeData2016")


def test_missing_ade_annotation_is_named(tmp_path: Path) -> None:
    root = _ade(tmp_path / "ade", [_blocks(20, 20, 0)])
    (root / "annotations" / "training" / "ADE_train_00000000.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"annotation .*annotations/training/ADE_train_00000000\.png"):
        ADE20kTrain(root)


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    root = _ade(tmp_path / "ade", [_blocks(20, 20, 0)])
    bad = root / "images" / "training" / "ADE_train_00000000.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match=r"cannot decode .*ADE_train_00000000\.jpg"):
        ADE20kTrain(root, crop=16)[0]


def test_annotation_of_another_size_is_named(tmp_path: Path) -> None:
    root = _ade(tmp_path / "ade", [_blocks(20, 20, 0)])
    Image.fromarray(_blocks(20, 24, 0).astype(np.uint8)).save(
        root / "annotations" / "training" / "ADE_train_00000000.png"
    )
    with pytest.raises(ValueError, match=r"ADE_train_00000000\.png is \(20, 24\), its image .*\.jpg \(20, 20\)"):
        ADE20kTrain(root, crop=16)[0]


@pytest.fixture(scope="module")
def skimage_data(optional_module: Callable[[str, str], ModuleType]) -> ModuleType:
    return optional_module("skimage.data", "the texture set needs scikit-image (the `train` extra)")


@given(split=st.sampled_from(["train", "val"]), size=st.integers(1, 128), index=st.integers(0, 9))
def test_texture_items_shapes_labels_and_offsets(split: str, size: int, index: int, skimage_data: ModuleType) -> None:
    """Shapes, dtypes, labels 0…2, and every class's patch inside its split's rows."""
    dataset = TextureSegmentation(split, size=size, length=10)
    image, labels = dataset[index]
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    assert labels.shape == (size, size) and labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) <= 2
    layout = dataset.layout(index)
    start, stop = TEXTURE_ROWS[split]
    assert bool((layout.offsets[:, 0] >= start).all()) and bool((layout.offsets[:, 0] + size <= stop).all())
    assert bool((layout.offsets[:, 1] >= 0).all()) and bool((layout.offsets[:, 1] + size <= 512).all())


def test_texture_splits_read_disjoint_rows() -> None:
    (train_start, train_stop), (val_start, val_stop) = TEXTURE_ROWS["train"], TEXTURE_ROWS["val"]
    assert train_stop <= val_start and (train_start, val_stop) == (0, 512)


def test_texture_val_pixels_are_the_texture_at_the_sampled_offsets(skimage_data: ModuleType) -> None:
    dataset = TextureSegmentation("val", size=64, length=4, seed=5)
    for index in range(4):
        image, labels = dataset[index]
        layout = dataset.layout(index)
        gray = _denormalize(image)
        assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])
        for k, name in enumerate(TEXTURE_CLASSES):
            row, column = layout.offsets[k].tolist()
            texture = torch.from_numpy(getattr(skimage_data, name)()[row : row + 64, column : column + 64]).float()
            mask = labels == k
            assert torch.equal(gray[0][mask], texture[mask])


def test_texture_train_pixels_are_the_turned_mirrored_texture(skimage_data: ModuleType) -> None:
    dataset = TextureSegmentation("train", size=48, length=1)
    torch.manual_seed(0)
    layouts = [dataset.layout(0) for _ in range(6)]
    assert any(int(layout.turns.sum()) > 0 for layout in layouts) and any(bool(lay.mirrored.any()) for lay in layouts)
    for layout in layouts:
        gray = torch.from_numpy(dataset.render(layout).numpy()).float()
        for k, name in enumerate(TEXTURE_CLASSES):
            row, column = layout.offsets[k].tolist()
            patch = torch.from_numpy(getattr(skimage_data, name)()[row : row + 48, column : column + 48].copy())
            if layout.mirrored[k]:
                patch = patch.flip(-1)
            patch = torch.rot90(patch, int(layout.turns[k])).float()
            mask = layout.labels == k
            assert torch.equal(gray[mask], patch[mask])


def test_texture_val_is_fixed_and_train_follows_the_global_rng(skimage_data: ModuleType) -> None:
    a, b = TextureSegmentation("val", size=32, length=3, seed=1), TextureSegmentation("val", size=32, length=3, seed=1)
    other = TextureSegmentation("val", size=32, length=3, seed=2)
    torch.manual_seed(0)
    first = a[2]
    torch.manual_seed(99)
    assert all(torch.equal(x, y) for x, y in zip(first, b[2], strict=True))
    assert not torch.equal(first[0], other[2][0])
    assert not torch.equal(first[0], a[1][0])

    train = TextureSegmentation("train", size=32, length=3)
    torch.manual_seed(7)
    draw = train[0]
    torch.manual_seed(7)
    assert all(torch.equal(x, y) for x, y in zip(draw, train[0], strict=True))
    assert not torch.equal(draw[0], train[0][0])


def test_every_texture_class_appears_and_classes_are_balanced(skimage_data: ModuleType) -> None:
    dataset = TextureSegmentation("val", size=32, length=40)
    labels = torch.stack([dataset[i][1] for i in range(40)])
    share = torch.bincount(labels.flatten(), minlength=3).double() / labels.numel()
    assert bool((share > 0.2).all()), share


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"split": "val", "size": 129}, ValueError, r"size=129 does not fit the 128 texture rows.*1 ≤ size ≤ 128"),
        ({"split": "test"}, ValueError, r"split must be one of \['train', 'val'\]"),
        ({"length": 0}, ValueError, "length must be ≥ 1"),
    ],
)
def test_texture_arguments_are_checked(kwargs: dict, error: type, match: str, skimage_data: ModuleType) -> None:
    with pytest.raises(error, match=match):
        TextureSegmentation(**kwargs)


def test_texture_index_out_of_range(skimage_data: ModuleType) -> None:
    with pytest.raises(IndexError, match="index 3 is out of range"):
        TextureSegmentation("val", size=16, length=3)[3]
