"""IoUAccumulator: mmseg's mIoU/aAcc on hand-made maps, ignore handling, accumulation, errors, and the sum over
two gloo ranks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tocalib.reproductions.metrics import IoUAccumulator

ROOT = Path(__file__).resolve().parents[3]


def test_perfect_prediction_scores_100() -> None:
    labels = torch.tensor([[0, 1, 2], [2, 1, 0]])
    acc = IoUAccumulator(num_classes=3)
    acc.update(labels.clone(), labels)
    assert acc.compute() == {"mIoU": 100.0, "aAcc": 100.0, "IoU": [100.0, 100.0, 100.0]}


def test_partial_case_by_hand() -> None:
    """labels 0 0 1 1 / pred 0 1 1 1 (+ one 255 pixel predicted 0, which counts nowhere).
    class 0: I=1, pred 1, label 2 → U=2, IoU 50; class 1: I=2, pred 3, label 2 → U=3, IoU 66.67; aAcc 3/4."""
    acc = IoUAccumulator(num_classes=2)
    acc.update(np.array([[0, 1, 1, 1, 0]]), np.array([[0, 0, 1, 1, 255]]))
    result = acc.compute()
    assert result["IoU"] == pytest.approx([50.0, 200 / 3])
    assert result["mIoU"] == pytest.approx((50.0 + 200 / 3) / 2)
    assert result["aAcc"] == pytest.approx(75.0)
    assert acc.intersect.tolist() == [1, 2] and acc.area_pred.tolist() == [1, 3] and acc.area_label.tolist() == [2, 2]
    assert acc.intersect.dtype == torch.int64


def test_ignored_pixels_change_nothing() -> None:
    labels = torch.tensor([[0, 1], [255, 255]])
    with_wrong_ignored = IoUAccumulator(num_classes=4)
    with_wrong_ignored.update(torch.tensor([[0, 1], [3, 2]]), labels)
    result = with_wrong_ignored.compute()
    assert (result["mIoU"], result["aAcc"], result["IoU"][:2]) == (100.0, 100.0, [100.0, 100.0])
    assert all(math.isnan(v) for v in result["IoU"][2:])
    assert with_wrong_ignored.area_pred.tolist() == [1, 1, 0, 0]


def test_class_absent_everywhere_is_left_out_of_the_mean() -> None:
    """Class 2 is neither predicted nor labelled: NaN IoU, not a 0 that would halve the mean."""
    acc = IoUAccumulator(num_classes=3)
    acc.update(torch.tensor([0, 1, 1, 0]).view(2, 2), torch.tensor([0, 1, 0, 0]).view(2, 2))
    result = acc.compute()
    assert math.isnan(result["IoU"][2])
    assert result["mIoU"] == pytest.approx((2 / 3 + 1 / 2) / 2 * 100)


def test_a_class_only_predicted_counts_with_iou_zero() -> None:
    """pred 2 1 / labels 1 1: class 0 absent (NaN), class 1 I=1 U=2 (50), class 2 predicted only (0)."""
    acc = IoUAccumulator(num_classes=3)
    acc.update(torch.tensor([[2, 1]]), torch.tensor([[1, 1]]))
    result = acc.compute()
    assert math.isnan(result["IoU"][0]) and result["IoU"][1:] == [50.0, 0.0]
    assert result["mIoU"] == pytest.approx(25.0)


def test_iou_is_total_intersection_over_total_union_not_a_mean_of_images() -> None:
    """Image 1: class 0 right on 1 of 1 pixel (IoU 1); image 2: right on 1 of 3 (IoU 1/3). Total: 2/4 = 50, while
    the mean of per-image IoUs would be 66.7."""
    acc = IoUAccumulator(num_classes=2)
    acc.update(torch.tensor([[0]]), torch.tensor([[0]]))
    acc.update(torch.tensor([[0, 1, 1]]), torch.tensor([[0, 0, 0]]))
    assert acc.compute()["IoU"][0] == pytest.approx(50.0)


@given(
    st.integers(1, 4),
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(1, 5),
    st.integers(0, 2**16),
)
def test_a_batch_update_equals_one_update_per_image(
    batch: int, height: int, width: int, classes: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randint(classes, (batch, height, width), generator=gen)
    labels = torch.randint(classes + 1, (batch, height, width), generator=gen)
    labels[labels == classes] = 255
    batched, one_by_one = IoUAccumulator(classes), IoUAccumulator(classes)
    batched.update(pred, labels)
    for p, lab in zip(pred, labels, strict=True):
        one_by_one.update(p.numpy(), lab.numpy())
    for name in ("intersect", "area_pred", "area_label"):
        assert torch.equal(getattr(batched, name), getattr(one_by_one, name))
    assert int(batched.area_label.sum()) == int((labels != 255).sum())


def test_shape_mismatch_is_an_error_that_names_both_shapes() -> None:
    acc = IoUAccumulator(num_classes=3)
    with pytest.raises(ValueError, match=r"pred has shape \(2, 3\) but labels \(3, 2\)"):
        acc.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))


@pytest.mark.parametrize(
    ("pred", "labels", "error", "match"),
    [
        (torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), TypeError, "pred must hold integer"),
        (torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), ValueError, r"\(H, W\) or \(B, H, W\)"),
        (torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7), ValueError, "labels holds values outside 0…2"),
        (torch.full((2, 2), -1), torch.zeros(2, 2, dtype=torch.long), ValueError, "pred holds values outside"),
    ],
    ids=["float", "1d", "label-range", "pred-range"],
)
def test_bad_inputs_are_named(pred: torch.Tensor, labels: torch.Tensor, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        IoUAccumulator(num_classes=3).update(pred, labels)


def test_ignore_index_inside_the_class_range_is_refused() -> None:
    with pytest.raises(ValueError, match="ignore_index=2 is a class index"):
        IoUAccumulator(num_classes=3, ignore_index=2)


def test_all_reduce_without_a_process_group_keeps_counts_and_guards_against_reuse() -> None:
    acc = IoUAccumulator(num_classes=2)
    acc.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    before = acc.compute()
    acc.all_reduce()
    assert acc.compute() == before
    with pytest.raises(RuntimeError, match="already called"):
        acc.all_reduce()
    with pytest.raises(RuntimeError, match="reset"):
        acc.update(torch.tensor([[0]]), torch.tensor([[0]]))
    acc.reset()
    assert int(acc.area_label.sum()) == 0
    acc.update(torch.tensor([[0]]), torch.tensor([[0]]))


_RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from tocalib.reproductions.metrics import IoUAccumulator

    rank, store = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    acc = IoUAccumulator(num_classes=3)
    pred, labels = json.loads(sys.argv[3])
    acc.update(torch.tensor(pred), torch.tensor(labels))
    acc.all_reduce()
    counts = [acc.intersect.tolist(), acc.area_pred.tolist(), acc.area_label.tolist()]
    print(json.dumps({"counts": counts, "mIoU": acc.compute()["mIoU"]}))
    dist.destroy_process_group()
    """
)
RANK_DATA = [
    ([[0, 1], [2, 2]], [[0, 1], [1, 255]]),  # intersect [1, 1, 0], pred [1, 1, 1], label [1, 2, 0]
    ([[1, 1, 0]], [[1, 2, 0]]),  # intersect [1, 1, 0], pred [1, 2, 0], label [1, 1, 1]
]


def test_all_reduce_sums_the_counts_of_two_gloo_ranks(tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT, encoding="utf-8")
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(tmp_path / "store"), json.dumps(RANK_DATA[rank])],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=120) for process in ranks]
    for process, (_, err) in zip(ranks, outputs, strict=True):
        assert process.returncode == 0, err
    single = IoUAccumulator(num_classes=3)
    for pred, labels in RANK_DATA:
        single.update(torch.tensor(pred), torch.tensor(labels))
    for out, _ in outputs:
        record = json.loads(out)
        assert record["counts"] == [[2, 2, 0], [2, 3, 1], [2, 3, 1]]
        assert record["mIoU"] == pytest.approx(single.compute()["mIoU"])
