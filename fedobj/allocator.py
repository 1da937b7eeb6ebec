"""Keep the C heap's freed memory in the process during training (glibc only).

Why: every training step of the ``cnn`` allocates and frees activation buffers of
1-4 MB. With glibc's default malloc the first of these are ``mmap``-ed; freeing
one raises the mmap threshold to its size, but also sets the trim threshold to
twice that, so the top of the heap is handed back to the kernel after nearly
every step and faulted in (and zeroed by the kernel) again on the next: measured
on the project's 2-core machine, a step took 21-22 ms with the defaults and
18-19 ms with both thresholds fixed (setting only one is worse than neither: a
fixed mmap threshold alone keeps the 128 KiB trim threshold; a fixed trim
threshold alone keeps the 128 KiB mmap threshold, 36 ms a step).

The cost is that a process keeps the freed memory of its peak, up to
``trim_threshold`` bytes, instead of returning it; its resident size stays at its
high-water mark rather than falling between steps. Other C libraries (musl,
macOS) and other allocators (jemalloc via ``LD_PRELOAD``) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""``mallopt`` parameter numbers, from glibc's ``malloc.h``."""

MMAP_THRESHOLD = 32 << 20
"""Allocations below 32 MiB come from the heap (a step's largest is ~4 MB); 32 MiB
is the largest value every glibc accepts (``DEFAULT_MMAP_THRESHOLD_MAX``)."""
TRIM_THRESHOLD = 256 << 20
"""Up to 256 MiB of free memory at the heap's top is kept, not returned."""


@functools.lru_cache(maxsize=1)
def retain_freed_memory(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Fix glibc's mmap and trim thresholds for this process; True if applied.

    Runs once per process (later calls return the first answer). Returns False,
    doing nothing, where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only; AttributeError elsewhere
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    refused = [
        name
        for name, param, value in (
            ("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, mmap_threshold),
            ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, trim_threshold),
        )
        if not mallopt(param, value)
    ]
    if refused:
        log.warning("mallopt refused %s; the heap keeps glibc's behaviour", refused)
    return not refused
