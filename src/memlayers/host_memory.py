"""Freed host memory kept in the process, so that a CPU step reuses its pages instead of faulting them in again.

glibc's ``malloc`` hands a block above its mmap threshold (at most 32 MiB, the
threshold adapts up to that) back to the kernel when it is freed, and trims
the free top of its heap once it exceeds twice the threshold. A training step
on the CPU allocates and frees the same large temporaries every step
(activations, their gradients, a value table's dense gradient, the scores of a
product-key search), so every step maps them again and the kernel zero-fills
each 4 KiB page on first touch: on the 2-core machine of
``benchmarks/RESULTS.md`` the LM benchmark took 3x as many page faults, its
training steps 13-18% longer, and dense AdamW over a 1 GiB table 45% longer,
than with the memory kept.

``keep_freed_memory`` raises both thresholds to their maximum with glibc's
``mallopt``: freed blocks stay in the heap for the next step. The price is that
the process's resident memory stays at its peak, as it does under CUDA's caching
allocator, and the peak can be higher (the step benchmark: 6.0 GB against 5.0).
The command line does this in its own process and in the processes it spawns;
a Python program calls it once at start. Set ``MEMLAYERS_KEEP_FREED_MEMORY=0``
to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "MEMLAYERS_KEEP_FREED_MEMORY"
"""Set to ``0`` to keep glibc's default thresholds."""

_kept = False
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LARGEST = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Keep freed heap memory in this process (glibc only): True when both thresholds were raised.

    False, with nothing changed, where the C library is not glibc or
    ``MEMLAYERS_KEEP_FREED_MEMORY=0``.
    """
    if os.environ.get(ENV, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    global _kept
    # each call returns 1 on success; the trim threshold first, so a refused mmap threshold leaves it harmless
    _kept = bool(mallopt(_M_TRIM_THRESHOLD, _LARGEST)) and bool(mallopt(_M_MMAP_THRESHOLD, _LARGEST))
    return _kept


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` took effect in this process (benchmarks store it beside their numbers)."""
    return _kept
