"""Load official PaCa-ViT checkpoints (reference §6.5) into the models of :mod:`models.paca_vit`.

Accepted inputs: a raw state dict, ``{'state_dict': ...}`` (timm, mmengine) or ``{'model': ...}``, or
a path to any of them. Key prefixes ``module.`` (DistributedDataParallel) and ``backbone.`` (mmdet /
mmseg checkpoints; only the backbone's entries are kept) are stripped. Our models use the official
key names, so nothing else is renamed.

Rules:

* **strict** (default): any missing key, unexpected key or shape mismatch raises
  :class:`StateDictMismatchError`, which lists all three;
* ``skip_mismatched_clusters=True``: a cluster layer whose shape differs only because M changed (the
  downstream override, e.g. ADE20k's 200 clusters: ``attn.clustering.clustering.{2,4}``,
  ``paca_teacher.to_clusters{i}``) keeps its fresh initialisation; each skipped key is named in a
  warning and in the returned :class:`LoadReport`;
* a model built without a head (``num_classes=0``) ignores a classifier's ``head.*`` entries, and a
  detection/segmentation checkpoint's non-backbone entries are ignored; both are listed in the report.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

__all__ = [
    "LoadReport",
    "StateDictMismatchError",
    "copy_matched",
    "flat_state_dict",
    "load_official_state_dict",
    "match_state_dict",
    "read_checkpoint",
    "unwrap_state_dict",
]

_CLUSTER_LAYER = re.compile(r"(^|\.)attn\.clustering\.clustering\.\d+\.(weight|bias)$|^paca_teacher\.to_clusters\d+\.")


class StateDictMismatchError(ValueError):
    """The checkpoint does not fit the model; the message lists missing, unexpected and mismatched keys."""


@dataclass
class LoadReport:
    """What :func:`load_official_state_dict` did.

    Attributes:
        loaded: keys copied into the model.
        missing: model keys the checkpoint lacks (non-empty only with ``strict=False``).
        unexpected: checkpoint keys the model lacks (non-empty only with ``strict=False``).
        mismatched: ``(key, checkpoint shape, model shape)`` left out (only with ``strict=False``).
        skipped_clusters: cluster layers left at their initialisation by ``skip_mismatched_clusters``.
        ignored: checkpoint keys outside the model by design (``head.*`` for a headless model, the
            non-backbone entries of a detection/segmentation checkpoint).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    skipped_clusters: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def with_prefix(self, prefix: str) -> LoadReport:
        """The same report with every key prefixed (a submodule's report seen from its parent)."""
        return LoadReport(
            loaded=[prefix + k for k in self.loaded],
            missing=[prefix + k for k in self.missing],
            unexpected=[prefix + k for k in self.unexpected],
            mismatched=[(prefix + k, a, b) for k, a, b in self.mismatched],
            skipped_clusters=[prefix + k for k in self.skipped_clusters],
            ignored=[prefix + k for k in self.ignored],
        )

    def __add__(self, other: LoadReport) -> LoadReport:
        """The reports of two disjoint parts of one model, joined."""
        return LoadReport(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def flat_state_dict(checkpoint: Mapping[str, object]) -> dict[str, Tensor]:
    """The tensors of a raw, ``{'state_dict': ...}`` or ``{'model': ...}`` checkpoint, ``module.`` stripped."""
    for wrapper in ("state_dict", "model"):
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
            checkpoint = checkpoint[wrapper]
            break
    bad = [k for k, v in checkpoint.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(
            f"expected a state dict of tensors (raw, or under 'state_dict' / 'model'), but these entries are "
            f"not tensors: {bad[:8]}{' ...' if len(bad) > 8 else ''}"
        )
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def unwrap_state_dict(checkpoint: Mapping[str, object]) -> tuple[dict[str, Tensor], list[str]]:
    """The flat state dict inside an official checkpoint, prefixes stripped.

    Returns:
        ``(state_dict, ignored)``: the backbone/classifier tensors under the official names, and the
        keys dropped because they belong to a detection/segmentation neck or head.
    """
    state = flat_state_dict(checkpoint)
    ignored: list[str] = []
    if any(k.startswith("backbone.") for k in state):
        ignored = sorted(k for k in state if not k.startswith("backbone."))
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state, ignored


def read_checkpoint(path: str | os.PathLike[str], weights_only: bool = True) -> Mapping[str, object]:
    """``torch.load`` a checkpoint file on the CPU; a missing or unreadable file gets an error naming it.

    ``weights_only=False`` is for formats that pickle non-tensor metadata (mmengine): only for files you trust.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {os.fspath(path)!r} does not exist; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # torch raises several error types for pickled non-tensor objects
        hint = (
            ". If you trust the file, load it yourself with torch.load(path, weights_only=False) and pass the dict"
            if weights_only
            else ""
        )
        raise ValueError(
            f"could not read {os.fspath(path)!r} with torch.load(weights_only={weights_only}): {err}{hint}"
        ) from err


def match_state_dict(
    model: nn.Module, state: Mapping[str, Tensor], skip_mismatched_clusters: bool = False
) -> LoadReport:
    """Compare ``state`` with ``model``'s keys and shapes, copying nothing (see :func:`copy_matched`)."""
    own = model.state_dict()
    report = LoadReport()
    if getattr(model, "head", True) is None:  # a headless model ignores a classifier's head
        report.ignored = sorted(k for k in state if k.startswith("head."))
    report.missing = sorted(k for k in own if k not in state)
    report.unexpected = sorted(k for k in state if k not in own and k not in report.ignored)
    for key in sorted(k for k in state if k in own):
        if state[key].shape == own[key].shape:
            report.loaded.append(key)
        elif skip_mismatched_clusters and _CLUSTER_LAYER.search(key):
            report.skipped_clusters.append(key)
        else:
            report.mismatched.append((key, tuple(state[key].shape), tuple(own[key].shape)))
    return report


def copy_matched(model: nn.Module, state: Mapping[str, Tensor], report: LoadReport, strict: bool = True) -> None:
    """Copy ``report.loaded`` from ``state`` into ``model``, all or nothing: with ``strict``, any missing,
    unexpected or mismatched key raises :class:`StateDictMismatchError` (listing them all) before anything is
    copied. Cluster layers skipped on purpose are named in a warning."""
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise StateDictMismatchError(_describe(report))
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    if report.skipped_clusters:
        warnings.warn(
            "kept the fresh initialisation of these cluster layers, whose number of clusters differs from the "
            f"checkpoint: {report.skipped_clusters}",
            stacklevel=3,
        )


def load_official_state_dict(
    model: nn.Module,
    state_dict_or_path: Mapping[str, object] | str | os.PathLike[str],
    strict: bool = True,
    skip_mismatched_clusters: bool = False,
) -> LoadReport:
    """Copy an official PaCa-ViT checkpoint into ``model`` (parameters and buffers).

    Args:
        model: a :class:`~models.paca_vit.PaCaViT` (any module with the official names works).
        state_dict_or_path: a (wrapped) state dict or the path of a ``torch.save`` file.
        strict: raise :class:`StateDictMismatchError` on any missing, unexpected or mismatched key.
        skip_mismatched_clusters: leave cluster layers whose shape differs (a changed M) at their
            initialisation instead of failing; each skipped key is warned about and reported.

    Returns:
        A :class:`LoadReport`. Nothing is copied when strict loading fails.
    """
    raw = (
        read_checkpoint(state_dict_or_path)
        if isinstance(state_dict_or_path, (str, os.PathLike))
        else state_dict_or_path
    )
    state, ignored = unwrap_state_dict(raw)
    report = match_state_dict(model, state, skip_mismatched_clusters)
    report.ignored = ignored + report.ignored
    copy_matched(model, state, report, strict)
    return report


def _describe(report: LoadReport) -> str:
    lines = ["the checkpoint does not match the model:"]
    if report.missing:
        lines.append(f"  missing in the checkpoint ({len(report.missing)}): {report.missing}")
    if report.unexpected:
        lines.append(f"  unexpected in the checkpoint ({len(report.unexpected)}): {report.unexpected}")
    if report.mismatched:
        shapes = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in report.mismatched]
        lines.append(f"  shape mismatch ({len(shapes)}): {shapes}")
        if any(_CLUSTER_LAYER.search(k) for k, _, _ in report.mismatched):
            lines.append(
                "  cluster layers differ: if you changed num_clusters on purpose (a downstream override), pass "
                "skip_mismatched_clusters=True"
            )
    lines.append("  check the model name and overrides, or pass strict=False to load the matching keys only")
    return "\n".join(lines)
