"""MAC counts of the dense-prediction models in the paper's conventions.

**ADE20k** (:func:`segmentor_macs`): fvcore rules (:func:`tocalib.flops.count_macs`) on mmseg's "tensor"
forward at 512×512, backbone + decode head up to the 1/4-resolution logits, auxiliary head not run. This
reproduces every README row within 1 %.

**COCO** (:func:`mask_rcnn_macs`): every README row is fvcore(backbone + FPN) at 1280×800 plus 132.8 ± 0.4 G
(counted by running the official code), but fvcore's rules give the RPN and RoI heads only 117.9 G. The gap is one
operator, the mask
head's 2×2 stride-2 transposed convolution. fvcore (and mmcv's hook counter) count a transposed convolution
once per *input* position; torchprofile, whose count the official ``get_flops.py`` prints next to mmengine's,
counts every convolution per *output* position (``prod(out_shape) · C_in · k²``), 4× for this layer:
100 RoIs × 28² × 256 × 256 × 4 = 20.55 G instead of 5.14 G, +15.41 G. ``convention="paper"`` counts transposed
convolutions that way and all else as fvcore; ``convention="fvcore"`` is plain fvcore.

PaCa-Tiny at 1280×800 (``mask_rcnn_macs``, GMACs; README 252):

===================  =======  =============================================================================
backbone              65.557  fvcore, features-only PaCa-Tiny
FPN                   52.942  1×1 laterals 2.785 + 3×3 outputs 589,824 × 85,000 positions 50.135 + nearest
                              upsampling 0.022 (P6 max-pool: 0)
RPN head              50.616  3×3 conv 589,824 × 85,260 positions (P2–P6) 50.288 + 1×1 cls/reg 3,840 × 85,260
box head              14.304  1000 proposals (``rpn_max_per_img``) × 14,304,256 (12544·1024 + 1024² + 1024·401)
mask head             68.400  100 RoIs (``max_per_img``) × (4 × 115,605,504 convs + 205,520,896 deconvolution
                              per output position + 16,056,320 logits); 52.986 with fvcore's rule
total                251.819  (fvcore rule: 236.405, −6.2 %)
===================  =======  =============================================================================

Alternatives that were checked and rejected: mmcv's hook counter adds bias, ReLU and pooling terms worth only
~0.14 G in these heads and cannot see the backbone's functional attention; a box head on 2000 RoIs gives
132.2 G, a mask head on 128 RoIs 132.7 G, but neither count occurs at test time (mmdet keeps 1000 proposals and
its tensor-mode forward runs the mask head on ``rois[:100]``). The remaining −0.5 G mean difference to the
README is consistent with torchprofile's lighter LayerNorm rule (1 per element instead of 5). RoIAlign, anchors,
decoding and NMS do no counted MACs in either tool (mmcv's RoIAlign is an opaque custom op) and are not counted.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Literal

import torch
from torch import Tensor, nn

from tocalib.flops import count_macs
from tocalib.models.heads.mask_rcnn import MaskRCNN

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
    if convention not in ("paper", "fvcore"):
        raise ValueError(f"convention must be 'paper' or 'fvcore', got {convention!r}")
    handles = {"aten::_convolution": transposed_conv_per_output_macs} if convention == "paper" else None
    return count_macs(module, *args, not_macs=NOT_MACS, handles=handles)


def segmentor_macs(segmentor: nn.Module, image_hw: tuple[int, int] = (512, 512)) -> int:
    """MACs of an :class:`~tocalib.models.heads.segmentor.EncoderDecoder` on one (1, 3, H, W) image (fvcore rules;
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
