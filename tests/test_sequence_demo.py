"""Smoke tests of examples/sequence_demo.py: the whole demo path on a tiny config and synthetic data."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

pytest.importorskip("fvcore", reason="the demo reports measured MACs: pip install tocalib[flops]")
Image = pytest.importorskip("PIL.Image", reason="the demo draws its picture with Pillow: pip install tocalib[viz]")
demo = importlib.import_module("examples.sequence_demo")  # after the skips: its MAC count needs fvcore


TINY = demo.Config(
    context=128,
    horizon=8,
    dim=16,
    heads=2,
    depth=2,
    clusters=4,
    steps=3,
    batch_size=4,
    warmup=1,
    eval_batch=16,
    log_every=2,
    scaling_lengths=(128,),
)


def test_the_demo_trains_both_models_and_writes_its_report(tmp_path):
    report = demo.run(TINY, tmp_path, series=demo.synthetic_series(400))
    assert {p.name for p in tmp_path.iterdir()} == {"results.md", "results.json", "assignments.png"}
    models = json.loads((tmp_path / "results.json").read_text())["models"]
    assert models.keys() == {"full", "toca", "toca_stage", "toca_teacher"}
    assert np.isfinite([[row["mae"], row["rmse"]] for row in models.values()]).all()
    full, block, stage = (models[key] for key in ("full", "toca", "toca_stage"))
    assert block["encoder_macs"] < full["encoder_macs"] and block["macs"] < full["macs"]
    assert stage["encoder_macs"] < block["encoder_macs"]  # one clustering instead of one per block
    assert [row["context"] for row in report["scaling"]] == [128]
    assert len(report["clusters"]) == TINY.depth
    for layer in report["clusters"]:
        assert 1 <= layer["tokens_per_cluster"] <= TINY.context and 0 <= layer["season_focus"] <= 1
    assert "| full attention (M = 0) |" in (tmp_path / "results.md").read_text()
    with Image.open(tmp_path / "assignments.png") as picture:
        assert picture.width > TINY.context + TINY.horizon


@pytest.mark.parametrize("share", ["block", "stage", "teacher"])
def test_the_toca_model_returns_one_assignment_per_block_that_sums_to_one(share):
    model = demo.Forecaster(TINY, clusters=TINY.clusters, share=share).eval()
    forecast, assignments = model(torch.randn(3, TINY.context) + 300, return_assignments=True)
    assert forecast.shape == (3, TINY.horizon) and len(assignments) == TINY.depth
    for c in assignments:
        assert c.shape == (3, TINY.clusters, TINY.context)
        torch.testing.assert_close(c.sum(-1), torch.ones(3, TINY.clusters))
    assert torch.equal(assignments[0], assignments[1]) == (share != "block")


def test_the_split_keeps_test_targets_out_of_training():
    values = np.arange(400, dtype=np.float64)
    split = demo.make_split(values, context=128, horizon=8, test_fraction=0.2)
    assert split.train_y.max() < split.test_y.min() == 320
    torch.testing.assert_close(split.test_x[0], torch.arange(192, 320, dtype=torch.float32))
    with pytest.raises(ValueError, match="shorten the context"):
        demo.make_split(values, context=390, horizon=8, test_fraction=0.2)


def test_the_seasonal_baselines_are_exact_on_a_periodic_series_with_a_trend():
    t = torch.arange(3 * demo.PERIOD + 10, dtype=torch.float32)
    series = torch.sin(2 * torch.pi * t / demo.PERIOD) + 0.5 * t / demo.PERIOD
    x, y = series[None, : 3 * demo.PERIOD], series[None, 3 * demo.PERIOD :]
    baselines = demo.seasonal_baselines(x, horizon=10)
    torch.testing.assert_close(baselines["seasonal naive + drift"], y, atol=1e-5, rtol=0)
    torch.testing.assert_close(baselines["seasonal naive"] + 0.5, y, atol=1e-5, rtol=0)


def test_a_missing_data_package_names_what_to_install(monkeypatch):
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(demo.MissingDataError, match=r"pip install -c constraints\.txt statsmodels"):
        demo.load_co2()


def test_the_co2_record_loads_complete(optional_module):
    optional_module("statsmodels", "the CO2 record ships inside statsmodels (pip install tocalib[sequence])")
    series = demo.load_co2()
    assert len(series.values) == len(series.dates) == 2284 and np.isfinite(series.values).all()
    assert str(series.dates[0]) == "1958-03-29" and str(series.dates[-1]) == "2001-12-29"
    assert 310 < series.values.min() < series.values.max() < 380
