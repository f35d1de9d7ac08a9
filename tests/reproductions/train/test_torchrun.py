"""Real distributed runs: two CPU processes under torchrun (gloo) train the ImageNet recipe on a generated
ImageFolder tree, stop part-way through an epoch, resume from the checkpoint, and end with exactly the weights of an
uninterrupted two-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[3]
TINY = {"embed_dims": [16, 32, 48, 64], "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "num_clusters": [4, 2, 1, 0]}


def _image_folder(root: Path, per_class: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for label, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 128, (40, 48, 3), dtype=np.uint8) + 100 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


def _torchrun(out: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "tocalib.reproductions.train.classification", "--data", str(data), "--out", str(out)]
    command += ["--model-kwargs", json.dumps(TINY), "--img-size", "32", "--batch-size", "2", "--eval-batch-size", "4"]
    command += ["--epochs", "2", "--warmup-epochs", "1", "--workers", "0", "--log-every", "1", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _steps(out: Path, split: str) -> list[int]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["split"] == split]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    _image_folder(root, {"train": 8, "val": 3})
    return root


def test_two_processes_stop_resume_and_match_an_uninterrupted_run(tmp_path: Path, data: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    _torchrun(straight, data)
    first = _torchrun(split, data, "--stop-after", "3")
    assert "2 process(es) × batch 2 on cpu" in first.stdout
    state = torch.load(split / "last.pt", weights_only=True)
    assert (state["step"], state["world_size"], len(state["rng"])) == (3, 2, 2)
    assert not torch.equal(state["rng"][0]["cpu"], state["rng"][1]["cpu"])
    second = _torchrun(split, data, "--resume", "auto")
    assert "at step 3/8" in second.stdout and "from step 3" in second.stdout
    assert _steps(split, "train") == [1, 2, 3, 4, 5, 6, 7, 8]
    assert _steps(split, "val") == [4, 8] == _steps(straight, "val")
    resumed = torch.load(split / "last.pt", weights_only=True)
    uninterrupted = torch.load(straight / "last.pt", weights_only=True)
    assert resumed["step"] == uninterrupted["step"] == 8
    for name, tensor in uninterrupted["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=0, msg=name)
    for index, moments in uninterrupted["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][index]["exp_avg"], moments["exp_avg"], rtol=0, atol=0)
    assert resumed["scheduler"]["last_epoch"] == uninterrupted["scheduler"]["last_epoch"] == 8
