"""The training loop in one process: exact resume, EMA, metrics records, checkpoints and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from tocalib.reproductions.train.checkpoint import load_checkpoint
from tocalib.reproductions.train.distributed import DistContext
from tocalib.reproductions.train.engine import RunLog, Trainer, TrainSettings, resolve_resume
from tocalib.reproductions.train.optim import WarmupCosine, no_decay_groups

CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Noisy(Dataset):
    """Fixed points plus augmentation noise drawn from torch's global RNG (as the real transforms do)."""

    def __init__(self, n: int = 24) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=generator)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i] + 0.1 * torch.randn(6), self.y[i]


class Task:
    key_metric = "acc"

    def __init__(self, data: Noisy, fail_at: int | None = None, nan_value_at: int | None = None) -> None:
        self.data, self.fail_at, self.nan_value_at, self.calls = data, fail_at, nan_value_at, 0

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        self.calls += 1
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        if self.fail_at is not None and self.calls >= self.fail_at:
            loss = loss * float("nan")
        if self.calls == self.nan_value_at:  # a NaN value whose gradients stay finite
            loss = loss + torch.tensor(float("nan"))
        return loss, {"twice": 2 * loss}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"acc": 100.0 * float((model(self.data.x).argmax(1) == self.data.y).float().mean())}


def _trainer(
    out: Path,
    resume: Path | None = None,
    ema: float = 0.0,
    task: Task | None = None,
    total: int = 10,
    config: dict | None = None,
    **kw,
) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.3), nn.GELU(), nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(no_decay_groups(model, 0.05), lr=1e-2)
    settings = TrainSettings(
        total_steps=total, steps_per_epoch=4, batch_size=6, eval_every=4, log_every=2, workers=0, ema_decay=ema, **kw
    )
    data = Noisy()
    return Trainer(
        model,
        optimizer,
        WarmupCosine(total, 2, 0.1, 0.01),
        data,
        task or Task(data),
        settings,
        CTX,
        out,
        config or {"name": "test"},
        RunLog(out, CTX),
        resume=resume,
    )


