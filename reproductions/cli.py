"""What the command lines of ``reproductions`` share: user errors end in one line, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from tocalib.models import create_model

__all__ = ["USER_ERRORS", "command_line", "create_from_options"]

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)
"""What a wrong command line, file or data folder raises (a checkpoint that does not fit is a ValueError too)."""


def command_line(main: Callable[[Sequence[str]], Any], name: str, argv: Sequence[str] | None = None) -> int:
    """Run ``main`` on ``argv`` (default: the process's arguments); a user error prints ``name: error: …``
    on one line and gives exit status 2."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except USER_ERRORS as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    return 0


def create_from_options(option: str, name: str, **overrides: Any) -> Any:
    """``tocalib.models.create_model(name, **overrides)``, where a keyword the model does not take came from the
    command line (``option``): a ValueError that names the option, for :func:`command_line`'s one line."""
    try:
        return create_model(name, **overrides)
    except TypeError as err:
        raise ValueError(f"{option}: {err}") from err
