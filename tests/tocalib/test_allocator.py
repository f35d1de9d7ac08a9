"""tocalib.allocator: after tune_cpu_allocator glibc serves large blocks from its heap (read from glibc's own
statistics in a fresh process), bad thresholds are refused by name, an older glibc's cap is used, other C libraries
and preloaded allocators are left alone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from tocalib import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
MALLINFO2 = GLIBC and tuple(map(int, platform.libc_ver()[1].split(".")[:2])) >= (2, 33)

MAPPED = """
import ctypes, sys, torch
from tocalib.allocator import tune_cpu_allocator
applied = tune_cpu_allocator() if sys.argv[1] == "tuned" else None
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
class Info(ctypes.Structure):  # glibc's struct mallinfo2: ten size_t fields
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS.split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
block = torch.empty(16 * 2**20)  # 64 MiB: above glibc's default mmap threshold (at most 32 MiB)
print(applied, libc.mallinfo2().hblkhd)  # bytes in blocks that have their own mmap
"""


def _mapped_bytes(mode: str) -> tuple[str, int]:
    """Run MAPPED in a fresh process whose environment sets none of glibc's malloc options."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    out = subprocess.run([sys.executable, "-c", MAPPED, mode], capture_output=True, text=True, check=True, env=env)
    applied, mapped = out.stdout.split()
    return applied, int(mapped)


@pytest.mark.skipif(not MALLINFO2, reason="glibc's mallinfo2 (2.33+)")
def test_a_large_block_comes_from_the_heap_after_tuning() -> None:
    """With glibc's defaults a 64 MiB tensor is a block of its own mmap (unmapped when freed, so the next one faults
    its pages in anew); after tune_cpu_allocator it is carved from the heap, which keeps it when freed."""
    applied, default = _mapped_bytes("default")
    assert applied == "None" and default >= 64 * 2**20
    applied, tuned = _mapped_bytes("tuned")
    assert applied == "True" and tuned < 64 * 2**20


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


def _no_libc(*args: object) -> None:
    raise AssertionError("the C library was loaded")


def test_other_c_libraries_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(allocator.ctypes, "CDLL", _no_libc)
    assert allocator.tune_cpu_allocator() is False


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_a_preloaded_allocator_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    monkeypatch.setattr(allocator.ctypes, "CDLL", _no_libc)
    assert allocator.tune_cpu_allocator() is False


class _Mallopt:
    """A stand-in for glibc's mallopt that accepts mmap thresholds up to ``limit`` (and any trim threshold) and
    records its calls."""

    def __init__(self, limit: int) -> None:
        self.limit, self.calls = limit, []

    def __call__(self, option: int, value: int) -> int:
        self.calls.append((option, value))
        return int(option != -3 or value <= self.limit)


BIG, CAP = 2**31 - 1, 2**25


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
@pytest.mark.parametrize(
    ("limit", "calls"),
    [(BIG, [(-3, BIG), (-1, BIG)]), (CAP, [(-3, BIG), (-3, CAP), (-1, BIG)]), (0, [(-3, BIG), (-3, CAP)])],
)
def test_an_older_glibc_gets_its_cap_and_a_refusal_raises(
    monkeypatch: pytest.MonkeyPatch, limit: int, calls: list[tuple[int, int]]
) -> None:
    """A current glibc takes 2**31 - 1 for both thresholds; one that refuses an mmap threshold above 32 MiB (before
    about 2.35) gets 32 MiB; one that refuses that too raises, naming what it refused."""
    mallopt = _Mallopt(limit)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: type("Libc", (), {"mallopt": mallopt}))
    if limit:
        assert allocator.tune_cpu_allocator() is True
    else:
        with pytest.raises(RuntimeError, match=f"mallopt refused M_MMAP_THRESHOLD={BIG} and {CAP}"):
            allocator.tune_cpu_allocator()
    assert mallopt.calls == calls
