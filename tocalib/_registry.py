"""A name → constructor registry, shared by the clustering functions and the assignment providers."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class Registry:
    """Constructors of one kind of module (``kind`` names it in errors), by name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., nn.Module]] = {}

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: make ``name`` build this class."""

        def decorate(cls: type) -> type:
            if name in self._entries:
                raise ValueError(f"{self.kind} name {name!r} is already registered to {self._entries[name]!r}")
            self._entries[name] = cls
            return cls

        return decorate

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def build(
        self,
        name: str,
        *args: Any,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> nn.Module:
        """``cls(*args, **kwargs)`` for the class registered as ``name``, with PyTorch's factory kwargs
        ``device`` and ``dtype`` where given (the built-in classes take them; a custom one must accept them
        to be built that way)."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        cls = self._entries[name]
        factory = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if factory and not takes_kwargs(cls, factory):
            raise ValueError(
                f"{self.kind} {name!r} ({cls.__name__}) does not take {sorted(factory)}: add those keyword "
                "arguments to its constructor (PyTorch's factory kwargs), or build it and move it with .to()"
            )
        return cls(*args, **factory, **kwargs)


def takes_kwargs(cls: Callable[..., nn.Module], names: dict[str, Any]) -> bool:
    """Whether ``cls``'s constructor accepts these keyword arguments."""
    parameters = inspect.signature(cls).parameters.values()
    return any(p.kind is p.VAR_KEYWORD for p in parameters) or set(names) <= {p.name for p in parameters}
