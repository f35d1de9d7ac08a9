"""Developer sessions. Every install goes through constraints.txt (torch==2.13.0, CPU build)."""

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests"]

CONSTRAINTS = ("-c", "constraints.txt")


def install(session: nox.Session, extras: str = "test,flops,viz,export") -> None:
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (`-m 'not slow'`) with every optional dependency, whose tests then may not skip."""
    install(session)
    # torch-scatter ships as source only and must build against the installed torch.
    session.install(*CONSTRAINTS, "--no-build-isolation", "torch-scatter")
    session.run("pytest", "-q", *session.posargs, env={"TOCALIB_REQUIRE_OPTIONAL": "1"})


@nox.session
def tests_slow(session: nox.Session) -> None:
    """Only the tests marked slow (reproductions, long property runs)."""
    install(session)
    session.run("pytest", "-q", "-m", "slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


BENCH_PEERS = ("nystrom-attention", "perceiver-pytorch", "isab-pytorch", "linformer")


@nox.session
def bench(session: nox.Session) -> None:
    """CPU benchmarks: ToCa against full attention and PyPI peers, PaCa-ViT against PVTv2 and Swin.

    Writes outputs/bench/{bench.md,bench.json,*.png} in ≲ 20 minutes on 2 cores; options after ``--``
    (e.g. ``nox -s bench -- --quick`` or ``-- --threads 1``). The peers are installed here only.
    """
    session.install(*CONSTRAINTS, "-e", ".[test,flops,viz]", *BENCH_PEERS, "matplotlib", "tqdm")
    session.run("python", "benchmarks/bench.py", *session.posargs)


@nox.session
def demo_sequence(session: nox.Session) -> None:
    """ToCa vs full attention forecasting weekly Mauna Loa CO2 (data ships in statsmodels); CPU, about 9 min on
    the shared 2-core machine; not a default session. Writes outputs/sequence_demo/{results.md,results.json,
    assignments.png}. Options after `--` go to the demo, e.g. `nox -s demo_sequence -- --steps 50`."""
    session.install(*CONSTRAINTS, "-e", ".[test,flops,viz]", "statsmodels")
    session.run("python", "examples/sequence_demo.py", *session.posargs)
