"""Semantic-segmentation training and evaluation with the paper's ADE20k recipe (PaCaViT@4307018 segmentation configs).

Launch (one node, 8 GPUs × 2 images; the defaults are the paper's settings)::

    torchrun --nproc_per_node 8 -m tocalib.reproductions.train.segmentation --head paca \\
        --backbone pacavit_small_p2cconv_100_0 --pretrained IMNET_224_paca_small.pth \\
        --data /data/ADEChallengeData2016 --out runs/ade_paca_small

``--data`` is the ``ADEChallengeData2016`` folder (``images/{training,validation}/*.jpg``,
``annotations/{training,validation}/*.png``). The recipe: the ImageNet backbone with ``downstream_clusters``
(200, 200, 200, 0), whose re-shaped cluster layers keep their fresh initialisation; drop path 0.1; AdamW lr 6e-5,
weight decay 0.01, with mmengine ``custom_keys`` — for the PaCa head ``norm`` (no decay), ``clustering.4`` and
``head`` (lr × 10), for UperNet ``norm`` only; linear warmup over 1500 iterations from 1e-6 × lr, then poly decay
(power 1) to 0 at 160k iterations; 512 × 512 crops from mmseg's default ADE20k pipeline; the PaCa head's
auxiliary cluster loss (0.4) or UperNet's FCN auxiliary head (0.4); AMP and SyncBN on CUDA (on the CPU, BN
statistics stay per process). Evaluation is single-scale whole-image mIoU, sharded over the ranks.

``--preset textures`` trains a small PaCa-ViT + PaCa head on label maps tiled with scikit-image's textures
(``nox -s train_smoke``). ``--eval-only --checkpoint PATH`` evaluates a segmentor checkpoint (mmseg format or
this pipeline's ``best.pt``/``last.pt``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from tocalib.models import load_official_state_dict
from tocalib.models.heads import EncoderDecoder, load_mmengine_checkpoint, paca_segmentor, upernet_segmentor
from tocalib.models.paca_vit import model_config
from tocalib.reproductions.cli import command_line, create_from_options
from tocalib.reproductions.data import ade20k
from tocalib.reproductions.data.segmentation import TEXTURE_CLASSES, ADE20kTrain, TextureSegmentation
from tocalib.reproductions.metrics import IoUAccumulator
from tocalib.reproductions.train.config import (
    AT_LEAST_ONE,
    BELOW_ONE,
    NON_NEGATIVE,
    POSITIVE,
    SMALL_PACA,
    Limit,
    RunConfig,
    parse_config,
)
from tocalib.reproductions.train.distributed import DistContext, ShardSampler
from tocalib.reproductions.train.engine import RunLog, evaluate_only, run_training, start_run
from tocalib.reproductions.train.optim import WarmupPoly, custom_key_groups

__all__ = [
    "PAPER_CUSTOM_KEYS",
    "PRESETS",
    "SegmentationConfig",
    "SegmentationTask",
    "main",
    "paper_backbone_settings",
]

PAPER_CUSTOM_KEYS: dict[str, dict[str, dict[str, float]]] = {
    "paca": {"norm": {"decay_mult": 0.0}, "clustering.4": {"lr_mult": 10.0}, "head": {"lr_mult": 10.0}},
    "upernet": {"norm": {"decay_mult": 0.0}},
}
"""mmengine ``paramwise_cfg.custom_keys`` of the released ADE20k configs, per head."""


@dataclass
class SegmentationConfig(RunConfig):
    """Train (or evaluate) a PaCa-head or UperNet segmentor with the paper's ADE20k recipe under torchrun.

    Defaults are PaCaViT@4307018 segmentation configs. ``custom_keys=None`` takes the head's released ``custom_keys``
    (:data:`PAPER_CUSTOM_KEYS`); ``head_channels=None`` the head's width (256 PaCa, 512 UperNet);
    ``downstream_clusters=None`` and ``drop_path=None`` the released values for the backbone
    (:func:`paper_backbone_settings`).
    """

    LIMITS: ClassVar[dict[str, Limit]] = {
        **RunConfig.LIMITS, "downstream_clusters": NON_NEGATIVE, "head_channels": AT_LEAST_ONE, "crop": AT_LEAST_ONE,
        "scale": AT_LEAST_ONE, "texture_train_samples": AT_LEAST_ONE, "texture_val_samples": AT_LEAST_ONE,
        "iterations": AT_LEAST_ONE, "warmup_iters": NON_NEGATIVE, "warmup_start": NON_NEGATIVE,
        "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "betas": BELOW_ONE, "drop_path": BELOW_ONE, "power": NON_NEGATIVE,
        "eval_every": AT_LEAST_ONE,
    }  # fmt: skip

    head: Literal["paca", "upernet"] = "paca"
    backbone: str = "pacavit_small_p2cconv_100_0"
    backbone_kwargs: dict = field(default_factory=dict)
    downstream_clusters: tuple[int, ...] | None = None
    head_channels: int | None = None
    pretrained: Path | None = None
    checkpoint: Path | None = None
    eval_only: bool = False
    dataset: Literal["ade20k", "textures"] = "ade20k"
    data: Path | None = None
    crop: int = 512
    scale: tuple[int, int] = (2048, 512)
    texture_train_samples: int = 4000
    texture_val_samples: int = 200
    iterations: int = 160_000
    warmup_iters: int = 1500
    warmup_start: float = 1e-6
    power: float = 1.0
    lr: float = 6e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    custom_keys: dict | None = None
    drop_path: float | None = None
    batch_size: int = 2
    workers: int = 4
    out: Path = Path("runs/segmentation")
    eval_every: int = 16_000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup_iters >= self.iterations:
            raise ValueError(
                f"--warmup-iters ({self.warmup_iters}) must be below --iterations ({self.iterations}); lower it"
            )
        if self.eval_only and self.checkpoint is None:
            raise ValueError(
                "--eval-only evaluates a trained segmentor: pass --checkpoint PATH (an mmseg-format file or this "
                "pipeline's best.pt); --pretrained only initialises the backbone"
            )


PRESETS: dict[str, dict] = {
    "ade20k": {},
    "textures": {
        "dataset": "textures",
        "head": "paca",
        "backbone": "pacavit_tiny_p2cconv_100_0",
        "backbone_kwargs": SMALL_PACA,
        "downstream_clusters": (32, 16, 8, 0),
        "head_channels": 64,
        "crop": 128,
        "iterations": 1500,
        "warmup_iters": 100,
        "lr": 1e-3,
        "drop_path": 0.05,
        "batch_size": 4,
        "workers": 0,
        "log_every": 50,
        "eval_every": 500,
        "out": Path("runs/textures"),
    },
}
"""Named settings: ``ade20k`` is the paper's recipe (the defaults); ``textures`` the CPU smoke run."""


