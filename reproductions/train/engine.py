"""The training loop shared by the classification and segmentation entry points.

:class:`Trainer` runs a step-indexed loop over a :class:`~.distributed.ResumableSampler`, with the model wrapped
in :class:`~torch.nn.parallel.DistributedDataParallel` when torchrun started several processes. Per step: the
task's loss under autocast (fp16 with a dynamic grad scaler, on CUDA when ``amp`` is on; the CPU trains in fp32),
backward, optional gradient clipping, the optimizer and lr-scheduler steps, the optional EMA update. Every
``eval_every`` steps it evaluates (the EMA weights too), and it checkpoints every ``save_every`` steps, after each
evaluation, at the end, and when ``stop_after`` ends a run early (a job time limit): rerun with ``--resume auto``.
A resumed run keeps the checkpoint's settings: one that changes a hyper-parameter is refused, with every difference
listed (:data:`RESUME_MAY_CHANGE` names what may change: where and how it runs, logs and evaluates, and the
schedule's length).

Rank 0 writes ``log.txt`` (what is printed), ``metrics.jsonl`` (one JSON record per log or evaluation, each with
its ``step``), ``last.pt`` (the resumable checkpoint), ``best.pt`` (the weights with the best key metric) and
``config.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset

from tocalib.allocator import tune_cpu_allocator
from tocalib.reproductions.train.checkpoint import load_checkpoint, restore_rng_state, save_checkpoint
from tocalib.reproductions.train.config import RunConfig, to_jsonable
from tocalib.reproductions.train.distributed import (
    DistContext,
    ResumableSampler,
    all_reduce_sum,
    batches_per_epoch,
    init_distributed,
    shutdown,
)

__all__ = [
    "Progress",
    "RunLog",
    "Task",
    "TrainSettings",
    "Trainer",
    "evaluate_only",
    "resolve_resume",
    "run_training",
    "start_run",
]


class RunLog:
    """Rank 0's log: :meth:`info` prints and appends to ``log.txt``; :meth:`record` appends a JSON line to
    ``metrics.jsonl``. On other ranks both do nothing."""

    def __init__(self, out_dir: Path, ctx: DistContext, stream: TextIO | None = None) -> None:
        self.enabled = ctx.is_main
        self.out_dir = out_dir
        self.stream = stream or sys.stdout
        self.start = time.monotonic()
        if self.enabled:
            out_dir.mkdir(parents=True, exist_ok=True)

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, file=self.stream, flush=True)
        with open(self.out_dir / "log.txt", "a") as file:
            file.write(line + "\n")

    def record(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as file:
            file.write(json.dumps({**record, "time": round(time.monotonic() - self.start, 3)}) + "\n")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A progress bar for rank 0. On a terminal it redraws one line (``\\r``) at most twice a second with the
    latest logged values; elsewhere (CI, files) :meth:`line` is logged at each log interval instead."""

    def __init__(self, total: int, start: int, log: RunLog, stream: TextIO | None = None, width: int = 24) -> None:
        self.total, self.start_step, self.log, self.width = total, start, log, width
        self.stream = stream or sys.stderr
        self.tty = log.enabled and self.stream.isatty()
        self.started = time.monotonic()
        self.drawn = 0.0
        self.fields = ""

    def line(self, step: int) -> str:
        done = step / self.total
        bar = "#" * round(done * self.width)
        rate = (step - self.start_step) / max(time.monotonic() - self.started, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else math.inf
        eta_text = _duration(eta) if math.isfinite(eta) else "?"
        return f"[{bar:<{self.width}}] {step}/{self.total} {self.fields} eta {eta_text}"

    def update(self, step: int, fields: str | None = None) -> None:
        """Note that ``step`` is done (and the latest ``fields`` text, at log points)."""
        if fields is not None:
            self.fields = fields
            if not self.tty:
                self.log.info(self.line(step))
        now = time.monotonic()
        if self.tty and (now - self.drawn > 0.5 or step == self.total):
            self.drawn = now
            print("\r" + self.line(step), end="\n" if step == self.total else "", file=self.stream, flush=True)


class Task(Protocol):
    """What the loop needs from a task (classification, segmentation)."""

    key_metric: str
    """The evaluation metric that picks ``best.pt`` (higher is better)."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss to minimise for a batch already on the device, and its named parts (for logging)."""
        ...

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of ``model`` (unwrapped, in eval mode) on the validation data, summed over all ranks."""
        ...


@dataclass(frozen=True)
class TrainSettings:
    """Loop settings (the step counts are optimizer steps)."""

    total_steps: int
    steps_per_epoch: int
    batch_size: int
    eval_every: int
    save_every: int = 0
    log_every: int = 50
    workers: int = 4
    clip_grad: float | None = None
    amp: bool = False
    ema_decay: float = 0.0
    channels_last: bool = False
    stop_after: int | None = None
    seed: int = 0
    find_unused_parameters: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("total_steps", "steps_per_epoch", "batch_size", "eval_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.save_every < 0 or self.workers < 0:
            raise ValueError(f"save_every and workers must be ≥ 0, got {self.save_every} and {self.workers}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 = no EMA), got {self.ema_decay}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad must be positive or None, got {self.clip_grad}")
        if self.stop_after is not None and self.stop_after <= 0:
            raise ValueError(f"stop_after must be a positive step count or None, got {self.stop_after}")


@contextlib.contextmanager
def start_run(out_dir: Path, device: str, seed: int) -> Iterator[tuple[DistContext, RunLog]]:
    """Join the torchrun group (if any), seed torch identically on every rank (so models start equal) and open
    rank 0's log; leave the group at the end."""
    ctx = init_distributed(device)
    try:
        torch.manual_seed(seed)
        yield ctx, RunLog(out_dir, ctx)
    finally:
        shutdown()


@torch.no_grad()
def evaluate_only(model: nn.Module, task: Task, log: RunLog) -> dict[str, float]:
    """Evaluate ``model`` once (``--eval-only``), log and record the metrics."""
    metrics = task.evaluate(model.eval())
    log.record({"split": "val", "step": 0, **metrics})
    log.info("eval: " + "  ".join(f"{name} {value:.3f}" for name, value in metrics.items()))
    return metrics


RESUME_MAY_CHANGE = frozenset({
    "resume", "stop_after", "out", "workers", "log_every", "save_every", "device", "compile", "channels_last",
    "data", "eval_batch_size", "eval_every", "eval_every_epochs", "epochs", "iterations", "pretrained", "checkpoint",
    "reset_head", "batch_size", "retain_cpu_memory",
})  # fmt: skip
"""Config fields that may differ between a run and the checkpoint it resumes: where and how it runs, logs and
evaluates, the schedule's length (a longer one extends the run), the initial weights (the checkpoint replaces
them) and the batch per process (the global batch must stay: it is checked on its own, so a run can move to
another number of processes). Any other difference is refused. A field the checkpoint's config does not have
(one added to the code since) is not compared."""


def resolve_resume(resume: str | None, out_dir: Path, log: RunLog) -> Path | None:
    """``--resume``: ``None`` starts fresh, ``"auto"`` takes ``out_dir/last.pt`` when it exists, else a path.

    When ``auto`` finds records but no checkpoint (a run that ended before its first save), rank 0 moves the old
    ``metrics.jsonl`` aside to ``metrics.N.jsonl`` and the run starts fresh."""
    if resume is None:
        return None
    if resume != "auto":
        return Path(resume)
    path = out_dir / "last.pt"
    if path.is_file():
        log.info(f"resume auto: resuming from {path}")
        return path
    records = out_dir / "metrics.jsonl"
    if log.enabled and records.exists():
        aside = next(
            out_dir / f"metrics.{n}.jsonl" for n in range(1, 10_000) if not (out_dir / f"metrics.{n}.jsonl").exists()
        )
        records.rename(aside)
        log.info(f"resume auto: no {path}; the earlier records moved to {aside}; starting fresh")
    else:
        log.info(f"resume auto: no {path}; starting fresh")
    return None


def _to_device(batch: Any, device: torch.device, channels_last: bool) -> Any:
    if isinstance(batch, Tensor):
        batch = batch.to(device, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last) if channels_last and batch.dim() == 4 else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(item, device, channels_last) for item in batch)
    raise TypeError(f"batches must be tensors or tuples/lists of tensors, got {type(batch).__name__}")


