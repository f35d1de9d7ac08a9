"""Build each row's model and count its parameters and MACs ("FLOPs") with the project's counter.

Conventions (those under which the numbers of PaCaViT@4307018's README reproduce):

* **classification**: the whole model, 1000-way head included; fvcore rules plus tocalib's handles
  (:func:`tocalib.flops.mac_analysis`, as ``count_macs``) on one (1, 3, H, W) image; mean pooling does no MACs.
* **detection**: Mask R-CNN params of every module; MACs of backbone + FPN + RPN + box head on 1000 proposals +
  mask head on 100 RoIs at (H, W) = (1280, 800) (:func:`tocalib.models.heads.flops.mask_rcnn_macs`, convention
  ``"paper"``).
* **segmentation**: params of every module (UperNet's FCN auxiliary head included); MACs of backbone + decode
  head at 512×512, traced as :func:`tocalib.models.heads.flops.segmentor_macs` does.

**The official counter's blind spot.** The official teacher (``PaCaTeacher_ConvMixer``) builds its 7×7 depthwise
ConvMixer convolutions with ``padding="same"``, which traces to ``aten::_convolution_mode``; fvcore has no handle
for it and skipped those convolutions without a word, so the README's FLOPs of every teacher model leave them out
(found by the models' tests, ``tests/models/test_paca_vit.py``). Our teacher pads explicitly and our counter counts
them. ``Count.macs`` is the README's convention — the trace's total minus the MACs that the trace attributes to
exactly those convolutions (:func:`official_fvcore_skips`) — and ``parts["all_ops"]`` is everything.

Counting Mask R-CNN at 1280×800 runs the backbone for real under fvcore's tracer, the slow part. So each row
traces only its own backbone + FPN, once, and the RPN and RoI heads — the same in every row (256-channel pyramid,
same test settings) — are counted once per resolution by ``mask_rcnn_macs`` on a stand-in backbone that returns
zero maps of the real backbone's output shapes (taken from a meta-device forward, no compute). Within one
:class:`CountingPool` each distinct architecture is counted once; nothing is kept between runs. The pool spreads
the work over worker processes of one thread each: on a small, shared CPU two single-threaded tracers finish
sooner than one two-threaded tracer.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from tocalib.flops import mac_analysis
from tocalib.models import create_model
from tocalib.models.heads import MaskRCNN, paca_segmentor, upernet_segmentor
from tocalib.models.heads.flops import NOT_MACS as DETECTION_NOT_MACS
from tocalib.models.heads.flops import mask_rcnn_macs
from tocalib.providers import ConvMixerLayer
from tocalib.reproductions.tables import Row, Section

__all__ = [
    "Count",
    "CountingPool",
    "ModelCounter",
    "build_row_model",
    "count_detection_heads",
    "num_params",
    "official_fvcore_skips",
]

HEAD_PARTS = ("rpn_head", "bbox_head", "mask_head")
"""Mask R-CNN parts whose MACs do not depend on the backbone."""


def num_params(module: nn.Module) -> int:
    """Number of parameters (buffers excluded), as ``sum(p.numel())`` in the official benchmark scripts."""
    return sum(p.numel() for p in module.parameters())


def build_row_model(section: Section, row: Row) -> nn.Module:
    """A fresh, randomly initialised model for ``row``, in eval mode: the classifier, the Mask R-CNN or the
    segmentor, with the row's per-stage cluster override."""
    overrides: dict[str, Any] = {} if row.num_clusters is None else {"num_clusters": row.num_clusters}
    if section.task == "classification":
        return create_model(row.model, **overrides).eval()
    backbone = create_model(row.model, features_only=True, **overrides)
    dims = backbone.feature_info.channels()
    if section.task == "detection":
        return MaskRCNN(backbone, dims).eval()
    build = upernet_segmentor if row.head == "upernet" else paca_segmentor
    return build(backbone, dims).eval()


SKIPPED = "skipped_by_official_fvcore"
"""``Count.parts`` key: MACs that fvcore did not count in the official code (see the module docstring)."""


def official_fvcore_skips(model: nn.Module) -> list[str]:
    """Names of the modules whose MACs fvcore skipped in the official code: the depthwise k×k convolution of
    every teacher ConvMixer layer (:attr:`~tocalib.providers.ConvMixerLayer.depthwise`), built there with
    ``padding="same"``."""
    convs = {id(layer.depthwise) for layer in model.modules() if isinstance(layer, ConvMixerLayer)}
    return [name for name, module in model.named_modules() if id(module) in convs]


def _traced_parts(model: nn.Module, image: Tensor, not_macs: tuple[str, ...] = (), split: Sequence[str] = ()) -> dict:
    """One fvcore trace of ``model(image)``: ``all_ops``, the :data:`SKIPPED` MACs, and the MACs of each
    top-level child named in ``split``."""
    by_module = mac_analysis(model, image, not_macs=not_macs).by_module()
    parts = {name: int(by_module[f"module.{name}"]) for name in split}
    parts["all_ops"] = int(by_module["module"])
    parts[SKIPPED] = sum(int(by_module[f"module.{name}"]) for name in official_fvcore_skips(model))
    return parts


