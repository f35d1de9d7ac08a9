"""Rebuild every row of a paper table, count its params and FLOPs, optionally evaluate the official checkpoints,
and print the reported and reproduced numbers side by side.

    python -m tocalib.reproductions.reproduce table2 [--out outputs/reproductions] [--rows GLOB]
    python -m tocalib.reproductions.reproduce table1 --checkpoints CKPT_DIR --data DATA_DIR
    python -m tocalib.reproductions.reproduce mytable --tables-dir MY_TABLES  # MY_TABLES/mytable.toml

Writes ``<out>/<table>.{md,csv,json}``. Exit status 1 when a reproduced params/FLOPs number misses the reported
one beyond its tolerance (README errata recorded in the table data are flagged instead, see
:mod:`tocalib.reproductions.report`); accuracy differences are shown, never failing.

``--data DATA_DIR`` holds ``imagenet/val/<class>/*`` (ImageNet val in class folders, sorted = class index),
``ADEChallengeData2016/{images,annotations}/validation`` and ``coco/{val2017,annotations/instances_val2017.json}``;
``--checkpoints CKPT_DIR`` holds the released files under the README's names (each row's ``checkpoint``).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from tocalib.reproductions.cli import USER_ERRORS
from tocalib.reproductions.counting import CountingPool
from tocalib.reproductions.report import RowResult, render_text, summary, write_outputs
from tocalib.reproductions.tables import TABLES_DIR, Row, Section, Table, load_table, table_names
from tocalib.reproductions.tasks import check_eval_inputs, evaluate_row

__all__ = ["main", "reproduce_table"]


def _select(table: Table, pattern: str | None) -> list[tuple[Section, Row]]:
    rows = table.rows
    if pattern is None:
        return rows
    return [(s, r) for s, r in rows if fnmatch.fnmatch(r.model, pattern) or fnmatch.fnmatch(r.label, pattern)]


def _print(line: str) -> None:
    print(line, flush=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def reproduce_table(
    table: Table,
    pool: CountingPool,
    rows: Sequence[tuple[Section, Row]],
    checkpoints: Path | None = None,
    data: Path | None = None,
    log: Callable[[str], None] | None = None,
    allow_fewer_classes: bool = False,
) -> list[RowResult]:
    """Count (and, given ``checkpoints`` and ``data``, evaluate) ``rows`` of ``table``, logging progress (default:
    printed and flushed at once)."""
    log = log or _print
    start = time.perf_counter()
    results = []
    log(f"{table.id}: counting {len(rows)} rows …")
    for i, ((section, row), count) in enumerate(zip(rows, pool.counts(rows), strict=True), 1):
        h, w = section.resolution
        how = "same architecture as an earlier row" if count.reused else f"counted in {count.seconds:.1f} s"
        log(
            f"[{i}/{len(rows)}] {table.id} {section.id}: {row.label} ({row.model}, {h}×{w}): "
            f"params {count.params / 1e6:.3f} M, FLOPs {count.macs / 1e9:.3f} G ({how})"
        )
        metrics = None
        if checkpoints is not None and data is not None:
            tick = time.perf_counter()
            checkpoint, root = checkpoints / row.checkpoint, data / section.data
            metrics = evaluate_row(section, row, checkpoint, root, log=log, allow_fewer_classes=allow_fewer_classes)
            shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
            log(f"      {shown} ({time.perf_counter() - tick:.1f} s)")
        results.append(RowResult.build(section, row, count, metrics))
        log(f"      elapsed {_clock(time.perf_counter() - start)}")
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tocalib-reproduce",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument(
        "tables", nargs="+", metavar="TABLE", help=f"table names ({', '.join(table_names())}) or all (every table)"
    )
    parser.add_argument(
        "--tables-dir",
        type=Path,
        default=TABLES_DIR,
        help="folder of the table files <name>.toml (default: the package's own, tables/)",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/reproductions"), help="output folder")
    parser.add_argument("--rows", help="only rows whose model name or label matches this shell pattern")
    parser.add_argument("--checkpoints", type=Path, help="folder of the released checkpoints (with --data)")
    parser.add_argument("--data", type=Path, help="folder of the evaluation datasets (with --checkpoints)")
    parser.add_argument(
        "--allow-fewer-classes",
        action="store_true",
        help="ImageNet folders for only the first classes (a pipeline check, not the paper's number)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="processes counting FLOPs, one thread each (default: min(2, CPUs)); 1 = in this process",
    )
    return parser


def _check_out(out: Path) -> None:
    """``--out`` must be a folder this process can write, checked before the first row is counted."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, expected a folder for the tables; pass another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise PermissionError(f"--out {out} is not a writable folder ({err.strerror}); pass another --out") from err


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return _main(args, argv)
    except USER_ERRORS as err:
        raise SystemExit(f"reproduce: error: {err}") from None


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    if (args.checkpoints is None) != (args.data is None):
        raise ValueError("--checkpoints and --data go together: pass both to evaluate accuracy, or neither")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    _check_out(args.out)
    if not args.tables_dir.is_dir():
        raise NotADirectoryError(f"--tables-dir {args.tables_dir} is not a folder of <name>.toml table files")
    known = table_names(args.tables_dir)
    unknown = [name for name in args.tables if name not in (*known, "all")]
    if unknown:
        raise ValueError(f"no table {', '.join(unknown)} in {args.tables_dir}; tables there: {', '.join(known)}, all")
    names = known if "all" in args.tables else list(dict.fromkeys(args.tables))
    tables = [load_table(name, args.tables_dir) for name in names]
    selected = {t.id: _select(t, args.rows) for t in tables}
    if not any(selected.values()):
        raise ValueError(f"no row matches --rows {args.rows!r}")
    if args.checkpoints is not None:
        check_eval_inputs([pair for rows in selected.values() for pair in rows], args.checkpoints, args.data)
    failed = []
    with CountingPool(args.workers) as pool:  # what it counted is shared by the tables of this run only
        for table in tables:
            try:
                if _run(table, pool, selected[table.id], args, argv, many=len(tables) > 1):
                    failed.append(table.id)
            except Exception as err:  # one table's failure must not cost the others
                if len(tables) == 1:
                    raise
                if not isinstance(err, USER_ERRORS):  # a bug: its traceback matters
                    traceback.print_exc()
                print(f"{table.id} failed: {type(err).__name__}: {err}; the other tables go on", flush=True)
                failed.append(table.id)
    if failed and len(tables) > 1:
        print(f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


def _run(
    table: Table,
    pool: CountingPool,
    rows: Sequence[tuple[Section, Row]],
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    many: bool,
) -> bool:
    """Reproduce one table, print it and write its files; True when a row failed."""
    if not rows:
        return False
    tick = time.perf_counter()
    results = reproduce_table(table, pool, rows, args.checkpoints, args.data, None, args.allow_fewer_classes)
    seconds = time.perf_counter() - tick
    meta = {
        "command": " ".join(["tocalib-reproduce", *(argv if argv is not None else sys.argv[1:])]),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "workers": args.workers,
        "machine": platform.processor() or platform.machine(),
        "accuracy": (
            ("evaluated on the first classes only (--allow-fewer-classes)" if args.allow_fewer_classes else "evaluated")
            if args.checkpoints
            else "reported only"
        ),
    }
    print()
    print(render_text(table, results))
    paths = write_outputs(table, results, args.out, meta)
    print(f"{table.id} done in {_clock(seconds)}; wrote {', '.join(str(p) for p in paths)}")
    if many:
        print(f"{table.id}: {summary(results)}")
    print(flush=True)
    return any(r.failed for r in results)


if __name__ == "__main__":
    sys.exit(main())
