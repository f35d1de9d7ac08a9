"""Accuracy of the released checkpoints: ImageNet top-1, ADE20k mIoU, COCO box/mask AP.

:func:`evaluate_row` builds a row's model (:func:`tocalib.reproductions.counting.build_row_model`), loads its checkpoint
strictly and runs the task's evaluation on the dataset folder. Readers use Pillow and numpy only; the COCO metric
needs pycocotools (``pip install pycocotools``), imported only when a COCO row is evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from tocalib.models import load_official_state_dict
from tocalib.models.heads import EncoderDecoder, MaskRCNN, load_mmengine_checkpoint
from tocalib.reproductions.counting import build_row_model
from tocalib.reproductions.tables import Row, Section

__all__ = ["DATA_LAYOUT", "check_eval_inputs", "evaluate_row"]

DATA_LAYOUT = {
    "classification": "<class folder>/<image> files (ImageNet val sorted into class folders; sorted names = indices)",
    "segmentation": "images/validation/*.jpg and annotations/validation/*.png (ADEChallengeData2016)",
    "detection": "val2017/*.jpg and annotations/instances_val2017.json (COCO 2017)",
}
"""What each task expects inside its dataset folder (``--data``/``section.data``)."""


def check_eval_inputs(rows: Sequence[tuple[Section, Row]], checkpoints: Path, data: Path) -> None:
    """Fail before any work when a checkpoint file or dataset folder is missing, naming every missing path and
    what was expected there."""
    problems = []
    for section, row in rows:
        path = checkpoints / row.checkpoint
        if not path.is_file():
            problems.append(f"missing checkpoint {path} (the README's file for {section.id} row {row.label!r})")
    for section in {section.id: section for section, _ in rows}.values():
        folder = data / section.data
        if not folder.is_dir():
            problems.append(f"missing dataset folder {folder}: expected {DATA_LAYOUT[section.task]}")
    if problems:
        raise FileNotFoundError("cannot evaluate:\n  " + "\n  ".join(problems))


def evaluate_row(
    section: Section,
    row: Row,
    checkpoint: Path,
    root: Path,
    log: Callable[[str], None] = print,
    allow_fewer_classes: bool = False,
    **settings: object,
) -> dict[str, float]:
    """Metrics of ``row``'s released ``checkpoint`` on the dataset folder ``root``, keyed as ``section.metrics``.

    ``settings`` go to the task's ``evaluate`` (e.g. a smaller ``scale`` in tests); defaults are the paper's.
    ``allow_fewer_classes``: ImageNet folders for only the model's first classes (see
    :func:`tocalib.reproductions.eval.imagenet.evaluate`).
    """
    model = build_row_model(section, row)
    if section.task == "classification":
        from tocalib.reproductions.eval import imagenet

        load_official_state_dict(model, checkpoint)
        metrics = imagenet.evaluate(model, root, log=log, allow_fewer_classes=allow_fewer_classes, **settings)
    elif section.task == "segmentation":
        from tocalib.reproductions.eval import ade20k

        assert isinstance(model, EncoderDecoder)
        load_mmengine_checkpoint(model, checkpoint)
        metrics = ade20k.evaluate(model, root, log=log, **settings)
    else:
        from tocalib.reproductions.eval import coco

        assert isinstance(model, MaskRCNN)
        load_mmengine_checkpoint(model, checkpoint)
        metrics = coco.evaluate(model, root, log=log, **settings)
    return {name: metrics[name] for name in section.metrics}