class SegmentationTask:
    """The segmentor's named losses summed (decode 1.0 + cluster or auxiliary 0.4), and mIoU evaluation sharded
    over the ranks (one image per forward, logits resized to the label map)."""

    key_metric = "mIoU"

    def __init__(self, val_set: Dataset, num_classes: int, ctx: DistContext, workers: int) -> None:
        self.val_set, self.num_classes, self.ctx, self.workers = val_set, num_classes, ctx, workers

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        images, labels = batch
        losses = model(images, labels)
        return sum(losses.values()), losses

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        loader = DataLoader(
            self.val_set, batch_size=1, sampler=ShardSampler(len(self.val_set), self.ctx), num_workers=self.workers
        )
        iou = IoUAccumulator(self.num_classes)
        for image, labels in loader:
            pred = model.predict(image.to(self.ctx.device), size=labels.shape[-2:])
            iou.update(pred.cpu(), labels)
        iou.all_reduce()
        metrics = iou.compute()
        return {"mIoU": metrics["mIoU"], "aAcc": metrics["aAcc"]}


def build_datasets(config: SegmentationConfig) -> tuple[Dataset | None, Dataset, int]:
    """(train set, validation set, number of classes); with ``--eval-only`` the train set is None and only the
    validation data is read."""
    if config.dataset == "textures":
        val = TextureSegmentation("val", size=config.crop, length=config.texture_val_samples, seed=config.seed)
        train = (
            None
            if config.eval_only
            else TextureSegmentation("train", size=config.crop, length=config.texture_train_samples, seed=config.seed)
        )
        return train, val, len(TEXTURE_CLASSES)
    if config.data is None:
        raise ValueError("--data is required for --dataset ade20k: the ADEChallengeData2016 folder")
    scale = tuple(config.scale)
    val = ade20k.ADE20kVal(config.data, scale)
    train = None if config.eval_only else ADE20kTrain(config.data, "training", crop=config.crop, scale=scale)
    return train, val, ade20k.NUM_CLASSES


