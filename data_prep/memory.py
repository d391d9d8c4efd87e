"""Keep freed heap memory in the process, so that per-image buffers are reused, not re-faulted.

Every image passes through a few buffers of about a megabyte (the encoded bytes, the
decoded pixels, their copies on the way to the resampler). glibc's malloc serves blocks of
that size with ``mmap`` (its threshold moves between 128 KiB and 32 MiB as it sees frees)
and hands freed heap tops back to the kernel, so the next image touches fresh pages again:
measured on the project machine, ~600 page faults per 640x480 image, 2-3 ms of its ~8 ms.
Fixing the mmap threshold and raising the trim threshold keeps those pages mapped and
reused (2,000 images: 1.1 M page faults -> 83 k, of which most are start-up).

The cost is memory held at its high-water mark: about the working set of the busiest
moment of each thread's arena. Prep workers own their processes, so that trade is theirs.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 2**20  # blocks above this (decoded images of ~8 Mpx and more) still use mmap
TRIM_THRESHOLD = 256 * 2**20
TOP_PAD = 16 * 2**20


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """Tune glibc's malloc of this process (and of children forked after) to reuse freed memory.

    Returns:
        Whether the settings took effect: ``False`` where the C library has no ``mallopt``
        (musl, macOS), which leaves the process as it was.
    """
    libc = _libc()
    if libc is None:
        return False
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
