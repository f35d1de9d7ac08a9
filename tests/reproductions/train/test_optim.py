"""Parameter groups, the lr rule and the schedules of the training recipes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from tocalib.reproductions.train.optim import WarmupCosine, WarmupPoly, custom_key_groups, no_decay_groups, scaled_lr


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.clustering = nn.Sequential(
            nn.Conv2d(4, 4, 1), nn.GELU(), nn.Conv2d(4, 4, 1), nn.GELU(), nn.Conv2d(4, 2, 1)
        )
        self.decode_head = nn.ModuleDict({"norm": nn.BatchNorm2d(4), "conv_seg": nn.Conv2d(4, 2, 1)})
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)


def test_scaled_lr_is_the_paper_rule() -> None:
    assert scaled_lr(5e-4, 1024) == pytest.approx(1e-3)
    assert scaled_lr(5e-4, 128) == pytest.approx(1.25e-4)
    with pytest.raises(ValueError, match="global_batch"):
        scaled_lr(5e-4, 0)


def test_no_decay_groups_exempt_norms_and_biases() -> None:
    net = Net()
    decay, no_decay = no_decay_groups(net, 0.05)
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        "conv.weight",
        "clustering.0.weight",
        "clustering.2.weight",
        "clustering.4.weight",
        "decode_head.conv_seg.weight",
    }
    assert all(names[id(p)].endswith(".bias") or p.ndim == 1 for p in no_decay["params"])
    assert "norm.weight" in {names[id(p)] for p in no_decay["params"]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert all(p.requires_grad for group in (decay, no_decay) for p in group["params"])


def test_custom_keys_follow_mmengine_longest_key_first() -> None:
    net = Net()
    keys = {"norm": {"decay_mult": 0.0}, "clustering.4": {"lr_mult": 10.0}, "head": {"lr_mult": 10.0}}
    groups = {g["custom_key"]: g for g in custom_key_groups(net, 6e-5, 0.01, keys)}
    names = {id(p): n for n, p in net.named_parameters()}
    members = {key: sorted(names[id(p)] for p in g["params"]) for key, g in groups.items()}
    assert members["clustering.4"] == ["clustering.4.bias", "clustering.4.weight"]
    # 'head' and 'norm' tie in length; 'head' comes first alphabetically, so the head's norm takes lr × 10, decay 1
    assert "decode_head.norm.weight" in members["head"]
    assert members["norm"] == ["norm.bias", "norm.weight"]
    assert "conv.weight" in members[None] and "clustering.0.weight" in members[None]
    assert groups["head"]["lr"] == pytest.approx(6e-4) and groups["head"]["weight_decay"] == pytest.approx(0.01)
    assert groups["norm"]["lr"] == pytest.approx(6e-5) and groups["norm"]["weight_decay"] == 0.0
    assert groups[None]["lr"] == pytest.approx(6e-5) and groups[None]["weight_decay"] == pytest.approx(0.01)
    assert sum(len(g["params"]) for g in groups.values()) == sum(p.requires_grad for p in net.parameters())
    torch.optim.AdamW(list(groups.values()), lr=6e-5).step()


def test_custom_keys_reject_unknown_settings() -> None:
    with pytest.raises(ValueError, match="may set only"):
        custom_key_groups(Net(), 1e-3, 0.0, {"norm": {"decay": 0.0}})


def test_warmup_cosine_matches_its_definition() -> None:
    schedule = WarmupCosine(total_steps=1000, warmup_steps=100, warmup_factor=1e-3, min_factor=1e-2)
    assert schedule(0) == pytest.approx(1e-3)
    assert schedule(50) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)
    # timm's warmup_prefix=False: the cosine runs over t / total, the warmup replaces its first steps
    assert schedule(100) == pytest.approx(1e-2 + (1 - 1e-2) * 0.5 * (1 + math.cos(math.pi * 0.1)))
    assert schedule(500) == pytest.approx(1e-2 + (1 - 1e-2) * 0.5)
    assert schedule(1000) == pytest.approx(1e-2)


def test_warmup_poly_is_linear_lr_then_poly_lr() -> None:
    schedule = WarmupPoly(total_steps=160_000, warmup_steps=1500, start_factor=1e-6, power=1.0)
    assert schedule(0) == pytest.approx(1e-6)
    assert schedule(750) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert schedule(1500) == pytest.approx(1.0)
    assert schedule(1500 + 158_500 // 2) == pytest.approx(0.5, abs=1e-5)
    assert schedule(160_000) == 0.0


@given(
    total=st.integers(2, 10_000),
    warmup_fraction=st.floats(0.0, 0.99),
    power=st.floats(0.5, 2.0),
    start=st.floats(1e-6, 1.0),
)
def test_schedules_stay_in_range_and_decay_after_warmup(
    total: int, warmup_fraction: float, power: float, start: float
) -> None:
    warmup = int(warmup_fraction * (total - 1))
    for schedule, low in (
        (WarmupCosine(total, warmup, start, 0.01), min(start, 0.01)),
        (WarmupPoly(total, warmup, start, power), 0.0),
    ):
        values = [schedule(t) for t in range(0, total + 1, max(1, total // 97))]
        assert all(low - 1e-12 <= v <= 1.0 + 1e-12 for v in values)
        after = [schedule(t) for t in range(warmup, total + 1, max(1, total // 89))]
        assert all(a >= b - 1e-12 for a, b in itertools.pairwise(after))
        assert schedule(warmup) <= 1.0


@pytest.mark.parametrize("cls", [WarmupCosine, WarmupPoly])
def test_schedules_reject_bad_step_counts(cls: type) -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        cls(100, 100, 0.1, 0.1)
    with pytest.raises(ValueError, match="total_steps"):
        cls(0, 0, 0.1, 0.1)