class Trainer:
    """Train ``model`` on ``train_set`` for ``task`` with ``optimizer`` and the lr factor ``schedule(step)``.

    Args:
        model: the unwrapped model (already on ``ctx.device``); wrapped in DDP here when ``ctx.distributed``.
        optimizer: over ``model``'s parameters (groups carry their base ``lr``).
        schedule: step → factor on each group's base lr (e.g. :class:`~.optim.WarmupCosine`).
        train_set: a map-style dataset of training batches' items (sampled by a :class:`ResumableSampler`).
        task: the loss and evaluation (:class:`Task`).
        settings: the loop settings.
        ctx: this process's place in the process group.
        out_dir: where rank 0 writes logs, metrics and checkpoints.
        config: the run's settings, saved in every checkpoint and in ``config.json``.
        resume: a checkpoint of this pipeline to continue from.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Callable[[int], float],
        train_set: Dataset,
        task: Task,
        settings: TrainSettings,
        ctx: DistContext,
        out_dir: Path,
        config: dict[str, Any],
        log: RunLog,
        resume: Path | None = None,
    ) -> None:
        self.model, self.optimizer, self.task, self.settings, self.ctx = model, optimizer, task, settings, ctx
        self.out_dir, self.config, self.log = out_dir, config, log
        self.scheduler = LambdaLR(optimizer, schedule)
        self.amp = settings.amp and ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.ema = (
            AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay), use_buffers=True)
            if settings.ema_decay
            else None
        )
        self.sampler = ResumableSampler(len(train_set), ctx, shuffle=True, seed=settings.seed)
        self.worker_seeds = torch.Generator()
        self.loader = DataLoader(
            train_set,
            batch_size=settings.batch_size,
            sampler=self.sampler,
            num_workers=settings.workers,
            drop_last=True,
            pin_memory=ctx.device.type == "cuda",
            generator=self.worker_seeds,
        )
        if len(self.loader) != settings.steps_per_epoch:
            raise ValueError(
                f"steps_per_epoch={settings.steps_per_epoch} but {len(train_set)} samples over {ctx.world_size} "
                f"process(es) in batches of {settings.batch_size} make {len(self.loader)}; use batches_per_epoch()"
                + ("; lower --batch-size or add data" if len(self.loader) == 0 else "")
            )
        if ctx.is_main and resume is None and (out_dir / "metrics.jsonl").exists():
            raise FileExistsError(
                f"{out_dir} already holds a run (metrics.jsonl): continue it with --resume auto, or pass another --out"
            )
        self.step = 0
        self.best = -math.inf
        torch.manual_seed(settings.seed + 1000 * ctx.rank)
        if resume is not None:
            self._restore(load_checkpoint(resume), resume)
        self.wrapped: nn.Module = (
            DistributedDataParallel(
                model,
                device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                find_unused_parameters=settings.find_unused_parameters,
            )
            if ctx.distributed
            else model
        )
        if settings.compile:
            self.wrapped = torch.compile(self.wrapped)
        if ctx.is_main:
            (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        saved = state["config"]
        changed = {
            name: (saved[name], value)
            for name, value in self.config.items()
            if name not in RESUME_MAY_CHANGE and name in saved and saved[name] != value
        }
        if changed:
            listed = "; ".join(
                f"--{key.replace('_', '-')}: {was!r} in the checkpoint, {now!r} now"
                for key, (was, now) in changed.items()
            )
            raise ValueError(
                f"{path} was trained with other settings ({listed}): a resumed run keeps its settings, so that it "
                "repeats an uninterrupted one; resume with the checkpoint's values (its config.json), or start a new "
                "run with --pretrained for new ones"
            )
        global_batch = self.settings.batch_size * self.ctx.world_size
        if state["global_batch"] != global_batch:
            raise ValueError(
                f"{path} was trained with a global batch of {state['global_batch']}, this run has {global_batch} "
                f"({self.ctx.world_size} process(es) × --batch-size {self.settings.batch_size}): its steps would "
                "mean other epochs and lrs; resume with the same global batch"
            )
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:  # torch's size-mismatch report, e.g. a head for another number of classes
            raise ValueError(
                f"{path} holds weights that do not fit this run's model ({str(err).splitlines()[-1].strip()}); a "
                "resumed run needs the same model and the same classes in --data"
            ) from err
        self.optimizer.load_state_dict(state["optimizer"])
        # the step count only: the schedule itself is this run's (e.g. a longer --epochs extends it)
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(self.optimizer.param_groups)})
        if state["total_steps"] != self.settings.total_steps:
            self.log.info(f"the schedule now ends at step {self.settings.total_steps} (was {state['total_steps']})")
        if self.scaler.is_enabled() and not state["scaler"]:
            self.log.info(f"{path} was saved without AMP: the grad scaler starts from its initial scale")
        elif self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError(f"{path} holds no EMA weights but this run has --ema-decay; resume without EMA")
            self.ema.load_state_dict(state["ema"])
        elif state.get("ema") is not None:
            self.log.info(f"warning: {path} holds EMA weights, which this run (no --ema-decay) leaves behind")
        self.step, self.best = state["step"], state["best"]
        if state["world_size"] == self.ctx.world_size:
            restore_rng_state(state["rng"][self.ctx.rank])
        else:
            torch.manual_seed(self.settings.seed + 1000 * self.ctx.rank + self.step)
            self.log.info(
                f"warning: {path} was saved by {state['world_size']} processes, this run has {self.ctx.world_size}: "
                "the data order and augmentations continue differently from an uninterrupted run"
            )
        self.log.info(f"resumed from {path} at step {self.step}/{self.settings.total_steps}")

    def _save(self, name: str = "last.pt") -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "step": self.step,
            "epoch": self.step / self.settings.steps_per_epoch,
            "total_steps": self.settings.total_steps,
            "global_batch": self.settings.batch_size * self.ctx.world_size,
            "best": self.best,
            "config": self.config,
        }
        save_checkpoint(self.out_dir / name, self.ctx, state)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()

    def _train_step(self, batch: Any) -> dict[str, Tensor]:
        with self._autocast():
            loss, parts = self.task.loss(self.wrapped, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.settings.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        return {"loss": loss.detach(), **{name: value.detach() for name, value in parts.items()}}

    def _batches(self) -> Iterator[Any]:
        """Batches from the current step on, epoch after epoch (an epoch part-way through is resumed).

        The loader draws its workers' base seed from its own generator, seeded by (seed, rank, epoch), so that
        starting an epoch leaves torch's global RNG (the one checkpoints restore) untouched."""
        per_epoch = self.settings.steps_per_epoch
        while True:
            epoch, done = divmod(self.step, per_epoch)
            self.sampler.set_epoch(epoch, done * self.settings.batch_size)
            self.worker_seeds.manual_seed(self.settings.seed + 1000 * self.ctx.rank + 1_000_003 * epoch)
            yield from self.loader

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Evaluate the model (and its EMA), log and record the metrics; keep ``best.pt`` (rank 0)."""
        results: dict[str, float] = {}
        candidates = [("val", self.model)] + ([("val_ema", self.ema.module)] if self.ema is not None else [])
        for split, model in candidates:
            was_training = model.training
            model.eval()
            with self._autocast():
                metrics = self.task.evaluate(model)
            model.train(was_training)
            self.log.record({"split": split, "step": self.step, "epoch": self._epoch(), **metrics})
            self.log.info(f"{split} step {self.step}: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            results.update({f"{split}/{name}": value for name, value in metrics.items()})
        score, split = max((results[f"{split}/{self.task.key_metric}"], split) for split, _ in candidates)
        if score > self.best:
            self.best = score
            if self.ctx.is_main:
                weights = dict(candidates)[split].state_dict()
                torch.save({"model": weights, "step": self.step, self.task.key_metric: score}, self.out_dir / "best.pt")
        return results

    def _epoch(self) -> float:
        return round(self.step / self.settings.steps_per_epoch, 4)

    def fit(self) -> dict[str, float]:
        """Train to ``total_steps`` (or ``stop_after``) and return the last evaluation's metrics."""
        s = self.settings
        self.log.info(
            f"training {s.total_steps} steps ({s.steps_per_epoch} per epoch), {self.ctx.world_size} process(es) × "
            f"batch {s.batch_size} on {self.ctx.device}, from step {self.step}"
        )
        self.log.record({"split": "start", "step": self.step, "world_size": self.ctx.world_size})
        progress = Progress(s.total_steps, self.step, self.log)
        window: dict[str, Tensor] = {}
        window_steps, window_start = 0, time.monotonic()
        results: dict[str, float] = {}
        self.model.train()
        if self.step >= s.total_steps:
            self.log.info("nothing to train: the checkpoint is already at the last step")
            return self.evaluate()
        for batch in self._batches():
            parts = self._train_step(_to_device(batch, self.ctx.device, s.channels_last))
            finite = torch.isfinite(parts["loss"])
            window["finite_steps"] = window.get("finite_steps", 0) + finite.float()
            for name, value in parts.items():
                window[name] = window.get(name, 0.0) + torch.where(finite, value.float(), 0.0)
            window_steps += 1
            done = self.step == s.total_steps
            stop = s.stop_after is not None and self.step >= s.stop_after
            if self.step % s.log_every == 0 or done or stop:
                record = self._reduce_window(window, window_steps, window_start)
                progress.update(self.step, "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step"))
                self.log.record({"split": "train", "epoch": self._epoch(), **record})
                window, window_steps, window_start = {}, 0, time.monotonic()
            else:
                progress.update(self.step)
            if self.step % s.eval_every == 0 or done:
                results = self.evaluate()
            if done or stop or (s.save_every and self.step % s.save_every == 0) or self.step % s.eval_every == 0:
                self._save()
            if stop and not done:
                self.log.info(f"stopped after step {self.step} (--stop-after); continue with --resume auto")
            if done or stop:
                return results
        raise AssertionError("unreachable: the batch stream is endless")

    def _reduce_window(self, window: dict[str, Tensor], steps: int, start: float) -> dict[str, float]:
        """Mean losses of the finite steps of the log window over all ranks. Steps with a non-finite loss (an fp16
        overflow the grad scaler skips) are counted; a window without a finite step stops the run."""
        names = sorted(window)
        totals = dict(zip(names, all_reduce_sum(torch.stack([window[name] for name in names])).tolist(), strict=True))
        finite = totals.pop("finite_steps")
        skipped = steps * self.ctx.world_size - finite
        if finite == 0:
            raise FloatingPointError(
                f"non-finite training loss in every step up to step {self.step}: lower the lr, enable --clip-grad "
                "or check the data"
            )
        seconds = max(time.monotonic() - start, 1e-9)
        images = steps * self.settings.batch_size * self.ctx.world_size
        return {
            "step": self.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            **{name: total / finite for name, total in totals.items()},
            **({"nonfinite_steps": int(skipped)} if skipped else {}),
            "samples_per_s": round(images / seconds, 1),
        }


