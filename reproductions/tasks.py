"""The task registry: what a table section's ``task`` means — how to build a row's model, count its MACs, evaluate
its released checkpoint, and what its dataset folder holds. One :class:`Task` per kind (``classification``,
``detection``, ``segmentation``); the tables (``reproductions/tables/*.toml``) name them, so a new table or row is
data only, and a new kind of task is one :class:`Task` subclass passed to :func:`register_task`.

>>> sorted(TASKS)
['classification', 'detection', 'segmentation']
>>> get_task("segmentation").heads
('upernet', 'paca')

Counting conventions (those under which the numbers of PaCaViT@4307018's README reproduce) are each task's
docstring. **The official counter's blind spot**, common to all: the official teacher (``PaCaTeacher_ConvMixer``)
builds its 7×7 depthwise ConvMixer convolutions with ``padding="same"``, which traces to
``aten::_convolution_mode``; fvcore has no handle for it and skipped those convolutions without a word, so the
README's FLOPs of every teacher model leave them out (found by the models' tests, ``tests/models/test_paca_vit.py``).
Our teacher pads explicitly and our counter counts them. Every task's :meth:`Task.count` reports the trace's total
(``all_ops``) and the MACs of exactly those convolutions (:data:`SKIPPED`, :func:`official_fvcore_skips`); the
README's convention is their difference.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from tocalib.flops import mac_analysis
from tocalib.models import create_model, load_official_state_dict
from tocalib.models.heads import MaskRCNN, load_mmengine_checkpoint, paca_segmentor, upernet_segmentor
from tocalib.models.heads.flops import NOT_MACS as DETECTION_NOT_MACS
from tocalib.models.heads.flops import mask_rcnn_macs
from tocalib.providers import ConvMixerLayer

if TYPE_CHECKING:
    from tocalib.reproductions.tables import Row, Section

__all__ = [
    "SKIPPED",
    "SKIPPED_NOTE",
    "TASKS",
    "ADE20kTask",
    "COCOTask",
    "ImageNetTask",
    "Task",
    "check_eval_inputs",
    "evaluate_row",
    "get_task",
    "official_fvcore_skips",
    "register_task",
    "traced_parts",
]

SKIPPED = "skipped_by_official_fvcore"
"""``Count.parts`` key: MACs that fvcore did not count in the official code (see the module docstring)."""

SKIPPED_NOTE = (
    "Teacher rows: reproduced FLOPs follow the README, which leaves out the teacher's 7×7 depthwise convs "
    "(built with padding='same' in the official code: aten::_convolution_mode, which fvcore skips); counting them too:"
)
"""What the report says above the rows whose :data:`SKIPPED` MACs are not zero."""


def official_fvcore_skips(model: nn.Module) -> list[str]:
    """Names of the modules whose MACs fvcore skipped in the official code: the depthwise k×k convolution of
    every teacher ConvMixer layer (:attr:`~tocalib.providers.ConvMixerLayer.depthwise`), built there with
    ``padding="same"``."""
    convs = {id(layer.depthwise) for layer in model.modules() if isinstance(layer, ConvMixerLayer)}
    return [name for name, module in model.named_modules() if id(module) in convs]


def traced_parts(model: nn.Module, image: Tensor, not_macs: tuple[str, ...] = (), split: Sequence[str] = ()) -> dict:
    """One fvcore trace of ``model(image)``: ``all_ops``, the :data:`SKIPPED` MACs, and the MACs of each
    top-level child named in ``split``."""
    by_module = mac_analysis(model, image, not_macs=not_macs).by_module()
    parts = {name: int(by_module[f"module.{name}"]) for name in split}
    parts["all_ops"] = int(by_module["module"])
    parts[SKIPPED] = sum(int(by_module[f"module.{name}"]) for name in official_fvcore_skips(model))
    return parts


class Task(ABC):
    """One kind of table section. Subclasses set :attr:`name`, :attr:`data_layout` (and :attr:`heads` when rows
    pick one) and implement :meth:`build`, :meth:`load` and :meth:`run_evaluation`; :meth:`count` traces the
    whole model on one image unless overridden."""

    name: ClassVar[str]
    """The ``task`` value of a table section."""
    data_layout: ClassVar[str]
    """What the section's dataset folder (``--data``/``section.data``) holds."""
    heads: ClassVar[tuple[str | None, ...]] = (None,)
    """The values a row's ``head`` may take (None: the row names no head)."""
    shared_parts: ClassVar[tuple[str, ...]] = ()
    """Parts whose MACs do not depend on the row's backbone: :meth:`count_shared` counts them once per resolution,
    and a :class:`~tocalib.reproductions.counting.CountingPool` adds them to every row's :meth:`count`."""

    @abstractmethod
    def build(self, row: Row) -> nn.Module:
        """A fresh, randomly initialised model for ``row``, in eval mode."""

    def count(self, model: nn.Module, resolution: tuple[int, int]) -> dict[str, int]:
        """MAC parts of ``model`` (built by :meth:`build`) on one (1, 3, H, W) image: at least ``all_ops`` and
        :data:`SKIPPED` (see :func:`traced_parts`), without the :attr:`shared_parts`."""
        with torch.no_grad():
            return traced_parts(model, torch.ones(1, 3, *resolution))

    def count_shared(self, row: Row, resolution: tuple[int, int]) -> dict[str, int]:
        """MACs of each of the :attr:`shared_parts` at ``resolution`` (``row`` is any row of this task)."""
        raise NotImplementedError(f"the {self.name} task has no shared parts")

    @abstractmethod
    def load(self, model: nn.Module, checkpoint: Path) -> None:
        """Load a released checkpoint file into ``model`` strictly (every key, every shape)."""

    @abstractmethod
    def run_evaluation(
        self, model: nn.Module, root: Path, log: Callable[[str], None], allow_fewer_classes: bool, **settings: Any
    ) -> dict[str, float]:
        """The task's metrics of a loaded ``model`` on the dataset folder ``root``."""

    @staticmethod
    def backbone(row: Row, **kwargs: Any) -> nn.Module:
        """``create_model(row.model, ...)`` with the row's per-stage cluster override."""
        overrides = {} if row.num_clusters is None else {"num_clusters": row.num_clusters}
        return create_model(row.model, **overrides, **kwargs)


