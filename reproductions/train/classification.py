"""Image-classification training and evaluation with the paper's ImageNet-1k recipe (PaCaViT@4307018
imagenet_vit_adamw.yml).

Launch (one node, 8 GPUs; the defaults are the paper's settings)::

    torchrun --nproc_per_node 8 -m tocalib.reproductions.train.classification \\
        --data /data/imagenet --model pacavit_small_p2cconv_100_0 --out runs/paca_small

``--data`` holds ``train/<class>/<image>`` and ``val/<class>/<image>``. The recipe: AdamW (betas 0.9/0.999,
weight decay 0.05, none on norms and biases), lr 5e-4 × global batch / 512 (warmup lr 5e-7 and min lr 5e-6
scaled alike), 5 warmup epochs then cosine over 300 epochs, label smoothing 0.1, mixup 0.8 / cutmix 1.0 with
switch probability 0.5, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25, the model's drop path, AMP on
CUDA; gradient clipping (``--clip-grad``) and EMA (``--ema-decay``) are options, off as in the paper. Input size,
normalisation, interpolation and the evaluation crop come from the model's ``pretrained_cfg`` (PaCa-ViT: 224,
ImageNet mean/std, bicubic, resize to 224 / 0.9 and centre-crop 224) unless ``--img-size``, ``--mean``, ``--std``,
``--interpolation`` or ``--crop-pct`` say otherwise.

``--preset fashion_mnist`` trains a small PaCa-ViT on Fashion-MNIST from Debian's ``dataset-fashion-mnist``
(``nox -s train_smoke``). ``--eval-only --pretrained PATH`` evaluates a checkpoint (official format, or this
pipeline's ``best.pt``/``last.pt``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from tocalib.models import PretrainedCfg, load_official_state_dict
from tocalib.reproductions.cli import command_line, create_from_options
from tocalib.reproductions.data.folders import FASHION_MNIST_ROOT, FashionMNIST, ImageFolder
from tocalib.reproductions.data.transforms import Mixup, classification_train_transform, eval_transform
from tocalib.reproductions.metrics import topk_correct
from tocalib.reproductions.train.config import (
    AT_LEAST_ONE,
    BELOW_ONE,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    SHARE,
    SMALL_PACA,
    Limit,
    RunConfig,
    parse_config,
)
from tocalib.reproductions.train.distributed import DistContext, ShardSampler, all_reduce_sum, batches_per_epoch
from tocalib.reproductions.train.engine import RunLog, evaluate_only, run_training, start_run
from tocalib.reproductions.train.optim import WarmupCosine, no_decay_groups, scaled_lr

__all__ = ["PRESETS", "ClassificationConfig", "ClassificationTask", "main", "soft_target_cross_entropy"]


@dataclass
class ClassificationConfig(RunConfig):
    """Train (or evaluate) an image classifier with the paper's ImageNet-1k recipe under torchrun.

    Defaults are PaCaViT@4307018 imagenet_vit_adamw.yml. ``lr=None`` applies the scaling rule to ``lr_base``,
    ``warmup_lr`` and
    ``min_lr`` (× global batch / 512); an explicit ``lr`` takes ``warmup_lr`` and ``min_lr`` as given.
    """

    LIMITS: ClassVar[dict[str, Limit]] = {
        **RunConfig.LIMITS, "img_size": AT_LEAST_ONE, "crop_pct": SHARE, "std": POSITIVE, "epochs": AT_LEAST_ONE,
        "warmup_epochs": NON_NEGATIVE, "eval_batch_size": AT_LEAST_ONE, "lr": POSITIVE, "lr_base": POSITIVE,
        "warmup_lr": NON_NEGATIVE, "min_lr": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "betas": BELOW_ONE,
        "eps": POSITIVE, "smoothing": BELOW_ONE, "mixup": NON_NEGATIVE, "cutmix": NON_NEGATIVE, "mixup_prob": FRACTION,
        "mixup_switch_prob": FRACTION, "scale": SHARE, "hflip": FRACTION, "reprob": FRACTION, "recount": AT_LEAST_ONE,
        "drop_path": BELOW_ONE, "ema_decay": BELOW_ONE, "eval_every_epochs": AT_LEAST_ONE,
    }  # fmt: skip

    model: str = "pacavit_tiny_p2cconv_100_0"
    model_kwargs: dict = field(default_factory=dict)
    pretrained: Path | None = None
    reset_head: bool = False
    eval_only: bool = False
    dataset: Literal["imagefolder", "fashion_mnist"] = "imagefolder"
    data: Path | None = None
    img_size: int | None = None
    crop_pct: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: Literal["bilinear", "bicubic"] | None = None
    epochs: int = 300
    warmup_epochs: int = 5
    eval_batch_size: int = 128
    lr: float | None = None
    lr_base: float = 5e-4
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    drop_path: float | None = None
    ema_decay: float = 0.0
    channels_last: bool = False
    compile: bool = False
    out: Path = Path("runs/classification")
    eval_every_epochs: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_only and self.pretrained is None:
            raise ValueError("--eval-only evaluates given weights: pass --pretrained PATH (else the model is random)")
        if self.reset_head and self.pretrained is None:
            raise ValueError("--reset-head replaces the classifier of --pretrained weights: pass --pretrained PATH")
        if self.reset_head and self.eval_only:
            raise ValueError("--eval-only with --reset-head would evaluate an untrained classifier: drop --reset-head")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"--warmup-epochs ({self.warmup_epochs}) must be below --epochs ({self.epochs}); lower it, e.g. "
                "--warmup-epochs 1 for a short run"
            )
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(f"--mean has {len(self.mean)} values and --std {len(self.std)}: give one per channel")


PRESETS: dict[str, dict] = {
    "imagenet": {},
    "fashion_mnist": {
        "dataset": "fashion_mnist",
        "model": "pacavit_tiny_p2cconv_100_0",
        "model_kwargs": {**SMALL_PACA, "num_clusters": [16, 8, 4, 0], "in_chans": 1},
        "img_size": 28,
        "crop_pct": 1.0,
        "mean": (0.2860,),
        "std": (0.3530,),
        "epochs": 7,
        "warmup_epochs": 1,
        "batch_size": 64,
        "eval_batch_size": 500,
        "lr": 2e-3,
        "warmup_lr": 1e-5,
        "min_lr": 1e-5,
        "mixup": 0.0,
        "cutmix": 0.0,
        "auto_augment": None,
        "scale": (0.6, 1.0),
        "reprob": 0.0,
        "drop_path": 0.05,
        "workers": 0,
        "log_every": 100,
        "out": Path("runs/fashion_mnist"),
    },
}
"""Named settings: ``imagenet`` is the paper's recipe (the defaults); ``fashion_mnist`` the CPU smoke run."""