def paper_backbone_settings(backbone: str, head: str) -> tuple[tuple[int, ...] | None, float]:
    """The released ADE20k configs' ``downstream_cluster_num`` and drop path for a PaCa-ViT backbone (PaCaViT@4307018
    segmentation configs): 200 clusters in every stage where the ImageNet model has clusters (so [200]*4 for the
    teachers and the 49_100, 100_49, 100 and blockwise ablations, [200, 200, 200, 0] otherwise); drop path 0.1, or
    0.5 for the PaCa head on the Base models. Another backbone (PVTv2, Swin) has no clusters: None, drop path 0.1."""
    try:
        config = model_config(backbone)
    except KeyError:
        return None, 0.1
    clusters = tuple(200 if m else 0 for m in config["num_clusters"])
    return clusters, 0.5 if head == "paca" and "_base_" in backbone else 0.1


def build_segmentor(config: SegmentationConfig, num_classes: int, log: RunLog) -> EncoderDecoder:
    """Backbone (features only, downstream clusters, ImageNet weights from ``--pretrained``) + the chosen head;
    ``--checkpoint`` then loads a whole segmentor."""
    clusters, drop_path = paper_backbone_settings(config.backbone, config.head)
    if clusters is None and config.downstream_clusters is not None:
        log.info(f"backbone {config.backbone} has no clusters: downstream clusters {config.downstream_clusters} unused")
    elif config.downstream_clusters is not None:
        clusters = config.downstream_clusters
    drop_path = drop_path if config.drop_path is None else config.drop_path
    described = "no clusters" if clusters is None else f"clusters per stage {tuple(clusters)}"
    log.info(f"backbone {config.backbone}: {described}, drop path {drop_path}")
    overrides = {} if clusters is None else {"num_clusters": clusters}
    backbone = create_from_options(
        "--backbone-kwargs",
        config.backbone,
        **config.backbone_kwargs,
        **overrides,
        num_classes=0,
        features_only=True,
        drop_path_rate=drop_path,
    )
    if config.pretrained is not None:
        report = load_official_state_dict(backbone, config.pretrained, skip_mismatched_clusters=True)
        log.info(
            f"backbone: {len(report.loaded)} tensors from {config.pretrained}; fresh cluster layers "
            f"{report.skipped_clusters}"
        )
    factory = paca_segmentor if config.head == "paca" else upernet_segmentor
    channels = {} if config.head_channels is None else {"channels": config.head_channels}
    segmentor = factory(backbone, backbone.feature_info.channels(), num_classes, **channels)
    if config.checkpoint is not None:
        report = load_mmengine_checkpoint(segmentor, config.checkpoint)
        log.info(f"segmentor: {len(report.loaded)} tensors from {config.checkpoint}")
    return segmentor


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Parse the command line, train (or evaluate), return the last evaluation's metrics."""
    config = parse_config(SegmentationConfig, argv, PRESETS)
    with start_run(config.out, config.device, config.seed) as (ctx, log):
        train_set, val_set, num_classes = build_datasets(config)
        model: nn.Module = build_segmentor(config, num_classes, log).to(ctx.device)
        if ctx.distributed and ctx.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        task = SegmentationTask(val_set, num_classes, ctx, config.workers)
        log.info(f"{config.head} head on {config.backbone}: {sum(p.numel() for p in model.parameters()):,} parameters")
        if config.eval_only:
            return evaluate_only(model, task, log)
        custom_keys = PAPER_CUSTOM_KEYS[config.head] if config.custom_keys is None else config.custom_keys
        groups = custom_key_groups(model, config.lr, config.weight_decay, custom_keys)
        for group in groups:
            log.info(
                f"param group {group['custom_key']!r}: {len(group['params'])} tensors, lr {group['lr']:.3g}, "
                f"weight decay {group['weight_decay']:.3g}"
            )
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))
        schedule = WarmupPoly(config.iterations, config.warmup_iters, config.warmup_start, config.power)
        return run_training(
            config, ctx, log, model, optimizer, schedule, train_set, task, config.iterations, config.eval_every
        )


def cli() -> int:
    """The console script ``tocalib-train-segmentation``: :func:`main` on the process's arguments; the exit status."""
    return command_line(main, "segmentation")


if __name__ == "__main__":
    sys.exit(cli())