TASKS: dict[str, Task] = {}
"""The registered tasks by name (:func:`register_task`)."""


def register_task(task: Task) -> Task:
    """Add ``task`` under ``task.name``; a name that is taken is an error."""
    if task.name in TASKS:
        raise ValueError(f"a task named {task.name!r} is already registered ({type(TASKS[task.name]).__name__})")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The task registered as ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


class ImageNetTask(Task):
    """ImageNet-1k classifiers. Counting: the whole model, 1000-way head included, fvcore rules plus tocalib's
    handles (:func:`tocalib.flops.mac_analysis`) on one (1, 3, H, W) image; mean pooling does no MACs.
    Evaluation: top-1/top-5 (:func:`tocalib.reproductions.eval.imagenet.evaluate`)."""

    name = "classification"
    data_layout = "<class folder>/<image> files (ImageNet val sorted into class folders; sorted names = indices)"

    def build(self, row: Row) -> nn.Module:
        return self.backbone(row).eval()

    def load(self, model: nn.Module, checkpoint: Path) -> None:
        load_official_state_dict(model, checkpoint)

    def run_evaluation(
        self, model: nn.Module, root: Path, log: Callable[[str], None], allow_fewer_classes: bool, **settings: Any
    ) -> dict[str, float]:
        from tocalib.reproductions.eval import imagenet

        return imagenet.evaluate(model, root, log=log, allow_fewer_classes=allow_fewer_classes, **settings)


class _DenseTask(Task):
    """A dense-prediction task: its checkpoints are mmengine files (mmdet, mmseg), and its evaluation
    (:meth:`evaluator`) runs on whatever images ``root`` holds, so ``allow_fewer_classes`` changes nothing."""

    @abstractmethod
    def evaluator(self) -> Callable[..., dict[str, float]]:
        """The ``evaluate`` function of this task's :mod:`tocalib.reproductions.eval` module, imported on demand."""

    def load(self, model: nn.Module, checkpoint: Path) -> None:
        load_mmengine_checkpoint(model, checkpoint)

    def run_evaluation(
        self, model: nn.Module, root: Path, log: Callable[[str], None], allow_fewer_classes: bool, **settings: Any
    ) -> dict[str, float]:
        return self.evaluator()(model, root, log=log, **settings)


class _Pyramid(nn.Module):
    """Backbone + FPN of a Mask R-CNN as one traceable module (the image → P2–P6 part)."""

    def __init__(self, detector: MaskRCNN) -> None:
        super().__init__()
        self.backbone = detector.backbone
        self.neck = detector.neck

    def forward(self, img: Tensor) -> list[Tensor]:
        return self.neck(list(self.backbone(img)))


class _FixedFeatures(nn.Module):
    """Stand-in backbone returning zero maps of given shapes: lets ``mask_rcnn_macs`` count the heads without
    running a real backbone."""

    def __init__(self, shapes: Sequence[tuple[int, ...]]) -> None:
        super().__init__()
        for i, shape in enumerate(shapes):
            self.register_buffer(f"feature{i}", torch.zeros(shape), persistent=False)
        self.count = len(shapes)

    def forward(self, img: Tensor) -> list[Tensor]:
        # The tracer needs outputs that depend on the input; sum, mul and add do no MACs.
        anchor = img.sum() * 0
        return [getattr(self, f"feature{i}") + anchor for i in range(self.count)]


