"""Argument checks that tocalib's modules share, public for code built on them (``tocalib.models`` uses them)."""

from __future__ import annotations

import operator

import torch
from torch import Tensor

__all__ = ["check_int"]


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int of at least ``minimum`` (Python and numpy ints; not bools, floats or strings),
    else a TypeError or ValueError that names ``name``."""
    if isinstance(value, torch.SymInt):  # a symbolic size under torch.export / compile: keep it symbolic
        return value
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number
