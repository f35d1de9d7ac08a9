"""Load official mmdet / mmseg (mmengine-format) checkpoints into :class:`MaskRCNN` and :class:`EncoderDecoder`.

An mmengine checkpoint is ``{'meta', 'state_dict', ...}`` whose ``state_dict`` keys start with the module
names (``backbone.``, ``neck.``, ``rpn_head.``, ``roi_head.``, ``decode_head.``, ``auxiliary_head.``). The
backbone part goes through :func:`models.load_official_state_dict` (its cluster-layer rules included); every
other top-level module is loaded by the same function under its mmdet/mmseg name, so both parts report
missing, unexpected and mismatched keys the same way. Loading is all-or-nothing: on an error the model is
restored before the :class:`~models.loading.StateDictMismatchError` propagates.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from models.loading import LoadReport, StateDictMismatchError, load_official_state_dict

__all__ = ["load_mmengine_checkpoint"]


def _state_dict(checkpoint: Mapping[str, object] | str | os.PathLike[str]) -> dict[str, Tensor]:
    if isinstance(checkpoint, (str, os.PathLike)):
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"checkpoint file {os.fspath(checkpoint)!r} does not exist; check the path")
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint['state_dict'] must be a mapping of tensors, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_mmengine_checkpoint(
    model: nn.Module,
    checkpoint: Mapping[str, object] | str | os.PathLike[str],
    strict: bool = True,
    skip_mismatched_clusters: bool = False,
) -> LoadReport:
    """Copy an mmdet/mmseg checkpoint into ``model`` (a module with a ``backbone`` child and heads named as in
    mmdet/mmseg).

    Args:
        model: e.g. :class:`~models.heads.MaskRCNN` or :class:`~models.heads.EncoderDecoder`.
        checkpoint: the loaded checkpoint dict, or the path of a ``.pth`` file. A path is read with
            ``torch.load(weights_only=False)`` because mmengine checkpoints pickle non-tensor metadata: only
            load files you trust.
        strict: raise on any missing, unexpected or shape-mismatched key (listed in the error).
        skip_mismatched_clusters: keep the fresh initialisation of backbone cluster layers whose number of
            clusters differs (see :func:`models.load_official_state_dict`).

    Returns:
        One :class:`~models.loading.LoadReport` with full (prefixed) key names.
    """
    state = _state_dict(checkpoint)
    children = dict(model.named_children())
    if "backbone" not in children:
        raise ValueError(f"model must have a 'backbone' child (mmdet/mmseg layout), got children {sorted(children)}")
    backbone_state = {k: v for k, v in state.items() if k.startswith("backbone.")}
    heads = nn.ModuleDict({name: child for name, child in children.items() if name != "backbone"})
    head_state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    backup = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        head_report = load_official_state_dict(heads, head_state, strict=strict)
        backbone_report = load_official_state_dict(
            model.backbone, backbone_state, strict=strict, skip_mismatched_clusters=skip_mismatched_clusters
        )
    except StateDictMismatchError:
        model.load_state_dict(backup)
        raise

    def prefixed(keys: list[str]) -> list[str]:
        return [f"backbone.{k}" for k in keys]

    return LoadReport(
        loaded=prefixed(backbone_report.loaded) + head_report.loaded,
        missing=prefixed(backbone_report.missing) + head_report.missing,
        unexpected=prefixed(backbone_report.unexpected) + head_report.unexpected,
        mismatched=[(f"backbone.{k}", a, b) for k, a, b in backbone_report.mismatched] + head_report.mismatched,
        skipped_clusters=prefixed(backbone_report.skipped_clusters),
        ignored=prefixed(backbone_report.ignored) + head_report.ignored,
    )
