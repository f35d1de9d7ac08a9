"""Shared test settings: deterministic torch, and hypothesis profiles sized for a 2-core CPU."""

import importlib
import os
from collections.abc import Callable
from types import ModuleType

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def _import_optional(module: str, reason: str) -> ModuleType:
    """Import an optional dependency, or skip; the nox test session sets TOCALIB_REQUIRE_OPTIONAL=1, and
    there a missing optional package fails the test instead, so no such test can silently skip in CI."""
    if os.environ.get("TOCALIB_REQUIRE_OPTIONAL") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=reason)


@pytest.fixture(scope="session")
def optional_module() -> Callable[[str, str], ModuleType]:
    """``optional_module("pycocotools", "why")``: the module, or a skip (a failure in the nox test session)."""
    return _import_optional
