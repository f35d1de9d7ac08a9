"""Mask R-CNN (He et al. 2017) in mmdet 3.x's layout: RPN head, RoI box and mask heads, and inference.

Module and parameter names follow mmdet (``neck``, ``rpn_head.rpn_{conv,cls,reg}``,
``roi_head.bbox_head.{shared_fcs.{0,1},fc_cls,fc_reg}``, ``roi_head.mask_head.{convs.k.conv,upsample,
conv_logits}``) so that the released COCO checkpoints load. Only inference is implemented; training losses
(anchor/RoI assignment and sampling) are not.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tocalib.models.heads.common import ConvModule
from tocalib.models.heads.fpn import FPN
from tocalib.models.heads.ops import batched_nms, decode_deltas, grid_anchors, roi_align

__all__ = ["FCNMaskHead", "MaskRCNN", "MaskRCNNTestConfig", "RPNHead", "RoIHead", "Shared2FCBBoxHead"]

RPN_STDS = (1.0, 1.0, 1.0, 1.0)
RCNN_STDS = (0.1, 0.1, 0.2, 0.2)


@dataclass(frozen=True)
class MaskRCNNTestConfig:
    """mmdet's ``mask-rcnn_r50_fpn`` test settings."""

    rpn_nms_pre: int = 1000
    """Top-scoring anchors kept per level before NMS."""
    rpn_iou_threshold: float = 0.7
    rpn_max_per_img: int = 1000
    """Proposals kept after NMS: the number of RoIs the box head sees."""
    score_threshold: float = 0.05
    iou_threshold: float = 0.5
    max_per_img: int = 100
    """Detections kept: the number of RoIs the mask head sees."""
    mask_threshold: float = 0.5


class RPNHead(nn.Module):
    """Region-proposal head: shared 3×3 conv + ReLU, then 1×1 objectness (A) and box-delta (4A) convs.

    Anchors follow mmdet's ``AnchorGenerator``: one scale (8 × stride) and ``ratios`` per level.
    """

    def __init__(
        self,
        in_channels: int = 256,
        strides: Sequence[int] = (4, 8, 16, 32, 64),
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
        scales: Sequence[float] = (8.0,),
    ) -> None:
        super().__init__()
        self.strides, self.ratios, self.scales = tuple(strides), tuple(ratios), tuple(scales)
        num_anchors = len(self.ratios) * len(self.scales)
        self.rpn_conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(in_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(in_channels, 4 * num_anchors, 1)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness logits (B, A, H, W) and deltas (B, 4A, H, W)."""
        if len(features) != len(self.strides):
            raise ValueError(f"RPNHead expects {len(self.strides)} pyramid levels, got {len(features)}")
        hidden = [F.relu(self.rpn_conv(f)) for f in features]
        return [self.rpn_cls(h) for h in hidden], [self.rpn_reg(h) for h in hidden]

    def proposals(self, features: Sequence[Tensor], image_hw: tuple[int, int], cfg: MaskRCNNTestConfig) -> list[Tensor]:
        """Per image, up to ``cfg.rpn_max_per_img`` proposals (K, 4) in pixels, by decreasing objectness."""
        logits, deltas = self(features)
        results = []
        for b in range(features[0].shape[0]):
            boxes, scores, levels = [], [], []
            for level, (stride, cls, reg) in enumerate(zip(self.strides, logits, deltas, strict=True)):
                anchors = grid_anchors(stride, self.ratios, self.scales, tuple(cls.shape[-2:])).to(cls)
                score = cls[b].permute(1, 2, 0).reshape(-1).sigmoid()
                delta = reg[b].permute(1, 2, 0).reshape(-1, 4)
                if len(score) > cfg.rpn_nms_pre:
                    score, top = score.topk(cfg.rpn_nms_pre)
                    anchors, delta = anchors[top], delta[top]
                boxes.append(decode_deltas(anchors, delta, RPN_STDS, image_hw))
                scores.append(score)
                levels.append(torch.full_like(score, level, dtype=torch.long))
            box, score, level_ids = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
            valid = (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
            box, score, level_ids = box[valid], score[valid], level_ids[valid]
            keep = batched_nms(box, score, level_ids, cfg.rpn_iou_threshold)[: cfg.rpn_max_per_img]
            results.append(box[keep])
        return results


class Shared2FCBBoxHead(nn.Module):
    """Two shared FCs (1024) on flattened (K, C, 7, 7) RoI features, then class scores (num_classes + 1,
    background last) and class-specific deltas (4 · num_classes)."""

    def __init__(
        self, in_channels: int = 256, roi_size: int = 7, fc_channels: int = 1024, num_classes: int = 80
    ) -> None:
        super().__init__()
        self.shared_fcs = nn.ModuleList(
            [nn.Linear(in_channels * roi_size * roi_size, fc_channels), nn.Linear(fc_channels, fc_channels)]
        )
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4 * num_classes)

    def forward(self, roi_features: Tensor) -> tuple[Tensor, Tensor]:
        """(K, C, 7, 7) -> class logits (K, num_classes + 1) and deltas (K, 4 · num_classes)."""
        x = roi_features.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class FCNMaskHead(nn.Module):
    """Four 3×3 convs + ReLU, a 2×2 stride-2 deconvolution + ReLU, and 1×1 per-class mask logits."""

    def __init__(self, in_channels: int = 256, channels: int = 256, num_convs: int = 4, num_classes: int = 80) -> None:
        super().__init__()
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.ModuleList(ConvModule(a, b, 3, padding=1, norm=False) for a, b in itertools.pairwise(widths))
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(channels, num_classes, 1)

    def forward(self, roi_features: Tensor) -> Tensor:
        """(K, C, 14, 14) -> mask logits (K, num_classes, 28, 28)."""
        x = roi_features
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(F.relu(self.upsample(x)))


def map_roi_levels(rois: Tensor, num_levels: int, finest_scale: int = 56) -> Tensor:
    """mmdet's level of each (K, 5) RoI: floor(log2(sqrt(area) / finest_scale)), clamped to the levels."""
    scale = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).sqrt()
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


