"""Each accuracy path end to end: a tiny dataset in the standard layout, a checkpoint of random weights in the
released format, :func:`tocalib.reproductions.tasks.evaluate_row`. Classifier biases are set so that the expected
metric is known exactly; small input sizes keep the tests fast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tocalib.models import create_model
from tocalib.models.heads import paca_segmentor
from tocalib.reproductions.data.ade20k import NUM_CLASSES
from tocalib.reproductions.eval import ade20k
from tocalib.reproductions.reproduce import main
from tocalib.reproductions.tables import load_table
from tocalib.reproductions.tasks import check_eval_inputs, evaluate_row, get_task

TINY = "pacavit_tiny_p2cconv_100_0"


def _row(table: str, section_id: str, model: str, head: str | None = None):
    for section, row in load_table(table).rows:
        if section.id == section_id and row.model == model and row.head == head:
            return section, row
    raise LookupError((table, section_id, model, head))


def _image(path: Path, height: int, width: int, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _quiet(*args: object) -> None:
    """A log function that drops progress lines."""


def _imagenet(tmp_path: Path) -> tuple[Path, Path]:
    """A val folder of 3 classes (2, 2, 1 images) under ``tmp_path/data/imagenet/val`` and a PaCa-Tiny checkpoint
    under ``tmp_path/ckpt`` whose head bias makes every prediction class 1 → top-1 = 2/5."""
    data = tmp_path / "data" / "imagenet" / "val"
    for c, (name, n) in enumerate({"n01440764": 2, "n01443537": 2, "n01484850": 1}.items()):
        for k in range(n):
            _image(data / name / f"ILSVRC2012_val_{c}{k}.JPEG", 60 + 10 * k, 80 - 7 * c, seed=10 * c + k)
    section, row = _row("table1", "imagenet", TINY)
    state = get_task(section.task).build(row).state_dict()
    state["head.bias"] = torch.zeros(1000).index_fill_(0, torch.tensor([1]), 1e4)
    checkpoint = tmp_path / "ckpt" / row.checkpoint
    checkpoint.parent.mkdir()
    torch.save(state, checkpoint)
    return data, checkpoint


def test_imagenet_top1_end_to_end(tmp_path: Path) -> None:
    data, checkpoint = _imagenet(tmp_path)
    section, row = _row("table1", "imagenet", TINY)
    with pytest.raises(
        ValueError, match=r"has 3 class folders \(n01440764, n01443537, n01484850\) but the model has 1000"
    ):
        evaluate_row(section, row, checkpoint, data, log=_quiet, crop=64)
    metrics = evaluate_row(section, row, checkpoint, data, log=_quiet, crop=64, allow_fewer_classes=True)
    assert metrics == {"top1": pytest.approx(100 * 2 / 5)}


def test_reproduce_command_fills_the_accuracy_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--checkpoints --data`` through the command line (paper preprocessing, 224 crops)."""
    _, checkpoint = _imagenet(tmp_path)
    args = ["table1", "--rows", TINY, "--out", str(tmp_path / "out"), "--workers", "1"]
    inputs = ["--checkpoints", str(checkpoint.parent), "--data", str(tmp_path / "data"), "--allow-fewer-classes"]
    assert main([*args, *inputs]) == 0
    assert "80.9 | 40.00 | -40.90" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "table1.json").read_text(encoding="utf-8"))["rows"][0]
    assert record["top1_reproduced"] == pytest.approx(40.0)


def test_ade20k_miou_end_to_end(tmp_path: Path) -> None:
    """Two images with labels 0 (ignored), 1 and 2; every prediction is class index 1 (label 2), so class 1 has
    IoU = its pixels / all valid pixels and class 0 has IoU 0."""
    root = tmp_path / "ADEChallengeData2016"
    label_maps = []
    for k, (h, w) in enumerate([(40, 56), (48, 36)]):
        _image(root / "images" / "validation" / f"ADE_val_{k:08d}.jpg", h, w, seed=k)
        labels = np.random.default_rng(100 + k).integers(0, 3, (h, w), dtype=np.uint8)
        path = root / "annotations" / "validation" / f"ADE_val_{k:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels).save(path)
        label_maps.append(labels)
    section, row = _row("table3", "ade20k", TINY, "paca")
    model = get_task(section.task).build(row)
    state = model.state_dict()
    state["decode_head.conv_seg.bias"] = torch.zeros(NUM_CLASSES).index_fill_(0, torch.tensor([1]), 1e4)
    checkpoint = tmp_path / row.checkpoint
    torch.save({"meta": {}, "state_dict": state}, checkpoint)
    metrics = evaluate_row(section, row, checkpoint, root, log=_quiet, scale=(96, 64))
    wrong = paca_segmentor(create_model(TINY, features_only=True), [96, 192, 320, 384], num_classes=3, channels=8)
    with pytest.raises(ValueError, match="the segmentor predicts 3 classes, ADE20k has 150"):
        ade20k.evaluate(wrong, root, scale=(96, 64), log=_quiet)
    labels = np.concatenate([m.ravel() for m in label_maps])
    valid = labels[labels > 0]
    expected = 100 * np.mean([0.0, np.mean(valid == 2)])  # classes present: index 0 (label 1), index 1 (label 2)
    assert metrics == {"mIoU": pytest.approx(expected)}


