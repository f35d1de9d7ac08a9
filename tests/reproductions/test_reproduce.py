"""The runner: a fast reproduction of Table 1's PaCa-Tiny row (params + FLOPs) in the default suite, the four
full tables under ``slow``."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tocalib.models.heads.flops import mask_rcnn_macs, segmentor_macs
from tocalib.reproductions.counting import CountingPool
from tocalib.reproductions.report import RowResult
from tocalib.reproductions.reproduce import main, reproduce_table
from tocalib.reproductions.tables import Number, load_table, table_names
from tocalib.reproductions.tasks import get_task, official_fvcore_skips


def test_table1_paca_tiny_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["table1", "--rows", "pacavit_tiny_p2cconv_100_0", "--out", str(tmp_path), "--workers", "1"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "[1/1] table1 imagenet: PaCa-Tiny (conv)" in out and "params 12.201 M, FLOPs 3.237 G" in out
    assert "reported only" in out
    record = json.loads((tmp_path / "table1.json").read_text(encoding="utf-8"))["rows"][0]
    assert record["params_reproduced"] == 12_200_680  # the official code's count (PaCaViT@4307018, models/paca_vit.py)
    assert record["flops_reproduced"] / 1e9 == pytest.approx(3.237, abs=5e-4)
    assert (record["params_status"], record["flops_status"]) == ("ok", "ok")
    assert record["top1_reported"] == 80.9 and record["top1_reproduced"] is None
    with (tmp_path / "table1.csv").open(encoding="utf-8") as f:
        assert next(csv.DictReader(f))["model"] == "pacavit_tiny_p2cconv_100_0"
    assert "| PaCa-Tiny (conv) | 12.2 | 12.201 |" in (tmp_path / "table1.md").read_text(encoding="utf-8")


def test_a_miss_fails_and_an_erratum_on_a_matching_number_is_stale() -> None:
    """The same count against a wrong README number is a MISS; recording that as an erratum without the
    official count agreeing is still a MISS; an erratum on a number that matches is STALE. All fail."""
    table = load_table("table1")
    section, row = table.rows[0]
    with CountingPool(1) as pool:
        (result,) = reproduce_table(table, pool, [(section, row)], log=lambda line: None)
    assert not result.failed
    wrong = dataclasses.replace(row, params_m=Number("12.5"))
    assert RowResult.build(section, wrong, result.count, None).params.status == "MISS"
    unexplained = dataclasses.replace(wrong, errata={"params": "why"}, official_params_m=Number("12.5"))
    assert RowResult.build(section, unexplained, result.count, None).failed
    stale = dataclasses.replace(row, errata={"params": "why"}, official_params_m=Number("12.200680"))
    assert RowResult.build(section, stale, result.count, None).params.status == "STALE"


def test_segmentation_count_is_segmentor_macs() -> None:
    """The runner's segmentation trace (split by module) totals what ``segmentor_macs`` counts."""
    section, row = next((s, r) for s, r in load_table("table3").rows if r.head == "paca")
    with CountingPool(1) as pool:
        (count,) = pool.counts([(section, row)])
    assert count.macs == count.parts["all_ops"] == segmentor_macs(get_task(section.task).build(row), section.resolution)


def test_checkpoints_without_data_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="go together"):
        main(["table1", "--checkpoints", str(tmp_path), "--out", str(tmp_path)])


@pytest.mark.slow
@pytest.mark.parametrize("name", table_names())
def test_full_table_reproduces(name: str, tmp_path: Path) -> None:
    """Every row within tolerance or flagged as a README erratum that the official code's count confirms."""
    assert main([name, "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / f"{name}.json").read_text(encoding="utf-8"))
    assert payload["failed"] == []
    assert len(payload["rows"]) == len(load_table(name).rows)


@pytest.mark.slow
def test_split_detection_count_equals_mask_rcnn_macs() -> None:
    """Backbone + FPN traced per row plus the heads counted once on a stand-in backbone give exactly
    ``mask_rcnn_macs`` of the whole detector (PaCa-Tiny at 1280×800)."""
    section, row = load_table("table2").rows[0]
    with CountingPool(1) as pool:
        (count,) = pool.counts([(section, row)])
    whole = mask_rcnn_macs(get_task(section.task).build(row), section.resolution, convention="paper")
    assert {part: count.parts[part] for part in whole if part != "total"} == {
        k: v for k, v in whole.items() if k != "total"
    }
    assert count.parts["all_ops"] == count.macs == whole["total"]  # no teacher: nothing skipped


def test_official_fvcore_skips_are_the_teacher_depthwise_convs() -> None:
    """The modules left out of the README's FLOPs: each teacher ConvMixer layer's 7×7 depthwise conv (block
    layers and top-down FPN layers), nothing in a model without teacher."""
    section, _ = load_table("table1").rows[0]
    rows = {row.model: row for _, row in load_table("table1").rows}
    with torch.device("meta"):
        teacher = get_task(section.task).build(rows["pacavit_convmixer_small_100"])
        plain = get_task(section.task).build(rows["pacavit_small_p2cconv_100_0"])
    names = official_fvcore_skips(teacher)
    assert len(names) == 2 + 2 + 2 + 2 + 3  # teacher depths 2,2,2,2 plus three FPN layers
    modules = dict(teacher.named_modules())
    for name in names:
        conv = modules[name]
        assert name.startswith("paca_teacher.")
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (7, 7) and conv.groups == conv.in_channels
    assert official_fvcore_skips(plain) == []


def test_a_bad_out_is_refused_before_any_row_is_counted(tmp_path: Path, monkeypatch, capsys) -> None:
    counted = []
    monkeypatch.setattr("tocalib.reproductions.reproduce.reproduce_table", lambda *a, **k: counted.append(a) or [])
    (tmp_path / "file.txt").write_text("x")
    cases = ((tmp_path / "file.txt", "is a file, expected a folder"), (tmp_path / "file.txt" / "sub", "not a writable"))
    for out, message in cases:
        with pytest.raises(SystemExit, match=f"reproduce: error: --out .* {message}"):
            main(["all", "--out", str(out), "--workers", "1"])
    assert not counted


def test_with_all_a_failing_table_is_reported_and_the_others_run(tmp_path: Path, monkeypatch, capsys) -> None:
    ran = []

    def fake(table, *args, **kwargs):
        ran.append(table.id)
        if table.id == "table2":
            raise RuntimeError("a broken row")
        return []

    monkeypatch.setattr("tocalib.reproductions.reproduce.reproduce_table", fake)
    assert main(["all", "--out", str(tmp_path), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert ran == list(table_names()) and "table2 failed: RuntimeError: a broken row; the other tables go on" in out
    assert out.rstrip().endswith("failed: table2")
    assert all((tmp_path / f"{name}.json").exists() for name in table_names() if name != "table2")


def test_user_errors_are_one_line_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"^reproduce: error: no row matches --rows 'nothing\*'$"):
        main(["table1", "--rows", "nothing*", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--workers must be >= 1, got 0"):
        main(["table1", "--workers", "0", "--out", str(tmp_path)])
