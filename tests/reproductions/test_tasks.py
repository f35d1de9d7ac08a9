"""The task registry: a table or a row is data only, a new kind of task is one registered class, and the three
paper tasks build, count and name their data layout through it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch import nn

from tocalib.flops import mac_analysis
from tocalib.models import create_model
from tocalib.reproductions.counting import num_params
from tocalib.reproductions.reproduce import main
from tocalib.reproductions.tables import TableFormatError, load_table, table_names
from tocalib.reproductions.tasks import (
    TASKS,
    ImageNetTask,
    Task,
    check_eval_inputs,
    get_task,
    register_task,
)

TINY = "pacavit_tiny_p2cconv_100_0"


def _table(task: str, params_m: str, flops_g: str, resolution: tuple[int, int] = (64, 64)) -> str:
    return f"""
id = "mine"
title = "A table of my own"
source = "this test"

[[sections]]
id = "small"
title = "PaCa-Tiny at {resolution[0]}×{resolution[1]}"
task = "{task}"
resolution = [{resolution[0]}, {resolution[1]}]
flops_tolerance = "rounding"
metrics = ["top1"]
data = "val"
source = "this test"

  [[sections.rows]]
  label = "PaCa-Tiny"
  model = "{TINY}"
  params_m = "{params_m}"
  flops_g = "{flops_g}"
  metrics = {{ top1 = "50.0" }}
  checkpoint = "tiny.pth"
"""


def _reference(model: nn.Module, resolution: tuple[int, int]) -> tuple[str, str]:
    """Params (M) and MACs (G) of ``model`` counted here, independently of the runner, at 3 decimals."""
    import torch

    with torch.no_grad():
        macs = mac_analysis(model.eval(), torch.ones(1, 3, *resolution)).total()
    return f"{num_params(model) / 1e6:.3f}", f"{macs / 1e9:.3f}"


def _reproduce_row(folder: Path, task: str, params: str, flops: str, workers: int) -> dict:
    """Write ``folder/mine.toml`` (one PaCa-Tiny row of ``task`` reporting ``params``/``flops``), reproduce it
    with the command line and return the row's JSON record; the run must exit 0."""
    (folder / "mine.toml").write_text(_table(task, params, flops), encoding="utf-8")
    out = folder / "out"
    assert main(["mine", "--tables-dir", str(folder), "--out", str(out), "--workers", str(workers)]) == 0
    (record,) = json.loads((out / "mine.json").read_text(encoding="utf-8"))["rows"]
    return record


def test_a_new_table_is_a_file(tmp_path: Path) -> None:
    """A table file in a folder of one's own reproduces with no code change (--tables-dir)."""
    params, flops = _reference(create_model(TINY), (64, 64))
    record = _reproduce_row(tmp_path, "classification", params, flops, workers=1)
    assert (record["params_status"], record["flops_status"]) == ("ok", "ok")
    assert f"{record['params_reproduced'] / 1e6:.3f}" == params


@pytest.fixture
def registry() -> Iterator[dict[str, Task]]:
    """The task registry, restored after the test."""
    saved = dict(TASKS)
    yield TASKS
    TASKS.clear()
    TASKS.update(saved)


def test_a_new_kind_of_task_is_one_registered_class(tmp_path: Path, registry: dict[str, Task]) -> None:
    """A 10-way fine-tuning task (the classifier rebuilt with 10 outputs), registered once, serves a table."""

    class TenWay(ImageNetTask):
        name = "ten_way"

        def build(self, row):
            return self.backbone(row, num_classes=10).eval()

    register_task(TenWay())
    params, flops = _reference(create_model(TINY, num_classes=10), (64, 64))
    assert params != _reference(create_model(TINY), (64, 64))[0]  # the head differs, so the count must too
    record = _reproduce_row(tmp_path, "ten_way", params, flops, workers=1)
    assert (record["params_status"], record["flops_status"]) == ("ok", "ok")
    with pytest.raises(SystemExit, match=r"'ten_way' .*cannot be sent to worker processes .* workers=1"):
        _reproduce_row(tmp_path, "ten_way", params, flops, workers=2)


def test_worker_processes_receive_the_registered_tasks(tmp_path: Path, registry: dict[str, Task]) -> None:
    """A task registered here (an importable class under a new name) is counted by spawned workers too."""
    again = ImageNetTask()
    again.name = "classification_again"
    register_task(again)
    params, flops = _reference(create_model(TINY), (64, 64))
    record = _reproduce_row(tmp_path, "classification_again", params, flops, workers=2)
    assert (record["params_status"], record["flops_status"]) == ("ok", "ok")


def test_an_unknown_task_or_table_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "mine.toml").write_text(_table("retrieval", "1.0", "1.0"), encoding="utf-8")
    with pytest.raises(
        TableFormatError, match=r"mine.toml.sections\[0\]: unknown task 'retrieval'; registered tasks: "
    ):
        load_table("mine", tmp_path)
    with pytest.raises(SystemExit, match=r"no table table9 in .*; tables there: mine, all"):
        main(["table9", "--tables-dir", str(tmp_path), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--tables-dir .*nowhere is not a folder"):
        main(["mine", "--tables-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="'classification' is already registered"):
        register_task(ImageNetTask())


def test_tables_are_discovered_in_natural_order(tmp_path: Path) -> None:
    for name in ("table10", "table2", "ablation", "table1"):
        (tmp_path / f"{name}.toml").write_text("", encoding="utf-8")
    assert table_names(tmp_path) == ["ablation", "table1", "table2", "table10"]
    assert table_names() == ["table1", "table2", "table3", "table4"]


@pytest.mark.parametrize("name", ["classification", "detection", "segmentation"])
def test_every_paper_task_is_registered_with_its_data_layout(name: str, tmp_path: Path) -> None:
    task = get_task(name)
    assert isinstance(task, Task) and task.name == name
    section, row = next(pair for table in table_names() for pair in load_table(table).rows if pair[0].task == name)
    with pytest.raises(FileNotFoundError) as error:
        check_eval_inputs([(section, row)], tmp_path, tmp_path)
    assert f"missing dataset folder {tmp_path / section.data}: expected {task.data_layout}" in str(error.value)


def test_only_detection_shares_parts_between_rows() -> None:
    paper = ("classification", "detection", "segmentation")  # README examples may register more
    assert {name: get_task(name).shared_parts for name in paper} == {
        "classification": (),
        "detection": ("rpn_head", "bbox_head", "mask_head"),
        "segmentation": (),
    }
    with pytest.raises(NotImplementedError, match="the classification task has no shared parts"):
        get_task("classification").count_shared(load_table("table1").rows[0][1], (224, 224))
