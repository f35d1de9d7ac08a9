"""benchmarks/revisions.py: an earlier revision's code is imported from its own files, laid out as installed, and
its training step is timed beside this checkout's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import revisions

REPO = Path(__file__).resolve().parent.parent


def test_the_layout_imports_the_trees_own_package_and_its_models(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    mapping = '"tocalib" = "tocalib"\n"tocalib.models" = "models"\n"tocalib.reproductions" = "reproductions"\n'
    (tree / "pyproject.toml").write_text("[tool.setuptools.package-dir]\n" + mapping)
    for folder, marker in (("tocalib", "package"), ("models", "models"), ("reproductions", "reproductions")):
        (tree / folder).mkdir(parents=True)
        (tree / folder / "__init__.py").write_text(f"WHERE = {marker!r}\n")
    layout = revisions.installed_layout(tree, tmp_path / "layout")
    code = "import tocalib, tocalib.models, tocalib.reproductions as r; print(tocalib.WHERE, tocalib.models.WHERE, "
    code += "r.WHERE, tocalib.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(layout)},
        capture_output=True,
        text=True,
        check=True,
    )
    where, models, reproductions, path = out.stdout.split()
    assert (where, models, reproductions) == ("package", "models", "reproductions") and Path(
        path
    ).resolve() == tree / "tocalib" / "__init__.py"


def test_a_revision_git_does_not_know_is_named(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="git cannot export revision 'no-such-revision'"):
        revisions.export("no-such-revision", tmp_path)


@pytest.mark.skipif(not (REPO / ".git").exists() or shutil.which("git") is None, reason="needs git and a clone")
def test_quick_run_times_every_side_of_head(tmp_path: Path) -> None:
    goals = revisions.main(["--quick", "--base", "HEAD", "--rounds", "1", "--steps", "1", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "revisions.json").read_text())
    (row,) = payload["rows"]
    assert set(row["seconds"]) == {*revisions.VARIANTS, *revisions.FLOORS} and all(
        t > 0 for t in row["seconds"].values()
    )
    kernels, with_math = (row["seconds"][name] for name in revisions.FLOORS)
    assert kernels < with_math < row["seconds"]["this checkout, heap kept"]  # the floors leave out the rest of a step
    assert set(row["peak_rss"]) == set(revisions.VARIANTS) and all(peak > 2**20 for peak in row["peak_rss"].values())
    assert [g.verdict for g in goals] == ["N/A"] * 4  # the quick sizes are not the goal's
    assert payload["header"]["order"] == "unbalanced (rounds not a multiple of 4)"  # one round: the base went first
    assert payload["header"]["wall_s"] >= int(sum(row["seconds"][name] for name in revisions.VARIANTS))
    report = (tmp_path / "revisions.md").read_text()
    assert "| pacavit_tiny_p2cconv_100_0 | 1x3x64x64 | base |" in report
    assert "| pacavit_tiny_p2cconv_100_0 | 1x3x64x64 | this checkout's kernel+math floor |" in report


def test_a_layout_that_is_not_tocalibs_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools.package-dir]\n"other" = "src"\n')
    with pytest.raises(SystemExit, match="a package-dir other than tocalib and its subpackages"):
        revisions.installed_layout(tmp_path, tmp_path / "layout")
