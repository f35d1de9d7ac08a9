"""MAC counts of the dense-prediction models in the paper's conventions.

**ADE20k** (`segmentor_macs`): fvcore rules (:func:`tocalib.flops.count_macs`) on mmseg's "tensor" forward,
backbone + decode head up to the 1/4-resolution logits, auxiliary head not run. This reproduces the README.

**COCO** (`mask_rcnn_macs`): the README numbers are backbone + FPN under fvcore rules plus about 132.8 G for
the heads, while fvcore's rules give the heads only about 117.9 G at 1280×800 (1000 proposals into the box
head, 100 RoIs into the mask head: mmdet's test ``max_per_img`` and its tensor-mode ``rois[:100]``). The
difference is one operator: the mask head's 2×2 stride-2 transposed convolution. fvcore (and mmcv's hook
counter) count a transposed convolution once per *input* position; torchprofile, which the official
``get_flops.py`` also prints, counts every convolution once per *output* position
(``prod(out_shape) · C_in · k²``), i.e. 4× for this layer: 100 × 28² × 256 × 256 × 4 = 20.55 G instead of
5.14 G, +15.41 G. ``convention="paper"`` counts transposed convolutions that way and everything else as
fvcore does; ``convention="fvcore"`` is plain fvcore. The RoIAlign, anchor, decoding and NMS steps do no
counted MACs in either tool (mmcv's RoIAlign is an opaque custom op to both) and are not counted here.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Literal

import torch
from torch import Tensor, nn

from models.heads.mask_rcnn import MaskRCNN
from tocalib.flops import count_macs, mac_analysis

__all__ = ["mask_rcnn_macs", "segmentor_macs", "transposed_conv_per_output_macs"]

Convention = Literal["paper", "fvcore"]

NOT_MACS = ("aten::max_pool2d",)
"""Traced here and MAC-free: the FPN's P6 is a kernel-1 stride-2 max-pool, i.e. a subsampling."""


def _shape(value: Any) -> list[int]:
    return value.type().sizes()


def transposed_conv_per_output_macs(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """fvcore handle for ``aten::_convolution`` that counts a transposed convolution per *output* position
    (torchprofile's rule: output elements × C_in/groups × kernel area); ordinary convolutions as fvcore does
    (output elements × C_in/groups × kernel area)."""
    w_shape, out_shape = _shape(inputs[1]), _shape(outputs[0])
    transposed, groups = bool(inputs[6].toIValue()), int(inputs[8].toIValue())
    # Conv weights are (C_out, C_in/g, k…); transposed-conv weights are (C_in, C_out/g, k…).
    in_per_group = w_shape[0] // groups if transposed else w_shape[1]
    return Counter({"conv": math.prod(out_shape) * in_per_group * math.prod(w_shape[2:])})


def _macs(module: nn.Module, *args: Any, convention: Convention) -> int:
    if convention == "fvcore":
        return count_macs(module, *args, not_macs=NOT_MACS)
    if convention != "paper":
        raise ValueError(f"convention must be 'paper' or 'fvcore', got {convention!r}")
    analysis = mac_analysis(module, *args, not_macs=NOT_MACS).set_op_handle(
        "aten::_convolution", transposed_conv_per_output_macs
    )
    return int(analysis.total())


def segmentor_macs(segmentor: nn.Module, image_hw: tuple[int, int] = (512, 512)) -> int:
    """MACs of an :class:`~models.heads.segmentor.EncoderDecoder` on one (1, 3, H, W) image (fvcore rules;
    decode head only, as the README counts)."""
    return count_macs(segmentor.eval(), torch.zeros(1, 3, *image_hw))


@torch.no_grad()
def mask_rcnn_macs(
    model: MaskRCNN,
    image_hw: tuple[int, int] = (1280, 800),
    convention: Convention = "paper",
) -> dict[str, int]:
    """MACs of Mask R-CNN inference on one (1, 3, H, W) image, part by part.

    The box head sees ``test_cfg.rpn_max_per_img`` RoIs (1000) and the mask head ``test_cfg.max_per_img``
    (100). Returns ``backbone``, ``neck``, ``rpn_head``, ``bbox_head``, ``mask_head`` and ``total``.
    """
    model = model.eval()
    cfg = model.test_cfg
    img = torch.zeros(1, 3, *image_hw)
    features = list(model.backbone(img))
    pyramid = model.neck(features)
    channels = pyramid[0].shape[1]
    parts: dict[str, tuple[nn.Module, Tensor | list[Tensor]]] = {
        "backbone": (model.backbone, img),
        "neck": (model.neck, features),
        "rpn_head": (model.rpn_head, pyramid),
        "bbox_head": (model.roi_head.bbox_head, torch.zeros(cfg.rpn_max_per_img, channels, 7, 7)),
        "mask_head": (model.roi_head.mask_head, torch.zeros(cfg.max_per_img, channels, 14, 14)),
    }
    counts = {name: _macs(module, arg, convention=convention) for name, (module, arg) in parts.items()}
    counts["total"] = sum(counts.values())
    return counts
