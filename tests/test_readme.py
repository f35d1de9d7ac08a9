"""The README's Python examples run exactly as written."""

from __future__ import annotations

import re
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
