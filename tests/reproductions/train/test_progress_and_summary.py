"""The rank-0 progress bar and the run summary."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from tocalib.reproductions.train.distributed import DistContext
from tocalib.reproductions.train.engine import Progress, RunLog
from tocalib.reproductions.train.summary import main, summarise


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _log(tmp_path: Path, rank: int = 0) -> RunLog:
    ctx = DistContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
    return RunLog(tmp_path, ctx, stream=io.StringIO())


def test_progress_redraws_one_line_on_a_terminal(tmp_path: Path) -> None:
    terminal = Terminal()
    progress = Progress(total=10, start=0, log=_log(tmp_path), stream=terminal)
    progress.update(5, "loss 0.5")
    progress.update(10, "loss 0.25")
    text = terminal.getvalue()
    assert text.startswith("\r[############            ] 5/10 loss 0.5 eta ")
    assert "\r[########################] 10/10 loss 0.25 eta 0:00:00\n" in text
    assert not (tmp_path / "log.txt").exists()


def test_progress_logs_lines_elsewhere_and_is_silent_off_rank_zero(tmp_path: Path) -> None:
    log = _log(tmp_path)
    Progress(total=4, start=0, log=log, stream=io.StringIO()).update(2, "loss 1")
    assert "[############            ] 2/4 loss 1 eta" in (tmp_path / "log.txt").read_text()
    other = tmp_path / "rank1"
    quiet, terminal = _log(other, rank=1), Terminal()
    Progress(total=4, start=0, log=quiet, stream=terminal).update(4, "loss 1")
    assert terminal.getvalue() == "" and not other.exists()


def _write_run(run: Path, records: list[dict]) -> None:
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"epochs": 2}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_summary_sums_resumed_segments_and_picks_the_best(tmp_path: Path) -> None:
    _write_run(
        tmp_path / "run",
        [
            {"split": "start", "step": 0, "time": 0.0},
            {"split": "train", "step": 1, "time": 10.0, "loss": 2.0},
            {"split": "val", "step": 2, "epoch": 1.0, "top1": 70.0, "loss": 0.9, "time": 30.0},
            {"split": "val", "step": 3, "epoch": 1.5, "top1": 99.0, "loss": 0.1, "time": 45.0},  # lost in a crash
            {"split": "start", "step": 2, "time": 0.0},
            {"split": "train", "step": 3, "time": 5.0, "loss": 1.0},
            {"split": "val", "step": 4, "epoch": 2.0, "top1": 65.0, "loss": 0.8, "time": 20.0},
            {"split": "val_ema", "step": 4, "epoch": 2.0, "top1": 72.0, "loss": 0.85, "time": 20.5},
        ],
    )
    summary = summarise(tmp_path / "run")
    assert summary["wall_clock_s"] == 50.5 and summary["steps"] == 4
    assert summary["final"] == {"top1": 65.0, "loss": 0.8} and summary["best"] == {"top1": 72.0, "loss": 0.8}
    main([str(tmp_path / "run"), "--out", str(tmp_path / "summary.md")])
    assert (
        "| 4 | 2.0 | 0.8 min | top1 65.00, loss 0.80 | top1 72.00, loss 0.80 |" in (tmp_path / "summary.md").read_text()
    )
    assert json.loads((tmp_path / "summary.json").read_text())[0]["config"] == {"epochs": 2}


def test_summary_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl does not exist"):
        summarise(tmp_path)
    _write_run(tmp_path / "early", [{"split": "train", "step": 1, "time": 1.0, "loss": 2.0}])
    with pytest.raises(ValueError, match="no evaluation record"):
        summarise(tmp_path / "early")


def test_summary_names_the_model_its_overrides_and_its_size(tmp_path: Path) -> None:
    records = [{"split": "start", "step": 0, "time": 0.0}, {"split": "val", "step": 1, "top1": 50.0, "time": 6.0}]
    for name, config in {
        "classifier": {"model": "pvt_v2_b0", "model_kwargs": {"depths": [1, 1, 1, 1]}},
        "segmentor": {"head": "paca", "backbone": "swin_tiny_patch4_window7_224", "backbone_kwargs": {}},
    }.items():
        _write_run(tmp_path / name, records)
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    (tmp_path / "classifier" / "log.txt").write_text("[00:00:01] pvt_v2_b0 with …: 1,277,834 parameters, 10 classes\n")
    classifier, segmentor = (summarise(tmp_path / name) for name in ("classifier", "segmentor"))
    assert classifier["model"] == "pvt_v2_b0 with --model-kwargs" and classifier["parameters"] == 1_277_834
    assert segmentor["model"] == "paca head on swin_tiny_patch4_window7_224" and segmentor["parameters"] is None
