"""The training step (forward+backward) of this checkout against an earlier git revision, measured side by side.

    python -m benchmarks.revisions [--base feb3f3f] [--rounds 3] [--steps 2] [--threads 2] [--quick] [--out DIR]

(``nox -s bench_revisions``.) The CPU-speed issue asked for training "≥ 1.3× today's"; it was filed at ``feb3f3f``,
the default base. The base is exported with ``git archive`` into a temporary folder and laid out as an installed
tocalib (``tocalib/`` with ``models/`` and ``reproductions/`` linked in as ``tocalib.models`` and
``tocalib.reproductions``); this checkout is laid out the same way. Three sides run each configuration, every one
in a fresh Python process (``--child``) that builds the model (seed 0), takes one warm-up step and times
``--steps`` more:

* the base revision, as it ran (glibc's allocator defaults);
* this checkout with glibc's defaults;
* this checkout as its training runs it (``RunConfig.retain_cpu_memory``: :func:`tocalib.allocator.tune_cpu_allocator`
  first).

The sides take turns in every round, so a slow spell of a shared machine hits all of them alike; each side's
time is the median over all its steps, its memory the largest peak RSS of its processes. Writes ``revisions.md``
and ``revisions.json`` to ``--out`` and prints the speed-ups with the 1.3× target.
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
from pathlib import Path

from benchmarks.common import Target

REPO = Path(__file__).resolve().parent.parent
BASE = "feb3f3f"
"""The commit at which the CPU-speed issue was filed (its measurements are of this code)."""

CONFIGS = (("pacavit_tiny_p2cconv_100_0", 8, 224), ("pacavit_small_p2cconv_100_0", 2, 512))
QUICK_CONFIGS = (("pacavit_tiny_p2cconv_100_0", 1, 64),)
SIDES = ("base", "this checkout, glibc default", "this checkout, heap kept")
GOAL = 1.3


def installed_layout(tree: Path, into: Path) -> Path:
    """A folder to put first on ``sys.path`` that imports ``tree``'s code as the installed package would:
    ``tocalib`` holds links to ``tree/tocalib``'s entries and to ``tree/models`` and ``tree/reproductions`` (the
    ``package-dir`` mapping of pyproject.toml)."""
    package = into / "tocalib"
    package.mkdir(parents=True)
    for entry in (tree / "tocalib").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name in ("models", "reproductions"):
        (package / name).symlink_to(tree / name)
    return into


def export(revision: str, into: Path) -> Path:
    """The files of git ``revision`` of this repository, written under ``into``."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", revision], capture_output=True, check=True
        ).stdout
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"git cannot export revision {revision!r}: {err.stderr.decode().strip()}") from err
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def child(layout: Path, model_name: str, batch: int, side: int, steps: int, threads: int, retain: bool) -> None:
    """Time ``steps`` training steps of the tocalib found in ``layout`` (after one warm-up step); print JSON."""
    sys.path.insert(0, str(layout))
    import torch

    import tocalib
    from tocalib.models import create_model

    expected = (layout / "tocalib" / "__init__.py").resolve()
    if Path(tocalib.__file__).resolve() != expected:
        raise SystemExit(f"imported tocalib from {tocalib.__file__}, not from the layout {layout}")
    if retain:
        from tocalib.allocator import tune_cpu_allocator

        tune_cpu_allocator()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    features = side > 224
    model = create_model(model_name, features_only=features).train()
    images = torch.randn(batch, 3, side, side)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(images)
        (sum(o.float().mean() for o in out) if features else out.float().mean()).backward()

    step()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    print(json.dumps({"seconds": seconds, "peak_rss": peak}))


def run_side(layout: Path, config: tuple[str, int, int], steps: int, threads: int, retain: bool) -> dict:
    model_name, batch, side = config
    command = [sys.executable, "-m", "benchmarks.revisions", "--child", str(layout), model_name, str(batch), str(side)]
    command += ["--steps", str(steps), "--threads", str(threads)] + (["--retain"] if retain else [])
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the measurement of {layout} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def measure(base: Path, here: Path, configs: tuple, rounds: int, steps: int, threads: int) -> list[dict]:
    """Per configuration: each side's median step seconds and peak RSS over ``rounds`` turns."""
    sides = {SIDES[0]: (base, False), SIDES[1]: (here, False), SIDES[2]: (here, True)}
    rows = []
    for config in configs:
        samples: dict[str, list[float]] = {name: [] for name in sides}
        peaks = dict.fromkeys(sides, 0)
        for _ in range(rounds):
            for name, (layout, retain) in sides.items():
                result = run_side(layout, config, steps, threads, retain)
                samples[name] += result["seconds"]
                peaks[name] = max(peaks[name], result["peak_rss"])
        model_name, batch, side = config
        seconds = {name: statistics.median(values) for name, values in samples.items()}
        rows.append({"model": model_name, "input": f"{batch}x3x{side}x{side}", "seconds": seconds, "peak_rss": peaks})
    return rows


def targets(rows: list[dict], applies: bool) -> list[Target]:
    result = []
    for row in rows:
        base = row["seconds"][SIDES[0]]
        for name in SIDES[1:]:
            speedup = base / row["seconds"][name] if applies else None
            result.append(Target(f"{row['model']} training step at {row['input']}: {name} over base", speedup, GOAL))
    return result


def markdown(rows: list[dict], goals: list[Target], header: dict) -> str:
    lines = [
        "# Training step: this checkout against an earlier revision",
        "",
        ", ".join(f"{k}: {v}" for k, v in header.items()),
    ]
    lines += ["", "| target | measured | threshold | verdict |", "|---|---|---|---|"]
    lines += [
        f"| {g.name} | {'—' if g.value is None else f'{g.value:.3g}'} | ≥ {g.threshold:g} | {g.verdict} |"
        for g in goals
    ]
    lines += ["", "| model | input | side | ms per step (median) | peak RSS MiB |", "|---|---|---|---|---|"]
    for row in rows:
        for name in SIDES:
            shown = f"{row['seconds'][name] * 1e3:.4g} | {row['peak_rss'][name] / 2**20:.0f}"
            lines.append(f"| {row['model']} | {row['input']} | {name} | {shown} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Target]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE, help="the git revision to compare with (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of every side per configuration")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every process")
    parser.add_argument("--quick", action="store_true", help="one tiny configuration: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("outputs/revisions"), help="output folder")
    parser.add_argument("--child", nargs=4, metavar=("LAYOUT", "MODEL", "BATCH", "SIDE"), help=argparse.SUPPRESS)
    parser.add_argument("--retain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        layout, model_name, batch, side = args.child
        child(Path(layout), model_name, int(batch), int(side), args.steps, args.threads, args.retain)
        return []
    for name in ("rounds", "steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    header = {"base": args.base, "threads": args.threads, "rounds": args.rounds, "steps per process": args.steps}
    header["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        base = installed_layout(export(args.base, Path(tmp) / "tree"), Path(tmp) / "base")
        here = installed_layout(REPO, Path(tmp) / "here")
        rows = measure(base, here, configs, args.rounds, args.steps, args.threads)
    goals = targets(rows, applies=not args.quick)
    report = markdown(rows, goals, header)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "revisions.md").write_text(report)
    payload = {"header": header, "rows": rows, "targets": [vars(g) for g in goals]}
    (args.out / "revisions.json").write_text(json.dumps(payload, indent=1))
    print(report)
    return goals


if __name__ == "__main__":
    main()
