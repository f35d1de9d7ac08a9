"""Checkpoints that resume a run exactly: model, optimizer, lr scheduler, AMP grad scaler, EMA weights, the step
and epoch, and every rank's random-number state.

Every random draw of the training pipeline (shuffling aside, which is seeded by epoch) comes from torch's RNGs:
the augmentations of :mod:`tocalib.reproductions.data.transforms` and :mod:`tocalib.reproductions.data.segmentation`,
drop path, dropout, mixup. Saving each rank's CPU and CUDA RNG state therefore makes a resumed run (same world
size, ``workers=0``) repeat an uninterrupted one step for step. The file is written atomically (temporary file,
then rename) by rank 0 and is read by :func:`tocalib.models.loading.read_checkpoint`, which runs no code from the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tocalib.models.loading import read_checkpoint
from tocalib.reproductions.train.distributed import DistContext, all_gather_objects

__all__ = ["CHECKPOINT_VERSION", "load_checkpoint", "restore_rng_state", "rng_state", "save_checkpoint"]

CHECKPOINT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """This process's torch RNG states: CPU, and CUDA when available."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the RNGs from :func:`rng_state`'s output."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, ctx: DistContext, state: dict[str, Any]) -> None:
    """Write ``state`` plus every rank's RNG state to ``path``. Collective: call it on all ranks."""
    rng = all_gather_objects(rng_state())
    if ctx.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({**state, "rng": rng, "world_size": ctx.world_size, "version": CHECKPOINT_VERSION}, tmp)
        os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with a clear error when it is not one."""
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass --resume auto to start fresh when it is absent"
        )
    state = read_checkpoint(path)
    missing = {"model", "optimizer", "scheduler", "step", "rng", "version"} - set(state)
    if missing:
        raise ValueError(
            f"{path} is not a training checkpoint of this pipeline (missing {sorted(missing)}); to start from "
            "released weights use --pretrained instead of --resume"
        )
    if state["version"] != CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint version {state['version']}, this code reads {CHECKPOINT_VERSION}")
    return state
