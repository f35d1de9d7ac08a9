"""Detection operators in pure PyTorch: RoIAlign, NMS, anchors and delta box coding.

Conventions follow mmcv 2.x / mmdet 3.x, which trained the released checkpoints:

* boxes are ``(x1, y1, x2, y2)`` in pixels with no ``+1`` (``offset=0``), so a box's width is ``x2 - x1``;
* RoIs are ``(K, 5)`` rows ``(batch_index, x1, y1, x2, y2)``;
* :func:`roi_align` has ``aligned=True`` semantics: a pixel's centre sits at ``i + 0.5`` in box coordinates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "batched_nms",
    "box_iou",
    "decode_deltas",
    "encode_deltas",
    "grid_anchors",
    "nms",
    "roi_align",
]

_MAX_DW = abs(math.log(16 / 1000))
"""Largest |log(width ratio)| a decoded box may have (mmdet's ``wh_ratio_clip = 16/1000``)."""


def _check_boxes(boxes: Tensor, name: str, columns: int = 4) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != columns:
        raise ValueError(
            f"{name} must have shape (K, {columns}), got {tuple(boxes.shape)}; reshape it to (-1, {columns})"
        )


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of ``boxes1`` (K, 4) and ``boxes2`` (L, 4) -> (K, L); empty boxes have IoU 0."""
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    area1 = (boxes1[:, 2] - boxes1[:, 0]).clamp(min=0) * (boxes1[:, 3] - boxes1[:, 1]).clamp(min=0)
    area2 = (boxes2[:, 2] - boxes2[:, 0]).clamp(min=0) * (boxes2[:, 3] - boxes2[:, 1]).clamp(min=0)
    top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = area1[:, None] + area2[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression.

    Visits boxes by decreasing score (ties: lower index first) and drops every later box whose IoU with a
    kept box is **above** ``iou_threshold``. Returns the kept indices (long, shape (J,)) by decreasing score.
    """
    _check_boxes(boxes, "boxes")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must have shape ({boxes.shape[0]},) to match boxes, got {tuple(scores.shape)}")
    order = torch.sort(scores, descending=True, stable=True).indices
    x1, y1, x2, y2 = boxes[order].unbind(dim=1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = slice(i + 1, None)
        inter = (torch.minimum(x2[rest], x2[i]) - torch.maximum(x1[rest], x1[i])).clamp(min=0) * (
            torch.minimum(y2[rest], y2[i]) - torch.maximum(y1[rest], y1[i])
        ).clamp(min=0)
        union = areas[rest] + areas[i] - inter
        # inter > thr·union is IoU > thr without dividing (and never true for an empty union)
        suppressed[rest] |= inter > iou_threshold * union
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """:func:`nms` run independently within each group id (class or level) of ``groups`` (K,).

    Returns kept indices into ``boxes`` sorted by decreasing score.
    """
    _check_boxes(boxes, "boxes")
    if groups.shape != boxes.shape[:1]:
        raise ValueError(f"groups must have shape ({boxes.shape[0]},) to match boxes, got {tuple(groups.shape)}")
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    # Shift each group far apart so that boxes of different groups never overlap.
    offsets = groups.to(boxes.dtype) * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def grid_anchors(
    base_size: int, ratios: tuple[float, ...], scales: tuple[float, ...], feat_hw: tuple[int, int]
) -> Tensor:
    """mmdet ``AnchorGenerator`` anchors of one level (stride = ``base_size``, centre offset 0).

    Returns (H·W·A, 4) with A = len(ratios)·len(scales), ordered position-major (row, then column), then
    ratio, then scale, which is the order of the RPN head's ``(A·k, H, W)`` output channels.
    """
    ratios_t = torch.tensor(ratios, dtype=torch.float32)
    scales_t = torch.tensor(scales, dtype=torch.float32)
    h_ratios = ratios_t.sqrt()
    widths = (base_size / h_ratios[:, None] * scales_t[None, :]).reshape(-1)
    heights = (base_size * h_ratios[:, None] * scales_t[None, :]).reshape(-1)
    base = torch.stack([-0.5 * widths, -0.5 * heights, 0.5 * widths, 0.5 * heights], dim=-1)
    height, width = feat_hw
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32) * base_size,
        torch.arange(width, dtype=torch.float32) * base_size,
        indexing="ij",
    )
    shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4)
    return (shifts + base[None]).reshape(-1, 4)


