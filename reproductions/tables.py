"""The paper's tables as data: load and validate ``reproductions/tables/<name>.toml``.

Every TOML file of that folder is a table (:func:`table_names`), so adding one is adding a file. A table has one or
more sections (Table 4 has three: ImageNet, COCO and ADE20k ablations); a section names a registered task
(:mod:`tocalib.reproductions.tasks`) and fixes the input resolution, the FLOP tolerance and the metric names; each
row names a registered model and the numbers the README reports for it, as strings so that the printed precision
(which sets the tolerance) is kept.

>>> table = load_table("table1")
>>> row = table.sections[0].rows[0]
>>> row.model, row.params_m.value, row.params_m.half_unit
('pacavit_tiny_p2cconv_100_0', 12.2, 0.05)
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI
    import tomli as tomllib

from tocalib.reproductions.tasks import get_task

__all__ = [
    "ERRATA_FIELDS",
    "TABLES_DIR",
    "Number",
    "Row",
    "Section",
    "Table",
    "TableFormatError",
    "load_table",
    "table_names",
]

TABLES_DIR = Path(__file__).parent / "tables"
ERRATA_FIELDS = ("params", "flops", "link")
"""Row fields an erratum can concern: a reported number, or the README's checkpoint link."""


def table_names(directory: Path = TABLES_DIR) -> list[str]:
    """The tables of ``directory``: its ``*.toml`` files' names, in natural order (``table2`` before ``table10``;
    the noxfile's per-table sessions follow the same order)."""
    natural = [
        (tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", f.stem)), f.stem)
        for f in directory.glob("*.toml")
    ]
    return [name for _, name in sorted(natural)]


class TableFormatError(ValueError):
    """A table file does not follow the schema; the message names the file and the entry."""


@dataclass(frozen=True)
class Number:
    """A number as printed, e.g. ``"12.2"``: its value and half a unit of its last printed digit."""

    text: str

    @property
    def value(self) -> float:
        return float(self.text)

    @property
    def half_unit(self) -> float:
        """Rounding tolerance: ``"12.2"`` → 0.05, ``"252"`` → 0.5."""
        decimals = len(self.text.partition(".")[2])
        return 0.5 * 10.0**-decimals


@dataclass(frozen=True)
class Row:
    """One table row: the model to build and what the README reports for it.

    Attributes:
        label: the README's row name.
        model: registered backbone name (:func:`tocalib.models.create_model`).
        params_m, flops_g: reported params (millions) and FLOPs (GMACs).
        metrics: reported metrics by name (``top1``, ``mIoU``, ``APb`` …).
        checkpoint: file name of the released checkpoint (the README's link name).
        head: segmentation head (``"upernet"`` or ``"paca"``), None otherwise.
        num_clusters: per-stage cluster override of the downstream config, None for the model's own.
        official_params_m, official_flops_g: the counts of the official code (PaCaViT@4307018); only
            used to check rows whose README number is an erratum.
        errata: explanation per erroneous field (:data:`ERRATA_FIELDS`).
    """

    label: str
    model: str
    params_m: Number
    flops_g: Number
    metrics: dict[str, Number]
    checkpoint: str
    head: str | None = None
    num_clusters: tuple[int, ...] | None = None
    official_params_m: Number | None = None
    official_flops_g: Number | None = None
    errata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Section:
    """Rows sharing a task, a resolution (H, W), a FLOP tolerance and metrics.

    ``flops_tolerance`` is ``"rounding"`` (half a unit of the printed digit) or a relative tolerance such as
    ``"1%"``; params always use the rounding tolerance. ``data`` is the dataset folder under ``--data``.
    """

    id: str
    title: str
    task: str
    resolution: tuple[int, int]
    flops_tolerance: str
    metrics: tuple[str, ...]
    data: str
    source: str
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = ()

    def flops_allowance(self, reported: Number) -> float:
        """Largest accepted |reproduced − reported| in G for a reported FLOP count."""
        if self.flops_tolerance == "rounding":
            return reported.half_unit
        return float(self.flops_tolerance.removesuffix("%")) / 100 * reported.value


@dataclass(frozen=True)
class Table:
    """A paper table: id (``table1`` …), title, source and sections."""

    id: str
    title: str
    source: str
    sections: tuple[Section, ...]

    @property
    def rows(self) -> list[tuple[Section, Row]]:
        """Every (section, row) pair in order."""
        return [(section, row) for section in self.sections for row in section.rows]


def _number(text: Any, where: str) -> Number:
    if not isinstance(text, str):
        raise TableFormatError(f'{where}: numbers are strings as printed (e.g. "12.2"), got {text!r}')
    try:
        float(text)
    except ValueError:
        raise TableFormatError(f"{where}: {text!r} is not a number") from None
    return Number(text)


def _require(entry: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in entry]
    if missing:
        raise TableFormatError(f"{where}: missing {missing}")


_ROW_KEYS = ("label", "model", "params_m", "flops_g", "metrics", "checkpoint")
_ROW_OPTIONAL = ("head", "num_clusters", "official_params_m", "official_flops_g", "errata")
_SECTION_KEYS = ("id", "title", "task", "resolution", "flops_tolerance", "metrics", "data", "source", "rows")


def _row(entry: dict[str, Any], section: dict[str, Any], where: str) -> Row:
    _require(entry, _ROW_KEYS, where)
    unknown = set(entry) - set(_ROW_KEYS) - set(_ROW_OPTIONAL)
    if unknown:
        raise TableFormatError(f"{where}: unknown keys {sorted(unknown)}")
    metrics = {name: _number(v, f"{where}.metrics.{name}") for name, v in entry["metrics"].items()}
    if tuple(metrics) != tuple(section["metrics"]):
        raise TableFormatError(f"{where}: metrics {list(metrics)} differ from the section's {section['metrics']}")
    errata = dict(entry.get("errata", {}))
    if set(errata) - set(ERRATA_FIELDS):
        raise TableFormatError(f"{where}: errata may concern {ERRATA_FIELDS}, got {sorted(errata)}")
    official = {k: _number(entry[k], f"{where}.{k}") for k in ("official_params_m", "official_flops_g") if k in entry}
    for name in ("params", "flops"):
        if name in errata and f"official_{name}_{'m' if name == 'params' else 'g'}" not in official:
            raise TableFormatError(f"{where}: an erratum on {name} needs the official code's value to check against")
    head, heads = entry.get("head"), get_task(section["task"]).heads
    if head not in heads:
        raise TableFormatError(f"{where}: head {head!r} is not one of {heads} for {section['task']}")
    clusters = entry.get("num_clusters")
    return Row(
        label=entry["label"],
        model=entry["model"],
        params_m=_number(entry["params_m"], f"{where}.params_m"),
        flops_g=_number(entry["flops_g"], f"{where}.flops_g"),
        metrics=metrics,
        checkpoint=entry["checkpoint"],
        head=head,
        num_clusters=None if clusters is None else tuple(clusters),
        official_params_m=official.get("official_params_m"),
        official_flops_g=official.get("official_flops_g"),
        errata=errata,
    )


def _section(entry: dict[str, Any], where: str) -> Section:
    _require(entry, _SECTION_KEYS, where)
    try:
        get_task(entry["task"])
    except ValueError as err:
        raise TableFormatError(f"{where}: {err}") from None
    tolerance = entry["flops_tolerance"]
    if tolerance != "rounding" and not (isinstance(tolerance, str) and tolerance.endswith("%")):
        raise TableFormatError(f"{where}: flops_tolerance must be 'rounding' or a percentage like '1%'")
    rows = tuple(_row(r, entry, f"{where}.rows[{i}]") for i, r in enumerate(entry["rows"]))
    return Section(
        id=entry["id"],
        title=entry["title"],
        task=entry["task"],
        resolution=(int(entry["resolution"][0]), int(entry["resolution"][1])),
        flops_tolerance=tolerance,
        metrics=tuple(entry["metrics"]),
        data=entry["data"],
        source=entry["source"],
        rows=rows,
        notes=tuple(entry.get("notes", ())),
    )


def load_table(name: str, directory: Path = TABLES_DIR) -> Table:
    """Read and validate ``<directory>/<name>.toml`` (``name`` is one of :func:`table_names`)."""
    path = directory / f"{name}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"no table file {path}; tables in {directory}: {', '.join(table_names(directory))}")
    with path.open("rb") as f:
        data = tomllib.load(f)
    where = path.name
    _require(data, ("id", "title", "source", "sections"), where)
    if data["id"] != name:
        raise TableFormatError(f"{where}: id {data['id']!r} differs from the file name")
    sections = tuple(_section(s, f"{where}.sections[{i}]") for i, s in enumerate(data["sections"]))
    return Table(id=data["id"], title=data["title"], source=data["source"], sections=sections)
