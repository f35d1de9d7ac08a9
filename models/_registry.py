"""The model registry: ``@register_model`` factories, looked up by name."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn

__all__ = ["get_model_factory", "list_models", "register_model"]

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory under its function name; the factory must return a fresh model per call."""
    name = factory.__name__
    if name in _FACTORIES:
        raise ValueError(f"model name {name!r} is already registered")
    _FACTORIES[name] = factory
    return factory


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    return sorted(name for name in _FACTORIES if fnmatch.fnmatch(name, pattern))


def get_model_factory(name: str) -> Callable[..., nn.Module]:
    """The factory registered as ``name``; a clear error lists the known names otherwise."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models()) or 'none'}")
    return _FACTORIES[name]
