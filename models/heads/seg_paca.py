"""The PaCa semantic-segmentation head (official ``PaCaSegHead``; PaCaViT@4307018 models/ and
segmentation/configs/paca_vit/).

The four backbone maps are projected to 256 channels, resized to the 1/4 map and concatenated into X
(B, 1024, H, W). A clustering branch predicts one soft cluster per class (L = num_classes), a softmax over the
H·W positions turns it into C (B, L, N), and the cluster tokens Z = C·X (B, L, 1024) give keys and values for a
single-head attention from every pixel query. During training the raw cluster logits also get a cross-entropy
loss against the label map (weight 0.4, key ``paca.loss_ce``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tocalib import Assignment
from tocalib.models.heads.common import ConvModule, check_features, resize, seg_cross_entropy

__all__ = ["PaCaSegHead"]


class _ChannelsFirst(nn.Module):
    """(B, L, C) <-> (B, C, L), so that BatchNorm1d normalises the channel axis of token sequences."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


def _token_mlp(in_features: int, out_features: int) -> nn.Sequential:
    """Linear → BatchNorm1d over channels → ReLU on (B, L, in) tokens; parameters at indices 0 and 2."""
    return nn.Sequential(
        nn.Linear(in_features, out_features),
        _ChannelsFirst(),
        nn.BatchNorm1d(out_features),
        _ChannelsFirst(),
        nn.ReLU(),
    )


class PaCaSegHead(nn.Module):
    """PaCa segmentation head with mmseg's state-dict names (``convs.k``, ``q.0``, ``clustering.{0,1}``,
    ``k.{0,2}``, ``v.{0,2}``, ``proj``, ``conv_seg``).

    Args:
        in_channels: channels of the four backbone maps (strides 4, 8, 16, 32).
        num_classes: L, also the number of clusters.
        channels: width of the projections and of the attention (256).
        dropout: Dropout2d rate before the classifier.
        cluster_loss_weight: weight of the auxiliary cluster-logit loss.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int = 150,
        channels: int = 256,
        dropout: float = 0.1,
        cluster_loss_weight: float = 0.4,
    ) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.num_classes = num_classes
        self.cluster_loss_weight = cluster_loss_weight
        fused = channels * len(self.in_channels)
        self.convs = nn.ModuleList(ConvModule(c, channels, 1) for c in self.in_channels)
        self.q = nn.Sequential(ConvModule(fused, channels, 1))
        self.clustering = nn.Sequential(ConvModule(fused, channels, 1), nn.Conv2d(channels, num_classes, 1))
        self.k = _token_mlp(fused, channels)
        self.v = _token_mlp(fused, channels)
        self.proj = ConvModule(channels, channels, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def fuse(self, features: Sequence[Tensor]) -> Tensor:
        """X: the four maps projected to ``channels``, resized to the first map and concatenated (B, 4·ch, H, W)."""
        check_features(features, self.in_channels, type(self).__name__)
        size = features[0].shape[-2:]
        return torch.cat([resize(conv(f), size) for conv, f in zip(self.convs, features, strict=True)], dim=1)

    def forward_with_clusters(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Class logits (B, L, H/4, W/4) and the raw cluster logits (B, L, H/4, W/4) before the softmax."""
        x = self.fuse(features)
        height, width = x.shape[-2:]
        query = self.q(x).flatten(2).transpose(1, 2)  # (B, N, ch)
        cluster_logits = self.clustering(x)  # (B, L, H, W)
        assignment = Assignment.from_logits(cluster_logits.flatten(2))  # (B, L, N): softmax over the pixels
        tokens = assignment.pool(x.flatten(2).transpose(1, 2))  # Z = C·X: (B, L, 4·ch)
        key, value = self.k(tokens), self.v(tokens)  # (B, L, ch)
        # Single head and, unlike the backbone's attention, no 1/sqrt(d) scaling.
        out = F.scaled_dot_product_attention(query[:, None], key[:, None], value[:, None], scale=1.0)[:, 0]
        out = self.proj(out.transpose(1, 2).reshape(-1, out.shape[-1], height, width))
        return self.conv_seg(self.dropout(out)), cluster_logits

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Class logits (B, num_classes, H/4, W/4) from the four (B, C_i, H/2^(i+2), W/2^(i+2)) maps."""
        return self.forward_with_clusters(features)[0]

    def loss(self, features: Sequence[Tensor], labels: Tensor, prefix: str = "decode") -> dict[str, Tensor]:
        """``{prefix}.loss_ce`` (weight 1, averaged over all pixels) on the class logits and ``paca.loss_ce``
        (averaged over labelled pixels, mmseg's ``avg_non_ignore``) on the cluster logits; labels are (B, H, W)
        class indices with 255 ignored."""
        logits, cluster_logits = self.forward_with_clusters(features)
        return {
            f"{prefix}.loss_ce": seg_cross_entropy(logits, labels, 1.0),
            "paca.loss_ce": seg_cross_entropy(cluster_logits, labels, self.cluster_loss_weight, avg_non_ignore=True),
        }
