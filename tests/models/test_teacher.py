"""The ConvMixer-FPN clustering teacher (``PaCaTeacher_ConvMixer`` in PaCaViT@4307018 paca_vit.py)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tocalib.models import create_model
from tocalib.models.teacher import ConvMixerFPNTeacher
from tocalib.providers import BlurConv2d

DIMS = (8, 16, 24, 32)


def small_teacher(clusters=(5, 4, 3, 2), depths=(1, 2, 1, 1)) -> ConvMixerFPNTeacher:
    torch.manual_seed(0)
    return ConvMixerFPNTeacher(DIMS, depths, clusters).eval()


def run(teacher: ConvMixerFPNTeacher, x: torch.Tensor) -> tuple[list[torch.Tensor | None], list[torch.Tensor]]:
    """The teacher on a (B, C, H, W) map, as the backbone calls it: the assignment matrices and the features."""
    provided = teacher(x.flatten(2).transpose(1, 2), size=x.shape[-2:])
    return [None if a is None else a.dense() for a in provided.assignments], provided.features


@functools.cache
def shared_teacher() -> ConvMixerFPNTeacher:
    return small_teacher()


@settings(max_examples=10)
@given(h=st.integers(1, 40), w=st.integers(1, 40), batch=st.integers(1, 2))
def test_every_level_gets_an_assignment_over_its_positions_and_a_token_feature(h, w, batch):
    teacher = shared_teacher()
    with torch.no_grad():
        assignments, features = run(teacher, torch.randn(batch, DIMS[0], h, w))
    sides = [(h, w)]
    for _ in range(3):
        sides.append((math.ceil(sides[-1][0] / 2), math.ceil(sides[-1][1] / 2)))
    for a, f, m, c, (sh, sw) in zip(assignments, features, (5, 4, 3, 2), DIMS, sides, strict=True):
        assert a.shape == (batch, m, sh * sw) and f.shape == (batch, sh * sw, c)
        torch.testing.assert_close(a.sum(-1), torch.ones(batch, m))


def test_a_level_without_clusters_has_no_cluster_layer_and_no_assignment():
    teacher = small_teacher(clusters=(5, 0, 3, 0))
    assert not hasattr(teacher, "to_clusters2") and not hasattr(teacher, "to_clusters4")
    with torch.no_grad():
        assignments, _ = run(teacher, torch.randn(1, DIMS[0], 16, 16))
    assert [a is None for a in assignments] == [False, True, False, True]


def test_the_top_level_reaches_the_finest_assignment_through_the_fpn():
    teacher = small_teacher()
    x = torch.randn(1, DIMS[0], 32, 32, requires_grad=True)
    assignments, features = run(teacher, x)
    # the level-4 features depend on the whole input; the level-1 assignment depends on level 4
    top = torch.autograd.grad(features[3].sum(), x, retain_graph=True)[0]
    assert (top != 0).float().mean() > 0.9
    head, lateral = torch.autograd.grad(
        assignments[0][0, 0, 0], [teacher.to_clusters1.weight, teacher.lateral3[0].weight]
    )
    assert head.abs().sum() > 0 and lateral.abs().sum() > 0


def test_the_blur_is_a_fixed_binomial_buffer_saved_in_the_state_dict():
    blur = BlurConv2d(3, 5)
    taps = torch.tensor([1.0, 2.0, 1.0])
    kernel = (torch.outer(taps, taps) / 16).expand(3, 1, 3, 3)  # (C_in, 1, 3, 3), as Composer's BlurConv2d
    assert torch.equal(blur.state_dict()["blur_filter"], kernel)
    assert "blur_filter" not in dict(blur.named_parameters())
    with torch.no_grad():
        blur.conv.weight.zero_()
        blur.conv.weight[:, :, 1, 1] = torch.eye(5, 3)
        blur.conv.bias.zero_()
        out = blur(torch.ones(1, 3, 8, 8))  # identity conv after a sum-to-one blur keeps constants inside
    torch.testing.assert_close(out[0, :3, 1:, 1:], torch.ones(3, 3, 3))


def test_the_teacher_parameter_cost_matches_the_reference():
    # counted by running PaCaViT@4307018's code: 3.01 M for the Small-teacher's teacher, 4.62 M for the Base-teacher's
    for name, expected in (("pacavit_convmixer_small_100", 3.01), ("pacavit_convmixer_base_100", 4.62)):
        with torch.device("meta"):
            teacher = create_model(name).paca_teacher
        assert round(sum(p.numel() for p in teacher.parameters()) / 1e6, 2) == expected


def test_the_teacher_uses_batch_statistics_in_training_and_running_ones_in_eval():
    teacher = small_teacher()
    x = torch.randn(4, DIMS[0], 12, 12)
    teacher.train()
    run(teacher, x)
    assert int(teacher.block1[0][3].num_batches_tracked) == 1
    teacher.eval()
    with torch.no_grad():
        a1, _ = run(teacher, x)
        a2, _ = run(teacher, x[:1])
    torch.testing.assert_close(a1[0][:1], a2[0])


def test_mismatched_configuration_lengths_are_rejected():
    with pytest.raises(ValueError, match="one entry per level"):
        ConvMixerFPNTeacher(DIMS, (1, 1, 1), (5, 4, 3, 2))
