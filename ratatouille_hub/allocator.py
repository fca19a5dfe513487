"""glibc's allocator tuned for PyTorch on CPU, from inside the process (measured on this project's machines).

By default glibc serves every large activation buffer with a fresh mmap and returns it on free, so each
training step page-faults its buffers in again: PyTorch on CPU runs 2-5x slower. The environment
variables MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_ and MALLOC_TOP_PAD_ fix it, but only if set before the
process starts; mallopt(3) sets the same parameters at run time, so a pip-installed console script gets
them too. The cost: freed memory stays with the process (its RSS is its peak so far).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt(3) parameter numbers (malloc.h) and the values measured for PyTorch on CPU.
SETTINGS = {
    "MALLOC_MMAP_MAX_": (-4, 0),  # M_MMAP_MAX: never mmap a block, reuse the heap
    "MALLOC_TRIM_THRESHOLD_": (-1, 2**31 - 1),  # M_TRIM_THRESHOLD: the most mallopt takes; in effect never trim
    "MALLOC_TOP_PAD_": (-2, 1 << 30),  # M_TOP_PAD: grow the heap 1 GiB at a time
}


def tune_allocator() -> list[str]:
    """Apply the settings the user has not set in the environment; returns the names applied (none off
    glibc, or where mallopt refuses)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return []
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    applied = []
    for name, (parameter, value) in SETTINGS.items():
        if name not in os.environ and libc.mallopt(ctypes.c_int(parameter), ctypes.c_int(value)):
            applied.append(name)
    return applied
