"""mmseg-style ``EncoderDecoder``: a features-only backbone, a decode head and an optional auxiliary head."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from tocalib.models.heads.common import resize
from tocalib.models.heads.seg_paca import PaCaSegHead
from tocalib.models.heads.uperhead import FCNHead, UPerHead

__all__ = ["EncoderDecoder", "paca_segmentor", "upernet_segmentor"]


class EncoderDecoder(nn.Module):
    """Backbone + decode head (+ auxiliary head), with mmseg's module names ``backbone``, ``decode_head`` and
    ``auxiliary_head`` so that mmseg checkpoints load.

    * ``forward(img)`` is mmseg's "tensor" mode: the decode head's logits at 1/4 resolution, which is what the
      paper's FLOP counts measure (the auxiliary head is not run);
    * ``loss(img, labels)``, or ``forward(img, labels)`` (mmseg's "loss" mode, the call that
      ``DistributedDataParallel`` sees), returns the named training losses;
    * ``predict(img)`` is ``mode='whole'`` inference: logits resized to the image, then the arg-max.
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, auxiliary_head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head

    def extract_feat(self, img: Tensor) -> list[Tensor]:
        """The backbone's four maps for (B, 3, H, W) images."""
        if img.dim() != 4:
            raise ValueError(f"img must be a (B, 3, H, W) batch, got shape {tuple(img.shape)}; add a batch axis")
        return list(self.backbone(img))

    def forward(self, img: Tensor, labels: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        """Decode-head logits (B, num_classes, H/4, W/4); with (B, H, W) ``labels``, the losses of :meth:`loss`."""
        if labels is not None:
            return self.loss(img, labels)
        return self.decode_head(self.extract_feat(img))

    def loss(self, img: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Training losses for (B, 3, H, W) images and (B, H, W) labels (255 = ignore): ``decode.loss_ce``,
        plus ``aux.loss_ce`` with an auxiliary head and ``paca.loss_ce`` with the PaCa head."""
        features = self.extract_feat(img)
        losses = self.decode_head.loss(features, labels, prefix="decode")
        if self.auxiliary_head is not None:
            losses.update(self.auxiliary_head.loss(features, labels, prefix="aux"))
        return losses

    def predict_logits(self, img: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """Whole-image inference: logits (B, num_classes, H, W) resized to ``size`` (default: the image's)."""
        return resize(self(img), img.shape[-2:] if size is None else size)

    def predict(self, img: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """Per-pixel class indices (B, H, W) at ``size`` (default: the image's)."""
        return self.predict_logits(img, size).argmax(dim=1)


def upernet_segmentor(
    backbone: nn.Module, in_channels: Sequence[int], num_classes: int = 150, channels: int = 512
) -> EncoderDecoder:
    """The ADE20k UperNet of the paper: UPerHead (``channels`` = 512, PPM 1/2/3/6) + FCN auxiliary head on stage 3
    (256 ch, loss 0.4)."""
    return EncoderDecoder(
        backbone,
        UPerHead(in_channels, num_classes, channels=channels),
        FCNHead(in_channels, in_index=2, num_classes=num_classes),
    )


def paca_segmentor(
    backbone: nn.Module, in_channels: Sequence[int], num_classes: int = 150, channels: int = 256
) -> EncoderDecoder:
    """The ADE20k PaCa-head segmentor of the paper (``channels`` = 256; no auxiliary head, the cluster loss is the
    head's own)."""
    return EncoderDecoder(backbone, PaCaSegHead(in_channels, num_classes, channels=channels))