def extract_roi_features(features: Sequence[Tensor], rois: Tensor, strides: Sequence[int], output_size: int) -> Tensor:
    """``SingleRoIExtractor``: RoIAlign (aligned, adaptive sampling) of each (K, 5) RoI on its pyramid level.

    Returns (K, C, output_size, output_size).
    """
    levels = map_roi_levels(rois, len(strides))
    out = features[0].new_zeros(len(rois), features[0].shape[1], output_size, output_size)
    for level, stride in enumerate(strides):
        members = (levels == level).nonzero().squeeze(1)
        if len(members):
            out[members] = roi_align(features[level], rois[members], output_size, 1.0 / stride)
    return out


def _to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image (K_b, 4) boxes -> (ΣK_b, 5) RoIs with the image index in column 0."""
    return torch.cat([F.pad(b, (1, 0), value=float(i)) for i, b in enumerate(boxes)])


def paste_masks(masks: Tensor, boxes: Tensor, image_hw: tuple[int, int], threshold: float) -> Tensor:
    """Paste (K, m, m) mask probabilities into their (K, 4) boxes on an (H, W) canvas -> (K, H, W) bool.

    Each image pixel centre (x + 0.5, y + 0.5) inside a box samples the mask bilinearly (mmdet's
    ``_do_paste_mask``); pixels outside every box are False.
    """
    height, width = image_hw
    out = torch.zeros(len(masks), height, width, dtype=torch.bool, device=masks.device)
    for k, (mask, box) in enumerate(zip(masks, boxes.tolist(), strict=True)):
        x0, y0 = max(math.floor(box[0]), 0), max(math.floor(box[1]), 0)
        x1, y1 = min(math.ceil(box[2]), width), min(math.ceil(box[3]), height)
        if x1 <= x0 or y1 <= y0:
            continue
        xs = (torch.arange(x0, x1, dtype=masks.dtype) + 0.5 - box[0]) / (box[2] - box[0]) * 2 - 1
        ys = (torch.arange(y0, y1, dtype=masks.dtype) + 0.5 - box[1]) / (box[3] - box[1]) * 2 - 1
        grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)[None]
        sampled = F.grid_sample(mask[None, None], grid, mode="bilinear", align_corners=False)[0, 0]
        out[k, y0:y1, x0:x1] = sampled >= threshold
    return out


class RoIHead(nn.Module):
    """mmdet's ``StandardRoIHead``: box head on 7×7 and mask head on 14×14 RoIAlign features of P2–P5."""

    def __init__(self, num_classes: int = 80, in_channels: int = 256, strides: Sequence[int] = (4, 8, 16, 32)) -> None:
        super().__init__()
        self.strides = tuple(strides)
        self.num_classes = num_classes
        self.bbox_head = Shared2FCBBoxHead(in_channels, num_classes=num_classes)
        self.mask_head = FCNMaskHead(in_channels, num_classes=num_classes)

    def predict(
        self,
        features: Sequence[Tensor],
        proposals: Sequence[Tensor],
        image_hw: tuple[int, int],
        cfg: MaskRCNNTestConfig,
    ) -> list[dict[str, Tensor]]:
        """Per image: ``boxes`` (J, 4), ``scores`` (J,), ``labels`` (J,) and ``masks`` (J, H, W) bool."""
        levels = features[: len(self.strides)]
        cls_logits, deltas = self.bbox_head(extract_roi_features(levels, _to_rois(proposals), self.strides, 7))
        results = []
        for b, (props, logits, delta) in enumerate(
            zip(
                proposals,
                cls_logits.split([len(p) for p in proposals]),
                deltas.split([len(p) for p in proposals]),
                strict=True,
            )
        ):
            scores = logits.softmax(dim=-1)[:, : self.num_classes]  # (K, num_classes); background dropped
            boxes = decode_deltas(props, delta, RCNN_STDS, image_hw).reshape(len(props), self.num_classes, 4)
            roi_index, label = (scores > cfg.score_threshold).nonzero(as_tuple=True)
            box, score = boxes[roi_index, label], scores[roi_index, label]
            keep = batched_nms(box, score, label, cfg.iou_threshold)[: cfg.max_per_img]
            box, score, label = box[keep], score[keep], label[keep]
            masks = torch.zeros(0, *image_hw, dtype=torch.bool, device=box.device)
            if len(box):
                rois = F.pad(box, (1, 0), value=float(b))
                mask_logits = self.mask_head(extract_roi_features(levels, rois, self.strides, 14))
                probs = mask_logits[torch.arange(len(box)), label].sigmoid()
                masks = paste_masks(probs, box, image_hw, cfg.mask_threshold)
            results.append({"boxes": box, "scores": score, "labels": label, "masks": masks})
        return results


