"""Config command lines and presets; the samplers that split data over ranks."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from tocalib.models import create_model
from tocalib.reproductions.train import classification
from tocalib.reproductions.train.classification import ClassificationConfig, preprocessing
from tocalib.reproductions.train.config import parse_config, to_jsonable
from tocalib.reproductions.train.distributed import DistContext, ResumableSampler, ShardSampler, batches_per_epoch
from tocalib.reproductions.train.segmentation import SegmentationConfig


@dataclass
class Demo:
    """A demo config.

    More text."""

    name: str = "a"
    epochs: int = 3
    lr: float | None = None
    amp: bool = True
    scale: tuple[float, ...] = (0.08, 1.0)
    kwargs: dict = field(default_factory=dict)
    mode: Literal["x", "y"] = "x"
    out: Path = Path("runs")


PRESETS = {"small": {"epochs": 1, "scale": (0.5, 1.0)}}


def test_defaults_presets_and_command_line_layer_in_order() -> None:
    assert parse_config(Demo, [], PRESETS) == Demo()
    assert parse_config(Demo, ["--preset", "small"], PRESETS) == Demo(epochs=1, scale=(0.5, 1.0))
    argv = ["--preset", "small", "--epochs", "7", "--lr", "0.1", "--no-amp", "--scale", "0.2", "0.9"]
    argv += ["--kwargs", '{"depths": [1, 2]}', "--mode", "y", "--out", "/tmp/r"]
    config = parse_config(Demo, argv, PRESETS)
    assert config == Demo(
        epochs=7, lr=0.1, amp=False, scale=(0.2, 0.9), kwargs={"depths": [1, 2]}, mode="y", out=Path("/tmp/r")
    )
    assert parse_config(Demo, ["--lr", "none"]).lr is None
    assert parse_config(Demo, ["--preset", "lr", "--lr", "none"], {"lr": {"lr": 0.5}}).lr is None
    assert to_jsonable(config)["out"] == "/tmp/r" and to_jsonable(config)["scale"] == [0.2, 0.9]


@pytest.mark.parametrize("argv", [["--epochs", "two"], ["--mode", "z"], ["--preset", "big"], ["--kwargs", "{bad"]])
def test_bad_command_lines_exit_with_a_usage_error(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parse_config(Demo, argv, PRESETS)
    assert "error" in capsys.readouterr().err


def _ctx(rank: int, world: int) -> DistContext:
    return DistContext(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))


@given(size=st.integers(1, 200), world=st.integers(1, 5))
def test_shards_cover_every_sample_exactly_once(size: int, world: int) -> None:
    shards = [list(ShardSampler(size, _ctx(rank, world))) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))
    assert [len(ShardSampler(size, _ctx(rank, world))) for rank in range(world)] == [len(s) for s in shards]


@given(size=st.integers(8, 200), world=st.integers(1, 4), batch=st.integers(1, 6), epoch=st.integers(0, 3))
def test_resumed_epoch_continues_with_the_same_batches(size: int, world: int, batch: int, epoch: int) -> None:
    for rank in range(world):
        sampler = ResumableSampler(size, _ctx(rank, world), seed=3)
        loader = DataLoader(range(size), batch_size=batch, sampler=sampler, drop_last=True)
        sampler.set_epoch(epoch)
        full = [b.tolist() for b in loader]
        assert len(full) == batches_per_epoch(size, _ctx(rank, world), batch)
        for done in range(len(full) + 1):
            sampler.set_epoch(epoch, done * batch)
            assert [b.tolist() for b in loader] == full[done:]


def test_epochs_reshuffle_and_ranks_agree_on_the_order() -> None:
    first, second = (ResumableSampler(64, _ctx(rank, 2), seed=0) for rank in range(2))
    first.set_epoch(0)
    second.set_epoch(0)
    assert sorted(list(first) + list(second)) == list(range(64))
    epoch0 = list(first)
    first.set_epoch(1)
    assert list(first) != epoch0
    with pytest.raises(ValueError, match="skip"):
        first.set_epoch(0, 33)


BAD_VALUES = [
    (ClassificationConfig, ["--lr", "0"], "--lr must be finite and > 0, got 0.0"),
    (ClassificationConfig, ["--lr=-1e-3"], "--lr must be finite and > 0, got -0.001"),
    (ClassificationConfig, ["--lr", "inf"], "--lr must be finite and > 0, got inf"),
    (ClassificationConfig, ["--weight-decay", "nan"], "--weight-decay must be finite and >= 0, got nan"),
    (ClassificationConfig, ["--betas", "0.9", "1.0"], "--betas must be in [0, 1), got (0.9, 1.0)"),
    (ClassificationConfig, ["--betas", "0.9"], "argument --betas: expected 2 arguments"),
    (ClassificationConfig, ["--model-kwargs", "[1, 2]"], "expected a JSON object ('{\"name\": value, ...}'"),
    (ClassificationConfig, ["--model-kwargs", "{depths: 1}"], "not valid JSON"),
    (ClassificationConfig, ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (ClassificationConfig, ["--mixup-prob", "1.5"], "--mixup-prob must be in [0, 1], got 1.5"),
    (ClassificationConfig, ["--crop-pct", "0"], "--crop-pct must be in (0, 1], got 0.0"),
    (SegmentationConfig, ["--iterations", "0", "--power=-1"], "--iterations must be >= 1, got 0; --power must be"),
    (SegmentationConfig, ["--scale", "2048"], "argument --scale: expected 2 arguments"),
]


@pytest.mark.parametrize(("config", "argv", "message"), BAD_VALUES)
def test_out_of_range_options_are_refused_by_the_parser_naming_the_rule(
    config: type, argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(config, argv)
    assert info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and "Traceback" not in error


@given(lr=st.floats(max_value=0.0, allow_nan=False), weight_decay=st.floats(max_value=-1e-9, allow_nan=False))
def test_configs_built_in_code_check_the_same_rules(lr: float, weight_decay: float) -> None:
    with pytest.raises(ValueError, match=r"--lr must be finite and > 0.*--weight-decay must be finite and >= 0"):
        SegmentationConfig(lr=lr, weight_decay=weight_decay)
    assert ClassificationConfig(lr=None).lr is None  # None means "scale lr_base", as documented


@pytest.mark.parametrize(("config", "argv", "message"), [
    (ClassificationConfig, ["--eval-only"], "--eval-only evaluates given weights: pass --pretrained PATH"),
    (ClassificationConfig, ["--reset-head"], "--reset-head replaces the classifier of --pretrained weights"),
    (SegmentationConfig, ["--eval-only", "--pretrained", "x.pth"], "--eval-only evaluates a trained segmentor"),
])  # fmt: skip
def test_options_that_need_weights_refuse_to_run_without_them(
    config: type, argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        parse_config(config, argv)
    assert message in capsys.readouterr().err


@settings(max_examples=40, deadline=None)
@given(lr=st.floats(allow_nan=True, allow_infinity=True), betas=st.lists(st.floats(-1, 2), min_size=1, max_size=3))
def test_any_lr_and_betas_either_parse_within_the_rules_or_exit_with_one_line(lr: float, betas: list[float]) -> None:
    argv = [f"--lr={lr}", "--betas", *map(str, betas)]
    try:
        config = parse_config(ClassificationConfig, argv)
    except SystemExit as exit_:
        assert exit_.code == 2
    else:
        assert math.isfinite(config.lr) and config.lr > 0 and len(config.betas) == 2
        assert all(0 <= beta < 1 for beta in config.betas)


@pytest.mark.parametrize(("argv", "message"), [
    (["--eval-only", "--pretrained", "w.pth", "--reset-head"], "would evaluate an untrained classifier"),
    (["--epochs", "2"], "--warmup-epochs (5) must be below --epochs (2)"),
    (["--mean", "0.5", "0.5", "--std", "0.2"], "--mean has 2 values and --std 1: give one per channel"),
])  # fmt: skip
def test_options_that_contradict_each_other_are_refused(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_config(ClassificationConfig, argv)
    assert message in capsys.readouterr().err


def test_configs_rebuilt_from_their_json_pass_and_bad_lists_are_named(tmp_path: Path) -> None:
    config = ClassificationConfig(betas=(0.9, 0.99), mean=(0.5,), std=(0.25,))
    rebuilt = ClassificationConfig(**json.loads(json.dumps(to_jsonable(config))))  # lists and strings
    assert list(rebuilt.betas) == [0.9, 0.99]
    with pytest.raises(ValueError, match=r"--betas must be in \[0, 1\), got \[0\.9, 1\.5\]"):
        ClassificationConfig(betas=[0.9, 1.5])
    with pytest.raises(ValueError, match="--std must be finite and > 0, got 'x'"):
        ClassificationConfig(std="x")
    assert parse_config(SegmentationConfig, ["--custom-keys", "null", "--power", "0"]).custom_keys is None


def test_the_training_command_lines_end_user_errors_in_one_line(tmp_path: Path, capsys) -> None:
    from tocalib.reproductions.cli import command_line
    from tocalib.reproductions.train import classification

    status = command_line(classification.main, "classification", ["--data", str(tmp_path / "nowhere")])
    error = capsys.readouterr().err.strip()
    assert status == 2 and error.startswith("classification: error: ") and "\n" not in error
    from PIL import Image

    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "val" / "a" / "0.png")
    typo = ["--data", str(tmp_path / "data"), "--eval-only", "--pretrained", "w.pth", "--model-kwargs", '{"dept": 1}']
    assert command_line(classification.main, "classification", [*typo, "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert "--model-kwargs: " in error and "unexpected keyword argument 'dept'" in error and "\n" not in error


def test_preprocessing_is_the_models_pretrained_cfg_unless_given() -> None:
    """Size, mean/std, interpolation and crop ratio travel with the model; the command line overrides them."""
    default = preprocessing(parse_config(ClassificationConfig, []))
    assert default == create_model("pacavit_tiny_p2cconv_100_0").pretrained_cfg
    assert (default.input_size, default.crop_pct, default.interpolation) == ((3, 224, 224), 224 / 248, "bicubic")
    fashion = preprocessing(parse_config(ClassificationConfig, ["--preset", "fashion_mnist"], classification.PRESETS))
    assert (fashion.input_size[1:], fashion.mean, fashion.std, fashion.crop_pct) == ((28, 28), (0.286,), (0.353,), 1.0)
    with pytest.raises(ValueError, match=r"mean .* and std .* differ in length"):
        preprocessing(parse_config(ClassificationConfig, ["--mean", "0.5", "0.5"]))