def soft_target_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of ``-Σ_c target_c · log softmax(logits)_c`` for (B, K) logits and soft targets."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and soft targets {tuple(target.shape)} must match")
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


class ClassificationTask:
    """Cross-entropy training (soft targets under mixup/cutmix, label smoothing otherwise) and top-1/top-5
    evaluation sharded over the ranks."""

    key_metric = "top1"

    def __init__(self, config: ClassificationConfig, val_set: Dataset, num_classes: int, ctx: DistContext) -> None:
        self.config, self.val_set, self.ctx = config, val_set, ctx
        mixing = config.mixup > 0 or config.cutmix > 0
        self.mixup = (
            Mixup(
                mixup_alpha=config.mixup,
                cutmix_alpha=config.cutmix,
                prob=config.mixup_prob,
                switch_prob=config.mixup_switch_prob,
                label_smoothing=config.smoothing,
                num_classes=num_classes,
            )
            if mixing
            else None
        )

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        images, labels = batch
        if self.mixup is not None:
            images, target = self.mixup(images, labels)
            return soft_target_cross_entropy(model(images), target), {}
        return F.cross_entropy(model(images), labels, label_smoothing=self.config.smoothing), {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        loader = DataLoader(
            self.val_set,
            batch_size=self.config.eval_batch_size,
            sampler=ShardSampler(len(self.val_set), self.ctx),
            num_workers=self.config.workers,
        )
        totals = torch.zeros(4, dtype=torch.float64, device=self.ctx.device)
        for images, labels in loader:
            images, labels = images.to(self.ctx.device), labels.to(self.ctx.device)
            logits = model(images).float()
            correct1, correct5 = topk_correct(logits, labels)
            totals[0] += correct1
            totals[1] += correct5
            totals[2] += F.cross_entropy(logits, labels, reduction="sum")
            totals[3] += labels.numel()
        correct1, correct5, loss, count = all_reduce_sum(totals).tolist()
        return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "loss": loss / count}


def preprocessing(config: ClassificationConfig) -> PretrainedCfg:
    """The model's :class:`~tocalib.models.PretrainedCfg` (read from the model built on the meta device: no
    weights, no compute) with the run's ``--img-size``, ``--crop-pct``, ``--mean``, ``--std`` and
    ``--interpolation`` where given."""
    with torch.device("meta"):
        cfg = create_from_options("--model-kwargs", config.model, **config.model_kwargs).pretrained_cfg
    given = {"crop_pct": config.crop_pct, "mean": config.mean, "std": config.std, "interpolation": config.interpolation}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})
    if config.img_size is not None:
        cfg = dataclasses.replace(cfg, input_size=(cfg.input_size[0], config.img_size, config.img_size))
    if len(cfg.mean) != len(cfg.std):
        raise ValueError(f"mean {cfg.mean} and std {cfg.std} differ in length: give --mean and --std one per channel")
    return cfg


