"""Load official mmdet / mmseg (mmengine-format) checkpoints into :class:`MaskRCNN` and :class:`EncoderDecoder`.

An mmengine checkpoint is ``{'meta', 'state_dict', ...}`` whose ``state_dict`` keys start with the module
names (``backbone.``, ``neck.``, ``rpn_head.``, ``roi_head.``, ``decode_head.``, ``auxiliary_head.``). The
backbone part is matched by the backbone loader's rules (:func:`tocalib.models.loading.match_state_dict`, its
cluster-layer skip included), every other top-level module under its mmdet/mmseg name, and the joined report
decides: loading is all-or-nothing, and a :class:`~tocalib.models.loading.StateDictMismatchError` lists every missing,
unexpected and mismatched key of both parts under its full name before anything is copied.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import nn

from tocalib.models.loading import (
    LoadReport,
    copy_matched,
    flat_state_dict,
    foreign_classes,
    match_state_dict,
    read_checkpoint,
)

__all__ = ["load_mmengine_checkpoint"]


def load_mmengine_checkpoint(
    model: nn.Module,
    checkpoint: Mapping[str, object] | str | os.PathLike[str],
    strict: bool = True,
    skip_mismatched_clusters: bool = False,
) -> LoadReport:
    """Copy an mmdet/mmseg checkpoint into ``model`` (a module with a ``backbone`` child and heads named as in
    mmdet/mmseg).

    Args:
        model: e.g. :class:`~tocalib.models.heads.MaskRCNN` or :class:`~tocalib.models.heads.EncoderDecoder`.
        checkpoint: the loaded checkpoint dict, or the path of a ``.pth`` file. A path is read by
            :func:`tocalib.models.loading.read_checkpoint`, which runs no code from the file: mmengine's pickled
            metadata (``meta``, ``message_hub``, ``optimizer``) becomes inert records, listed in the
            report's ``foreign``, and mmengine need not be installed.
        strict: raise on any missing, unexpected or shape-mismatched key (listed in the error).
        skip_mismatched_clusters: keep the fresh initialisation of backbone cluster layers whose number of
            clusters differs (see :func:`tocalib.models.load_official_state_dict`).

    Returns:
        One :class:`~tocalib.models.loading.LoadReport` with full (prefixed) key names.
    """
    children = dict(model.named_children())
    if "backbone" not in children:
        raise ValueError(f"model must have a 'backbone' child (mmdet/mmseg layout), got children {sorted(children)}")
    raw = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    state = flat_state_dict(raw)
    backbone_state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    heads = nn.ModuleDict({name: child for name, child in children.items() if name != "backbone"})
    head_state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    report = match_state_dict(model.backbone, backbone_state, skip_mismatched_clusters).with_prefix(
        "backbone."
    ) + match_state_dict(heads, head_state)
    copy_matched(model, state, report, strict)
    report.foreign = foreign_classes(raw)
    return report
