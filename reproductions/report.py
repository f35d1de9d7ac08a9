"""Compare reproduced numbers with the reported ones and render the side-by-side table (terminal, Markdown, CSV,
JSON).

A reported params/FLOPs number is **ok** when the reproduced one is within tolerance, a **MISS** otherwise. A
field recorded as a README erratum is **erratum** (flagged, not failing) when the reproduced number misses the
README but matches the official code's count; it is a MISS when it matches neither, and **STALE** (failing)
when it matches the README after all, so that an erratum can never hide a real change.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tocalib.reproductions.counting import Count
from tocalib.reproductions.tables import Number, Row, Section, Table
from tocalib.reproductions.tasks import SKIPPED, SKIPPED_NOTE

__all__ = ["Check", "RowResult", "check", "render_text", "summary", "write_outputs"]

Status = Literal["ok", "erratum", "MISS", "STALE"]
FAILING: tuple[Status, ...] = ("MISS", "STALE")
_EPS = 1e-9


@dataclass(frozen=True)
class Check:
    """One reported number against its reproduction (both in M or G)."""

    reported: Number
    reproduced: float
    allowance: float
    status: Status

    @property
    def delta(self) -> float:
        """Reproduced − reported."""
        return self.reproduced - self.reported.value


def check(reproduced: float, reported: Number, allowance: float, erratum: str | None, official: Number | None) -> Check:
    """Classify ``reproduced`` against ``reported`` (see the module docstring)."""
    within = abs(reproduced - reported.value) <= allowance + _EPS
    if erratum is None:
        return Check(reported, reproduced, allowance, "ok" if within else "MISS")
    if within:
        return Check(reported, reproduced, allowance, "STALE")
    assert official is not None, "tables.py guarantees an official value for every numeric erratum"
    matches_official = abs(reproduced - official.value) <= official.half_unit + _EPS
    return Check(reported, reproduced, allowance, "erratum" if matches_official else "MISS")


@dataclass
class RowResult:
    """Everything known about one row after counting (and optionally evaluating)."""

    section: Section
    row: Row
    count: Count
    params: Check
    flops: Check
    metrics: dict[str, float] | None = None

    @property
    def failed(self) -> bool:
        """A params or FLOPs MISS, or a STALE erratum."""
        return self.params.status in FAILING or self.flops.status in FAILING

    @classmethod
    def build(cls, section: Section, row: Row, count: Count, metrics: dict[str, float] | None) -> RowResult:
        """Check ``count`` against the row's reported numbers with the section's tolerances."""
        params = check(
            count.params / 1e6, row.params_m, row.params_m.half_unit, row.errata.get("params"), row.official_params_m
        )
        flops = check(
            count.macs / 1e9,
            row.flops_g,
            section.flops_allowance(row.flops_g),
            row.errata.get("flops"),
            row.official_flops_g,
        )
        return cls(section, row, count, params, flops, metrics)


def _num(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


Footnotes = dict[tuple[str, str, str], int]
"""Errata shown under a table: (row label, field, explanation) → footnote number."""


def _status_cell(result: RowResult, footnotes: Footnotes) -> str:
    parts = [
        f"{c.status} {name}" for name, c in (("params", result.params), ("FLOPs", result.flops)) if c.status != "ok"
    ]
    for fieldname, text in result.row.errata.items():
        number = footnotes.setdefault((result.row.label, fieldname, text), len(footnotes) + 1)
        parts.append(f"[{number}]")
    return " ".join(parts) or "ok"


def _metric_cell(result: RowResult, name: str) -> str:
    reported = result.row.metrics[name].text
    if result.metrics is None:
        return reported
    ours = result.metrics[name]
    return f"{reported} | {ours:.2f} | {ours - result.row.metrics[name].value:+.2f}"


def _table_rows(results: Sequence[RowResult], footnotes: Footnotes) -> tuple[list[str], list[list[str]]]:
    section = results[0].section
    evaluated = results[0].metrics is not None
    headers = ["model", "params(M) reported", "reproduced", "Δ", "FLOPs(G) reported", "reproduced", "Δ"]
    headers += [f"{m} reported | reproduced | Δ" if evaluated else m for m in section.metrics]
    headers.append("status")
    body = []
    for r in results:
        flops_decimals = 3 if section.flops_tolerance == "rounding" else 2
        body.append(
            [
                r.row.label,
                r.params.reported.text,
                _num(r.params.reproduced, 3),
                f"{r.params.delta:+.3f}",
                r.flops.reported.text,
                _num(r.flops.reproduced, flops_decimals),
                f"{r.flops.delta:+.{flops_decimals}f}",
                *(_metric_cell(r, m) for m in section.metrics),
                _status_cell(r, footnotes),
            ]
        )
    return headers, body


def _grid(headers: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*headers), "  ".join("-" * w for w in widths)] + [fmt.format(*row) for row in body]


def _section_header(section: Section) -> str:
    h, w = section.resolution
    tolerance = "README rounding" if section.flops_tolerance == "rounding" else section.flops_tolerance
    return (
        f"{section.title}: {section.task}, input 1×3×{h}×{w}; params within README rounding, FLOPs within {tolerance}"
    )


def _render(table: Table, results: Sequence[RowResult], markdown: bool) -> list[str]:
    footnotes: Footnotes = {}
    lines = [f"# {table.id}: {table.title}" if markdown else f"{table.id}: {table.title}", ""]
    for section in table.sections:
        rows = [r for r in results if r.section is section]
        if not rows:
            continue
        lines.append(f"## {_section_header(section)}" if markdown else _section_header(section))
        lines.append("")
        lines += _grid(*_table_rows(rows, footnotes), markdown=markdown)
        lines.append("")
        lines += [f"Note: {note}" for note in section.notes]
        if rows[0].metrics is None:
            lines.append(
                f"Accuracy ({', '.join(section.metrics)}): reported only; "
                "pass --checkpoints DIR --data DIR to evaluate."
            )
        lines.append("")
    skipping = [r for r in results if r.count.parts[SKIPPED]]
    if skipping:
        lines.append(SKIPPED_NOTE)
        lines += [
            f"  {r.section.id}/{r.row.label}: +{r.count.parts[SKIPPED] / 1e9:.3f} G → all ops "
            f"{r.count.parts['all_ops'] / 1e9:.3f} G"
            for r in skipping
        ]
        lines.append("")
    if footnotes:
        lines.append("README errata (recorded in the table data; flagged, not failing when the official code agrees):")
        for (label, fieldname, text), number in footnotes.items():
            lines.append(f"[{number}] {label}, {fieldname}: {text}")
        lines.append("")
    lines.append(summary(results))
    lines.append(f"Source: {table.source}")
    return lines


def summary(results: Sequence[RowResult]) -> str:
    """One line: rows in tolerance, rows flagged as README errata, misses (named)."""
    failed = [f"{r.section.id}/{r.row.label}" for r in results if r.failed]
    flagged = sum(1 for r in results if not r.failed and "erratum" in (r.params.status, r.flops.status))
    return (
        f"{len(results)} rows: {len(results) - len(failed) - flagged} in tolerance, {flagged} README errata flagged, "
        f"{len(failed)} misses" + (f" ({', '.join(failed)})" if failed else "")
    )


def render_text(table: Table, results: Sequence[RowResult]) -> str:
    """The side-by-side table for the terminal."""
    return "\n".join(_render(table, results, markdown=False))


def _record(result: RowResult) -> dict[str, Any]:
    row, section = result.row, result.section
    record: dict[str, Any] = {
        "section": section.id,
        "label": row.label,
        "model": row.model,
        "head": row.head,
        "num_clusters": list(row.num_clusters) if row.num_clusters else None,
        "resolution": list(section.resolution),
        "params_reported_m": row.params_m.value,
        "params_reproduced": result.count.params,
        "params_delta_m": result.params.delta,
        "params_status": result.params.status,
        "flops_reported_g": row.flops_g.value,
        "flops_reproduced": result.count.macs,
        "flops_delta_g": result.flops.delta,
        "flops_status": result.flops.status,
        "flops_allowance_g": result.flops.allowance,
        "flops_all_ops": result.count.parts["all_ops"],
        f"flops_{SKIPPED}": result.count.parts[SKIPPED],
        "checkpoint": row.checkpoint,
        "count_seconds": round(result.count.seconds, 2),
    }
    for name, reported in row.metrics.items():
        record[f"{name}_reported"] = reported.value
        record[f"{name}_reproduced"] = None if result.metrics is None else result.metrics[name]
    record["errata"] = "; ".join(f"{k}: {v}" for k, v in row.errata.items())
    return record


def write_outputs(table: Table, results: Sequence[RowResult], out: Path, meta: dict[str, Any]) -> list[Path]:
    """Write ``<out>/<table>.md``, ``.csv`` and ``.json``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path, json_path = (out / f"{table.id}.{ext}" for ext in ("md", "csv", "json"))
    md.write_text("\n".join(_render(table, results, markdown=True)) + "\n", encoding="utf-8")
    records = [_record(r) for r in results]
    fieldnames = list(dict.fromkeys(k for record in records for k in record))
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(records)
    payload = {
        "table": table.id,
        "title": table.title,
        "source": table.source,
        **meta,
        "rows": [
            {**record, "flops_parts": result.count.parts} for record, result in zip(records, results, strict=True)
        ],
        "failed": [r.row.label for r in results if r.failed],
    }
    json_path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [md, csv_path, json_path]
