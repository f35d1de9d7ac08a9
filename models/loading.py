"""Load official PaCa-ViT checkpoints (PaCaViT@4307018 paca_vit.py, its module tree) into the models of
:mod:`tocalib.models.paca_vit`.

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

import collections
import os
import pickle
import types
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
from torch import Tensor, _weights_only_unpickler, nn

from tocalib import cluster_parameter_names

__all__ = [
    "ForeignObject",
    "LoadReport",
    "StateDictMismatchError",
    "copy_matched",
    "flat_state_dict",
    "foreign_classes",
    "load_official_state_dict",
    "match_state_dict",
    "read_checkpoint",
    "unwrap_state_dict",
]


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
        foreign: classes of non-tensor objects in the file (its metadata), read as inert
            :class:`ForeignObject` records instead of being imported (see :func:`read_checkpoint`).
        reset: model keys kept at their initialisation on purpose (the classifier with ``reset_head``).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    skipped_clusters: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    reset: list[str] = field(default_factory=list)

    def with_prefix(self, prefix: str) -> LoadReport:
        """The same report with every key prefixed (a submodule's report seen from its parent)."""
        return LoadReport(
            loaded=[prefix + k for k in self.loaded],
            missing=[prefix + k for k in self.missing],
            unexpected=[prefix + k for k in self.unexpected],
            mismatched=[(prefix + k, a, b) for k, a, b in self.mismatched],
            skipped_clusters=[prefix + k for k in self.skipped_clusters],
            ignored=[prefix + k for k in self.ignored],
            foreign=list(self.foreign),
            reset=[prefix + k for k in self.reset],
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


class ForeignObject:
    """What a checkpoint's pickle made of an object whose class this loader does not allow (an mmengine
    ``HistoryBuffer``, a numpy scalar, anything not a tensor, container or plain value): an inert record
    of the class's name and of the arguments and state the pickle held. The class is never imported and
    nothing of it runs. Each foreign class gets its own subclass, whose ``qualname`` names it."""

    qualname = "?"

    def __new__(cls, *args: object, **kwargs: object) -> ForeignObject:
        record = super().__new__(cls)
        record.args, record.kwargs, record.state, record.items = args, kwargs, None, []
        return record

    def __init__(self, *args: object, **kwargs: object) -> None:
        """The arguments are kept by ``__new__``; nothing else happens."""

    def __setstate__(self, state: object) -> None:
        self.state = state

    def __setitem__(self, key: object, value: object) -> None:
        self.items.append((key, value))

    def append(self, value: object) -> None:
        self.items.append(value)

    def extend(self, values: object) -> None:
        self.items.extend(values)

    def __call__(self, *args: object, **kwargs: object) -> ForeignObject:
        """A foreign callable (a ``functools.partial``, a factory) called by the pickle: another record, which
        keeps the called one among its items."""
        result = type(self)(*args, **kwargs)
        result.items.append(self)
        return result

    def __repr__(self) -> str:
        return f"<foreign {self.qualname}>"


_FOREIGN: dict[str, type[ForeignObject]] = {}


def _foreign_class(module: str, name: str) -> type[ForeignObject]:
    qualname = f"{module}.{name}"
    if qualname not in _FOREIGN:
        _FOREIGN[qualname] = type(f"Foreign[{qualname}]", (ForeignObject,), {"qualname": qualname})
    return _FOREIGN[qualname]


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as pickle uses it for bytes (protocol 2), which never imports a codec module."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing the text encoding {encoding!r} (pickled bytes use latin1)")
    return text.encode("latin1")


_SETTABLE = (Tensor, collections.OrderedDict, collections.Counter, ForeignObject)
"""What the pickle's BUILD may set state on: tensors (their ``__setstate__``), state dicts' ``_metadata`` and
records. Never a class or a function, whose attributes would change for the whole process."""


class _RestrictedUnpickler(pickle._Unpickler):  # the Python unpickler, whose opcodes can be overridden
    """Resolves only what ``torch.load(weights_only=True)`` allows (tensors, storages, dtypes, containers,
    and what the user allowed with ``torch.serialization.add_safe_globals``); every other global becomes a
    :class:`ForeignObject` subclass, so nothing named by the file is imported or called. BUILD sets state
    only on :data:`_SETTABLE` instances."""

    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> object:
        qualname = f"{module}.{name}"
        if qualname == "_codecs.encode":
            return _latin1
        allowed = _weights_only_unpickler._get_allowed_globals().get(qualname)
        if allowed is None:
            allowed = _weights_only_unpickler._get_user_allowed_globals().get(qualname)
        return allowed if allowed is not None else _foreign_class(module, name)

    def load_build(self) -> None:
        target = self.stack[-2]  # below the state
        if isinstance(target, type) or not isinstance(target, _SETTABLE):
            raise pickle.UnpicklingError(f"refusing to set the state of a {type(target).__name__} {target!r}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


_RESTRICTED_PICKLE = types.ModuleType("restricted_pickle", "pickle, with globals restricted (tocalib.models.loading)")
_RESTRICTED_PICKLE.Unpickler = _RestrictedUnpickler
_RESTRICTED_PICKLE.load = lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load()


def read_checkpoint(path: str | os.PathLike[str]) -> Mapping[str, object]:
    """Read a ``torch.save`` checkpoint file on the CPU, without ever running code from it.

    Files of tensors and plain values load as ``torch.load(weights_only=True)`` loads them. Files that
    also pickle other objects (mmengine's ``meta`` and ``message_hub``, optimizer states with numpy
    values) load too, with those objects as inert :class:`ForeignObject` records (see
    :func:`foreign_classes`), whether or not their packages are installed. A missing, empty, truncated
    or non-checkpoint file gets an error naming it and saying what was found.
    """
    name = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {name!r} does not exist; check the path")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"checkpoint file {name!r} is empty (0 bytes); expected a file written by torch.save")
    archive = zipfile.is_zipfile(path)
    try:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # objects beyond torch's allowlist: the restricted unpickler
            if "Weights only load failed" not in str(err) or not archive:
                raise  # a legacy (pre-1.6) file's loader acts on what it unpickles: no second try there
            content = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    except Exception as err:  # torch raises many types for damaged files
        with open(path, "rb") as file:
            head = file.read(8)
        if archive and "PytorchStreamReader" not in str(err):
            found = f"a zip archive of {size} bytes whose pickled content cannot be read safely"
        elif head.startswith(b"PK"):
            found = f"a damaged or truncated zip archive of {size} bytes"
        else:
            found = f"{size} bytes starting with {head!r}"
        raise ValueError(
            f"checkpoint file {name!r} is not a readable torch.save checkpoint: found {found} ({_reason(err)}); "
            "expected a complete .pth/.pt file written by torch.save (a legacy pre-1.6 file is read only when it "
            "holds tensors and plain values)"
        ) from err
    if not isinstance(content, Mapping):
        raise ValueError(
            f"checkpoint file {name!r} holds a {type(content).__name__}, expected a dict (a state dict, or one "
            "under 'state_dict' or 'model')"
        )
    return content


def _reason(err: Exception) -> str:
    """The error's own words, without torch's advice to load with ``weights_only=False`` (which would run
    whatever code the file holds)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n", 1)[0]
    return f"{type(err).__name__}: {text}"


def foreign_classes(content: object) -> list[str]:
    """The classes that :func:`read_checkpoint` kept as :class:`ForeignObject` records, anywhere in
    ``content`` (dicts, lists, tuples and the records' own arguments and state), sorted and unique."""
    found: set[str] = set()
    seen: set[int] = set()  # pickles can hold cycles and shared parts
    stack = [content]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, type) and issubclass(item, ForeignObject):  # a foreign class passed as a value
            found.add(item.qualname)
        elif isinstance(item, ForeignObject):
            found.add(item.qualname)
            stack.extend([*item.args, *item.kwargs.values(), item.state, *item.items])
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return sorted(found)


def match_state_dict(
    model: nn.Module, state: Mapping[str, Tensor], skip_mismatched_clusters: bool = False, reset_head: bool = False
) -> LoadReport:
    """Compare ``state`` with ``model``'s keys and shapes, copying nothing (see :func:`copy_matched`)."""
    own = model.state_dict()
    clusters = cluster_parameter_names(model)
    report = LoadReport()
    if reset_head or getattr(model, "head", True) is None:  # a headless model ignores a classifier's head
        report.ignored = sorted(k for k in state if k.startswith("head."))
    if reset_head:
        report.reset = sorted(k for k in own if k.startswith("head."))
    report.missing = sorted(k for k in own if k not in state and k not in report.reset)
    report.unexpected = sorted(k for k in state if k not in own and k not in report.ignored)
    for key in sorted(k for k in state if k in own and k not in report.ignored):
        if state[key].shape == own[key].shape:
            report.loaded.append(key)
        elif skip_mismatched_clusters and key in clusters:
            report.skipped_clusters.append(key)
        else:
            report.mismatched.append((key, tuple(state[key].shape), tuple(own[key].shape)))
    return report


def copy_matched(model: nn.Module, state: Mapping[str, Tensor], report: LoadReport, strict: bool = True) -> None:
    """Copy ``report.loaded`` from ``state`` into ``model``, all or nothing: with ``strict``, any missing,
    unexpected or mismatched key raises :class:`StateDictMismatchError` (listing them all) before anything is
    copied. Cluster layers skipped on purpose are named in a warning."""
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise StateDictMismatchError(_describe(report, cluster_parameter_names(model)))
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
    reset_head: bool = False,
) -> LoadReport:
    """Copy an official PaCa-ViT checkpoint into ``model`` (parameters and buffers).

    Args:
        model: a :class:`~tocalib.models.paca_vit.PaCaViT` (any module with the official names works).
        state_dict_or_path: a (wrapped) state dict or the path of a ``torch.save`` file.
        strict: raise :class:`StateDictMismatchError` on any missing, unexpected or mismatched key.
        skip_mismatched_clusters: leave cluster layers whose shape differs (a changed M) at their
            initialisation instead of failing; each skipped key is warned about and reported.
        reset_head: fine-tuning onto other classes: the checkpoint's classifier (``head.*``) is ignored and
            the model's keeps its initialisation (``report.reset``); everything else loads strictly.

    Returns:
        A :class:`LoadReport`. Nothing is copied when strict loading fails.
    """
    raw = (
        read_checkpoint(state_dict_or_path)
        if isinstance(state_dict_or_path, (str, os.PathLike))
        else state_dict_or_path
    )
    state, ignored = unwrap_state_dict(raw)
    report = match_state_dict(model, state, skip_mismatched_clusters, reset_head)
    report.ignored = ignored + report.ignored
    report.foreign = foreign_classes(raw)
    copy_matched(model, state, report, strict)
    return report


def _describe(report: LoadReport, clusters: set[str]) -> str:
    lines = ["the checkpoint does not match the model:"]
    if report.missing:
        lines.append(f"  missing in the checkpoint ({len(report.missing)}): {report.missing}")
    if report.unexpected:
        lines.append(f"  unexpected in the checkpoint ({len(report.unexpected)}): {report.unexpected}")
    if report.mismatched:
        shapes = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in report.mismatched]
        lines.append(f"  shape mismatch ({len(shapes)}): {shapes}")
        if any(k in clusters for k, _, _ in report.mismatched):
            lines.append(
                "  cluster layers differ: if you changed num_clusters on purpose (a downstream override), pass "
                "skip_mismatched_clusters=True"
            )
    if any(k.startswith("head.") for k, _, _ in report.mismatched):
        lines.append(
            "  the classifier differs: to fine-tune onto another number of classes pass reset_head=True "
            "(--reset-head on the training command line)"
        )
    lines.append("  check the model name and overrides, or pass strict=False to load the matching keys only")
    return "\n".join(lines)