@dataclass(frozen=True)
class Count:
    """Params and MACs of one row's model. ``macs`` follows the README's convention (``all_ops`` minus
    :data:`SKIPPED`); ``parts`` holds ``all_ops``, :data:`SKIPPED` and, for Mask R-CNN, the per-part MACs."""

    params: int
    macs: int
    parts: dict[str, int]
    seconds: float
    reused: bool = False
    """True when an identical architecture was already counted in this run."""


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


def count_detection_heads(section: Section, row: Row) -> dict[str, int]:
    """MACs of the Mask R-CNN parts that do not depend on the backbone (:data:`HEAD_PARTS`) at
    ``section.resolution``, in ``mask_rcnn_macs``'s "paper" convention."""
    image_hw = section.resolution
    with torch.device("meta"):  # output shapes only: no initialisation, no compute
        backbone = build_row_model(section, row).backbone
        shapes = [tuple(f.shape) for f in backbone(torch.zeros(1, 3, *image_hw))]
    stand_in = MaskRCNN(_FixedFeatures(shapes), backbone.feature_info.channels())
    with torch.no_grad():
        counts = mask_rcnn_macs(stand_in, image_hw, convention="paper")
    return {name: counts[name] for name in HEAD_PARTS}


class ModelCounter:
    """Counts rows; remembers, for the lifetime of this object only, what it already counted.

    For detection rows the count covers backbone + FPN only; :class:`CountingPool` adds the heads.
    """

    def __init__(self) -> None:
        self._done: dict[tuple[Any, ...], Count] = {}

    def count(self, section: Section, row: Row) -> Count:
        """Params and MACs of ``row`` at ``section.resolution`` (detection: without the RPN and RoI heads)."""
        key = (section.task, row.model, row.head, row.num_clusters, section.resolution)
        if key in self._done:
            return dataclasses.replace(self._done[key], seconds=0.0, reused=True)
        start = time.perf_counter()
        model = build_row_model(section, row)
        image = torch.ones(1, 3, *section.resolution)
        with torch.no_grad():
            if section.task in ("classification", "segmentation"):  # segmentation: decode head only, as
                parts = _traced_parts(model, image)  # tocalib.models.heads.flops.segmentor_macs counts
            else:
                assert isinstance(model, MaskRCNN)
                parts = _pyramid_macs(model, image)
        macs = parts["all_ops"] - parts[SKIPPED]
        result = Count(num_params(model), macs, parts, time.perf_counter() - start)
        self._done[key] = result
        return result


def _pyramid_macs(model: MaskRCNN, image: Tensor) -> dict[str, int]:
    """Backbone and FPN MACs of a Mask R-CNN, from one trace."""
    pyramid = _Pyramid(model)
    if any(isinstance(m, nn.ConvTranspose2d) for m in pyramid.modules()):
        raise RuntimeError(
            "the backbone or FPN holds a transposed convolution, which the 'paper' convention counts differently "
            "from fvcore: count this model with tocalib.models.heads.flops.mask_rcnn_macs instead"
        )
    return _traced_parts(pyramid, image, not_macs=DETECTION_NOT_MACS, split=("backbone", "neck"))


def _with_heads(count: Count, heads: dict[str, int]) -> Count:
    """A backbone + FPN count completed with the RPN and RoI heads."""
    parts = {**count.parts, **heads}
    parts["all_ops"] += sum(heads.values())
    return dataclasses.replace(count, macs=parts["all_ops"] - parts[SKIPPED], parts=parts)


_WORKER_COUNTER: ModelCounter | None = None
"""The :class:`ModelCounter` of a :class:`CountingPool` worker process (one per process, for the pool's lifetime)."""


def _start_worker() -> None:
    global _WORKER_COUNTER
    torch.set_num_threads(1)
    _WORKER_COUNTER = ModelCounter()


def _announce(section: Section, row: Row) -> None:
    h, w = section.resolution
    print(f"      … counting {section.id}: {row.label} at {h}×{w}", flush=True)


def _count_in_worker(section: Section, row: Row) -> Count:
    if _WORKER_COUNTER is None:  # in-process pool
        _start_worker()
    assert _WORKER_COUNTER is not None
    _announce(section, row)
    return _WORKER_COUNTER.count(section, row)


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

    Use as a context manager; :meth:`counts` yields complete counts (Mask R-CNN heads included) in row order.
    """

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be ≥ 1, got {workers}")
        self._pool: ProcessPoolExecutor | _InProcess = (
            _InProcess()
            if workers == 1
            else ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker
            )
        )
        self._heads: dict[tuple[int, int], Future[dict[str, int]]] = {}

    def counts(self, rows: Sequence[tuple[Section, Row]]) -> Iterator[Count]:
        """The :class:`Count` of each (section, row), in order."""
        for section, row in rows:  # the shared heads first, so that they run alongside the first rows
            if section.task == "detection" and section.resolution not in self._heads:
                self._heads[section.resolution] = self._pool.submit(count_detection_heads, section, row)
        futures = [self._pool.submit(_count_in_worker, section, row) for section, row in rows]
        for (section, _), future in zip(rows, futures, strict=True):
            count = future.result()
            yield _with_heads(count, self._heads[section.resolution].result()) if section.task == "detection" else count

    def __enter__(self) -> CountingPool:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._pool.shutdown(cancel_futures=True)
