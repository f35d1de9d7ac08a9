"""FPN and Mask R-CNN: shapes at 512×512 and 1280×800, inference outputs, mask pasting and MAC rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tocalib.flops import count_macs
from tocalib.models import create_model
from tocalib.models.heads import FPN, FCNMaskHead, MaskRCNN, MaskRCNNTestConfig, RPNHead, Shared2FCBBoxHead
from tocalib.models.heads.flops import mask_rcnn_macs
from tocalib.models.heads.mask_rcnn import map_roi_levels, paste_masks

DIMS = [96, 192, 320, 384]


def _features(height: int, width: int, dims: list[int] = DIMS) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, c, height // 2 ** (i + 2), width // 2 ** (i + 2), generator=gen) for i, c in enumerate(dims)]


@pytest.mark.parametrize(
    ("hw", "sizes"),
    [
        ((512, 512), [(128, 128), (64, 64), (32, 32), (16, 16), (8, 8)]),
        ((1280, 800), [(320, 200), (160, 100), (80, 50), (40, 25), (20, 13)]),
    ],
)
def test_fpn_and_rpn_output_shapes(hw: tuple[int, int], sizes: list[tuple[int, int]]) -> None:
    """Shapes only, so the meta device (no data, no compute) is enough."""
    with torch.device("meta"):
        maps = [torch.empty(1, c, hw[0] // 2 ** (i + 2), hw[1] // 2 ** (i + 2)) for i, c in enumerate(DIMS)]
        pyramid = FPN(DIMS)(maps)
        logits, deltas = RPNHead()(pyramid)
    assert [tuple(p.shape) for p in pyramid] == [(1, 256, *s) for s in sizes]
    assert [tuple(t.shape) for t in logits] == [(1, 3, *s) for s in sizes]
    assert [tuple(t.shape) for t in deltas] == [(1, 12, *s) for s in sizes]


def test_roi_heads_output_shapes() -> None:
    with torch.no_grad():
        cls, reg = Shared2FCBBoxHead()(torch.zeros(5, 256, 7, 7))
        masks = FCNMaskHead()(torch.zeros(3, 256, 14, 14))
    assert (cls.shape, reg.shape, masks.shape) == ((5, 81), (5, 320), (3, 80, 28, 28))


def _tiny_mask_rcnn(label: int, cfg: MaskRCNNTestConfig) -> MaskRCNN:
    """PaCa-Tiny Mask R-CNN whose box head always prefers ``label``, so random weights still detect."""
    backbone = create_model("pacavit_tiny_p2cconv_100_0", features_only=True)
    model = MaskRCNN(backbone, DIMS, test_cfg=cfg).eval()
    with torch.no_grad():
        model.roi_head.bbox_head.fc_cls.bias[label] = 30.0
    return model


def _check_detections(result: dict[str, torch.Tensor], hw: tuple[int, int], label: int, max_dets: int) -> None:
    boxes, scores, labels, masks = result["boxes"], result["scores"], result["labels"], result["masks"]
    assert 0 < len(boxes) <= max_dets
    assert boxes.shape == (len(boxes), 4) and scores.shape == labels.shape == (len(boxes),)
    assert masks.shape == (len(boxes), *hw) and masks.dtype == torch.bool
    assert (labels == label).all() and (scores > 0.05).all() and (scores[:-1] >= scores[1:]).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= hw[1]).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 3] <= hw[0]).all() and (boxes[:, 2] >= boxes[:, 0]).all()
    ys, xs = torch.meshgrid(torch.arange(hw[0]) + 0.5, torch.arange(hw[1]) + 0.5, indexing="ij")
    for box, mask in zip(boxes, masks, strict=True):  # mask pixels lie inside their box (one-pixel slack)
        inside = (xs >= box[0] - 1) & (xs <= box[2] + 1) & (ys >= box[1] - 1) & (ys <= box[3] + 1)
        assert not (mask & ~inside).any()


def test_mask_rcnn_inference_at_256() -> None:
    cfg = MaskRCNNTestConfig(rpn_max_per_img=200, max_per_img=8)  # fewer RoIs keep the default suite fast
    results = _tiny_mask_rcnn(3, cfg).predict(torch.randn(1, 3, 256, 224))  # 224 is padded to 256 internally
    assert len(results) == 1
    _check_detections(results[0], (256, 224), label=3, max_dets=8)


@pytest.mark.slow
def test_mask_rcnn_inference_at_512() -> None:
    results = _tiny_mask_rcnn(3, MaskRCNNTestConfig()).predict(torch.randn(1, 3, 512, 480))
    assert len(results) == 1
    _check_detections(results[0], (512, 480), label=3, max_dets=100)


@pytest.mark.slow
def test_mask_rcnn_inference_at_1280x800() -> None:
    results = _tiny_mask_rcnn(7, MaskRCNNTestConfig()).predict(torch.randn(2, 3, 1280, 800))
    assert len(results) == 2
    for result in results:
        _check_detections(result, (1280, 800), label=7, max_dets=100)


def test_paste_masks_fills_exactly_the_pixel_centres_inside_the_box() -> None:
    boxes = torch.tensor([[2.0, 3.0, 7.0, 5.5], [-4.0, 8.0, 3.0, 20.0]])
    masks = paste_masks(torch.ones(2, 28, 28), boxes, (12, 10), threshold=0.5)
    ys, xs = torch.meshgrid(torch.arange(12) + 0.5, torch.arange(10) + 0.5, indexing="ij")
    for box, mask in zip(boxes, masks, strict=True):
        expected = (xs >= box[0]) & (xs <= box[2]) & (ys >= box[1]) & (ys <= box[3])
        assert torch.equal(mask, expected)


def test_rois_are_assigned_to_levels_by_scale_as_in_mmdet() -> None:
    sides = torch.tensor([20.0, 56.0, 111.0, 112.0, 224.0, 448.0, 2000.0])
    rois = torch.stack([torch.zeros(7), torch.zeros(7), torch.zeros(7), sides, sides], dim=1)
    assert map_roi_levels(rois, 4).tolist() == [0, 0, 0, 1, 2, 3, 3]


def test_mask_and_box_head_macs_follow_each_convention() -> None:
    """Per RoI: box head 12544·1024 + 1024² + 1024·81 + 1024·320; mask head 4 convs 3×3 on 14², the 2×2
    deconvolution counted per input (fvcore: 14²) or per output position (paper: 28²), and 1×1 logits."""
    box = 256 * 49 * 1024 + 1024 * 1024 + 1024 * 81 + 1024 * 320
    convs = 4 * 14 * 14 * 256 * 256 * 9
    logits = 28 * 28 * 256 * 80
    assert count_macs(Shared2FCBBoxHead().eval(), torch.zeros(3, 256, 7, 7)) == 3 * box
    assert count_macs(FCNMaskHead().eval(), torch.zeros(2, 256, 14, 14)) == 2 * (
        convs + 14 * 14 * 256 * 256 * 4 + logits
    )


class _StrideConvs(nn.Module):
    """A stand-in backbone: one strided conv per level, so that MACs are easy to state."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, c, 2 ** (i + 2), stride=2 ** (i + 2)) for i, c in enumerate(DIMS))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [conv(x) for conv in self.convs]


