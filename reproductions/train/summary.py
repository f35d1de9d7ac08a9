"""Summarise training runs from their ``metrics.jsonl`` and ``config.json``: ``python -m
tocalib.reproductions.train.summary RUN_DIR [RUN_DIR ...] [--out summary.md]``.

For each run: the final and best evaluation metrics, the steps and epochs trained and the wall-clock time of the
training (from the records' ``time``, summed over resumed segments); the JSON output also holds each run's config.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "summarise"]


def _records(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run} the --out folder of a training run?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _segments(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The records of each process start (a ``start`` record opens a segment: the first run, then each resume).
    A segment's records past the step the next one resumed from (written after its last checkpoint, then
    repeated) are dropped."""
    opened_at: list[int | None] = []
    segments: list[list[dict[str, Any]]] = []
    for record in records:
        if record["split"] == "start" or not segments:
            opened_at.append(record["step"] if record["split"] == "start" else None)
            segments.append([])
        if record["split"] != "start":
            segments[-1].append(record)
    ends = [*opened_at[1:], None]
    return [[r for r in seg if end is None or r["step"] <= end] for seg, end in zip(segments, ends, strict=True)]


def summarise(run: Path) -> dict[str, Any]:
    """Final and best validation metrics (best over the EMA weights too), steps and wall-clock seconds of the run
    in ``run`` (each segment's clock restarts, so their last times are summed)."""
    segments = [seg for seg in _segments(_records(run)) if seg]
    records = [r for seg in segments for r in seg]
    evaluations = [r for r in records if r["split"] == "val"]
    if not evaluations:
        raise ValueError(f"{run}/metrics.jsonl has no evaluation record yet")
    config = json.loads((run / "config.json").read_text())
    final = evaluations[-1]
    metrics = [k for k in final if k not in ("split", "step", "epoch", "time")]
    candidates = [r for r in records if r["split"] in ("val", "val_ema")]
    best = {k: (min if "loss" in k else max)(r[k] for r in candidates) for k in metrics}
    return {
        "run": str(run),
        "model": _model(config),
        "parameters": _parameters(run),
        "steps": final["step"],
        "epochs": final.get("epoch"),
        "wall_clock_s": round(sum(seg[-1]["time"] for seg in segments), 1),
        "final": {k: final[k] for k in metrics},
        "best": best,
        "config": config,
    }


def _model(config: dict[str, Any]) -> str:
    """The run's model as its config names it; architecture overrides are flagged (the name alone would mislead)."""
    if "model" in config:
        return config["model"] + (" with --model-kwargs" if config.get("model_kwargs") else "")
    backbone = config.get("backbone", "?") + (" with --backbone-kwargs" if config.get("backbone_kwargs") else "")
    return f"{config.get('head')} head on {backbone}"


def _parameters(run: Path) -> int | None:
    """The parameter count the run's log states (``… N parameters``), or None when its log has none."""
    log = run / "log.txt"
    found = re.search(r"([\d,]+) parameters", log.read_text()) if log.is_file() else None
    return None if found is None else int(found.group(1).replace(",", ""))


def _markdown(summaries: list[dict[str, Any]]) -> str:
    lines = [
        "| run | model | parameters | steps | epochs | wall clock | final | best |",
        "|---|---|---:|---|---|---|---|---|",
    ]
    for s in summaries:
        final = ", ".join(f"{k} {v:.2f}" for k, v in s["final"].items())
        best = ", ".join(f"{k} {v:.2f}" for k, v in s["best"].items())
        minutes = s["wall_clock_s"] / 60
        params = "–" if s["parameters"] is None else f"{s['parameters']:,}"
        lines.append(
            f"| {s['run']} | {s['model']} | {params} | {s['steps']} | {s['epochs']} | {minutes:.1f} min | {final} "
            f"| {best} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description="Summarise training runs (metrics.jsonl + config.json).")
    parser.add_argument("runs", nargs="+", type=Path, help="--out folders of training runs")
    parser.add_argument("--out", type=Path, help="also write the table (.md) and the summaries (.json) here")
    args = parser.parse_args(argv)
    summaries = [summarise(run) for run in args.runs]
    table = _markdown(summaries)
    print(table, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps(summaries, indent=2) + "\n")
    return summaries


if __name__ == "__main__":
    main(sys.argv[1:])
