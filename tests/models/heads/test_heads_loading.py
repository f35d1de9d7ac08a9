"""mmdet/mmseg checkpoint loading: official key names, round trips and clear, all-or-nothing errors."""

from __future__ import annotations

import pytest
import torch

from tocalib.models import StateDictMismatchError, create_model
from tocalib.models.heads import MaskRCNN, load_mmengine_checkpoint, paca_segmentor, upernet_segmentor

DIMS = [96, 192, 320, 384]
TINY = "pacavit_tiny_p2cconv_100_0"

# Non-backbone key names of the mmdet 3.x / mmseg 1.x module trees of the released configs.
MASK_RCNN_KEYS = [
    "neck.lateral_convs.0.conv.weight",
    "neck.lateral_convs.3.conv.bias",
    "neck.fpn_convs.3.conv.weight",
    "rpn_head.rpn_conv.weight",
    "rpn_head.rpn_cls.bias",
    "rpn_head.rpn_reg.weight",
    "roi_head.bbox_head.shared_fcs.0.weight",
    "roi_head.bbox_head.shared_fcs.1.bias",
    "roi_head.bbox_head.fc_cls.weight",
    "roi_head.bbox_head.fc_reg.bias",
    "roi_head.mask_head.convs.0.conv.weight",
    "roi_head.mask_head.convs.3.conv.bias",
    "roi_head.mask_head.upsample.weight",
    "roi_head.mask_head.conv_logits.weight",
]
PACA_HEAD_KEYS = [
    "decode_head.convs.0.conv.weight",
    "decode_head.convs.3.bn.running_mean",
    "decode_head.q.0.conv.weight",
    "decode_head.q.0.bn.weight",
    "decode_head.clustering.0.conv.weight",
    "decode_head.clustering.0.bn.bias",
    "decode_head.clustering.1.weight",
    "decode_head.clustering.1.bias",
    "decode_head.k.0.weight",
    "decode_head.k.2.running_var",
    "decode_head.v.0.bias",
    "decode_head.v.2.weight",
    "decode_head.proj.conv.weight",
    "decode_head.proj.bn.num_batches_tracked",
    "decode_head.conv_seg.weight",
]
UPERNET_KEYS = [
    "decode_head.psp_modules.0.1.conv.weight",
    "decode_head.psp_modules.3.1.bn.weight",
    "decode_head.bottleneck.conv.weight",
    "decode_head.lateral_convs.2.conv.weight",
    "decode_head.fpn_convs.0.bn.running_mean",
    "decode_head.fpn_bottleneck.conv.weight",
    "decode_head.conv_seg.bias",
    "auxiliary_head.convs.0.conv.weight",
    "auxiliary_head.convs.0.bn.weight",
    "auxiliary_head.conv_seg.weight",
]


def _meta_keys(build) -> set[str]:
    with torch.device("meta"):
        return set(build(create_model(TINY, features_only=True), DIMS).state_dict())


@pytest.mark.parametrize(
    ("build", "keys"),
    [(MaskRCNN, MASK_RCNN_KEYS), (paca_segmentor, PACA_HEAD_KEYS), (upernet_segmentor, UPERNET_KEYS)],
    ids=["mask_rcnn", "paca", "upernet"],
)
def test_state_dict_uses_the_official_key_names(build, keys: list[str]) -> None:
    own = _meta_keys(build)
    assert set(keys) <= own
    prefixes = {k.split(".")[0] for k in own}
    assert prefixes <= {"backbone", "neck", "rpn_head", "roi_head", "decode_head", "auxiliary_head"}


def _mmengine_checkpoint(model: torch.nn.Module) -> dict[str, object]:
    """An mmengine-style checkpoint of ``model`` with random values (DDP ``module.`` prefix included)."""
    gen = torch.Generator().manual_seed(0)
    state = {
        f"module.{k}": torch.randn(v.shape, generator=gen).to(v.dtype) if v.is_floating_point() else v + 3
        for k, v in model.state_dict().items()
    }
    return {"meta": {"mmdet_version": "3.0.0"}, "state_dict": state, "optimizer": {"state": {}}}


def test_mask_rcnn_checkpoint_round_trip() -> None:
    source = MaskRCNN(create_model(TINY, features_only=True), DIMS)
    checkpoint = _mmengine_checkpoint(source)
    target = MaskRCNN(create_model(TINY, features_only=True), DIMS)
    report = load_mmengine_checkpoint(target, checkpoint)
    assert not report.missing and not report.unexpected and not report.mismatched
    assert sorted(report.loaded) == sorted(target.state_dict())
    for key, value in target.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][f"module.{key}"]), key


def test_segmentor_errors_list_every_problem_and_leave_the_model_untouched() -> None:
    model = paca_segmentor(create_model(TINY, features_only=True, num_clusters=(200, 200, 200, 0)), DIMS)
    checkpoint = _mmengine_checkpoint(model)
    state = checkpoint["state_dict"]
    del state["module.decode_head.q.0.conv.weight"]
    state["module.decode_head.extra.weight"] = torch.zeros(1)
    state["module.decode_head.conv_seg.weight"] = torch.zeros(19, 256, 1, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StateDictMismatchError) as err:
        load_mmengine_checkpoint(model, checkpoint)
    message = str(err.value)
    assert "decode_head.q.0.conv.weight" in message and "decode_head.extra.weight" in message
    assert "decode_head.conv_seg.weight: checkpoint [19, 256, 1, 1] vs model [150, 256, 1, 1]" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_ade_checkpoint_into_imagenet_cluster_numbers_needs_the_skip_option() -> None:
    """An ADE20k checkpoint has 200 clusters per stage; a model built with 100 keeps its own cluster layers."""
    ade = paca_segmentor(create_model(TINY, features_only=True, num_clusters=(200, 200, 200, 0)), DIMS)
    checkpoint = _mmengine_checkpoint(ade)
    model = paca_segmentor(create_model(TINY, features_only=True), DIMS)
    with pytest.raises(StateDictMismatchError, match="skip_mismatched_clusters=True"):
        load_mmengine_checkpoint(model, checkpoint)
    with pytest.warns(UserWarning, match="cluster layers"):
        report = load_mmengine_checkpoint(model, checkpoint, skip_mismatched_clusters=True)
    assert report.skipped_clusters and all(k.startswith("backbone.stage") for k in report.skipped_clusters)
    assert "decode_head.q.0.conv.weight" in report.loaded


def test_loader_needs_a_backbone_child() -> None:
    with pytest.raises(ValueError, match="must have a 'backbone' child"):
        load_mmengine_checkpoint(torch.nn.Linear(2, 2), {"state_dict": {}})
