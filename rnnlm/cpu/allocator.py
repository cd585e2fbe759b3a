"""Keep the trainer's freed memory in the process instead of handing it back to the OS after every minibatch.

Every minibatch allocates the same large buffers again. glibc serves blocks of 128 KB and more with fresh `mmap`
pages, or trims the heap when they are freed, so each minibatch would touch its buffers as new pages (page faults
every time). Raising glibc's mmap and trim thresholds keeps those pages for reuse. The setting is for the whole
process and stays (glibc cannot go back to its dynamic threshold); other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_KEEP_MMAP = 32 * 1024 * 1024  # blocks up to this size come from the heap (glibc's own dynamic ceiling on 64-bit)
_KEEP_TRIM = 1024 * 1024 * 1024  # free memory kept at the top of the heap before it is given back

_applied: list[bool] = []


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks up to 32 MB (and up to 1 GB free at the heap's top) in the process, once per
    process; returns whether the setting is in force (False where the C library is not glibc)."""
    if not _applied:
        mallopt = _mallopt()
        ok = mallopt is not None and mallopt(_M_MMAP_THRESHOLD, _KEEP_MMAP) == 1
        _applied.append(ok and mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM) == 1)
    return _applied[0]


def _mallopt():
    """glibc's `mallopt`, or None where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return getattr(ctypes.CDLL(None), "mallopt", None)
