"""Count each row's parameters and MACs ("FLOPs"), each distinct architecture once per run, over worker processes.

What is counted, and how, is the row's task's (:mod:`tocalib.reproductions.tasks`): :meth:`Task.build
<tocalib.reproductions.tasks.Task.build>` makes the model, :meth:`Task.count <tocalib.reproductions.tasks.Task.count>`
traces it, and the parts that do not depend on the backbone (Mask R-CNN's RPN and RoI heads) are counted once per
resolution and added to every row. Within one :class:`CountingPool` each distinct architecture is counted once;
nothing is kept between runs. The pool spreads the work over worker processes of one thread each: on a small,
shared CPU two single-threaded tracers finish sooner than one two-threaded tracer.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn

from tocalib.reproductions.tables import Row, Section
from tocalib.reproductions.tasks import SKIPPED, TASKS, Task, get_task

__all__ = ["Count", "CountingPool", "ModelCounter", "num_params"]


def num_params(module: nn.Module) -> int:
    """Number of parameters (buffers excluded), as ``sum(p.numel())`` in the official benchmark scripts."""
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class Count:
    """Params and MACs of one row's model. ``macs`` follows the README's convention (``all_ops`` minus
    :data:`~tocalib.reproductions.tasks.SKIPPED`); ``parts`` holds ``all_ops``, ``SKIPPED`` and the task's other
    parts (for Mask R-CNN: backbone, neck and each head)."""

    params: int
    macs: int
    parts: dict[str, int]
    seconds: float
    reused: bool = False
    """True when an identical architecture was already counted in this run."""


class ModelCounter:
    """Counts rows; remembers, for the lifetime of this object only, what it already counted.

    A count leaves out the task's :attr:`~tocalib.reproductions.tasks.Task.shared_parts`; :class:`CountingPool`
    adds them.
    """

    def __init__(self) -> None:
        self._done: dict[tuple[Any, ...], Count] = {}

    def count(self, section: Section, row: Row) -> Count:
        """Params and MACs of ``row`` at ``section.resolution``, without the task's shared parts."""
        key = (section.task, row.model, row.head, row.num_clusters, section.resolution)
        if key in self._done:
            return dataclasses.replace(self._done[key], seconds=0.0, reused=True)
        start = time.perf_counter()
        task = get_task(section.task)
        model = task.build(row)
        parts = task.count(model, section.resolution)
        macs = parts["all_ops"] - parts[SKIPPED]
        result = Count(num_params(model), macs, parts, time.perf_counter() - start)
        self._done[key] = result
        return result


def _with_shared(count: Count, shared: dict[str, int]) -> Count:
    """A row's count completed with its task's shared parts."""
    parts = {**count.parts, **shared}
    parts["all_ops"] += sum(shared.values())
    return dataclasses.replace(count, macs=parts["all_ops"] - parts[SKIPPED], parts=parts)


_WORKER_COUNTER: ModelCounter | None = None
"""The :class:`ModelCounter` of a :class:`CountingPool` worker process (one per process, for the pool's lifetime)."""


def _start_worker(tasks: dict[str, Task] | None = None) -> None:
    """One thread, a fresh counter, and the tasks registered in the parent process (a spawned worker imports
    only the built-in ones)."""
    global _WORKER_COUNTER
    torch.set_num_threads(1)
    _WORKER_COUNTER = ModelCounter()
    for name, task in (tasks or {}).items():
        TASKS.setdefault(name, task)


def _picklable_tasks() -> dict[str, Task]:
    """This process's registered tasks, for the workers; a task that cannot be sent to them is an error."""
    for name, task in TASKS.items():
        try:
            pickle.dumps(task)
        except (pickle.PicklingError, AttributeError, TypeError) as err:
            raise ValueError(
                f"the task {name!r} ({type(task).__qualname__}) cannot be sent to worker processes ({err}): define its "
                "class at the top level of an importable module, or count in this process with workers=1"
            ) from None
    return dict(TASKS)


def _announce(section: Section, row: Row) -> None:
    h, w = section.resolution
    print(f"      … counting {section.id}: {row.label} at {h}×{w}", flush=True)


def _count_in_worker(section: Section, row: Row) -> Count:
    if _WORKER_COUNTER is None:  # in-process pool
        _start_worker()
    assert _WORKER_COUNTER is not None
    _announce(section, row)
    return _WORKER_COUNTER.count(section, row)


def _count_shared(task: str, row: Row, resolution: tuple[int, int]) -> dict[str, int]:
    return get_task(task).count_shared(row, resolution)


class _InProcess:
    """The ``submit`` of an executor, run at once in this process."""

    def __init__(self) -> None:
        self._counter = ModelCounter()

    def submit(self, function: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        if function is _count_in_worker:
            _announce(*args)
            future.set_result(self._counter.count(*args))
        else:
            future.set_result(function(*args))
        return future

    def shutdown(self, cancel_futures: bool) -> None:
        """Nothing to stop."""


class CountingPool:
    """Counts rows in ``workers`` processes of one thread each, or in this process when ``workers`` is 1.

    Use as a context manager; :meth:`counts` yields complete counts (the tasks' shared parts included) in row order.
    """

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be ≥ 1, got {workers}")
        self._pool: ProcessPoolExecutor | _InProcess = (
            _InProcess()
            if workers == 1
            else ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(_picklable_tasks(),),
            )
        )
        self._shared: dict[tuple[str, tuple[int, int]], Future[dict[str, int]]] = {}

    def counts(self, rows: Sequence[tuple[Section, Row]]) -> Iterator[Count]:
        """The :class:`Count` of each (section, row), in order."""
        for section, row in rows:  # the shared parts first, so that they run alongside the first rows
            key = (section.task, section.resolution)
            if get_task(section.task).shared_parts and key not in self._shared:
                self._shared[key] = self._pool.submit(_count_shared, section.task, row, section.resolution)
        futures = [self._pool.submit(_count_in_worker, section, row) for section, row in rows]
        for (section, _), future in zip(rows, futures, strict=True):
            shared = self._shared.get((section.task, section.resolution))
            yield future.result() if shared is None else _with_shared(future.result(), shared.result())

    def __enter__(self) -> CountingPool:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._pool.shutdown(cancel_futures=True)
