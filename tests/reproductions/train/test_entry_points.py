"""The classification and segmentation entry points, run in-process on generated data: training, evaluation from
the saved weights, and the errors for bad data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tocalib.reproductions.data.folders import CorruptImageError
from tocalib.reproductions.train import classification, engine, segmentation
from tocalib.reproductions.train.config import parse_config

TINY = {"embed_dims": [16, 32, 48, 64], "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]}
CLS_ARGS = ["--model-kwargs", json.dumps({**TINY, "num_clusters": [4, 2, 1, 0]}), "--img-size", "32"]
CLS_ARGS += ["--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0", "--device", "cpu"]


def _records(out: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def _image_folder(root: Path, counts: dict[str, int], size: tuple[int, int] = (36, 44)) -> Path:
    rng = np.random.default_rng(1)
    for split, count in counts.items():
        for label, name in enumerate(("a", "b", "c")):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 100, (*size, 3)) + 70 * label
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.jpg")
    return root


def test_classification_trains_then_evaluates_its_best_weights(tmp_path: Path) -> None:
    data = _image_folder(tmp_path / "data", {"train": 4, "val": 2})
    out = tmp_path / "run"
    results = classification.main(["--data", str(data), "--out", str(out), *CLS_ARGS])
    (last_val,) = _records(out, "val")
    assert results["val/top1"] == last_val["top1"] and 0.0 <= last_val["top1"] <= 100.0
    assert last_val["top5"] == 100.0  # 3 classes: the true class is always among the top 5
    shutil.rmtree(data / "train")  # evaluation reads the validation data only
    weights = ["--pretrained", str(out / "best.pt"), "--eval-only"]
    evaluated = classification.main(["--data", str(data), "--out", str(tmp_path / "eval"), *weights, *CLS_ARGS])
    assert evaluated == {k: pytest.approx(v) for k, v in last_val.items() if k in ("top1", "top5", "loss")}


def test_classification_data_errors_name_the_problem(tmp_path: Path) -> None:
    run = ["--out", str(tmp_path / "run"), *CLS_ARGS]
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        classification.main(["--data", str(tmp_path / "missing"), *run])
    data = _image_folder(tmp_path / "data", {"train": 4, "val": 1})
    (data / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        classification.main(["--data", str(data), *run])
    (data / "train" / "empty").rmdir()
    (data / "train" / "a" / "0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CorruptImageError, match=r"0\.jpg"):
        classification.main(["--data", str(data), *run])
    with pytest.raises(ValueError, match="--data is required"):
        classification.main(run)


def test_fashion_mnist_preset_is_the_documented_small_run() -> None:
    config = parse_config(
        classification.ClassificationConfig, ["--preset", "fashion_mnist", "--epochs", "2"], classification.PRESETS
    )
    assert (config.dataset, config.epochs, config.img_size, config.mean) == ("fashion_mnist", 2, 28, (0.2860,))
    assert config.model_kwargs["in_chans"] == 1 and config.mixup == 0.0 and config.auto_augment is None
    paper = parse_config(classification.ClassificationConfig, [])
    assert (paper.lr_base, paper.epochs, paper.warmup_epochs, paper.weight_decay) == (5e-4, 300, 5, 0.05)
    assert (paper.auto_augment, paper.mixup, paper.cutmix, paper.reprob) == ("rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.25)


SEG_ARGS = ["--backbone-kwargs", json.dumps(TINY), "--downstream-clusters", "8", "4", "2", "0"]
SEG_ARGS += ["--head-channels", "16", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--log-every", "1"]


@pytest.mark.parametrize("head", ["paca", "upernet"])
def test_segmentation_on_textures_trains_then_evaluates_its_best_weights(tmp_path: Path, head: str) -> None:
    out = tmp_path / "run"
    args = ["--head", head, "--dataset", "textures", "--crop", "32", "--iterations", "4", "--warmup-iters", "1"]
    args += ["--texture-train-samples", "8", "--texture-val-samples", "3", "--eval-every", "4", *SEG_ARGS]
    results = segmentation.main([*args, "--out", str(out)])
    (val,) = _records(out, "val")
    assert results["val/mIoU"] == val["mIoU"] and 0.0 <= val["mIoU"] <= 100.0
    train = _records(out, "train")
    aux = "paca.loss_ce" if head == "paca" else "aux.loss_ce"
    assert all(r["loss"] == pytest.approx(r["decode.loss_ce"] + r[aux], rel=1e-5) for r in train)
    log = (out / "log.txt").read_text()
    groups = ["'clustering.4'", "'head'", "'norm'"] if head == "paca" else ["'norm'"]
    assert all(f"param group {key}" in log for key in groups)
    evaluated = segmentation.main(
        [*args, "--out", str(tmp_path / "eval"), "--eval-only", "--checkpoint", str(out / "best.pt")]
    )
    assert evaluated == {"mIoU": pytest.approx(val["mIoU"]), "aAcc": pytest.approx(val["aAcc"])}


def _ade(root: Path) -> Path:
    rng = np.random.default_rng(2)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(2):
            labels = rng.integers(0, 151, (24, 32)).astype(np.uint8)
            Image.fromarray(rng.integers(0, 255, (24, 32, 3)).astype(np.uint8)).save(
                root / "images" / split / f"{i}.jpg"
            )
            Image.fromarray(labels).save(root / "annotations" / split / f"{i}.png")
    return root


def test_segmentation_reads_the_ade20k_layout(tmp_path: Path) -> None:
    data = _ade(tmp_path / "ADEChallengeData2016")
    args = ["--data", str(data), "--crop", "32", "--scale", "64", "32", "--iterations", "2", "--warmup-iters", "1"]
    results = segmentation.main([*args, "--eval-every", "2", "--out", str(tmp_path / "run"), *SEG_ARGS])
    assert 0.0 <= results["val/mIoU"] <= 100.0
    best = ["--eval-only", "--checkpoint", str(tmp_path / "run" / "best.pt")]
    evaluated = segmentation.main([*args, "--out", str(tmp_path / "eval"), *best, *SEG_ARGS])
    assert evaluated == {"mIoU": pytest.approx(results["val/mIoU"]), "aAcc": pytest.approx(results["val/aAcc"])}
    (data / "annotations" / "validation" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1\.png"):
        segmentation.main([*args, "--out", str(tmp_path / "again"), *SEG_ARGS])


def test_segmentation_backbone_settings_follow_the_released_configs() -> None:
    assert segmentation.paper_backbone_settings("pacavit_small_p2cconv_100_0", "paca") == ((200, 200, 200, 0), 0.1)
    assert segmentation.paper_backbone_settings("pacavit_convmixer_small_100", "paca") == ((200,) * 4, 0.1)
    assert segmentation.paper_backbone_settings("pacavit_small_p2cconv_49_100", "paca") == ((200,) * 4, 0.1)
    assert segmentation.paper_backbone_settings("pacavit_small_p2cconv_100_blockwise", "paca")[0] == (200,) * 4
    assert segmentation.paper_backbone_settings("pacavit_base_p2cconv_100_0", "paca") == ((200, 200, 200, 0), 0.5)
    assert segmentation.paper_backbone_settings("pacavit_convmixer_base_100", "paca") == ((200,) * 4, 0.5)
    assert segmentation.paper_backbone_settings("pacavit_base_p2cconv_100_0", "upernet")[1] == 0.1
    assert segmentation.paper_backbone_settings("swin_tiny_patch4_window7_224", "paca") == (None, 0.1)


@pytest.mark.parametrize("flag", [[], ["--no-retain-cpu-memory"]])
def test_cpu_runs_keep_freed_memory_unless_told_not_to(tmp_path: Path, monkeypatch, flag: list[str]) -> None:
    """A CPU run asks tocalib.allocator to keep freed memory in the heap (stubbed here: the real setting would stay
    for the rest of the test process) and says so in its log; ``--no-retain-cpu-memory`` leaves the allocator alone."""
    calls = []
    monkeypatch.setattr(engine, "tune_cpu_allocator", lambda: calls.append(1) or True)
    data = _image_folder(tmp_path / "data", {"train": 4, "val": 2})
    classification.main(["--data", str(data), "--out", str(tmp_path / "run"), *CLS_ARGS, "--stop-after", "1", *flag])
    logged = "freed memory stays in the heap" in (tmp_path / "run" / "log.txt").read_text()
    assert (len(calls), logged) == ((0, False) if flag else (1, True))
