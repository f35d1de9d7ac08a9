"""The README's Python examples run exactly as written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.filterwarnings(  # PyTorch's own, when nn.TransformerEncoder packs a padded batch in evaluation
    r"ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning"
)
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out.splitlines()
    expected = re.findall(r"^print\(.*\)[ \t]+# (.*)$", BLOCKS[index], flags=re.M)
    assert printed == expected


RUN_BLOCKS = """
import json, re, sys, pathlib
import tocalib, tocalib.models
blocks = json.loads(sys.argv[1])
for installed in (tocalib, tocalib.models):
    assert pathlib.Path(sys.prefix) in pathlib.Path(installed.__file__).parents, installed.__file__
for index, block in enumerate(blocks):
    exec(compile(block, f"README.md[python block {index}]", "exec"), {"__name__": "readme_example"})
"""


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning")
def test_the_wheel_installs_in_a_fresh_venv_and_runs_the_readme_outside_the_repository(tmp_path):
    source, wheels, venv, elsewhere = (tmp_path / name for name in ("source", "wheels", "venv", "elsewhere"))
    elsewhere.mkdir()
    # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    skip = shutil.ignore_patterns(".git", ".venv", ".ci-venv", ".nox", "build", "outputs", "*.egg-info", "__pycache__")
    shutil.copytree(README.parent, source, ignore=skip)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(source)], check=True)
    (wheel,) = wheels.glob("tocalib-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], check=True)
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    # torch and the optional libraries come from this environment's site-packages, after the wheel's own files
    (Path(purelib) / "dependencies.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")))
    run = subprocess.run(
        [python, "-c", RUN_BLOCKS, json.dumps(BLOCKS)], cwd=elsewhere, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for script in ("tocalib-reproduce", "tocalib-train-classification", "tocalib-train-segmentation", "tocalib-viz"):
        usage = subprocess.run([venv / "bin" / script, "--help"], cwd=elsewhere, capture_output=True, text=True)
        assert usage.returncode == 0 and "usage:" in usage.stdout, (script, usage.stderr[-2000:])
