"""The torchrun process group and the samplers that split data across its ranks.

:func:`init_distributed` reads the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and
joins the group: NCCL when training on CUDA, gloo on the CPU. Without them it is a one-process run, and every
helper here works the same (collectives become no-ops).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

__all__ = [
    "DistContext",
    "ResumableSampler",
    "ShardSampler",
    "all_gather_objects",
    "all_reduce_sum",
    "batches_per_epoch",
    "init_distributed",
    "shutdown",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes checkpoints and metrics."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from None


def init_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun process group (if launched by torchrun) and pick this process's device.

    ``device``: ``"auto"`` (CUDA if available, else CPU), ``"cpu"`` or ``"cuda"``. With CUDA each process takes
    ``cuda:LOCAL_RANK`` and the backend is NCCL; on the CPU it is gloo.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch.cuda.is_available() is False; use --device cpu")
    rank, world_size, local_rank = (_env_int(name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if world_size is None or world_size == 1:
        rank = local_rank = 0
        world_size = 1
    elif rank is None or local_rank is None:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} is set but RANK/LOCAL_RANK are not: launch with torchrun, which sets all three"
        )
    torch_device = torch.device(device, local_rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            device_id=torch_device if device == "cuda" else None,
        )
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def shutdown() -> None:
    """Leave the process group (no-op in a one-process run)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place and return it (unchanged in a one-process run)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: object) -> list[object]:
    """``[obj of rank 0, obj of rank 1, …]`` on every rank (``[obj]`` in a one-process run)."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def batches_per_epoch(dataset_size: int, ctx: DistContext, batch_size: int) -> int:
    """Full batches per process and epoch: each rank draws ``ceil(dataset_size / world_size)`` indices (the
    sampler pads by repeating) and incomplete batches are dropped."""
    return math.ceil(dataset_size / ctx.world_size) // batch_size


class ResumableSampler(DistributedSampler):
    """:class:`~torch.utils.data.DistributedSampler` that can start an epoch part-way.

    ``set_epoch(epoch, skip)`` reshuffles as usual (seeded by ``seed + epoch``, the same order on every rank) and
    drops this rank's first ``skip`` indices, so that a run resumed after ``k`` batches of an epoch sees exactly
    the batches an uninterrupted run would have seen next.
    """

    def __init__(self, dataset_size: int, ctx: DistContext, shuffle: bool = True, seed: int = 0) -> None:
        super().__init__(
            range(dataset_size), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if not 0 <= skip <= self.num_samples:
            raise ValueError(f"skip must be in [0, {self.num_samples}] (indices per rank), got {skip}")
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank ``r`` takes indices ``r, r + world, …`` — every sample exactly once over all ranks
    (no padding, unlike ``DistributedSampler``), so summed counts are exact."""

    def __init__(self, dataset_size: int, ctx: DistContext) -> None:
        self.indices = range(ctx.rank, dataset_size, ctx.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