def run_training(
    config: RunConfig,
    ctx: DistContext,
    log: RunLog,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Callable[[int], float],
    train_set: Dataset,
    task: Task,
    total_steps: int,
    eval_every: int,
    **loop: Any,
) -> dict[str, float]:
    """Build the :class:`Trainer` of a run from its config (resuming per ``config.resume``) and train it; ``loop``
    holds the task-specific :class:`TrainSettings` (e.g. ``ema_decay``). On the CPU it first keeps freed memory in
    glibc's heap for the rest of the process (``config.retain_cpu_memory``, :mod:`tocalib.allocator`)."""
    if config.retain_cpu_memory and ctx.device.type == "cpu":
        kept = tune_cpu_allocator()
        log.info(
            "CPU allocator: freed memory stays in the heap (tocalib.allocator.tune_cpu_allocator)"
            if kept
            else "CPU allocator: left as it is (not glibc, or an allocator in LD_PRELOAD, which keeps its own memory)"
        )
    settings = TrainSettings(
        total_steps=total_steps,
        steps_per_epoch=batches_per_epoch(len(train_set), ctx, config.batch_size),
        batch_size=config.batch_size,
        eval_every=eval_every,
        save_every=config.save_every,
        log_every=config.log_every,
        workers=config.workers,
        clip_grad=config.clip_grad,
        amp=config.amp,
        stop_after=config.stop_after,
        seed=config.seed,
        **loop,
    )
    resume = resolve_resume(config.resume, config.out, log)
    trainer = Trainer(
        model, optimizer, schedule, train_set, task, settings, ctx, config.out, to_jsonable(config), log, resume
    )
    return trainer.fit()