class COCOTask(_DenseTask):
    """MS-COCO Mask R-CNN. Counting: params of every module; MACs of backbone + FPN + RPN + box head on 1000
    proposals + mask head on 100 RoIs (:func:`tocalib.models.heads.flops.mask_rcnn_macs`, convention ``"paper"``).

    Counting Mask R-CNN at 1280×800 runs the backbone for real under fvcore's tracer, the slow part. So each row
    traces only its own backbone + FPN (:meth:`count`), and the RPN and RoI heads — the same in every row
    (256-channel pyramid, same test settings) — are counted once per resolution (:meth:`count_shared`) on a
    stand-in backbone that returns zero maps of the real backbone's output shapes (taken from a meta-device
    forward, no compute). Evaluation: box and mask AP (:func:`tocalib.reproductions.eval.coco.evaluate`)."""

    name = "detection"
    data_layout = "val2017/*.jpg and annotations/instances_val2017.json (COCO 2017)"
    shared_parts = ("rpn_head", "bbox_head", "mask_head")

    def build(self, row: Row) -> nn.Module:
        backbone = self.backbone(row, features_only=True)
        return MaskRCNN(backbone, backbone.feature_info.channels()).eval()

    def evaluator(self) -> Callable[..., dict[str, float]]:
        from tocalib.reproductions.eval import coco  # pycocotools, when a COCO row is evaluated

        return coco.evaluate

    def count(self, model: nn.Module, resolution: tuple[int, int]) -> dict[str, int]:
        assert isinstance(model, MaskRCNN)
        pyramid = _Pyramid(model)
        if any(isinstance(m, nn.ConvTranspose2d) for m in pyramid.modules()):
            raise RuntimeError(
                "the backbone or FPN holds a transposed convolution, which the 'paper' convention counts differently "
                "from fvcore: count this model with tocalib.models.heads.flops.mask_rcnn_macs instead"
            )
        with torch.no_grad():
            image = torch.ones(1, 3, *resolution)
            return traced_parts(pyramid, image, not_macs=DETECTION_NOT_MACS, split=("backbone", "neck"))

    def count_shared(self, row: Row, resolution: tuple[int, int]) -> dict[str, int]:
        with torch.device("meta"):  # output shapes only: no initialisation, no compute
            backbone = self.backbone(row, features_only=True)
            shapes = [tuple(f.shape) for f in backbone(torch.zeros(1, 3, *resolution))]
        stand_in = MaskRCNN(_FixedFeatures(shapes), backbone.feature_info.channels())
        with torch.no_grad():
            counts = mask_rcnn_macs(stand_in, resolution, convention="paper")
        return {name: counts[name] for name in self.shared_parts}


class ADE20kTask(_DenseTask):
    """ADE20k semantic segmentation with a row's ``head``: UperNet or the PaCa head. Counting: params of every
    module (UperNet's FCN auxiliary head included); MACs of backbone + decode head on one image, the eval-mode
    forward that :func:`tocalib.models.heads.flops.segmentor_macs` traces. Evaluation: mIoU and aAcc
    (:func:`tocalib.reproductions.eval.ade20k.evaluate`)."""

    name = "segmentation"
    data_layout = "images/validation/*.jpg and annotations/validation/*.png (ADEChallengeData2016)"
    heads = ("upernet", "paca")

    def build(self, row: Row) -> nn.Module:
        backbone = self.backbone(row, features_only=True)
        build = upernet_segmentor if row.head == "upernet" else paca_segmentor
        return build(backbone, backbone.feature_info.channels()).eval()

    def evaluator(self) -> Callable[..., dict[str, float]]:
        from tocalib.reproductions.eval import ade20k

        return ade20k.evaluate


for _task in (ImageNetTask(), COCOTask(), ADE20kTask()):
    register_task(_task)


def check_eval_inputs(rows: Sequence[tuple[Section, Row]], checkpoints: Path, data: Path) -> None:
    """Fail before any work when a checkpoint file or dataset folder is missing, naming every missing path and
    what was expected there (the task's :attr:`Task.data_layout`)."""
    problems = []
    for section, row in rows:
        path = checkpoints / row.checkpoint
        if not path.is_file():
            problems.append(f"missing checkpoint {path} (the README's file for {section.id} row {row.label!r})")
    for section in {section.id: section for section, _ in rows}.values():
        folder = data / section.data
        if not folder.is_dir():
            problems.append(f"missing dataset folder {folder}: expected {get_task(section.task).data_layout}")
    if problems:
        raise FileNotFoundError("cannot evaluate:\n  " + "\n  ".join(problems))


def evaluate_row(
    section: Section,
    row: Row,
    checkpoint: Path,
    root: Path,
    log: Callable[[str], None] = print,
    allow_fewer_classes: bool = False,
    **settings: Any,
) -> dict[str, float]:
    """Metrics of ``row``'s released ``checkpoint`` on the dataset folder ``root``, keyed as ``section.metrics``:
    the section's task builds the model, loads the checkpoint strictly and evaluates it.

    ``settings`` go to the task's evaluation (e.g. a smaller ``scale`` in tests); defaults are the paper's.
    ``allow_fewer_classes``: ImageNet folders for only the model's first classes (see
    :func:`tocalib.reproductions.eval.imagenet.evaluate`).
    """
    task = get_task(section.task)
    model = task.build(row)
    task.load(model, checkpoint)
    metrics = task.run_evaluation(model, root, log, allow_fewer_classes, **settings)
    return {name: metrics[name] for name in section.metrics}
