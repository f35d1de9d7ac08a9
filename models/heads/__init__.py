"""Dense-prediction heads for PaCa-ViT backbones: the PaCa segmentation head, UperNet + FCN auxiliary head,
FPN + Mask R-CNN, their pure-PyTorch operators, MAC counting and mmdet/mmseg checkpoint loading.

>>> import torch
>>> from tocalib.models.heads import PaCaSegHead
>>> head = PaCaSegHead([96, 192, 320, 384]).eval()
>>> maps = [torch.zeros(1, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate([96, 192, 320, 384])]
>>> head(maps).shape
torch.Size([1, 150, 32, 32])
"""

from tocalib.models.heads.flops import mask_rcnn_macs, segmentor_macs
from tocalib.models.heads.fpn import FPN
from tocalib.models.heads.loading import load_mmengine_checkpoint
from tocalib.models.heads.mask_rcnn import (
    FCNMaskHead,
    MaskRCNN,
    MaskRCNNTestConfig,
    RoIHead,
    RPNHead,
    Shared2FCBBoxHead,
)
from tocalib.models.heads.seg_paca import PaCaSegHead
from tocalib.models.heads.segmentor import EncoderDecoder, paca_segmentor, upernet_segmentor
from tocalib.models.heads.uperhead import FCNHead, UPerHead

__all__ = [
    "FPN",
    "EncoderDecoder",
    "FCNHead",
    "FCNMaskHead",
    "MaskRCNN",
    "MaskRCNNTestConfig",
    "PaCaSegHead",
    "RPNHead",
    "RoIHead",
    "Shared2FCBBoxHead",
    "UPerHead",
    "load_mmengine_checkpoint",
    "mask_rcnn_macs",
    "paca_segmentor",
    "segmentor_macs",
    "upernet_segmentor",
]
