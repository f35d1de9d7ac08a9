"""tocalib.allocator: glibc keeps freed memory after tune_cpu_allocator (page faults counted in a fresh process),
bad thresholds are refused by name, other C libraries are left alone."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from tocalib import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

FAULTS = """
import resource, sys, torch
from tocalib.allocator import tune_cpu_allocator
applied = tune_cpu_allocator() if sys.argv[1] == "tuned" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB allocated, touched and freed, as a training step's activations
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 16 * 2**20 * 4 // 4096  # of one allocation


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    """Eight allocations of 64 MiB (16,384 pages of 4 KiB) in turn: with glibc's defaults each is a fresh mmap whose
    every page faults on first touch; after tune_cpu_allocator they come from the heap, which grows once or twice
    (an aligned block may not fit in the free block below the top, depending on where the heap begins) and is then
    reused."""
    applied, default = _faults("default")
    assert applied == "None" and default > 7 * PAGES
    applied, tuned = _faults("tuned")
    assert applied == "True" and tuned < 2.5 * PAGES


@pytest.mark.parametrize(
    ("threshold", "error", "message"),
    [
        (2**16, ValueError, "threshold must be >= 131072, got 65536"),
        (2**31, ValueError, "threshold must be <= 2147483647"),
        (1.5e9, TypeError, "threshold must be an int, got float"),
        (True, TypeError, "threshold must be an int, got bool"),
    ],
)
def test_bad_thresholds_are_refused(threshold: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        allocator.tune_cpu_allocator(threshold)


def test_other_c_libraries_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc(*args: object) -> None:
        raise AssertionError("the C library was loaded")

    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(allocator.ctypes, "CDLL", no_libc)
    assert allocator.tune_cpu_allocator() is False


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_a_refused_setting_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    class Refusing:
        def __init__(self, name: str) -> None:
            self.name = name

        def mallopt(self, option: int, value: int) -> int:
            return 0

    monkeypatch.setattr(allocator.ctypes, "CDLL", Refusing)
    with pytest.raises(RuntimeError, match="mallopt refused M_MMAP_THRESHOLD=2147483647"):
        allocator.tune_cpu_allocator()
