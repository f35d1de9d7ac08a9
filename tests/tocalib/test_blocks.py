"""ToCaBlock and ToCaStack: every sharing policy is the hand-written loop it stands for, assignments flow in the
form their consumers need, causal stacks stay causal, and the analytic MACs are the measured ones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import tocalib.pooling
from tocalib import (
    Assignment,
    Conv1dClustering,
    Conv1dTeacher,
    Conv2dTeacher,
    ToCaBlock,
    ToCaStack,
    cluster_parameter_names,
)
from tocalib.blocks import DropPath, DWConvMlp, Mlp

DIM = 16


def stack(depth: int = 4, seed: int = 0, **kwargs) -> ToCaStack:
    torch.manual_seed(seed)
    kwargs.setdefault("clustering", "mlp")
    return ToCaStack(DIM, depth, 2, 4, mlp_ratio=2.0, **kwargs).eval()


def hand_loop(model: ToCaStack, x: Tensor, owners: list[int], given: Tensor | None = None) -> Tensor:
    """The stack as explicit ToCaAttention calls: blocks in ``owners`` cluster, the others reuse the latest
    assignment (as a dense matrix, or ``given``)."""
    shared = given
    for j, block in enumerate(model):
        h = block.norm1(x)
        if j in owners:
            y, record = block.attn(h, return_intermediates=True)
            shared = record.assignment.dense()
        else:
            y = block.attn(h, assignment=shared)
        x = x + y
        x = x + block.mlp(block.norm2(x))
    return x


@pytest.mark.parametrize(
    ("share", "owners"), [("block", [0, 1, 2, 3]), (1, [0, 1, 2, 3]), ("stage", [0]), (2, [0, 2]), (3, [0, 3])]
)
def test_every_sharing_policy_is_the_hand_written_loop(share, owners):
    model = stack(share=share)
    assert [j for j, block in enumerate(model) if block.computes_assignment] == owners
    x = torch.randn(2, 11, DIM)
    torch.testing.assert_close(model(x), hand_loop(model, x, owners), atol=1e-6, rtol=1e-5)


def test_a_teacher_feeds_its_groups_of_blocks():
    torch.manual_seed(1)
    teacher = Conv1dTeacher(DIM, (4, 4), depths=1, kernel_size=3)
    model = stack(teacher=teacher)
    assert model.share == "teacher" and not any(block.computes_assignment for block in model)
    x = torch.randn(2, 11, DIM)
    first, second = (a.dense() for a in teacher(x).assignments)
    expected = x  # blocks 0-1 take the first group's assignment, blocks 2-3 the second's
    for j, block in enumerate(model):
        h = block.attn(block.norm1(expected), assignment=first if j < 2 else second)
        expected = expected + h
        expected = expected + block.mlp(block.norm2(expected))
    out, records = model(x, return_intermediates=True)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert records[1].assignment is not records[2].assignment


def test_a_given_assignment_feeds_every_block():
    model = stack(share="given", clustering=None)
    x, c = torch.randn(2, 11, DIM), torch.randn(2, 4, 11).softmax(-1)
    torch.testing.assert_close(model(x, assignment=c), hand_loop(model, x, [], given=c), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="pass assignment="):
        model(x)
    with pytest.raises(ValueError, match="share='given'"):
        stack(share="stage")(x, assignment=c)


def test_hard_clustering_flows_through_a_stack_without_a_dense_assignment(monkeypatch):
    model = stack(share="stage", clustering="hard")
    x = torch.randn(2, 11, DIM)
    expected = hand_loop(model, x, [0])

    def refuse(*args: object) -> Tensor:
        raise AssertionError("a dense (B, M, N) hard assignment was built")

    monkeypatch.setattr(tocalib.pooling, "hard_assignment_matrix", refuse)
    out, records = model(x, return_intermediates=True)
    assert all(r.assignment.form == "hard" and r.assignment.matrix is None for r in records)
    assert all(r.assignment is records[0].assignment for r in records)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("share", ["block", "stage", 2, "teacher"])
def test_a_causal_stack_is_causal(share):
    teacher = Conv1dTeacher(DIM, 4, depths=2, kernel_size=3, causal=True) if share == "teacher" else None
    model = stack(share=None if teacher else share, teacher=teacher, causal=True, attention_kwargs={"chunk_size": 4})
    x = torch.randn(1, 13, DIM, requires_grad=True)
    y = model(x)
    for t in range(13):
        (grad,) = torch.autograd.grad(y[:, t].sum(), x, retain_graph=True)
        assert torch.all(grad[:, t + 1 :] == 0), f"position {t} depends on the future"
    torch.testing.assert_close(model(x[:, :6]), y[:, :6], atol=1e-5, rtol=1e-5)  # the prefix definition


def test_a_causal_stack_shares_the_logits_every_block_renormalises():
    model = stack(share="stage", causal=True)
    x = torch.randn(2, 9, DIM)
    out, records = model(x, return_intermediates=True)
    assert all(r.assignment.form == "causal" for r in records) and records[3].assignment is records[0].assignment
    expected, logits = x, None
    for j, block in enumerate(model):
        h = block.norm1(expected)
        logits = block.attn.clustering(h) if j == 0 else logits
        expected = expected + block.attn(h, assignment=Assignment.from_logits(logits, causal=True))
        expected = expected + block.mlp(block.norm2(expected))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 14), extra=st.integers(1, 6), share=st.sampled_from(["block", "stage", "teacher"]))
def test_padding_changes_no_real_token_of_a_stack(n, extra, share):
    teacher = Conv1dTeacher(DIM, 4, depths=1, kernel_size=3) if share == "teacher" else None
    model = stack(share=None if teacher else share, teacher=teacher)
    x = torch.randn(2, n, DIM)
    padded = torch.cat([x, torch.randn(2, extra, DIM)], dim=1)
    pad = (torch.arange(n + extra) >= n).expand(2, -1)
    torch.testing.assert_close(model(padded, key_padding_mask=pad)[:, :n], model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"share": "block"},
        {"share": "stage"},
        {"share": 2, "clustering": "hard"},
        {"share": "stage", "causal": True},
        {"teacher": "causal"},
        {"share": "block", "clustering": "conv2d", "mlp_layer": DWConvMlp},
    ],
    ids=["block", "stage", "every-2-hard", "causal-stage", "causal-teacher", "grid"],
)
def test_a_stacks_analytic_macs_are_the_measured_ones(kwargs):
    flops = pytest.importorskip("tocalib.flops")
    if kwargs.get("teacher") == "causal":
        kwargs = {"teacher": Conv1dTeacher(DIM, 4, depths=2, kernel_size=3, causal=True), "causal": True}
    model = stack(**kwargs)
    size = (4, 5)
    x = torch.randn(1, 20, DIM)
    assert flops.count_macs(model, x, size=size) == model.macs(20, size=size)


def test_blocks_take_pluggable_norms_and_mlps_and_factory_kwargs():
    block = ToCaBlock(DIM, 2, 4, norm_layer=nn.RMSNorm, mlp_layer=Mlp, mlp_ratio=3.0, dtype=torch.float64)
    assert isinstance(block.norm1, nn.RMSNorm) and block.mlp.fc1.out_features == 3 * DIM
    assert {p.dtype for p in block.parameters()} == {torch.float64}
    assert block(torch.randn(2, 5, DIM, dtype=torch.float64)).dtype == torch.float64
    with torch.device("meta"):
        meta = ToCaStack(DIM, 2, 2, 4, teacher=Conv1dTeacher(DIM, 4))
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    with pytest.raises(ValueError, match="does not take"):
        ToCaBlock(DIM, 2, 4, mlp_layer=lambda dim, hidden, drop: Mlp(dim, hidden), device="cpu")


def test_stacks_refuse_inconsistent_policies():
    with pytest.raises(ValueError, match="share must be one of"):
        stack(share="layer")
    with pytest.raises(ValueError, match="drop share="):
        stack(share="stage", teacher=Conv1dTeacher(DIM, 4))
    with pytest.raises(ValueError, match=r"num_clusters \(3,\)"):
        stack(teacher=Conv1dTeacher(DIM, 3))
    with pytest.raises(ValueError, match="equal groups"):
        stack(depth=3, teacher=Conv1dTeacher(DIM, (4, 4)))
    with pytest.raises(ValueError, match="needs a causal teacher"):
        stack(teacher=Conv1dTeacher(DIM, 4), causal=True)
    with pytest.raises(ValueError, match="one rate or one per block"):
        stack(drop_path=[0.1, 0.2])
    model = stack()
    assert len(model) == 4 and model[-1] is model[3] and [b for b in model] == [model[j] for j in range(4)]


def test_stacks_refuse_what_would_break_later():
    with pytest.raises(ValueError, match="non-causal stack needs a non-causal teacher"):
        stack(teacher=Conv1dTeacher(DIM, 4, causal=True))
    with pytest.raises(ValueError, match="causal block needs a token-wise MLP"):
        ToCaBlock(DIM, 2, 4, causal=True, mlp_layer=DWConvMlp)
    given = stack(share="given", clustering=None)
    with pytest.raises(ValueError, match="sum to 1 over the real tokens"):
        given(torch.randn(1, 10, DIM), assignment=torch.rand(1, 4, 10) * 5)
    with pytest.raises(TypeError, match="counts LayerNorm"):
        ToCaStack(DIM, 2, 2, 4, norm_layer=nn.RMSNorm).macs(10)
    assert ToCaStack(DIM, 2, 2, 0).computes_assignment(0) is False
    model = stack()
    assert model[1:3] == [model[1], model[2]] and model[-1] is model[3]


def test_a_multi_level_teacher_feeds_a_stack_only_on_its_own_tokens():
    teacher = Conv2dTeacher((DIM, DIM), (1, 1), (4, 4), kernel_size=3)
    model = ToCaStack(DIM, 2, 2, 4, teacher=teacher, mlp_layer=DWConvMlp)
    with pytest.raises(ValueError, match="must cluster its own tokens"):
        model(torch.randn(1, 16, DIM), size=(4, 4))


def test_a_clustering_module_is_copied_for_every_block_that_clusters():
    clustering = Conv1dClustering(DIM, 4, causal=True)
    model = ToCaStack(DIM, 3, 2, 4, clustering=clustering, share=2)
    owners = [block.attn.clustering for block in model if block.computes_assignment]
    assert len(owners) == 2 and owners[0] is not owners[1] and clustering not in owners
    torch.testing.assert_close(owners[1].clustering[0].weight, clustering.clustering[0].weight)
    with pytest.raises(TypeError, match="attention_kwargs"):
        ToCaStack(DIM, 2, 2, 4, clustering_kwargs={"hidden_dim": 8})
    with pytest.raises(ValueError, match="width 8, but the stack's dim is 16"):
        ToCaStack(DIM, 2, 2, 4, teacher=Conv1dTeacher(8, 4))
    with pytest.raises(TypeError, match="num_clusters must be an int"):
        ToCaStack(DIM, 2, 2, (4, 4), teacher=Conv1dTeacher(DIM, (4, 4)))
    assert ToCaStack(DIM, 2, 2, 0, teacher=Conv1dTeacher(DIM, 0))(torch.randn(1, 5, DIM)).shape == (1, 5, DIM)


def test_measured_macs_take_assignments_that_require_grad():
    flops = pytest.importorskip("tocalib.flops")
    model = stack(share="given", clustering=None)
    x = torch.randn(1, 10, DIM)
    given = Assignment.from_logits(torch.randn(1, 4, 10, requires_grad=True))
    assert flops.count_macs(model, x, assignment=given) == model.macs(10)


def test_the_cluster_shaped_parameters_are_named_by_structure_not_by_key_patterns():
    model = ToCaStack(DIM, 3, 2, 5, share=2, teacher=None)
    assert cluster_parameter_names(model) == {
        f"{j}.attn.clustering.clustering.2.{p}" for j in (0, 2) for p in ("weight", "bias")
    }
    taught = ToCaStack(DIM, 2, 2, 5, teacher=Conv1dTeacher(DIM, (5, 5), depths=1))
    assert cluster_parameter_names(taught) == {f"teacher.heads.{g}.{p}" for g in (0, 1) for p in ("weight", "bias")}


def test_drop_path_drops_whole_samples_and_keeps_the_expectation() -> None:
    drop, x = DropPath(0.25), torch.randn(4000, 3, 5, dtype=torch.float64)
    torch.manual_seed(0)
    y = drop(x)
    kept = (y != 0).flatten(1).any(1)
    torch.testing.assert_close(y[kept], x[kept] / 0.75, rtol=1e-15, atol=0)  # each sample: all or nothing
    assert torch.all(y[~kept] == 0)
    assert abs(kept.double().mean().item() - 0.75) < 0.03
    assert drop.eval()(x) is x and DropPath(0.0).train()(x) is x
