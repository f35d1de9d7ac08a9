"""The training step (forward+backward) of this checkout against an earlier git revision, measured side by side.

    python -m benchmarks.revisions [--base feb3f3f] [--rounds N] [--steps 2] [--threads 2] [--quick] [--out DIR]

(``nox -s bench_revisions``.) The CPU-speed issue asked for training "≥ 1.3× today's"; it was filed at ``feb3f3f``,
the default base. The base is exported with ``git archive`` into a temporary folder and laid out as an
installed tocalib (the ``[tool.setuptools.package-dir]`` of its own pyproject.toml, as links); this
checkout is laid out the same way. Three variants run each configuration, every one in fresh Python processes
(``--child``) that build the model (seed 0), take one warm-up step and time ``--steps`` more:

* the base revision, as it ran (glibc's allocator defaults);
* this checkout with glibc's defaults;
* this checkout as its training runs it (``RunConfig.retain_cpu_memory``: :func:`tocalib.allocator.tune_cpu_allocator`
  first).

A fourth process per round measures that step's floors (:func:`benchmarks.common.kernel_floor`): its matrix products,
convolutions and attention kernels, each run again on the inputs it gave them, summed; and those with its GELUs,
softmaxes and LayerNorms; each as its share of the step timed in the same rounds, times the heap-kept variant's
median step. If the base's time over the second is below the goal, this checkout's sequence of operators cannot meet it
even if everything else cost nothing: only fewer passes (fused kernels, another arrangement) could.

The processes take turns in every round, in a rotating order, so that a slow spell of a shared machine hits all of
them alike (evenly when ``--rounds`` is a multiple of the four processes: then each takes every place in the order
equally often; the report says when it is not); a variant's time is the median over all its steps, its memory the
largest peak RSS of its processes.
Writes ``revisions.md`` and ``revisions.json`` to ``--out`` and prints the speed-ups against the 1.3× target.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.common import TRAINING, TRAINING_QUICK, Target, kernel_floor, training_step

REPO = Path(__file__).resolve().parent.parent
BASE = "feb3f3f"
"""The commit at which the CPU-speed issue was filed (its measurements are of this code)."""

VARIANTS = ("base", "this checkout, glibc default", "this checkout, heap kept")
FLOORS = ("this checkout's kernel floor", "this checkout's kernel+math floor")
"""What the floor process measures of this checkout's step (heap kept), :func:`benchmarks.common.kernel_floor`: its
matrix products, convolutions and attention kernels alone; those and its GELUs, softmaxes and LayerNorms alone."""
FLOOR_REPS = 3
RUNS = (*VARIANTS, "floor")
"""The processes of a round, whose order rotates by one place per round."""
GOAL = 1.3

Config = tuple[str, int, int]  # (model, batch, image side)


def installed_layout(tree: Path, into: Path) -> Path:
    """A folder to put first on ``sys.path`` that imports ``tree``'s code as its installed package would: for every
    ``package = folder`` of ``tree/pyproject.toml``'s ``[tool.setuptools.package-dir]``, a link to ``tree/folder``
    (``tocalib`` itself as a folder of links, so that ``tocalib.models`` can live inside it)."""
    import tomllib  # Python 3.11 on, as tarfile's "data" filter that export() uses

    mapping = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    if mapping.get("tocalib") != "tocalib" or any(
        not name.startswith("tocalib.") for name in mapping if name != "tocalib"
    ):
        raise SystemExit(f"{tree}: a package-dir other than tocalib and its subpackages cannot be laid out: {mapping}")
    package = into / "tocalib"
    package.mkdir(parents=True)
    for entry in (tree / "tocalib").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        if name != "tocalib":
            (package / name.removeprefix("tocalib.")).symlink_to(tree / folder)
    return into


def export(revision: str, into: Path) -> Path:
    """The files of git ``revision`` of this repository, written under ``into`` (which of its folders are packages
    is for :func:`installed_layout` to read from the revision's own pyproject.toml)."""
    command = ["git", "-C", str(REPO), "archive", "--format=tar", revision]
    try:
        archive = subprocess.run(command, capture_output=True, check=True).stdout
    except OSError as err:
        raise SystemExit(f"git is needed to export revision {revision!r}: {err}") from err
    except subprocess.CalledProcessError as err:
        raise SystemExit(
            f"git cannot export revision {revision!r} ({err.stderr.decode().strip()}); in a shallow clone, "
            "`git fetch --unshallow` first, or pass another --base"
        ) from err
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def child(layout: Path, config: Config, steps: int, threads: int, retain: bool, floor: bool = False) -> None:
    """Time ``steps`` training steps of the tocalib found in ``layout`` (after one warm-up step); print JSON. With
    ``floor``, measure the step's :data:`FLOORS` instead of timing it."""
    sys.path.insert(0, str(layout))
    import torch

    import tocalib
    from tocalib.models import create_model

    expected = (layout / "tocalib" / "__init__.py").resolve()
    if Path(tocalib.__file__).resolve() != expected:
        raise SystemExit(f"imported tocalib from {tocalib.__file__}, not from the layout {layout}")
    if retain:
        from tocalib.allocator import tune_cpu_allocator

        if not tune_cpu_allocator():
            raise SystemExit("tune_cpu_allocator changed nothing here (not glibc, or an allocator in LD_PRELOAD)")
    torch.set_num_threads(threads)
    step = training_step(create_model, *config)
    step()
    if floor:
        floors = kernel_floor(step, FLOOR_REPS)
        print(json.dumps({"share": dict(zip(FLOORS, floors.scaled(1.0), strict=True))}))
        return
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts it in kilobytes
    print(json.dumps({"seconds": seconds, "peak_rss": peak}))


def run_variant(
    layout: Path, config: Config, steps: int, threads: int, retain: bool, floor: bool = False
) -> dict[str, Any]:
    """One ``--child`` process: ``{"seconds": [...], "peak_rss": bytes}``, or with ``floor`` the :data:`FLOORS`."""
    command = [sys.executable, "-m", "benchmarks.revisions", "--child", str(layout), *map(str, config)]
    command += ["--steps", str(steps), "--threads", str(threads)] + (["--retain"] if retain else [])
    command += ["--floor"] if floor else []
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    lines = done.stdout.splitlines()
    if done.returncode or not lines:
        raise SystemExit(f"the measurement of {layout} ({' '.join(command[3:])}) failed:\n{done.stderr}")
    return json.loads(lines[-1])


def measure(base: Path, here: Path, configs: tuple[Config, ...], rounds: int, steps: int, threads: int) -> list[dict]:
    """Per configuration: each variant's median step seconds and largest peak RSS over ``rounds`` turns, and the
    :data:`FLOORS` of this checkout (one process per turn, in the rotation) as the median share of its step that
    they take in their own process, times the heap-kept variant's median step (so that drift between the processes
    cancels)."""
    variants = dict(zip(VARIANTS, ((base, False), (here, False), (here, True)), strict=True))
    rows = []
    for config in configs:
        samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
        shares: dict[str, list[float]] = {name: [] for name in FLOORS}
        peaks = dict.fromkeys(variants, 0)
        for turn in range(rounds):
            for name in RUNS[turn % len(RUNS) :] + RUNS[: turn % len(RUNS)]:
                if name == "floor":
                    for floor, share in run_variant(here, config, steps, threads, True, floor=True)["share"].items():
                        shares[floor].append(share)
                    continue
                layout, retain = variants[name]
                result = run_variant(layout, config, steps, threads, retain)
                samples[name] += result["seconds"]
                peaks[name] = max(peaks[name], result["peak_rss"])
        model, batch, side = config
        seconds = {name: statistics.median(values) for name, values in samples.items()}
        kept = seconds[VARIANTS[2]]  # the floors' step: its share of it, on the variants' time base
        seconds |= {name: kept * statistics.median(values) for name, values in shares.items()}
        rows.append({"model": model, "input": f"{batch}x3x{side}x{side}", "seconds": seconds, "peak_rss": peaks})
    return rows


def targets(rows: list[dict], applies: bool) -> list[Target]:
    """The base's time over each of this checkout's variants and :data:`FLOORS`, against :data:`GOAL` (N/A where
    ``not applies``): below it at the kernel+math floor, this operator sequence cannot meet it."""
    result = []
    for row in rows:
        base = row["seconds"][VARIANTS[0]]
        for name in (*VARIANTS[1:], *FLOORS):
            speedup = base / row["seconds"][name] if applies else None
            result.append(Target(f"{row['model']} training step at {row['input']}: {name} over base", speedup, GOAL))
    return result


def markdown(rows: list[dict], goals: list[Target], header: dict[str, Any]) -> str:
    """The report: the run's settings, the targets, every variant's time and memory."""
    lines = ["# Training step: this checkout against an earlier revision", ""]
    lines += [", ".join(f"{k}: {v}" for k, v in header.items()), ""]
    lines += ["| target | measured | threshold | verdict |", "|---|---|---|---|"]
    for goal in goals:
        shown = (
            "—" if goal.value is None else f"{goal.value:.3f}"
        )  # three decimals: 1.297 must not read "1.3" beside a MISS
        lines.append(f"| {goal.name} | {shown} | ≥ {goal.threshold:g} | {goal.verdict} |")
    lines += ["", "| model | input | code | ms per step (median) | peak RSS MiB |", "|---|---|---|---|---|"]
    for row in rows:
        for name in (*VARIANTS, *FLOORS):
            peak = f"{row['peak_rss'][name] / 2**20:.0f}" if name in row["peak_rss"] else ""
            lines.append(f"| {row['model']} | {row['input']} | {name} | {row['seconds'][name] * 1e3:.4g} | {peak} |")
    return "\n".join(lines) + "\n"


def _checkout() -> str:
    """This checkout's commit, marked when the working tree has changes (they are measured too)."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    return head.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> list[Target]:
    """Measure, write the reports, print them; returns the targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE, help="the git revision to compare with (default: %(default)s)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=len(RUNS),
        help=f"turns of every process per configuration (default %(default)s; a multiple of {len(RUNS)} "
        "gives every process each place in the order)",
    )
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every process")
    parser.add_argument("--quick", action="store_true", help="one tiny configuration: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("outputs/revisions"), help="output folder")
    parser.add_argument("--child", nargs=4, metavar=("LAYOUT", "MODEL", "BATCH", "SIDE"), help=argparse.SUPPRESS)
    parser.add_argument("--retain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        layout, model, batch, side = args.child
        child(Path(layout), (model, int(batch), int(side)), args.steps, args.threads, args.retain, args.floor)
        return []
    for name in ("rounds", "steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    import torch  # for the header only: the measuring processes import their own

    header = {"base": args.base, "this checkout": _checkout(), "torch": torch.__version__, "threads": args.threads}
    header |= {"rounds": args.rounds, "steps per process": args.steps}
    header["order"] = (
        "balanced" if args.rounds % len(RUNS) == 0 else f"unbalanced (rounds not a multiple of {len(RUNS)})"
    )
    header["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = installed_layout(export(args.base, Path(tmp) / "tree"), Path(tmp) / "base")
        here = installed_layout(REPO, Path(tmp) / "here")
        rows = measure(base, here, TRAINING_QUICK if args.quick else TRAINING, args.rounds, args.steps, args.threads)
    header["wall_s"] = round(time.perf_counter() - started)
    goals = targets(rows, applies=not args.quick)
    report = markdown(rows, goals, header)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "revisions.md").write_text(report)
    payload = {"header": header, "rows": rows, "targets": [{**asdict(g), "verdict": g.verdict} for g in goals]}
    (args.out / "revisions.json").write_text(json.dumps(payload, indent=1))
    print(report)
    return goals


if __name__ == "__main__":
    main()