def test_mask_rcnn_macs_by_part_at_256() -> None:
    model = MaskRCNN(_StrideConvs(), DIMS, test_cfg=MaskRCNNTestConfig(rpn_max_per_img=10, max_per_img=3))
    fvcore, paper = mask_rcnn_macs(model, (256, 256), "fvcore"), mask_rcnn_macs(model, (256, 256), "paper")
    positions = [64 * 64, 32 * 32, 16 * 16, 8 * 8, 4 * 4]
    rpn = sum(positions) * (256 * 256 * 9 + 256 * 15)
    deconv_input, deconv_output = 3 * 14 * 14 * 256 * 256 * 4, 3 * 28 * 28 * 256 * 256 * 4
    assert fvcore["rpn_head"] == paper["rpn_head"] == rpn
    assert fvcore["bbox_head"] == paper["bbox_head"] == 10 * (256 * 49 * 1024 + 1024 * 1024 + 1024 * 401)
    assert paper["mask_head"] - fvcore["mask_head"] == deconv_output - deconv_input
    assert paper["total"] == sum(v for k, v in paper.items() if k != "total")


def test_detector_input_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"img must be a \(B, 3, H, W\) batch"):
        MaskRCNN(_StrideConvs(), DIMS).predict(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="RPNHead expects 5 pyramid levels"):
        RPNHead()(_features(64, 64))
