"""Keep freed CPU memory in the process instead of handing it back to the OS after every step (glibc only).

PyTorch allocates CPU tensors with the C library's ``malloc``. With glibc's defaults, a block above the *mmap
threshold* (128 KiB, adjusted up to at most 32 MiB) is a fresh ``mmap`` that ``free`` unmaps, and free memory at the
top of the heap beyond the *trim threshold* is returned to the OS. A forward and backward pass allocates its
activations and frees them all at the end, so the next step gets the memory back as new pages and takes a page fault
on the first touch of each 4 KiB page (and the kernel zeroes it). On a 2-core virtual machine that cost is a few
microseconds per page with two threads: in separate runs PaCa-Tiny's training step at 8×3×224² faulted ~150,000 pages
(~600 MB) per step, and keeping the memory took it from 1937 to 1519 ms (``python -m benchmarks.bench --parts
goals,heap`` measures both; its committed run, on a drifting machine, gave 1934 → 1807 ms). PyTorch's CPU
performance guide gives the same advice in another form (a caching allocator such as jemalloc or tcmalloc through
``LD_PRELOAD``); the environment variables ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` do what :func:`tune_cpu_allocator` does, before the process starts.

The price: the process keeps its peak heap, and fragmentation can hold more (its resident memory does not shrink after
a large step; each process of a multi-process run keeps its own), which is what a training or benchmark process wants
and a long-lived process with one rare large step may not. glibc before about 2.35 caps the mmap threshold at 32 MiB
(larger blocks are still mapped one by one there); :func:`tune_cpu_allocator` then uses that cap. The setting is
process-wide and stays until the process ends, so a library never makes it on import: call it from the
application's entry point (tocalib's training pipeline does, unless ``--no-retain-cpu-memory`` is given).
"""

from __future__ import annotations

import ctypes
import os
import platform

from tocalib.validation import check_int

__all__ = ["RETAIN_BYTES", "tune_cpu_allocator"]

_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> option numbers
_M_MMAP_THRESHOLD = -3

RETAIN_BYTES = 2**31 - 1
"""The thresholds :func:`tune_cpu_allocator` sets by default: the largest ``int`` that ``mallopt`` takes. Blocks above
it (2 GiB) are still mapped and unmapped one by one."""

_OLD_GLIBC_MMAP_CAP = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
"""glibc's ``DEFAULT_MMAP_THRESHOLD_MAX`` (32 MiB on 64-bit): the largest mmap threshold that older releases accept."""

_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")
"""Allocators that replace glibc's ``malloc`` when named in ``LD_PRELOAD`` (and then keep freed memory themselves)."""


def tune_cpu_allocator(threshold: int = RETAIN_BYTES) -> bool:
    """Make glibc's ``malloc`` serve blocks up to ``threshold`` bytes from its heap and keep up to ``threshold``
    bytes of freed memory at its top, so that each training or benchmark step reuses the previous step's pages.

    Args:
        threshold: bytes, 128 KiB to 2**31 - 1; both glibc thresholds (mmap and trim) are set to it.

    Returns:
        True when the settings were applied (on glibc before about 2.35 the mmap threshold is capped at 32 MiB);
        False when nothing was changed: the C library is not glibc (musl, macOS, Windows: use jemalloc or tcmalloc
        there), or ``LD_PRELOAD`` names jemalloc, tcmalloc or mimalloc, which then serve ``malloc`` instead.

    Raises:
        TypeError, ValueError: for a threshold that is not an int in that range.
        RuntimeError: when glibc refuses a setting.

    Example (at the start of a training script, before the first step)::

        from tocalib.allocator import tune_cpu_allocator

        if not tune_cpu_allocator():  # not glibc, or another allocator preloaded
            print("the allocator is left as it is; jemalloc or tcmalloc in LD_PRELOAD keep freed memory")
    """
    threshold = check_int("threshold", threshold, 2**17)
    if threshold > RETAIN_BYTES:
        raise ValueError(f"threshold must be <= {RETAIN_BYTES} (mallopt takes an int), got {threshold}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in _PRELOADED):
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    tried = tuple(dict.fromkeys((threshold, min(threshold, _OLD_GLIBC_MMAP_CAP))))  # an older glibc takes the cap
    if not any(mallopt(_M_MMAP_THRESHOLD, value) == 1 for value in tried):
        raise RuntimeError(f"glibc's mallopt refused M_MMAP_THRESHOLD={' and '.join(map(str, tried))}")
    if mallopt(_M_TRIM_THRESHOLD, threshold) != 1:
        raise RuntimeError(f"glibc's mallopt refused M_TRIM_THRESHOLD={threshold}")
    return True