def _coco_dataset(root: Path) -> dict:
    """Two images with two square instances each, 80 categories (ids 1…80)."""
    images, annotations = [], []
    for k, (h, w) in enumerate([(72, 96), (80, 64)]):
        name = f"{k:012d}.jpg"
        _image(root / "val2017" / name, h, w, seed=k)
        images.append({"id": k + 1, "file_name": name, "height": h, "width": w})
        for j, (x, y, s, cat) in enumerate([(8, 10, 30, 1), (40, 30, 20, 5)]):
            polygon = [x, y, x + s, y, x + s, y + s, x, y + s]
            annotations.append(
                {
                    "id": 10 * k + j + 1,
                    "image_id": k + 1,
                    "category_id": cat,
                    "bbox": [x, y, s, s],
                    "area": s * s,
                    "iscrowd": 0,
                    "segmentation": [polygon],
                }
            )
    categories = [{"id": i, "name": f"class{i}", "supercategory": "thing"} for i in range(1, 81)]
    dataset = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(dataset), encoding="utf-8")
    return dataset


def test_coco_results_of_the_ground_truth_score_100(tmp_path: Path, optional_module) -> None:
    """The result conversion (resize factors, xywh boxes, RLE masks, sorted category ids) is right: the ground
    truth itself, passed through it, gets AP 100 for boxes and masks (the hand-drawn squares differ from
    pycocotools' polygon rasterisation by at most a pixel row, IoU > 0.95)."""
    optional_module("pycocotools", "COCO AP needs pycocotools (pip install tocalib[eval])")
    from pycocotools.coco import COCO

    from tocalib.reproductions.eval.coco import coco_metrics, to_coco_results

    root = tmp_path / "coco"
    dataset = _coco_dataset(root)
    ground_truth = COCO(str(root / "annotations" / "instances_val2017.json"))
    category_ids = sorted(ground_truth.getCatIds())
    results = []
    scale = (1.5, 0.75)  # (height, width) factors of a resize, divided out of the boxes
    for image in dataset["images"]:
        anns = [a for a in dataset["annotations"] if a["image_id"] == image["id"]]
        boxes, masks = [], torch.zeros(len(anns), image["height"], image["width"], dtype=torch.bool)
        for k, (x, y, s, _) in enumerate(a["bbox"] for a in anns):
            boxes.append([x * scale[1], y * scale[0], (x + s) * scale[1], (y + s) * scale[0]])
            masks[k, y : y + s, x : x + s] = True
        detections = {
            "boxes": torch.tensor(boxes),
            "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([category_ids.index(a["category_id"]) for a in anns]),
            "masks": masks,
        }
        results += to_coco_results(detections, image["id"], category_ids, scale)
    metrics = coco_metrics(ground_truth, results, sorted(ground_truth.getImgIds()))
    assert metrics == {name: pytest.approx(100.0) for name in metrics}


def test_coco_ap_end_to_end(tmp_path: Path, optional_module) -> None:
    """Mask R-CNN with random weights (box-classifier bias towards category 1 so that detections pass the score
    threshold) through the whole COCO path; APs are valid percentages."""
    optional_module("pycocotools", "COCO AP needs pycocotools (pip install tocalib[eval])")
    root = tmp_path / "coco"
    _coco_dataset(root)
    section, row = _row("table2", "coco", TINY)
    model = get_task(section.task).build(row)
    state = model.state_dict()
    state["roi_head.bbox_head.fc_cls.bias"] = torch.zeros(81).index_fill_(0, torch.tensor([0]), 10.0)
    checkpoint = tmp_path / row.checkpoint
    torch.save({"meta": {}, "state_dict": state}, checkpoint)
    metrics = evaluate_row(section, row, checkpoint, root, log=_quiet, scale=(128, 96))
    assert list(metrics) == list(section.metrics)
    assert all(0.0 <= value <= 100.0 for value in metrics.values())


def test_missing_inputs_are_named(tmp_path: Path) -> None:
    rows = load_table("table2").rows[:2] + load_table("table3").rows[:1]
    with pytest.raises(FileNotFoundError) as error:
        check_eval_inputs(rows, tmp_path / "ckpt", tmp_path / "data")
    message = str(error.value)
    assert str(tmp_path / "ckpt" / rows[0][1].checkpoint) in message
    assert f"{tmp_path / 'data' / 'coco'}: expected val2017/*.jpg" in message
    assert str(tmp_path / "data" / "ADEChallengeData2016") in message


def test_malformed_ade_folder_names_the_missing_annotation(tmp_path: Path) -> None:
    from tocalib.reproductions.data.ade20k import list_pairs

    root = tmp_path / "ADEChallengeData2016"
    _image(root / "images" / "validation" / "a.jpg", 8, 8, seed=0)
    (root / "annotations" / "validation").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"annotation .*a\.png"):
        list_pairs(root)


def test_imagenet_evaluation_needs_the_models_preprocessing(tmp_path: Path) -> None:
    from torch import nn

    from tocalib.reproductions.eval import imagenet

    with pytest.raises(ValueError, match=r"Linear has no pretrained_cfg .* build it with tocalib.models.create_model"):
        imagenet.evaluate(nn.Linear(3, 2), tmp_path)
