"""Training configs as dataclasses, their command lines and named presets.

A run's settings are resolved in three layers: the dataclass defaults (the paper's recipe), then a named preset,
then the options given on the command line. :func:`parse_config` builds an ``argparse`` parser from the
dataclass fields, so every field is an option (``--warmup-epochs 5``, ``--no-amp``, ``--scale 0.08 1``,
``--model-kwargs '{"embed_dims": [32, 64, 128, 192]}'``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

__all__ = ["SMALL_PACA", "Limit", "RunConfig", "check_limits", "parse_config", "to_jsonable"]

SMALL_PACA: dict[str, list[int]] = {"embed_dims": [32, 64, 128, 192], "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 6]}
"""The small PaCa-ViT (1.3 M parameters with a 10-class head) of the CPU smoke runs (``--model-kwargs``)."""


@dataclass(frozen=True)
class Limit:
    """A rule a config value must follow (on every item of a tuple; None passes where a field allows it)."""

    text: str
    holds: Callable[[Any], bool]


POSITIVE = Limit("finite and > 0", lambda v: math.isfinite(v) and v > 0)
AT_LEAST_ONE = Limit(">= 1", lambda v: v >= 1)
NON_NEGATIVE = Limit("finite and >= 0", lambda v: math.isfinite(v) and v >= 0)
FRACTION = Limit("in [0, 1]", lambda v: 0 <= v <= 1)
BELOW_ONE = Limit("in [0, 1)", lambda v: 0 <= v < 1)
SHARE = Limit("in (0, 1]", lambda v: 0 < v <= 1)


def check_limits(config: object) -> None:
    """Raise a ValueError naming the option, the rule and the value for every value that breaks its
    :class:`Limit` (the config class's ``LIMITS``)."""
    problems = []
    for name, limit in getattr(config, "LIMITS", {}).items():
        value = getattr(config, name)
        items = value if isinstance(value, (tuple, list)) else (value,)
        try:
            broken = value is not None and not all(limit.holds(item) for item in items)
        except TypeError:  # not a number at all
            broken = True
        if broken:
            problems.append(f"--{name.replace('_', '-')} must be {limit.text}, got {value!r}")
    if problems:
        raise ValueError("; ".join(problems))


@dataclass
class RunConfig:
    """Settings every training run shares: batch size per process, precision, clipping, where it runs and
    writes, how it logs, checkpoints and resumes. Task configs subclass it (and may change the defaults).
    ``LIMITS`` holds the rules of its values, checked when a config is built."""

    LIMITS: ClassVar[dict[str, Limit]] = {
        "batch_size": AT_LEAST_ONE, "clip_grad": POSITIVE, "workers": NON_NEGATIVE, "stop_after": AT_LEAST_ONE,
        "log_every": AT_LEAST_ONE, "save_every": NON_NEGATIVE,
    }  # fmt: skip

    batch_size: int = 128
    clip_grad: float | None = None
    amp: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = 8
    seed: int = 0
    out: Path = Path("runs")
    resume: str | None = None
    stop_after: int | None = None
    log_every: int = 50
    save_every: int = 0
    retain_cpu_memory: bool = True  # on CPU, tocalib.allocator.tune_cpu_allocator(): steps reuse freed pages

    def __post_init__(self) -> None:
        check_limits(self)


C = TypeVar("C")


def _parser_for(name: str, hint: Any) -> dict[str, Any]:
    """``add_argument`` keywords for a field of type ``hint``."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    origin = typing.get_origin(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is tuple:
        (item, *rest) = typing.get_args(hint)
        count = "+" if rest == [Ellipsis] else 1 + len(rest)  # tuple[float, ...] or tuple[float, float]
        return {"nargs": count, "type": item, "metavar": name.upper()}
    if origin is dict or hint is dict:
        return {"type": _json_object_or_none if optional else _json_object, "metavar": "JSON"}
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        return {"type": type(choices[0]), "choices": choices}
    if hint in (int, float, str, Path):
        return {"type": _none_or(hint) if optional else hint}
    raise TypeError(f"config field {name!r} has type {hint!r}, which has no command-line form")


def _json_object(text: str) -> dict:
    """A JSON object from the command line, or argparse's error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object ('{{\"name\": value, ...}}' in quotes), got {type(value).__name__} {text!r}"
        )
    return value


def _json_object_or_none(text: str) -> dict | None:
    """:func:`_json_object`, or None for ``none``/``null`` (an optional field's default)."""
    return None if text.lower() in ("none", "null") else _json_object(text)


def _none_or(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def parse_config(
    cls: type[C], argv: Sequence[str] | None = None, presets: Mapping[str, Mapping[str, Any]] | None = None
) -> C:
    """A ``cls`` instance from the defaults, then ``--preset NAME`` from ``presets``, then ``argv``."""
    presets = dict(presets or {})
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").split("\n\n")[0])
    if presets:
        parser.add_argument(
            "--preset", choices=sorted(presets), default=argparse.SUPPRESS, help="a named bundle of settings"
        )
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        kwargs = _parser_for(field.name, hints[field.name])
        parser.add_argument(
            flag, dest=field.name, default=argparse.SUPPRESS, help=f"(default: {_default(field)!r})", **kwargs
        )
    args = vars(parser.parse_args(argv))
    chosen = dict(presets[args.pop("preset")]) if "preset" in args else {}
    chosen.update(args)
    for key, value in chosen.items():
        if typing.get_origin(_strip_optional(hints[key])) is tuple:
            chosen[key] = tuple(value)
    try:
        return cls(**chosen)
    except ValueError as err:  # a Limit: argparse's usage line and the message, exit status 2
        parser.error(str(err))


def _strip_optional(hint: Any) -> Any:
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def to_jsonable(config: object) -> dict[str, Any]:
    """The config's fields as a JSON-ready dict (paths as strings, tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
