"""Assignment providers: the 1-D and 2-D CNN teachers, the registry, and the Assignment they return."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tocalib import (
    Assignment,
    AssignmentProvider,
    Conv1dTeacher,
    Conv2dTeacher,
    ToCaAttention,
    build_provider,
    list_providers,
)
from tocalib.providers import Provided, register_provider

flops = pytest.importorskip("tocalib.flops")


def teacher_1d(causal: bool = False, clusters=(5, 3), seed: int = 0) -> Conv1dTeacher:
    torch.manual_seed(seed)
    return Conv1dTeacher(16, clusters, depths=(2, 1), kernel_size=3, causal=causal).eval()


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 30), batch=st.integers(1, 3), causal=st.booleans())
def test_a_sequence_teacher_gives_one_assignment_per_group_over_the_tokens(n, batch, causal):
    teacher = teacher_1d(causal)
    provided = teacher(torch.randn(batch, n, 16))
    assert [a.shape for a in provided.assignments] == [(batch, 5, n), (batch, 3, n)]
    assert all(a.form == ("causal" if causal else "soft") for a in provided.assignments)
    for a in provided.assignments:
        torch.testing.assert_close(a.dense().sum(-1), torch.ones(batch, a.shape[1]))


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 20), extra=st.integers(1, 8), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_padding_appended_to_a_sequence_changes_no_real_assignment(n, extra, causal, seed):
    teacher = teacher_1d(causal, seed=seed)
    x = torch.randn(2, n, 16)
    padded = torch.cat([x, torch.randn(2, extra, 16) * 100], dim=1)
    pad = torch.arange(n + extra) >= n
    alone = teacher(x).assignments
    with_padding = teacher(padded, key_padding_mask=pad.expand(2, -1)).assignments
    for a, b in zip(alone, with_padding, strict=True):
        dense = b.dense()
        torch.testing.assert_close(dense[..., :n], a.dense(), atol=1e-6, rtol=1e-5)
        assert torch.all(dense[..., n:] == 0)


def test_a_causal_teacher_leaks_nothing_from_the_future():
    teacher = teacher_1d(causal=True)
    x = torch.randn(1, 12, 16, requires_grad=True)
    logits = teacher(x).assignments[0].logits  # (1, M, N)
    for t in range(12):
        (grad,) = torch.autograd.grad(logits[..., t].sum(), x, retain_graph=True)
        assert torch.all(grad[:, t + 1 :] == 0) and grad[:, t].abs().sum() > 0
    prefix = teacher(x[:, :7]).assignments[0].logits
    torch.testing.assert_close(prefix, logits[..., :7])


def test_the_grid_teacher_gives_every_level_its_positions_features_and_size():
    torch.manual_seed(0)
    teacher = Conv2dTeacher((8, 12, 16), (1, 1, 2), (4, 0, 3), kernel_size=3).eval()
    provided = teacher(torch.randn(2, 9 * 11, 8), size=(9, 11))
    assert provided.sizes == teacher.level_sizes((9, 11)) == [(9, 11), (5, 6), (3, 3)]
    assert [None if a is None else a.shape for a in provided.assignments] == [(2, 4, 99), None, (2, 3, 9)]
    assert [f.shape for f in provided.features] == [(2, 99, 8), (2, 30, 12), (2, 9, 16)]
    with pytest.raises(ValueError, match=r"size=\(H, W\)"):
        teacher(torch.randn(2, 99, 8), size=(9, 10))
    with pytest.raises(ValueError, match="no key_padding_mask"):
        teacher(torch.randn(2, 99, 8), size=(9, 11), key_padding_mask=torch.zeros(2, 99, dtype=torch.bool))


@pytest.mark.parametrize("blur", [True, False])
def test_the_teachers_analytic_macs_are_the_measured_ones(blur):
    torch.manual_seed(0)
    grid = Conv2dTeacher((8, 12, 16), (1, 2, 1), (4, 5, 0), kernel_size=5, blur=blur).eval()
    for h, w in ((9, 11), (16, 16)):
        measured = flops.count_macs(grid, torch.randn(1, h * w, 8), size=(h, w))
        assert measured == grid.macs(h * w, size=(h, w))
    for causal in (False, True):
        teacher = teacher_1d(causal)
        assert flops.count_macs(teacher, torch.randn(1, 23, 16)) == teacher.macs(23)


def test_providers_have_a_registry_like_the_clusterings():
    assert {"conv1d", "conv2d"} <= set(list_providers())
    built = build_provider("conv1d", 16, 4, causal=True, dtype=torch.float64)
    assert isinstance(built, Conv1dTeacher) and built.causal and built.norm.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="unknown provider 'nope'"):
        build_provider("nope", 16, 4)
    with pytest.raises(ValueError, match="already registered"):
        register_provider("conv1d")(Conv1dTeacher)


def test_a_custom_provider_implements_the_protocol():
    class Fixed(AssignmentProvider):
        num_clusters = (2,)

        def forward(self, x, *, size=None, key_padding_mask=None):
            return Provided([Assignment.from_logits(x[..., :2].transpose(1, 2))])

        def macs(self, num_tokens, size=None):
            return 0

    assert Fixed()(torch.randn(1, 5, 4)).assignments[0].shape == (1, 2, 5)
    with pytest.raises(TypeError, match="abstract"):
        type("Incomplete", (AssignmentProvider,), {"num_clusters": (1,)})()


def test_assignment_forms_pool_like_their_dense_matrix():
    logits, x = torch.randn(2, 4, 9), torch.randn(2, 9, 6)
    keep = torch.arange(9) < torch.tensor([[9], [5]])
    for hard in (False, True):
        a = Assignment.from_logits(logits, keep, hard=hard)
        assert a.form == ("hard" if hard else "soft") and a.shape == (2, 4, 9)
        torch.testing.assert_close(a.pool(x), a.dense() @ x)
    causal = Assignment.from_logits(logits, keep, causal=True)
    assert causal.form == "causal" and causal.matrix is None
    torch.testing.assert_close(causal.dense(), Assignment.from_logits(logits, keep).dense())
    with pytest.raises(ValueError, match="causal assignment has no cluster tokens"):
        causal.pool(x)
    with pytest.raises(ValueError, match="not both"):
        Assignment.from_logits(logits, hard=True, causal=True)


def test_a_layer_and_the_assignment_it_takes_must_agree_on_padding():
    layer = ToCaAttention(16, 2, 4, cluster_norm=False)
    causal = ToCaAttention(16, 2, 4, causal=True)
    x, logits = torch.randn(2, 9, 16), torch.randn(2, 4, 9)
    pad = torch.arange(9) >= torch.tensor([[9], [6]])
    with pytest.raises(ValueError, match="built without it"):
        layer(x, key_padding_mask=pad, assignment=Assignment.from_logits(logits))
    with pytest.raises(ValueError, match="other padding"):
        layer(x, key_padding_mask=pad, assignment=Assignment.from_logits(logits, ~pad.flip(0)))
    # the assignment's own padding applies when the call names none: a padded token changes nothing
    noisy = x.clone()
    noisy[1, 6:] = 1e3
    for model, causal_form in ((layer, False), (causal, True)):
        given = Assignment.from_logits(logits, ~pad, causal=causal_form)
        torch.testing.assert_close(model(noisy, assignment=given), model(x, assignment=given))


def test_assignments_move_and_detach_and_count_members_exactly_in_half_precision():
    logits = torch.randn(2, 4, 9, requires_grad=True)
    hard = Assignment.from_logits(logits, hard=True)
    moved = hard.to(dtype=torch.float64)
    assert moved.weight.dtype == torch.float64 and moved.index.dtype == torch.long
    assert moved.counts.dtype == hard.counts.dtype == torch.float32
    assert not Assignment.from_logits(logits).detach().matrix.requires_grad
    many = Assignment.from_logits(torch.randn(1, 2, 3000).to(torch.bfloat16), hard=True)
    assert many.counts.dtype == torch.float32 and many.counts.sum() == 3000
