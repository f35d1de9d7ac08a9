"""MkDocs hooks: pages generated from the repository's data at build time (nothing generated is committed).

* ``generated/tables.md``: the reproduced tables from ``reproductions/tables/*.toml`` (reported numbers, the
  official code's counts where a README erratum is recorded, and the errata's explanations);
* ``generated/benchmarks.md``: the committed benchmark reports of ``benchmarks/results/`` with their plots;
* ``outputs/docs_api/tocalib``: the installed package layout for the API reference (the core's files, with
  ``models/`` and ``reproductions/`` linked in as ``tocalib.models`` and ``tocalib.reproductions``, as the wheel
  installs them), which mkdocstrings reads.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import tomllib

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "generated"


API_TREE = ROOT / "outputs" / "docs_api"


def on_pre_build(config: Any) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / "tables.md").write_text(_tables())
    (OUT / "benchmarks.md").write_text(_benchmarks())


def _package_tree() -> None:
    package = API_TREE / "tocalib"
    shutil.rmtree(API_TREE, ignore_errors=True)
    package.mkdir(parents=True)
    for source in (ROOT / "tocalib").glob("*.py"):
        (package / source.name).symlink_to(source)
    for folder in ("models", "reproductions"):
        (package / folder).symlink_to(ROOT / folder, target_is_directory=True)


def _tables() -> str:
    lines = [
        "# Reproduced tables",
        "",
        "The paper's tables as data (`reproductions/tables/*.toml`); `tocalib-reproduce tableN` rebuilds every row",
        "and compares it with these numbers.",
    ]
    for path in sorted((ROOT / "reproductions" / "tables").glob("*.toml")):
        table = tomllib.loads(path.read_text())
        lines += ["", f"## {table['id']}: {table['title']}", "", f"Source: {table['source']}."]
        for section in table["sections"]:
            metrics = section.get("metrics", [])
            lines += ["", f"### {section['title']}", ""]
            lines.append("| row | model | params (M) | FLOPs (G) | " + " | ".join(metrics) + " |")
            lines.append("|---|---|---:|---:|" + "---:|" * len(metrics))
            errata = []
            for row in section["rows"]:
                values = [row.get("metrics", {}).get(m, "–") for m in metrics]
                marks = "".join(f" ({k} erratum)" for k in row.get("errata", {}))
                lines.append(
                    f"| {row['label']}{marks} | `{row['model']}` | {row.get('params_m', '–')} | "
                    f"{row.get('flops_g', '–')} | " + " | ".join(values) + " |"
                )
                errata += [f"- **{row['label']}**, {k}: {text}" for k, text in row.get("errata", {}).items()]
            if errata:
                lines += ["", "Errata of the official README:", "", *errata]
    return "\n".join(lines) + "\n"


def _benchmarks() -> str:
    results = ROOT / "benchmarks" / "results"
    lines = ["# Benchmarks", "", "The committed CPU measurements (`nox -s bench`, `nox -s bench_causal`)."]
    for report in sorted(results.glob("*.md")):
        lines += ["", re.sub(r"^#", "##", report.read_text(), flags=re.M)]  # one level below this page's title
    for picture in sorted(results.glob("*.png")):
        shutil.copyfile(picture, OUT / picture.name)
        lines += ["", f"![{picture.stem}]({picture.name})"]
    return "\n".join(lines) + "\n"


_package_tree()  # on import: mkdocstrings settles its search paths when the configuration loads, before any event
