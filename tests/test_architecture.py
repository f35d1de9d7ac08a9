"""The house rules on imports: reproductions → models → tocalib, the evaluation and the training never import each
other, every package folder is in the wheel, and a light `import tocalib`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder → the installed packages its code may not import (models/ installs as tocalib.models, reproductions/ as
# tocalib.reproductions; the bare names are not importable once installed, so nothing may use them)
FORBIDDEN = {
    "tocalib": {"tocalib.models", "tocalib.reproductions", "models", "reproductions"},
    "models": {"tocalib.reproductions", "models", "reproductions"},
    "reproductions": {"models", "reproductions"},
    # the evaluation and the training both read tocalib.reproductions.data and .metrics, never each other, nor the
    # task registry or the runner (which import the evaluation)
    "reproductions/eval": {
        "tocalib.reproductions.train",
        "tocalib.reproductions.tasks",
        "tocalib.reproductions.reproduce",
    },
    "reproductions/train": {
        "tocalib.reproductions.eval",
        "tocalib.reproductions.tasks",
        "tocalib.reproductions.reproduce",
    },
    "reproductions/data": {"tocalib.reproductions.eval", "tocalib.reproductions.train", "tocalib.reproductions.tasks"},
    "tests": {"models", "reproductions"},
    "benchmarks": {"models", "reproductions"},
    "examples": {"models", "reproductions"},
}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, and ``module.name`` for each name of a ``from module import name`` (which may
    be a submodule); a relative import counts as the bare names it reaches, which no rule allows."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_relative_imports_are_not_used():
    """Imports name the installed packages, so that the rules below read them."""
    relative = [str(p.relative_to(ROOT)) for folder in FORBIDDEN for p in (ROOT / folder).rglob("*.py")
                if any(m.startswith(".") for m in imported_modules(p))]  # fmt: skip
    assert relative == []


def _within(module: str, packages: set[str]) -> list[str]:
    return [p for p in packages if module == p or module.startswith(p + ".")]


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_run_one_way_only(folder):
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if _within(m, FORBIDDEN[folder]))
        for path in (ROOT / folder).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_tocalib_loads_no_optional_library():
    heavy = "{'fvcore', 'PIL', 'torch_scatter', 'tocalib.models', 'tocalib.reproductions'}"
    code = f"import sys, tocalib; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_package_folder_is_in_the_wheel():
    """pyproject.toml lists the packages by name: a new folder with an ``__init__.py`` must be listed there."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {install: ROOT / folder for install, folder in setuptools["package-dir"].items()}
    found = set()
    for install, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            found.add(".".join([install, *init.parent.relative_to(folder).parts]))
    assert found == set(setuptools["packages"])