def build_datasets(config: ClassificationConfig, cfg: PretrainedCfg) -> tuple[Dataset | None, Dataset, int]:
    """(train set, validation set, number of classes) with the recipe's transforms at the size, normalisation and
    interpolation of ``cfg`` (:func:`preprocessing`); with ``--eval-only`` the train set is None and only the
    validation data is read."""
    val_transform = eval_transform(cfg)
    train_transform = classification_train_transform(
        size=cfg.input_size[-1],
        scale=config.scale,
        hflip=config.hflip,
        auto_augment=config.auto_augment,
        mean=cfg.mean,
        std=cfg.std,
        re_prob=config.reprob,
        re_mode=config.remode,
        re_count=config.recount,
        interpolation=cfg.interpolation,
    )
    if config.dataset == "fashion_mnist":
        root = config.data or FASHION_MNIST_ROOT
        val = FashionMNIST(root, "test", transform=val_transform)
        train = None if config.eval_only else FashionMNIST(root, "train", transform=train_transform)
        return train, val, len(FashionMNIST.CLASSES)
    if config.data is None:
        raise ValueError("--data is required for --dataset imagefolder: a folder with train/ and val/ class folders")
    val = ImageFolder(config.data / "val", transform=val_transform)
    if config.eval_only:
        return None, val, len(val.classes)
    train = ImageFolder(config.data / "train", transform=train_transform)
    if train.classes != val.classes:
        raise ValueError(
            f"{config.data}/train and {config.data}/val must hold the same class folders; they differ in "
            f"{sorted(set(train.classes) ^ set(val.classes))[:10]}"
        )
    return train, val, len(train.classes)


def build_model(config: ClassificationConfig, num_classes: int, log: RunLog) -> nn.Module:
    """The registered model with ``num_classes`` outputs, the run's drop path, and ``--pretrained`` weights."""
    overrides = dict(config.model_kwargs, num_classes=num_classes)
    if config.drop_path is not None:
        overrides["drop_path_rate"] = config.drop_path
    model = create_from_options("--model-kwargs", config.model, **overrides)
    if config.pretrained is not None:
        report = load_official_state_dict(model, config.pretrained, reset_head=config.reset_head)
        fresh = f"; a fresh {num_classes}-class head" if report.reset else ""
        log.info(f"loaded {len(report.loaded)} tensors from {config.pretrained}{fresh}")
    return model


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Parse the command line, train (or evaluate), return the last evaluation's metrics."""
    config = parse_config(ClassificationConfig, argv, PRESETS)
    with start_run(config.out, config.device, config.seed) as (ctx, log):
        cfg = preprocessing(config)
        train_set, val_set, num_classes = build_datasets(config, cfg)
        model = build_model(config, num_classes, log).to(ctx.device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        task = ClassificationTask(config, val_set, num_classes, ctx)
        name = (
            f"{config.model} with --model-kwargs {json.dumps(config.model_kwargs)}"
            if config.model_kwargs
            else config.model
        )
        log.info(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, {num_classes} classes")
        if config.eval_only:
            return evaluate_only(model, task, log)
        global_batch = config.batch_size * ctx.world_size
        lr, warmup_lr, min_lr = (
            (config.lr, config.warmup_lr, config.min_lr)
            if config.lr is not None
            else tuple(scaled_lr(v, global_batch) for v in (config.lr_base, config.warmup_lr, config.min_lr))
        )
        optimizer = torch.optim.AdamW(
            no_decay_groups(model, config.weight_decay), lr=lr, betas=tuple(config.betas), eps=config.eps
        )
        steps_per_epoch = batches_per_epoch(len(train_set), ctx, config.batch_size)
        schedule = WarmupCosine(
            total_steps=config.epochs * steps_per_epoch,
            warmup_steps=config.warmup_epochs * steps_per_epoch,
            warmup_factor=warmup_lr / lr,
            min_factor=min_lr / lr,
        )
        log.info(f"lr {lr:.3g} (warmup from {warmup_lr:.3g}, cosine to {min_lr:.3g}), global batch {global_batch}")
        return run_training(
            config,
            ctx,
            log,
            model,
            optimizer,
            schedule,
            train_set,
            task,
            total_steps=config.epochs * steps_per_epoch,
            eval_every=config.eval_every_epochs * steps_per_epoch,
            ema_decay=config.ema_decay,
            channels_last=config.channels_last,
            compile=config.compile,
        )


def cli() -> int:
    """The console script ``tocalib-train-classification``: :func:`main` on the process's arguments; the exit status."""
    return command_line(main, "classification")


if __name__ == "__main__":
    sys.exit(cli())
