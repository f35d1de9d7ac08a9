"""Keep freed CPU memory in the process instead of handing it back to the OS after every step (glibc only).

PyTorch allocates CPU tensors with the C library's ``malloc``. With glibc's defaults, a block above the *mmap
threshold* (128 KiB, adjusted up to at most 32 MiB) is a fresh ``mmap`` that ``free`` unmaps, and free memory at the
top of the heap beyond the *trim threshold* is returned to the OS. A forward and backward pass allocates its
activations and frees them all at the end, so the next step gets the memory back as new pages and takes a page fault
on the first touch of each 4 KiB page (and the kernel zeroes it). On a 2-core virtual machine that cost is a few
microseconds per page with two threads: PaCa-Tiny's training step at 8×3×224² faulted ~150,000 pages (~600 MB) per
step, and keeping the memory took it from 1937 to 1519 ms (``python -m benchmarks.bench --parts goals`` reports both
in one run). PyTorch's CPU performance guide gives the same advice in another form (a caching allocator such as
jemalloc or tcmalloc through ``LD_PRELOAD``); the environment variables ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` do what :func:`tune_cpu_allocator` does, before the process starts.

The price: the process keeps its peak heap (its resident memory does not shrink after a large step), which is what a
training or benchmark process wants and a long-lived process with one rare large step may not. The setting is
process-wide and stays until the process ends, so a library never makes it on import: call it from the
application's entry point (tocalib's training pipeline does, unless ``--no-retain-cpu-memory`` is given).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

from tocalib.validation import check_int

__all__ = ["RETAIN_BYTES", "tune_cpu_allocator"]

_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> option numbers
_M_MMAP_THRESHOLD = -3

RETAIN_BYTES = 2**31 - 1
"""The thresholds :func:`tune_cpu_allocator` sets by default: the largest value ``mallopt`` accepts (an ``int``).
Blocks above it (2 GiB) are still mapped and unmapped one by one."""


def tune_cpu_allocator(threshold: int = RETAIN_BYTES) -> bool:
    """Make glibc's ``malloc`` serve blocks up to ``threshold`` bytes from its heap and keep up to ``threshold``
    bytes of freed memory at its top, so that each training or benchmark step reuses the previous step's pages.

    Args:
        threshold: bytes, 128 KiB to 2**31 - 1; both glibc thresholds (mmap and trim) are set to it.

    Returns:
        True when the settings were applied; False when the process's C library is not glibc (musl, macOS,
        Windows), where nothing is changed: use jemalloc or tcmalloc there.

    Raises:
        TypeError, ValueError: for a threshold that is not an int in that range.
        RuntimeError: when glibc refuses a setting.

    Example (at the start of a training script, before the first step)::

        from tocalib.allocator import tune_cpu_allocator

        if not tune_cpu_allocator():
            print("not glibc: start the process with jemalloc or tcmalloc in LD_PRELOAD instead")
    """
    threshold = check_int("threshold", threshold, 2**17)
    if threshold > RETAIN_BYTES:
        raise ValueError(f"threshold must be <= {RETAIN_BYTES} (mallopt takes an int), got {threshold}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    for name, option in (("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD), ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD)):
        if libc.mallopt(option, threshold) != 1:
            raise RuntimeError(f"glibc's mallopt refused {name}={threshold}")
    return True
