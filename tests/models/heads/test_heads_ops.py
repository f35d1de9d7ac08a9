"""RoIAlign, NMS and box coding against brute-force references and stated properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tocalib.models.heads.ops import batched_nms, box_iou, decode_deltas, encode_deltas, grid_anchors, nms, roi_align


def _bilinear(feature: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """mmcv's ``bilinear_interpolate`` for one point of a (C, H, W) map, written out scalar by scalar."""
    height, width = feature.shape[-2:]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return torch.zeros(feature.shape[0], dtype=feature.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    return (
        (1 - ly) * (1 - lx) * feature[:, y_low, x_low]
        + (1 - ly) * lx * feature[:, y_low, x_high]
        + ly * (1 - lx) * feature[:, y_high, x_low]
        + ly * lx * feature[:, y_high, x_high]
    )


def _roi_align_reference(
    features: torch.Tensor, rois: torch.Tensor, size: int, scale: float, sampling_ratio: int
) -> torch.Tensor:
    """RoIAlign (aligned=True) as nested loops over RoIs, bins and samples."""
    out = torch.zeros(len(rois), features.shape[1], size, size, dtype=features.dtype)
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = (v * scale - 0.5 for v in (x1, y1, x2, y2))
        bin_w, bin_h = (x2 - x1) / size, (y2 - y1) / size
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil((y2 - y1) / size)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil((x2 - x1) / size)
        count = max(grid_h * grid_w, 1)
        for py in range(size):
            for px in range(size):
                total = torch.zeros(features.shape[1], dtype=features.dtype)
                for iy in range(grid_h):
                    y = y1 + py * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = x1 + px * bin_w + (ix + 0.5) * bin_w / grid_w
                        total += _bilinear(features[int(b)], y, x)
                out[k, :, py, px] = total / count
    return out


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_matches_brute_force_on_random_boxes(sampling_ratio: int) -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 9, 13, generator=gen, dtype=torch.float64)
    # Boxes in image pixels (stride 4 -> a 52x36 image); some stick out of the image, one is empty.
    corner = torch.rand(24, 2, generator=gen, dtype=torch.float64) * torch.tensor([60.0, 44.0]) - 6
    size = torch.rand(24, 2, generator=gen, dtype=torch.float64) * 40
    size[0] = 0.0
    rois = torch.cat([torch.randint(0, 2, (24, 1), generator=gen).double(), corner, corner + size], dim=1)
    ours = roi_align(features, rois, 3, 0.25, sampling_ratio)
    torch.testing.assert_close(ours, _roi_align_reference(features, rois, 3, 0.25, sampling_ratio), rtol=0, atol=1e-12)


@given(
    value=st.floats(-10, 10),
    x1=st.floats(0, 30),
    y1=st.floats(0, 20),
    w=st.floats(1, 30),
    h=st.floats(1, 20),
    size=st.integers(1, 7),
)
def test_roi_align_of_a_box_inside_a_constant_map_returns_the_constant(
    value: float, x1: float, y1: float, w: float, h: float, size: int
) -> None:
    features = torch.full((1, 2, 16, 16), value, dtype=torch.float64)  # stride 4: a 64x64 image
    rois = torch.tensor([[0.0, x1, y1, min(x1 + w, 64.0), min(y1 + h, 64.0)]], dtype=torch.float64)
    torch.testing.assert_close(
        roi_align(features, rois, size, 0.25), torch.full((1, 2, size, size), value, dtype=torch.float64)
    )


def test_roi_align_rejects_rois_without_batch_index() -> None:
    with pytest.raises(ValueError, match=r"rois must have shape \(K, 5\)"):
        roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(3, 4), 2, 1.0)


def _nms_reference(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """Greedy NMS by plain Python over a pairwise IoU written out with scalars."""

    def iou(a: list[float], b: list[float]) -> float:
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    kept: list[int] = []
    for i in order:
        if all(iou(boxes[i].tolist(), boxes[j].tolist()) <= threshold for j in kept):
            kept.append(i)
    return kept


def _random_boxes(gen: torch.Generator, n: int) -> torch.Tensor:
    corner = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 50
    return torch.cat([corner, corner + 1 + torch.rand(n, 2, generator=gen, dtype=torch.float64) * 30], dim=1)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_brute_force(threshold: float) -> None:
    gen = torch.Generator().manual_seed(1)
    boxes = _random_boxes(gen, 120)
    scores = torch.rand(120, generator=gen, dtype=torch.float64)
    assert nms(boxes, scores, threshold).tolist() == _nms_reference(boxes, scores, threshold)


@given(seed=st.integers(0, 2**16), n=st.integers(0, 40), threshold=st.floats(0.05, 0.95))
def test_nms_keeps_a_subset_with_no_pair_above_threshold_and_covers_every_dropped_box(
    seed: int, n: int, threshold: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    boxes = _random_boxes(gen, n)
    scores = torch.rand(n, generator=gen, dtype=torch.float64)
    keep = nms(boxes, scores, threshold)
    assert len(set(keep.tolist())) == len(keep) and all(0 <= i < n for i in keep.tolist())
    iou = box_iou(boxes[keep], boxes[keep]).fill_diagonal_(0)
    assert not (iou > threshold).any()
    dropped = sorted(set(range(n)) - set(keep.tolist()))
    for i in dropped:  # every dropped box overlaps a kept box that scores at least as high
        overlapping = keep[box_iou(boxes[i : i + 1], boxes[keep])[0] > threshold]
        assert (scores[overlapping] >= scores[i]).any()


def test_batched_nms_never_suppresses_across_groups() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1]


def test_nms_rejects_mismatched_scores() -> None:
    with pytest.raises(ValueError, match="scores must have shape"):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)


def test_anchors_of_stride_4_follow_mmdet_base_anchors() -> None:
    anchors = grid_anchors(4, (0.5, 1.0, 2.0), (8.0,), (2, 3))
    assert anchors.shape == (2 * 3 * 3, 4)
    side = 32 / math.sqrt(2)  # ratio h/w = 0.5 at area 32²: w = 32·√2, h = 32/√2
    torch.testing.assert_close(anchors[0], torch.tensor([-side, -side / 2, side, side / 2]))
    torch.testing.assert_close(anchors[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    torch.testing.assert_close(anchors[3 * 4 + 1], torch.tensor([-12.0, -12.0, 20.0, 20.0]))  # row 1, column 1


@given(seed=st.integers(0, 2**16))
def test_decode_inverts_encode(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    boxes, targets = _random_boxes(gen, 16), _random_boxes(gen, 16)
    stds = (0.1, 0.1, 0.2, 0.2)
    torch.testing.assert_close(decode_deltas(boxes, encode_deltas(boxes, targets, stds), stds), targets)
