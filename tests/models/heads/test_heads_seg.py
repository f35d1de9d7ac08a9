"""Segmentation heads on random feature maps: shapes, the PaCa attention, losses, MACs and input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tocalib.flops import count_macs
from tocalib.models.heads import FCNHead, PaCaSegHead, UPerHead, upernet_segmentor
from tocalib.models.heads.common import IGNORE_INDEX

DIMS = [96, 192, 320, 384]


def _features(size: int, dims: list[int] = DIMS, batch: int = 1) -> list[torch.Tensor]:
    """Random maps at strides 4, 8, 16, 32 of a size×size image."""
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(batch, c, size // 2 ** (i + 2), size // 2 ** (i + 2), generator=gen) for i, c in enumerate(dims)
    ]


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (lambda: PaCaSegHead(DIMS), (1, 150, 128, 128)),
        (lambda: UPerHead(DIMS), (1, 150, 128, 128)),
        (lambda: FCNHead(DIMS), (1, 150, 32, 32)),
    ],
    ids=["paca", "uper", "fcn"],
)
def test_heads_output_shapes_at_512(head, expected: tuple[int, ...]) -> None:
    """Shapes only, so the meta device (no data, no compute) is enough."""
    with torch.device("meta"):
        maps = [torch.empty(1, c, 512 // 2 ** (i + 2), 512 // 2 ** (i + 2)) for i, c in enumerate(DIMS)]
        assert head().eval()(maps).shape == expected


def test_paca_head_attention_matches_a_direct_einsum_formulation() -> None:
    head = PaCaSegHead(DIMS, num_classes=7).eval()
    features = _features(64, batch=2)
    with torch.no_grad():
        logits, cluster_logits = head.forward_with_clusters(features)
        x = head.fuse(features)  # (B, D, H, W)
        q = torch.einsum("bdhw,cd->bhwc", x, head.q[0].conv.weight[:, :, 0, 0])
        q = F.relu(head.q[0].bn(q.permute(0, 3, 1, 2))).flatten(2)  # (B, 256, N)
        c = head.clustering(x).flatten(2).softmax(-1)  # (B, L, N)
        z = torch.einsum("bln,bdn->bld", c, x.flatten(2))
        k, v = head.k(z), head.v(z)  # (B, L, 256)
        weights = torch.einsum("bcn,blc->bnl", q, k).softmax(-1)  # no 1/sqrt(d)
        out = torch.einsum("bnl,blc->bcn", weights, v).reshape(2, 256, 16, 16)
        expected = head.conv_seg(head.proj(out))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cluster_logits, head.clustering(x))


def test_paca_head_losses_are_ce_on_logits_and_0_4_ce_on_clusters() -> None:
    head = PaCaSegHead(DIMS, num_classes=5).eval()
    features = _features(64)
    labels = torch.randint(0, 5, (1, 64, 64))
    labels[0, :8] = IGNORE_INDEX
    losses = head.loss(features, labels)
    logits, clusters = head.forward_with_clusters(features)

    def ce(x: torch.Tensor, over: int) -> torch.Tensor:
        up = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
        keep = labels != IGNORE_INDEX
        return -up.log_softmax(1).gather(1, labels.clamp(max=4)[:, None])[:, 0][keep].sum() / over

    assert sorted(losses) == ["decode.loss_ce", "paca.loss_ce"]
    # mmseg: the decode loss averages over all pixels, the cluster loss over labelled ones (avg_non_ignore)
    torch.testing.assert_close(losses["decode.loss_ce"], ce(logits, 64 * 64))
    torch.testing.assert_close(losses["paca.loss_ce"], 0.4 * ce(clusters, 64 * 56))
    labels[:] = IGNORE_INDEX
    unlabelled = head.loss(features, labels)
    assert unlabelled["decode.loss_ce"] == 0.0 and unlabelled["paca.loss_ce"] == 0.0


def test_paca_head_macs_equal_the_closed_form() -> None:
    """fvcore rules: conv/linear/matmul MACs, BatchNorm 2 per element, bilinear upsampling 4 per output."""
    classes, ch, dims = 150, 256, DIMS
    head = PaCaSegHead(dims, num_classes=classes).eval()
    features = _features(64)
    n = [f.shape[-2] * f.shape[-1] for f in features]  # positions per level: 256, 64, 16, 4
    d = ch * len(dims)
    expected = (
        sum(c * ch * m + 2 * ch * m for c, m in zip(dims, n, strict=True))  # per-level 1x1 ConvModules
        + 3 * 4 * ch * n[0]  # three bilinear resizes to 1/4
        + 2 * (d * ch * n[0] + 2 * ch * n[0])  # q and clustering.0
        + ch * classes * n[0]  # clustering.1
        + classes * n[0] * d  # Z = C X
        + 2 * (classes * d * ch + 2 * classes * ch)  # k and v: Linear + BatchNorm1d
        + 2 * n[0] * classes * ch  # Q Kᵀ and A V
        + ch * ch * n[0]
        + 2 * ch * n[0]  # proj
        + ch * classes * n[0]  # conv_seg
    )
    assert count_macs(head, features) == expected


@pytest.mark.parametrize(
    ("head", "reference"),
    [
        (lambda d: PaCaSegHead(d), {(96, 192, 320, 384): 1_450_284, (96, 192, 384, 512): 1_499_436}),
        (lambda d: UPerHead(d), {(96, 192, 320, 384): 28_908_694, (96, 192, 384, 512): 29_793_430}),
        (lambda d: FCNHead(d), {(96, 192, 320, 384): 776_342, (96, 192, 384, 512): 923_798}),
    ],
    ids=["paca", "uper", "fcn"],
)
def test_head_parameter_counts_match_the_official_heads(head, reference: dict[tuple[int, ...], int]) -> None:
    """Counting the heads of PaCaViT@4307018's released ADE20k configs (mmseg 1.x) gives 1.450/1.499 M,
    28.909/29.793 M and 0.776/0.924 M."""
    for dims, count in reference.items():
        assert sum(p.numel() for p in head(list(dims)).parameters()) == count


def test_heads_name_the_mismatched_feature_map() -> None:
    features = _features(64)
    features[2] = torch.zeros(1, 384, 4, 4)
    with pytest.raises(ValueError, match=r"feature map 2 must be \(B, 320, H, W\)"):
        UPerHead(DIMS)(features)
    with pytest.raises(ValueError, match="expects 4 feature maps"):
        PaCaSegHead(DIMS)(features[:3])


class _StridePools(torch.nn.Module):
    """A stand-in backbone: strided average pools plus fixed channel projections."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.ModuleList(torch.nn.Conv2d(3, c, 1) for c in DIMS)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [proj(F.avg_pool2d(x, 2 ** (i + 2))) for i, proj in enumerate(self.proj)]


def test_upernet_segmentor_losses_and_whole_image_prediction() -> None:
    model = upernet_segmentor(_StridePools(), DIMS, num_classes=6).eval()
    img = torch.randn(2, 3, 64, 96)
    labels = torch.randint(0, 6, (2, 64, 96))
    losses = model.loss(img, labels)
    features = model.extract_feat(img)
    expected_aux = F.cross_entropy(
        F.interpolate(model.auxiliary_head(features), size=(64, 96), mode="bilinear", align_corners=False), labels
    )
    assert sorted(losses) == ["aux.loss_ce", "decode.loss_ce"]
    torch.testing.assert_close(losses["aux.loss_ce"], 0.4 * expected_aux)
    assert model(img).shape == (2, 6, 16, 24)  # tensor mode: decode head at 1/4, auxiliary head not run
    logits = model.predict_logits(img)
    assert logits.shape == (2, 6, 64, 96)
    assert torch.equal(model.predict(img), logits.argmax(1))
    assert model.predict(img, size=(32, 48)).shape == (2, 32, 48)