class MaskRCNN(nn.Module):
    """Backbone + FPN + RPN + RoI heads, with mmdet's module names.

    Args:
        backbone: returns four NCHW maps at strides 4, 8, 16, 32.
        in_channels: their channel counts.
        num_classes: object classes (80 for COCO).
        test_cfg: inference settings.
    """

    def __init__(
        self,
        backbone: nn.Module,
        in_channels: Sequence[int],
        num_classes: int = 80,
        test_cfg: MaskRCNNTestConfig | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = FPN(in_channels)
        self.rpn_head = RPNHead()
        self.roi_head = RoIHead(num_classes)
        self.test_cfg = test_cfg or MaskRCNNTestConfig()

    def extract_feat(self, img: Tensor) -> list[Tensor]:
        """Pyramid P2–P6, (B, 256, H/s, W/s) for s = 4 … 64, of a (B, 3, H, W) batch."""
        if img.dim() != 4:
            raise ValueError(f"img must be a (B, 3, H, W) batch, got shape {tuple(img.shape)}; add a batch axis")
        return self.neck(list(self.backbone(img)))

    @torch.no_grad()
    def predict(self, img: Tensor) -> list[dict[str, Tensor]]:
        """Detections per image in the input's pixel coordinates: ``boxes`` (J, 4) as x1, y1, x2, y2,
        ``scores`` (J,), ``labels`` (J,) in [0, num_classes) and ``masks`` (J, H, W) bool.

        The batch is zero-padded to a multiple of 32 (mmdet's ``pad_size_divisor``); boxes are clipped to and
        masks cover the unpadded (H, W).
        """
        image_hw = (img.shape[-2], img.shape[-1])
        pad_h, pad_w = (-image_hw[0]) % 32, (-image_hw[1]) % 32
        features = self.extract_feat(F.pad(img, (0, pad_w, 0, pad_h)))
        proposals = self.rpn_head.proposals(features, image_hw, self.test_cfg)
        return self.roi_head.predict(features, proposals, image_hw, self.test_cfg)

    def forward(self, img: Tensor) -> list[dict[str, Tensor]]:
        """Same as :meth:`predict`."""
        return self.predict(img)
