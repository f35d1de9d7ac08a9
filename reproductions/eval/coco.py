"""COCO val2017 box and mask AP with pycocotools (``val2017/*.jpg`` + ``annotations/instances_val2017.json``).

mmdet 3.x's test setting for the released Mask R-CNN configs (PaCaViT@4307018 mask_rcnn_1x configs): resize keeping
the aspect ratio
into (1333, 800), pad to a multiple of 32 (done by :meth:`tocalib.models.heads.MaskRCNN.predict`), 1000 proposals,
score threshold 0.05, NMS 0.5, 100 detections. Boxes are mapped back to the original image by the resize factors.
Masks come from ``MaskRCNN.predict`` at the resized image's size and are resized bilinearly to the original size
and thresholded at 0.5; mmdet instead pastes the 28×28 mask logits at the original size directly, so mask AP may
differ slightly. Model label ``i`` is the ``i``-th category id in sorted order, as in mmdet.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tocalib.models.heads import MaskRCNN
from tocalib.reproductions.data.images import load_rgb, rescaled_size, to_input

__all__ = ["METRICS", "coco_metrics", "evaluate", "to_coco_results"]

METRICS = {"bbox": ("APb", "APb50", "APb75"), "segm": ("APm", "APm50", "APm75")}
"""COCOeval ``stats[0:3]`` (AP, AP50, AP75) of each IoU type, by the table's metric names."""


def _pycocotools() -> tuple[Any, Any, Any]:
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("COCO evaluation needs pycocotools: `pip install pycocotools`") from err
    return COCO, COCOeval, mask_utils


def _quiet(function: Callable[..., Any], *args: Any) -> Any:
    """Call a pycocotools function without its progress prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


def to_coco_results(
    detections: dict[str, torch.Tensor], image_id: int, category_ids: list[int], scale: tuple[float, float]
) -> list[dict[str, Any]]:
    """One image's detections (resized-image coordinates, masks already at the original size) as COCO results.

    Args:
        detections: ``boxes`` (J, 4) x1y1x2y2, ``scores`` (J,), ``labels`` (J,), ``masks`` (J, H, W) bool.
        image_id: the COCO image id.
        category_ids: sorted category ids; label ``i`` is ``category_ids[i]``.
        scale: (height, width) factors of the resize, divided out of the boxes.
    """
    _, _, mask_utils = _pycocotools()
    boxes = detections["boxes"].double() / torch.tensor([scale[1], scale[0], scale[1], scale[0]]).double()
    masks = np.asfortranarray(detections["masks"].numpy().transpose(1, 2, 0).astype(np.uint8))
    rles = mask_utils.encode(masks) if len(boxes) else []
    results = []
    for box, score, label, rle in zip(
        boxes.tolist(), detections["scores"].tolist(), detections["labels"].tolist(), rles, strict=True
    ):
        rle["counts"] = rle["counts"].decode("ascii")
        results.append(
            {
                "image_id": image_id,
                "category_id": category_ids[label],
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                "score": score,
                "segmentation": rle,
            }
        )
    return results


def _check_layout(root: Path) -> tuple[Path, Path]:
    images, annotations = root / "val2017", root / "annotations" / "instances_val2017.json"
    if not images.is_dir():
        raise FileNotFoundError(f"{images} does not exist; expected COCO's val2017/*.jpg under {root}")
    if not annotations.is_file():
        raise FileNotFoundError(f"{annotations} does not exist; expected COCO's annotations/instances_val2017.json")
    return images, annotations


@torch.no_grad()
def evaluate(
    detector: MaskRCNN,
    root: Path,
    scale: tuple[int, int] = (1333, 800),
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Box and mask AP, AP50, AP75 (%) of ``detector`` on the COCO folder ``root``."""
    coco_class, _, _ = _pycocotools()
    images, annotations = _check_layout(root)
    try:
        ground_truth = _quiet(coco_class, str(annotations))
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{annotations} is not a COCO instances file: {err}") from err
    category_ids = sorted(ground_truth.getCatIds())
    if len(category_ids) != detector.roi_head.num_classes:
        raise ValueError(
            f"{annotations} lists {len(category_ids)} categories, the detector predicts {detector.roi_head.num_classes}"
        )
    detector.eval()
    image_ids = sorted(ground_truth.getImgIds())
    results: list[dict[str, Any]] = []
    for i, image_id in enumerate(image_ids):
        info = ground_truth.loadImgs(image_id)[0]
        image = load_rgb(images / info["file_name"])
        height, width = image.shape[:2]
        size = rescaled_size(height, width, scale)
        detections = detector.predict(to_input(image, size))[0]
        masks = detections["masks"]
        if len(masks):
            masks = F.interpolate(masks[:, None].float(), size=(height, width), mode="bilinear")[:, 0] >= 0.5
        detections = {**detections, "masks": masks.reshape(-1, height, width)}
        results += to_coco_results(detections, image_id, category_ids, (size[0] / height, size[1] / width))
        if i % 100 == 0:
            log(f"      coco: {i + 1}/{len(image_ids)} images, {len(results)} detections")
    if not results:
        log("      coco: no detection above the score threshold; every AP is 0")
    return coco_metrics(ground_truth, results, image_ids)


def coco_metrics(ground_truth: Any, results: list[dict[str, Any]], image_ids: list[int]) -> dict[str, float]:
    """COCOeval box and mask AP, AP50, AP75 (%) of ``results`` (COCO result dicts with ``bbox`` and
    ``segmentation``) against a pycocotools ``COCO`` ground truth; all 0 without results."""
    _, coco_eval_class, _ = _pycocotools()
    metrics = {name: 0.0 for names in METRICS.values() for name in names}
    if not results:
        return metrics
    detections = _quiet(ground_truth.loadRes, results)
    for iou_type, names in METRICS.items():
        evaluator = coco_eval_class(ground_truth, detections, iou_type)
        evaluator.params.imgIds = image_ids
        for step in (evaluator.evaluate, evaluator.accumulate, evaluator.summarize):
            _quiet(step)
        metrics.update({name: 100.0 * float(evaluator.stats[k]) for k, name in enumerate(names)})
    return metrics
