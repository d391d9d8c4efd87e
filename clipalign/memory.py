"""Keep freed heap memory in the process, so that buffers are reused, not faulted in again.

glibc's malloc serves large blocks with ``mmap`` (its threshold moves between 128 KiB and
32 MiB as it sees frees, and blocks above 32 MiB always get one) and hands freed heap tops back
to the kernel, so the next block of that size touches fresh pages again, each a page fault and
a page of zeroing. Two kinds of process pay for it, each measured on the project machines:

- A prep worker: every image passes through a few buffers of about a megabyte (the encoded
  bytes, the decoded pixels, their copies on the way to the resampler); ~600 page faults per
  640x480 image, 2-3 ms of its ~8 ms. Fixing the mmap threshold at 32 MiB and raising the trim
  threshold keeps those pages mapped and reused (2,000 images: 1.1 M page faults -> 83 k, of
  which most are start-up).
- A training process: each step allocates and frees the same activations and gradients, some
  above 32 MiB (``ca-small``, batch 128: the 50 MB token-embedding gradient). With no ``mmap``
  at all every block comes from the heap, which is then reused from the second step on
  (``largest=True``): the demo's 100 training steps take 0.47 M page faults instead of 1.84 M
  and 1.9 s of system time instead of 4.4, and run about 7 % faster (BENCHMARKS.md).

A heap that keeps freed blocks reuses them only for requests of sizes it has seen: a tensor
whose size changes every step (the MLM logits, one row per masked token) splits and extends it
instead, and RSS grows step by step; such tensors are padded to a few sizes
(``ClipAlign.mlm_logits``'s ``row_multiple``).

The cost is memory held at its high-water mark: about the working set of the busiest moment
of each thread's arena (a training step's peak, which the step reaches again every step
anyway). Prep workers and trainers own their processes, so that trade is theirs.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4

MMAP_THRESHOLD = 32 * 2**20  # blocks above this (decoded images of ~8 Mpx and more) still use mmap
TRIM_THRESHOLD = 256 * 2**20
TOP_PAD = 16 * 2**20
MMAP_MAX = 65536  # glibc's default: how many blocks may be mmap-ed at once
# with every block on the heap, a freed top of the heap is handed back only above this (mallopt takes an int)
LARGEST_TRIM_THRESHOLD = 2**31 - 1
LARGEST_TOP_PAD = 64 * 2**20

# keep_freed_memory's settings by ``largest``: (mallopt parameter, its GLIBC_TUNABLES name, value)
_SETTINGS = {
    False: ((_M_MMAP_MAX, "mmap_max", MMAP_MAX), (_M_MMAP_THRESHOLD, "mmap_threshold", MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, "trim_threshold", TRIM_THRESHOLD), (_M_TOP_PAD, "top_pad", TOP_PAD)),
    True: ((_M_MMAP_MAX, "mmap_max", 0), (_M_TRIM_THRESHOLD, "trim_threshold", LARGEST_TRIM_THRESHOLD),
           (_M_TOP_PAD, "top_pad", LARGEST_TOP_PAD)),
}


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


def keep_freed_memory(*, largest: bool = False) -> bool:
    """Tune glibc's malloc of this process (and of children forked after) to reuse freed memory.

    Args:
        largest: keep blocks of every size, not only those up to 32 MiB: no block is mmap-ed,
            and the heap is handed back only above 2 GiB free at its top. For a training
            process, whose every step frees and allocates again the same tensors.

    Returns:
        Whether the settings took effect: ``False`` where the C library has no ``mallopt``
        (musl, macOS), which leaves the process as it was.
    """
    libc = _libc()
    if libc is None:
        return False
    return all(libc.mallopt(param, value) == 1 for param, _, value in _SETTINGS[largest])


def glibc_tunables(*, largest: bool = False) -> str:
    """``keep_freed_memory``'s settings as a ``GLIBC_TUNABLES`` value: for a process that does
    not set them itself (another trainer, run side by side), which glibc reads at its start."""
    return ":".join(f"glibc.malloc.{name}={value}" for _, name, value in _SETTINGS[largest])
