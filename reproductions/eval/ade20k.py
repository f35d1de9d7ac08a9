"""ADE20k mIoU on ``ADEChallengeData2016`` (``images/validation/*.jpg`` + ``annotations/validation/*.png``).

mmseg 1.x's ADE20k test setting (PaCaViT@4307018 segmentation configs): the images of
:class:`~tocalib.reproductions.data.ade20k.ADE20kVal`, whole-image inference, logits resized bilinearly to the
annotation's size, arg-max. mIoU is mmseg's: per class, total intersection / total union over the dataset, then the
mean over classes present in prediction or ground truth.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tocalib.models.heads import EncoderDecoder
from tocalib.reproductions.data.ade20k import IGNORE, NUM_CLASSES, ADE20kVal
from tocalib.reproductions.metrics import IoUAccumulator

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    segmentor: EncoderDecoder,
    root: Path,
    scale: tuple[int, int] = (2048, 512),
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """mIoU and pixel accuracy (aAcc), in %, of ``segmentor`` on the validation split under ``root``."""
    dataset = ADE20kVal(root, scale)
    segmentor.eval()
    accumulator = IoUAccumulator(NUM_CLASSES, ignore_index=IGNORE)
    for i in range(len(dataset)):
        x, labels = dataset[i]
        logits = segmentor.predict_logits(x[None], size=labels.shape)
        if logits.shape[1] != NUM_CLASSES:
            raise ValueError(
                f"the segmentor predicts {logits.shape[1]} classes, ADE20k has {NUM_CLASSES}: build it with "
                f"num_classes={NUM_CLASSES}"
            )
        accumulator.update(logits.argmax(dim=1)[0], labels)
        if i % 100 == 0:
            log(f"      ade20k: {i + 1}/{len(dataset)} images")
    metrics = accumulator.compute()
    return {"mIoU": metrics["mIoU"], "aAcc": metrics["aAcc"]}
