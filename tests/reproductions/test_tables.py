"""The paper's tables as data: the files parse, every row builds, params match (on the meta device), and the
status rules cannot let an erratum hide a change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tocalib.models import list_models
from tocalib.reproductions.counting import num_params
from tocalib.reproductions.report import check
from tocalib.reproductions.tables import Number, TableFormatError, load_table, table_names
from tocalib.reproductions.tasks import get_task

ALL_ROWS = [(name, section, row) for name in table_names() for section, row in load_table(name).rows]
IDS = [f"{name}-{section.id}-{row.model}-{row.head or ''}" for name, section, row in ALL_ROWS]


def test_every_table_loads_with_the_project_numbering() -> None:
    tasks = {name: [s.task for s in load_table(name).sections] for name in table_names()}
    assert tasks == {
        "table1": ["classification"],
        "table2": ["detection"],
        "table3": ["segmentation"],
        "table4": ["classification", "detection", "segmentation"],
    }
    assert [len(load_table(name).rows) for name in table_names()] == [6, 6, 9, 18]


@pytest.mark.parametrize(("name", "section", "row"), ALL_ROWS, ids=IDS)
def test_row_names_a_registered_model_and_a_checkpoint_file(name: str, section, row) -> None:
    assert row.model in list_models()
    assert row.checkpoint.endswith(".pth")
    assert set(row.metrics) == set(section.metrics)
    for field in ("params", "flops"):
        if field in row.errata:
            assert getattr(row, f"official_{field}_{'m' if field == 'params' else 'g'}") is not None


def test_checkpoint_names_are_unique_within_a_section() -> None:
    for name in table_names():
        for section in load_table(name).sections:
            names = [row.checkpoint for row in section.rows]
            assert len(names) == len(set(names)), (name, section.id)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "section", "row"), ALL_ROWS, ids=IDS)
def test_reported_params_within_rounding_or_recorded_erratum(name: str, section, row) -> None:
    """Parameter shapes only (meta device): every row's params are within the README's rounding, or the row
    records an erratum and matches the official code's count."""
    with torch.device("meta"):
        model = get_task(section.task).build(row)
    result = check(
        num_params(model) / 1e6, row.params_m, row.params_m.half_unit, row.errata.get("params"), row.official_params_m
    )
    assert result.status == ("erratum" if "params" in row.errata else "ok"), (result, row.errata.get("params"))


def test_numbers_keep_their_printed_precision() -> None:
    assert Number("252").half_unit == 0.5
    assert Number("83.08").half_unit == pytest.approx(0.005)
    assert Number("9.5").value == 9.5


def test_flops_allowance_is_rounding_for_imagenet_and_one_percent_for_dense_tasks() -> None:
    imagenet = load_table("table1").sections[0]
    coco = load_table("table2").sections[0]
    assert imagenet.flops_allowance(Number("3.2")) == pytest.approx(0.05)
    assert coco.flops_allowance(Number("252")) == pytest.approx(2.52)


def test_status_rules() -> None:
    """ok within tolerance; MISS outside; an erratum is flagged only if the official count agrees, and an
    erratum whose README number is met after all is STALE (failing)."""
    reported, official = Number("46.7"), Number("47.659192")
    assert check(46.72, reported, 0.05, None, None).status == "ok"
    assert check(46.80, reported, 0.05, None, None).status == "MISS"
    assert check(47.659192, reported, 0.05, "why", official).status == "erratum"
    assert check(47.70, reported, 0.05, "why", official).status == "MISS"
    assert check(46.70, reported, 0.05, "why", official).status == "STALE"


def test_malformed_tables_fail_with_the_file_and_entry(tmp_path: Path) -> None:
    text = (Path(__file__).parents[2] / "reproductions" / "tables" / "table1.toml").read_text(encoding="utf-8")
    (tmp_path / "table1.toml").write_text(text.replace('params_m = "12.2"', "params_m = 12.2"), encoding="utf-8")
    with pytest.raises(TableFormatError, match=r"table1.toml.sections\[0\].rows\[0\].params_m"):
        load_table("table1", tmp_path)
    (tmp_path / "table1.toml").write_text(text.replace('errata.params = """', 'errata.acc = """'), encoding="utf-8")
    with pytest.raises(TableFormatError, match="errata may concern"):
        load_table("table1", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"tables in .*: table1$"):
        load_table("table9", tmp_path)


def test_errata_rows_are_data() -> None:
    """The known README errata (where PaCaViT@4307018's README disagrees with its released configs) are in the
    tables, each with an explanation."""
    errata = {
        (name, section.id, row.model, field)
        for name, section, row in ALL_ROWS
        for field, text in row.errata.items()
        if text.strip()
    }
    assert ("table1", "imagenet", "pacavit_convmixer_base_100", "params") in errata
    assert ("table2", "coco", "pacavit_convmixer_base_100", "params") in errata
    assert ("table4", "imagenet_ablation", "pacavit_small_p2cconv_49_0", "flops") in errata
    assert ("table4", "coco_ablation", "pacavit_small_p2cconv_2_0", "params") in errata
    assert ("table4", "ade20k_ablation", "pacavit_small_p2cconv_100_49", "params") in errata