def _linear_trainer(out: Path, steps_per_epoch: int, batch_size: int, resume: Path | None = None) -> Trainer:
    """A bare trainer for the checks that happen before any step."""
    model = nn.Linear(6, 2)
    settings = TrainSettings(
        total_steps=4, steps_per_epoch=steps_per_epoch, batch_size=batch_size, eval_every=4, workers=0
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = Noisy()
    return Trainer(
        model, optimizer, lambda step: 1.0, data, Task(data), settings, CTX, out, {}, RunLog(out, CTX), resume
    )


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_a_resumed_run_repeats_the_uninterrupted_one_exactly(tmp_path: Path, ema: float) -> None:
    straight = _trainer(tmp_path / "straight", ema=ema)
    straight.fit()
    first = _trainer(tmp_path / "split", ema=ema, stop_after=5)
    first.fit()
    assert first.step == 5 and load_checkpoint(tmp_path / "split" / "last.pt")["step"] == 5
    second = _trainer(tmp_path / "split", resume=tmp_path / "split" / "last.pt", ema=ema)
    assert second.step == 5
    second.fit()
    for a, b in zip(straight.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if ema:
        for a, b in zip(straight.ema.state_dict().values(), second.ema.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(straight.ema.module[0].weight, straight.model[0].weight)
    train_steps = [r["step"] for r in _records(tmp_path / "split") if r["split"] == "train"]
    assert train_steps == [2, 4, 5, 6, 8, 10]
    assert [r["step"] for r in _records(tmp_path / "straight") if r["split"] == "train"] == [2, 4, 6, 8, 10]
    log = (tmp_path / "split" / "log.txt").read_text()
    assert "stopped after step 5" in log and "resumed from" in log and "at step 5/10" in log


def test_records_checkpoints_and_best_weights(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, ema=0.5)
    results = trainer.fit()
    records = _records(tmp_path)
    train = [r for r in records if r["split"] == "train"]
    assert all({"lr", "loss", "twice", "samples_per_s", "epoch", "time"} <= set(r) for r in train)
    assert all(r["twice"] == pytest.approx(2 * r["loss"]) for r in train)
    assert [r["step"] for r in records if r["split"] == "val"] == [4, 8, 10]
    assert [r["step"] for r in records if r["split"] == "val_ema"] == [4, 8, 10]
    assert set(results) == {"val/acc", "val_ema/acc"}
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["acc"] == max(r["acc"] for r in records if r["split"].startswith("val"))
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["step"] == 10 and state["epoch"] == 2.5 and state["world_size"] == 1 and len(state["rng"]) == 1
    assert state["scheduler"]["last_epoch"] == 10
    assert json.loads((tmp_path / "config.json").read_text()) == {"name": "test"}


def test_lr_follows_the_schedule(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    trainer.fit()
    lrs = {r["step"]: r["lr"] for r in _records(tmp_path) if r["split"] == "train"}
    schedule = WarmupCosine(10, 2, 0.1, 0.01)
    assert lrs == {step: pytest.approx(1e-2 * schedule(step)) for step in (2, 4, 6, 8, 10)}


def test_non_finite_loss_stops_with_a_clear_error(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, task=Task(Noisy(), fail_at=3))
    with pytest.raises(FloatingPointError, match="non-finite training loss in every step up to step 4"):
        trainer.fit()


def test_bad_settings_and_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="steps_per_epoch=4 but 24 samples"):
        _linear_trainer(tmp_path, steps_per_epoch=4, batch_size=7)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainSettings(total_steps=1, steps_per_epoch=1, batch_size=1, eval_every=1, ema_decay=1.0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"state_dict": {}}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        load_checkpoint(tmp_path / "weights.pt")
    _trainer(tmp_path / "plain", stop_after=2).fit()
    with pytest.raises(FileExistsError, match="already holds a run"):
        _trainer(tmp_path / "plain")
    with pytest.raises(ValueError, match="no EMA weights"):
        _trainer(tmp_path / "plain", resume=tmp_path / "plain" / "last.pt", ema=0.9)


def test_resume_auto_finds_the_last_checkpoint(tmp_path: Path) -> None:
    log = RunLog(tmp_path, CTX)
    assert resolve_resume(None, tmp_path, log) is None
    assert resolve_resume("auto", tmp_path, log) is None
    (tmp_path / "last.pt").write_bytes(b"")
    assert resolve_resume("auto", tmp_path, log) == tmp_path / "last.pt"
    assert resolve_resume("x/y.pt", tmp_path, log) == Path("x/y.pt")


def test_a_single_non_finite_step_is_counted_not_fatal(tmp_path: Path) -> None:
    _trainer(tmp_path, task=Task(Noisy(), nan_value_at=3)).fit()
    train = [r for r in _records(tmp_path) if r["split"] == "train"]
    assert [r.get("nonfinite_steps", 0) for r in train] == [0, 1, 0, 0, 0]
    assert all(math.isfinite(r["loss"]) for r in train)


def test_resume_extends_the_schedule_and_refuses_another_global_batch(tmp_path: Path) -> None:
    _trainer(tmp_path, stop_after=4).fit()
    longer = _trainer(tmp_path, resume=tmp_path / "last.pt", total=20)
    longer.fit()
    lrs = {r["step"]: r["lr"] for r in _records(tmp_path) if r["split"] == "train"}
    assert lrs[12] == pytest.approx(1e-2 * WarmupCosine(20, 2, 0.1, 0.01)(12))
    assert "the schedule now ends at step 20 (was 10)" in (tmp_path / "log.txt").read_text()
    with pytest.raises(ValueError, match="global batch of 6, this run has 12"):
        _linear_trainer(tmp_path, steps_per_epoch=2, batch_size=12, resume=tmp_path / "last.pt")


def test_resume_auto_without_a_checkpoint_moves_old_records_aside(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"split": "train", "step": 1, "time": 1.0}\n')
    log = RunLog(tmp_path, CTX)
    assert resolve_resume("auto", tmp_path, log) is None
    assert (tmp_path / "metrics.1.jsonl").exists() and not (tmp_path / "metrics.jsonl").exists()
    _trainer(tmp_path).fit()


def test_a_resume_that_changes_hyper_parameters_is_refused_with_every_difference(tmp_path: Path) -> None:
    config = {"name": "test", "lr": 1e-2, "weight_decay": 0.05, "workers": 0, "stop_after": 2, "epochs": 3}
    _trainer(tmp_path, config=config, stop_after=2).fit()
    changed = {**config, "lr": 5e-3, "weight_decay": 0.1, "workers": 4, "stop_after": None, "epochs": 6}
    refused = r"--lr: 0\.01 in the checkpoint, 0\.005 now; --weight-decay: 0\.05 .* 0\.1 now\)"
    with pytest.raises(ValueError, match=refused):
        _trainer(tmp_path, resume=tmp_path / "last.pt", config=changed)
    allowed = {**config, "workers": 4, "stop_after": None, "epochs": 6}  # how it runs, and a longer schedule
    assert _trainer(tmp_path, resume=tmp_path / "last.pt", config=allowed).step == 2
    newer = {**allowed, "reset_head": False}  # a field the code gained after the checkpoint was written
    assert _trainer(tmp_path, resume=tmp_path / "last.pt", config=newer).step == 2


def test_a_resume_onto_another_model_shape_is_named(tmp_path: Path) -> None:
    _trainer(tmp_path, stop_after=2).fit()
    trainer_state = load_checkpoint(tmp_path / "last.pt")
    trainer_state["model"]["3.weight"] = torch.zeros(5, 16)  # a head for 5 classes instead of 2
    trainer_state["model"]["3.bias"] = torch.zeros(5)
    torch.save(trainer_state, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt holds weights that do not fit this run's model .*size mismatch"):
        _trainer(tmp_path / "again", resume=tmp_path / "other.pt")
