"""Giving freed memory back to the system after big, short-lived work.

A preparation or a generation at 1080p allocates and frees hundreds of MB of
frames; glibc's allocator keeps most of that in the process (its heap grows,
and its dynamic mmap threshold moves big blocks into the heap too), so the
front end's resident memory would only grow. `release()` runs after each such
job and asks glibc to return what is free (malloc_trim): measured, a 4 s 1080p
preparation left 795 MB more resident without it, against about 40 MB with it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading

_lock = threading.Lock()
_libc = None


def release() -> None:
    """Return the allocator's free memory to the system (glibc only; elsewhere nothing)."""
    global _libc
    with _lock:
        if _libc is None:
            name = ctypes.util.find_library("c")
            _libc = ctypes.CDLL(name) if name else False
        trim = getattr(_libc, "malloc_trim", None) if _libc else None
        if trim:
            trim(0)
