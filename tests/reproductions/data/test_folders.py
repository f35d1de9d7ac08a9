"""Classification datasets: IDX files round trip and fail loudly, Fashion-MNIST from tiny generated IDX files, and
image folders that name the missing or broken path."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image, UnidentifiedImageError

from tocalib.reproductions.data.folders import IMAGE_SUFFIXES, CorruptImageError, FashionMNIST, ImageFolder, read_idx


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path: Path, payload: bytes, compress: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


# IDX files


@given(array=arrays(np.uint8, st.lists(st.integers(0, 5), min_size=1, max_size=4).map(tuple)), gz=st.booleans())
def test_idx_round_trip(tmp_path_factory: pytest.TempPathFactory, array: np.ndarray, gz: bool) -> None:
    path = _write(tmp_path_factory.mktemp("idx") / ("a.idx.gz" if gz else "a.idx"), _idx_bytes(array), gz)
    back = read_idx(path)
    assert back.dtype == np.uint8 and back.shape == array.shape and np.array_equal(back, array)
    assert back.flags.writeable


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x00\x01\x08\x01" + struct.pack(">I", 2) + b"ab", "magic bytes 00 00 08"),
        (b"\x00", "magic bytes 00 00 08"),
        (_idx_bytes(np.zeros(3), type_code=0x0D), "element type 0x0d"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "too short"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (_idx_bytes(np.zeros((4, 3)))[:-1], "is truncated"),
        (_idx_bytes(np.zeros((4, 3))) + b"x", "trailing bytes"),
    ],
)
def test_bad_idx_files_raise_value_errors_naming_the_file(tmp_path: Path, payload: bytes, message: str) -> None:
    path = _write(tmp_path / "bad-images-idx3-ubyte.gz", payload)
    with pytest.raises(ValueError, match=re.escape(str(path))) as error:
        read_idx(path)
    assert message in str(error.value)


def test_truncated_or_non_gzip_archives_raise_value_errors_naming_the_file(tmp_path: Path) -> None:
    good = gzip.compress(_idx_bytes(np.arange(100).reshape(10, 10)))
    for name, payload in [("cut.gz", good[: len(good) // 2]), ("plain.gz", _idx_bytes(np.zeros(3)))]:
        path = _write(tmp_path / name, payload, compress=False)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            read_idx(path)
    with pytest.raises(FileNotFoundError, match=r"missing\.gz"):
        read_idx(tmp_path / "missing.gz")


# Fashion-MNIST


def _fashion(root: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    _write(root / f"{prefix}-images-idx3-ubyte.gz", _idx_bytes(images))
    _write(root / f"{prefix}-labels-idx1-ubyte.gz", _idx_bytes(labels))


def test_fashion_mnist_items_are_gray_pillow_images_and_int_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    _fashion(tmp_path, "train", train, np.array([9, 0, 0, 3, 1]))
    _fashion(tmp_path, "t10k", test, np.array([2, 7, 5]))
    dataset = FashionMNIST(tmp_path, "train")
    assert len(dataset) == 5 and dataset.images.dtype == torch.uint8 and dataset.images.shape == (5, 28, 28)
    image, label = dataset[3]
    assert isinstance(image, Image.Image) and image.mode == "L" and image.size == (28, 28) and label == 3
    assert type(label) is int and np.array_equal(np.asarray(image), train[3])
    assert dataset.classes[9] == "Ankle boot" and len(FashionMNIST.CLASSES) == 10
    shapes = FashionMNIST(tmp_path, "test", transform=lambda im: np.asarray(im).shape)
    assert len(shapes) == 3 and shapes[2] == ((28, 28), 5)


def test_fashion_mnist_missing_folder_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"missing .*train-images-idx3-ubyte\.gz"):
        FashionMNIST(tmp_path)
    with pytest.raises(ValueError, match="split='val'"):
        FashionMNIST(tmp_path, "val")


def test_fashion_mnist_rejects_mismatched_or_out_of_range_labels(tmp_path: Path) -> None:
    _fashion(tmp_path, "train", np.zeros((4, 28, 28), np.uint8), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz"):
        FashionMNIST(tmp_path)
    _fashion(tmp_path, "train", np.zeros((3, 28, 28), np.uint8), np.array([1, 2, 10]))
    with pytest.raises(ValueError, match="labels are 0–9"):
        FashionMNIST(tmp_path)


# Image folders


def _save(path: Path, size: tuple[int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 100).save(path)


def test_image_folder_indexes_sorted_classes_and_gives_rgb_images(tmp_path: Path) -> None:
    _save(tmp_path / "b_cat" / "2.png", (4, 3), "L")
    _save(tmp_path / "b_cat" / "1.JPEG", (5, 6))
    _save(tmp_path / "a_dog" / "x.bmp", (2, 2))
    (tmp_path / "a_dog" / "notes.txt").write_text("not an image")
    dataset = ImageFolder(tmp_path, transform=lambda image: (image.mode, image.size))
    assert dataset.classes == ["a_dog", "b_cat"]
    assert [(p.name, c) for p, c in dataset.samples] == [("x.bmp", 0), ("1.JPEG", 1), ("2.png", 1)]
    assert [dataset[i] for i in range(len(dataset))] == [
        (("RGB", (2, 2)), 0),
        (("RGB", (5, 6)), 1),
        (("RGB", (4, 3)), 1),
    ]
    assert isinstance(ImageFolder(tmp_path)[0][0], Image.Image)


def test_image_folder_construction_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing"))):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ImageFolder(tmp_path / "file")
    (tmp_path / "flat").mkdir()
    _save(tmp_path / "flat" / "a.png", (2, 2))
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolder(tmp_path / "flat")
    (tmp_path / "tree" / "empty").mkdir(parents=True)
    (tmp_path / "tree" / "empty" / "readme.txt").write_text("")
    _save(tmp_path / "tree" / "full" / "a.png", (2, 2))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "tree" / "empty"))) as error:
        ImageFolder(tmp_path / "tree")
    assert all(suffix in str(error.value) for suffix in IMAGE_SUFFIXES)


def test_corrupt_images_fail_when_loaded_naming_the_file(tmp_path: Path) -> None:
    _save(tmp_path / "ok" / "a.png", (2, 2))
    garbage = tmp_path / "ok" / "b.jpg"
    garbage.write_bytes(b"this is not a jpeg" * 10)
    _save(tmp_path / "ok" / "c.jpg", (64, 64))
    truncated = tmp_path / "ok" / "c.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    dataset = ImageFolder(tmp_path)
    assert dataset[0][1] == 0
    with pytest.raises(CorruptImageError, match=re.escape(str(garbage))) as error:
        dataset[1]
    assert isinstance(error.value, ValueError) and isinstance(error.value.__cause__, UnidentifiedImageError)
    with pytest.raises(CorruptImageError, match=re.escape(str(truncated))):
        dataset[2]
