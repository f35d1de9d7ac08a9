"""Developer sessions. Every install goes through constraints.txt (torch==2.13.0, CPU build)."""

import json
import re
import shutil
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests", "tests_scatter", "docs"]

CONSTRAINTS = ("-c", "constraints.txt")


def install(session: nox.Session, extras: str = "test,flops,viz,export,sequence,eval,train") -> None:
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (not `slow`, not `scatter`) with every optional dependency but torch-scatter; tests of
    optional dependencies may not skip here."""
    install(session)
    required = {"TOCALIB_REQUIRE_OPTIONAL": "1"}
    session.run("pytest", "-q", "-m", "not slow and not scatter", *session.posargs, env=required)


@nox.session
def tests_scatter(session: nox.Session) -> None:
    """The torch-scatter backend's parity tests (marked `scatter`). torch-scatter ships as source only and
    builds against the installed torch, which takes minutes on a fresh machine: hence a session of its own."""
    install(session)
    session.install(*CONSTRAINTS, "--no-build-isolation", "torch-scatter")
    session.run("pytest", "-q", "-m", "scatter", *session.posargs, env={"TOCALIB_REQUIRE_OPTIONAL": "1"})


@nox.session
def tests_slow(session: nox.Session) -> None:
    """Only the tests marked slow (reproductions, long property runs)."""
    install(session)
    session.run("pytest", "-q", "-m", "slow", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (MkDocs + mkdocstrings): the API reference from the docstrings, the clustering guide,
    the reproduced tables with their errata and the benchmark plots, built with --strict (any warning fails) into
    outputs/docs. Reads the sources only: torch is not installed."""
    session.install(*CONSTRAINTS, "mkdocs>=1.6", "mkdocstrings[python]>=0.26")
    session.run("mkdocs", "build", "--strict")


