"""Semantic-segmentation IoU with mmseg's semantics, accumulated over a dataset and summed across ranks.

Per class, IoU = total intersection / total union over every pixel seen (not a mean of per-image IoUs); mIoU is the
mean over the classes whose union is non-empty (classes absent from both predictions and labels everywhere do not
count); aAcc is the fraction of labelled pixels predicted right. Pixels labelled ``ignore_index`` count nowhere.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["IoUAccumulator", "topk_correct"]


class IoUAccumulator:
    """Running intersection / prediction / label areas per class (int64 tensors of shape (num_classes,)).

    >>> acc = IoUAccumulator(num_classes=3)
    >>> acc.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [2, 255]]))
    >>> acc.compute()["mIoU"]  # class 0: 1/1, class 1: 1/2, class 2: 0/1
    50.0
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} is a class index (0…{num_classes - 1}); pick a value outside that range"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Zero the counts (start a new evaluation)."""
        self.intersect = torch.zeros(self.num_classes, dtype=torch.int64)
        self.area_pred = torch.zeros(self.num_classes, dtype=torch.int64)
        self.area_label = torch.zeros(self.num_classes, dtype=torch.int64)
        self._reduced = False

    def update(self, pred: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
        """Add one prediction: ``pred`` and ``labels`` are integer class maps of the same shape, (H, W) or
        (B, H, W); ``labels`` may hold ``ignore_index``. Any device; the counts stay on the CPU."""
        if self._reduced:
            raise RuntimeError("update() after all_reduce() would mix local and global counts; call reset() first")
        pred, labels = torch.as_tensor(pred), torch.as_tensor(labels)
        if pred.shape != labels.shape:
            raise ValueError(
                f"pred has shape {tuple(pred.shape)} but labels {tuple(labels.shape)}; resize the prediction to the "
                "label map (e.g. segmentor.predict(img, size=labels.shape[-2:])) before update()"
            )
        if pred.dim() not in (2, 3):
            raise ValueError(f"pred and labels must be (H, W) or (B, H, W), got shape {tuple(pred.shape)}")
        for name, value in (("pred", pred), ("labels", labels)):
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"{name} must hold integer class indices, got dtype {value.dtype}; take argmax first")
        labels = labels.to(pred.device)
        valid = labels != self.ignore_index
        pred, labels = pred[valid].long(), labels[valid].long()
        for name, value in (("pred", pred), ("labels", labels)):
            if value.numel() and (value.min() < 0 or value.max() >= self.num_classes):
                raise ValueError(
                    f"{name} holds values outside 0…{self.num_classes - 1} (other than ignore_index="
                    f"{self.ignore_index}): min {int(value.min())}, max {int(value.max())}"
                )
        n = self.num_classes
        self.intersect += torch.bincount(pred[pred == labels], minlength=n).cpu()
        self.area_pred += torch.bincount(pred, minlength=n).cpu()
        self.area_label += torch.bincount(labels, minlength=n).cpu()

    def all_reduce(self) -> None:
        """Sum the counts over all ``torch.distributed`` ranks (a no-op without a process group). Call it once,
        on every rank, after the last ``update``; calling it twice would double the counts, so it refuses."""
        if self._reduced:
            raise RuntimeError("all_reduce() was already called for these counts; call reset() to start over")
        self._reduced = True
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        counts = torch.stack([self.intersect, self.area_pred, self.area_label]).to(device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        self.intersect, self.area_pred, self.area_label = counts.cpu().unbind(0)

    def compute(self) -> dict[str, float | list[float]]:
        """``{"mIoU": float, "aAcc": float, "IoU": [float] * num_classes}``, all in %. A class whose union is
        empty has IoU NaN and is left out of the mean; with no labelled pixel at all, mIoU and aAcc are NaN."""
        union = self.area_pred + self.area_label - self.intersect
        iou = torch.where(union > 0, self.intersect.double() / union.clamp(min=1).double(), math.nan)
        present = union > 0
        miou = float(iou[present].mean()) if bool(present.any()) else math.nan
        total = int(self.area_label.sum())
        aacc = int(self.intersect.sum()) / total if total else math.nan
        return {"mIoU": 100.0 * miou, "aAcc": 100.0 * aacc, "IoU": [100.0 * float(v) for v in iou]}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of (B,) ``labels`` that are the arg-max, and among the top 5, of (B, K) ``logits`` (top-5 is top-K
    when K < 5); 0-d tensors on the logits' device."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return (top5[:, 0] == labels).sum(), (top5 == labels[:, None]).any(dim=1).sum()