def encode_deltas(boxes: Tensor, targets: Tensor, stds: tuple[float, float, float, float]) -> Tensor:
    """``DeltaXYWHBBoxCoder.encode`` (means 0): the deltas (K, 4) that turn ``boxes`` (K, 4) into ``targets``."""
    pw, ph = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    gw, gh = targets[:, 2] - targets[:, 0], targets[:, 3] - targets[:, 1]
    dx = ((targets[:, 0] + targets[:, 2]) - (boxes[:, 0] + boxes[:, 2])) * 0.5 / pw
    dy = ((targets[:, 1] + targets[:, 3]) - (boxes[:, 1] + boxes[:, 3])) * 0.5 / ph
    deltas = torch.stack([dx, dy, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
    return deltas / deltas.new_tensor(stds)


def decode_deltas(
    boxes: Tensor, deltas: Tensor, stds: tuple[float, float, float, float], max_hw: tuple[int, int] | None = None
) -> Tensor:
    """``DeltaXYWHBBoxCoder.decode`` (means 0): apply ``deltas`` (K, 4·c) to ``boxes`` (K, 4) -> (K, 4·c).

    Width/height log-ratios are clamped to ±|log(16/1000)|; with ``max_hw = (H, W)`` the result is clipped to
    the image.
    """
    _check_boxes(boxes, "boxes")
    d = deltas.reshape(len(deltas), -1, 4) * deltas.new_tensor(stds)
    d[..., 2:] = d[..., 2:].clamp(-_MAX_DW, _MAX_DW)
    centre = ((boxes[:, :2] + boxes[:, 2:]) * 0.5)[:, None]
    size = (boxes[:, 2:] - boxes[:, :2])[:, None]
    new_centre = centre + size * d[..., :2]
    new_size = size * d[..., 2:].exp()
    out = torch.cat([new_centre - 0.5 * new_size, new_centre + 0.5 * new_size], dim=-1)
    if max_hw is not None:
        height, width = max_hw
        out = torch.stack(
            [
                out[..., 0].clamp(0, width),
                out[..., 1].clamp(0, height),
                out[..., 2].clamp(0, width),
                out[..., 3].clamp(0, height),
            ],
            dim=-1,
        )
    return out.reshape(len(deltas), -1)


def _bin_offsets(output_size: int, grid: int, like: Tensor) -> Tensor:
    """Sample positions in bin units, (P·grid,): bin p, sample i sits at p + (i + 0.5) / grid."""
    bins = torch.arange(output_size, dtype=like.dtype, device=like.device)
    within = (torch.arange(grid, dtype=like.dtype, device=like.device) + 0.5) / grid
    return (bins[:, None] + within[None, :]).reshape(-1)


def roi_align(
    features: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int = 0
) -> Tensor:
    """RoIAlign with ``aligned=True`` (mmcv / Detectron2 semantics), pure PyTorch.

    Args:
        features: (B, C, H, W) feature map.
        rois: (K, 5) rows ``(batch_index, x1, y1, x2, y2)`` in input-image pixels.
        output_size: P, the side of the pooled square.
        spatial_scale: feature pixels per image pixel (1/stride).
        sampling_ratio: samples per bin side; 0 means ``ceil(roi_side / P)``, chosen per RoI.

    Returns:
        (K, C, P, P): each bin is the mean of its sampling grid's bilinear samples. A sample more than one
        pixel outside the map counts as 0; one within a pixel of the border takes the border value.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (B, C, H, W), got shape {tuple(features.shape)}")
    _check_boxes(rois, "rois", columns=5)
    if output_size < 1 or sampling_ratio < 0:
        raise ValueError(f"output_size must be >= 1 and sampling_ratio >= 0, got {output_size}, {sampling_ratio}")
    rois = rois.to(features.dtype)
    num_rois, channels = len(rois), features.shape[1]
    height, width = features.shape[-2:]
    out = features.new_zeros(num_rois, channels, output_size, output_size)
    if num_rois == 0:
        return out
    start = rois[:, 1:3] * spatial_scale - 0.5  # (K, 2) as (x, y), pixel centres at integers
    size = (rois[:, 3:5] - rois[:, 1:3]) * spatial_scale
    bin_size = size / output_size
    grid = (
        torch.full_like(size, float(sampling_ratio)) if sampling_ratio > 0 else (size / output_size).ceil()
    ).long()  # (K, 2) samples per bin side; <= 0 for an empty RoI, whose bins stay 0 as in mmcv
    keys = torch.cat([rois[:, :1].long(), grid], dim=1)
    for key in torch.unique(keys, dim=0):
        batch_index, grid_x, grid_y = (int(v) for v in key)
        if grid_x <= 0 or grid_y <= 0:
            continue
        members = (keys == key).all(dim=1).nonzero().squeeze(1)
        xs = start[members, 0, None] + _bin_offsets(output_size, grid_x, rois) * bin_size[members, 0, None]  # (k, P·gx)
        ys = start[members, 1, None] + _bin_offsets(output_size, grid_y, rois) * bin_size[members, 1, None]  # (k, P·gy)
        valid = ((ys >= -1) & (ys <= height))[:, :, None] & ((xs >= -1) & (xs <= width))[:, None, :]
        # grid_sample with border padding clamps to [0, size-1], which is RoIAlign's rule for samples that
        # lie within one pixel outside the map; samples further out are zeroed through ``valid``.
        norm_x = (2 * xs + 1) / width - 1
        norm_y = (2 * ys + 1) / height - 1
        sample_grid = torch.stack(torch.broadcast_tensors(norm_x[:, None, :], norm_y[:, :, None]), dim=-1)
        k, rows, cols = valid.shape
        samples = F.grid_sample(
            features[batch_index : batch_index + 1],
            sample_grid.reshape(1, k * rows, cols, 2),
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        ).reshape(channels, k, rows, cols)
        samples = samples.transpose(0, 1) * valid[:, None].to(samples)
        out[members] = samples.reshape(k, channels, output_size, grid_y, output_size, grid_x).mean(dim=(3, 5))
    return out