@nox.session
def lint(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TORCHRUN = ("python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


# The backbones of the smoke runs, each at about 1.3 M parameters: the presets' PaCa-ViT (dims 32/64/128/192), and
# PVTv2 and Swin of the same widths and depths (PVTv2's spatial reductions 4, 2, 1, 1 fit 28×28 inputs).
SMOKE_BACKBONES = {
    "paca": None,
    "pvt": ("pvt_v2_b0", {"embed_dims": [32, 64, 128, 192], "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 6],
                          "mlp_ratios": [4, 4, 4, 4], "sr_ratios": [4, 2, 1, 1]}),
    "swin": ("swin_tiny_patch4_window7_224", {"embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8]}),
}  # fmt: skip


@nox.session
def train_smoke(session: nox.Session) -> None:
    """Real small training runs on CPU with torchrun and 2 processes (gloo), not part of the tests, for each backbone
    of SMOKE_BACKBONES (PaCa-ViT, PVTv2, Swin; `-- paca` runs one): the backbone with a classifier on Fashion-MNIST
    (Debian's dataset-fashion-mnist, installed here with apt-get when missing; ≈ 14 min on 2 cores), then with the
    PaCa segmentation head on scikit-image texture label maps (≈ 6 min), same recipe and budget for all. Writes
    outputs/train_smoke/<backbone>/{fashion_mnist,textures}/ (log.txt, metrics.jsonl, checkpoints) and
    summary.{md,json}."""
    install(session, "train")
    if not FASHION_MNIST.is_dir():
        session.run("apt-get", "install", "-y", "dataset-fashion-mnist", external=True)
    out = Path("outputs/train_smoke")
    shutil.rmtree(out, ignore_errors=True)
    runs = []
    for name in session.posargs or SMOKE_BACKBONES:
        for entry, preset in (("classification", "fashion_mnist"), ("segmentation", "textures")):
            runs.append(out / name / preset)
            session.run(*TORCHRUN, *smoke_command(name, entry, preset, runs[-1]))
    session.run(
        "python", "-m", "tocalib.reproductions.train.summary", *map(str, runs), "--out", str(out / "summary.md")
    )


def smoke_command(backbone: str, entry: str, preset: str, out: Path) -> list[str]:
    """The training command line of one smoke run: the preset, on the SMOKE_BACKBONES entry ``backbone``."""
    command = ["-m", f"tocalib.reproductions.train.{entry}", "--preset", preset, "--device", "cpu", "--out", str(out)]
    if SMOKE_BACKBONES[backbone] is not None:
        model, kwargs = SMOKE_BACKBONES[backbone]
        kwargs = {**kwargs, "in_chans": 1} if entry == "classification" else kwargs
        option = "--model" if entry == "classification" else "--backbone"
        command += [option, model, f"{option}-kwargs", json.dumps(kwargs)]
    return command


BENCH_PEERS = ("nystrom-attention", "perceiver-pytorch", "isab-pytorch", "linformer")
TIMM_DEPENDENCIES = ("pyyaml", "safetensors", "huggingface_hub", "pillow")  # timm's, but torchvision


@nox.session
def bench(session: nox.Session) -> None:
    """CPU benchmarks: the speed goals (the ToCa layer against full SDPA at 1 and 2 threads, PaCa-ViT against
    timm's own PVTv2-b2 and Swin-T, training throughput), ToCa against full attention and PyPI peers, PaCa-ViT
    against PVTv2 and Swin, the roof, profiles; last, the layer goals and training steps again with freed memory
    kept in glibc's heap (``tocalib.allocator``).

    Writes outputs/bench/{bench.md,bench.json,*.png} in about 12 minutes on 2 cores (the install aside); options
    after ``--`` (e.g. ``nox -s bench -- --quick`` or ``-- --parts goals``). The peers and timm are installed here
    only; timm without its torchvision dependency (no wheel matches this CPU torch), whose import-time names come
    from the stand-in ``benchmarks/torchvision_standin``, importable in this session only.
    """
    session.install(*CONSTRAINTS, "-e", ".[test,flops,viz]", *BENCH_PEERS, *TIMM_DEPENDENCIES, "matplotlib", "tqdm")
    session.install(*CONSTRAINTS, "--no-deps", "timm")
    standin = str(Path(__file__).parent / "benchmarks" / "torchvision_standin")
    session.run("python", "-m", "benchmarks.bench", *session.posargs, env={"PYTHONPATH": standin})


@nox.session
def bench_revisions(session: nox.Session) -> None:
    """The training step of PaCa-Tiny (8×224²) and PaCa-Small (2×512²) in this checkout against an earlier git
    revision (default: feb3f3f, where the CPU-speed issue was filed), each side in its own processes, taking turns;
    this checkout with glibc's defaults and with freed memory kept (as its training runs), and this checkout's
    floors. About 11 minutes on 2 cores (4 rounds); writes outputs/revisions/{revisions.md,revisions.json};
    options after ``--`` (e.g. ``-- --base HEAD~3``)."""
    session.install(*CONSTRAINTS, "-e", ".")
    session.run("python", "-m", "benchmarks.revisions", *session.posargs)


@nox.session
def bench_causal(session: nox.Session) -> None:
    """Causal ToCa against SDPA is_causal=True (C=512, 8 heads, M=64, B=1, fp32): training and inference time
    at N = 1k … 64k, decoding latency and state size; ≈ 12 min on 2 cores. Writes outputs/bench_causal/
    {causal.md,causal.json,causal_seconds.png}; options after `--` (e.g. `-- --threads 1`)."""
    session.install(*CONSTRAINTS, "-e", ".", "matplotlib")
    session.run("python", "-m", "benchmarks.causal", *session.posargs)


@nox.session
def demo_lm(session: nox.Session) -> None:
    """A character-level language model of the King James Bible (Debian's bible-kjv, installed here with apt-get
    when missing), causal ToCa against full causal attention with the same code, seed, batches and steps;
    ≈ 20 min on 2 cores, not a default session. Writes outputs/lm_demo/{results.md,results.json,samples.txt,
    assignments.png}. Options after `--` go to the demo, e.g. `nox -s demo_lm -- --steps 50`."""
    install(session, "test")
    session.install(*CONSTRAINTS, "matplotlib")
    if shutil.which("bible") is None:
        session.run("apt-get", "install", "-y", "bible-kjv", external=True)
    session.run("python", "examples/lm_demo.py", *session.posargs)


@nox.session
def demo_sequence(session: nox.Session) -> None:
    """ToCa (clustering in every block, in block 1 only, or from a Conv1dTeacher) vs full attention forecasting
    weekly Mauna Loa CO2 (data ships in statsmodels); CPU, about 4 min on the shared 2-core machine; not a default
    session. Writes outputs/sequence_demo/{results.md,results.json,
    assignments.png}. Options after `--` go to the demo, e.g. `nox -s demo_sequence -- --steps 50`."""
    install(session, "test,flops,viz,sequence")
    session.run("python", "examples/sequence_demo.py", *session.posargs)


def _reproduce(session: nox.Session, *tables: str) -> None:
    install(session, "test,flops,viz,eval")
    session.run("python", "-m", "tocalib.reproductions.reproduce", *tables, *session.posargs)


def _table_session(path: Path) -> None:
    """Register ``reproduce_<name>`` for the table file ``reproductions/tables/<name>.toml``."""

    def reproduce(session: nox.Session) -> None:
        _reproduce(session, path.stem)

    reproduce.__doc__ = (
        f"The table of reproductions/tables/{path.name}: params and FLOPs of every row next to the README's; writes "
        f"outputs/reproductions/{path.stem}.{{md,csv,json}}. Options after `--`, e.g. "
        "`-- --rows GLOB` or `-- --checkpoints DIR --data DIR` for accuracy."
    )
    nox.session(name=f"reproduce_{path.stem}")(reproduce)


# One session per table file (adding a table adds its session), in the runner's order (table2 before table10:
# tocalib.reproductions.tables.table_names, which the noxfile cannot import, sorts the same way).
for _path in sorted(
    (Path(__file__).parent / "reproductions" / "tables").glob("*.toml"),
    key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.stem)],
):
    _table_session(_path)


@nox.session
def reproduce_all(session: nox.Session) -> None:
    """Every table in one run (rows of the same architecture counted once); writes
    outputs/reproductions/<table>.{md,csv,json}."""
    _reproduce(session, "all")
