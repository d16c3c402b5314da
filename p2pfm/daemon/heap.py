"""Give freed heap memory back to the system (glibc): a long-lived peer's RSS follows what it holds.

A peer allocates and frees many mid-sized buffers from several threads (4 MiB state chunks,
3 MB updates, a 124 MB params answer at 124M parameters). glibc raises its mmap threshold
after each large free (up to 32 MiB), so such buffers then come from per-thread arenas, and
freed arena memory stays resident: ~1 GB of a 124M peer's RSS between rounds was memory it
no longer used. A fixed 1 MiB threshold keeps large buffers in their own mappings (returned on
free), and ``malloc_trim`` after each round returns what the arenas hold free. Both are no-ops
where glibc is absent (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("p2pfm.peer")

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018  (musl has no malloc_trim: not glibc)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def fix_mmap_threshold() -> bool:
    """Allocations of 1 MiB and more get their own mapping, released on free (returns True if set)."""
    return bool(_LIBC is not None and _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1)


def release_free_heap() -> bool:
    """Return the arenas' free memory to the system (True if glibc released something)."""
    return bool(_LIBC is not None and _LIBC.malloc_trim(0) == 1)
