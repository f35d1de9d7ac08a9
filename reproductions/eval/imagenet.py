"""ImageNet-1k top-1 on a validation folder sorted into class folders (``val/n01440764/*.JPEG`` …).

Preprocessing is timm's evaluation transform with the model's ``pretrained_cfg`` (:class:`tocalib.models.PretrainedCfg`;
PaCa-ViT's is that of PaCaViT@4307018 imagenet_vit_adamw.yml, ``crop_pct=0.9``): resize the shorter side to
``floor(224 / 0.9) = 248`` with bicubic interpolation (Pillow, as torchvision does for PIL images), center-crop
224, scale to [0, 1] and normalise with the ImageNet mean and std. Class indices are the sorted folder names, as
in torchvision's ``ImageFolder`` (the standard order of the 1000 synsets).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from tocalib.models import PretrainedCfg
from tocalib.reproductions.data.folders import ImageFolder
from tocalib.reproductions.data.transforms import eval_transform
from tocalib.reproductions.metrics import topk_correct

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    root: Path,
    crop: int | None = None,
    batch_size: int = 32,
    log: Callable[[str], None] = print,
    allow_fewer_classes: bool = False,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) of a classifier on ``root``, preprocessed as its ``pretrained_cfg`` says
    (``crop`` overrides the input size, e.g. for a quick check).

    The sorted class folders must be the model's classes, one per output. ``allow_fewer_classes`` accepts K
    folders for the model's first K classes (a quick check of the pipeline on part of the data; the result
    is then not the paper's number)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, PretrainedCfg):
        raise ValueError(
            f"{type(model).__name__} has no pretrained_cfg (a tocalib.models.PretrainedCfg) saying how its inputs "
            "are resized and normalised: build it with tocalib.models.create_model, or set model.pretrained_cfg"
        )
    dataset = ImageFolder(root, eval_transform(cfg, crop))
    model.eval()
    correct1 = correct5 = 0
    for i, (images, labels) in enumerate(DataLoader(dataset, batch_size=batch_size)):
        logits = model(images)
        found, outputs = len(dataset.classes), logits.shape[1]
        if i == 0 and (found > outputs or (found < outputs and not allow_fewer_classes)):
            shown = ", ".join(dataset.classes[:5]) + (", …" if found > 5 else "")
            raise ValueError(
                f"{root} has {found} class folders ({shown}) but the model has {outputs} outputs: the folders, "
                "sorted, must be exactly the model's classes (all 1,000 synset folders n01440764 … n15075141 for "
                "ImageNet-1k), else a label means another class"
                + (
                    "; to check the pipeline on the first classes only, pass allow_fewer_classes=True "
                    "(reproduce --allow-fewer-classes)"
                    if found < outputs
                    else ""
                )
            )
        if i == 0 and found < outputs:
            log(f"      imagenet: {found} of the model's {outputs} classes (allow_fewer_classes): not the paper's")
        batch1, batch5 = topk_correct(logits, labels)
        correct1, correct5 = correct1 + int(batch1), correct5 + int(batch5)
        if i % 50 == 0:
            log(f"      imagenet: {min((i + 1) * batch_size, len(dataset))}/{len(dataset)} images")
    return {"top1": 100.0 * correct1 / len(dataset), "top5": 100.0 * correct5 / len(dataset)}
