"""Process memory settings for a server that moves large frames.

Broadcasts of up to a few MB pass through each server process as bytes
objects of the same size (received, published, framed, buffered). glibc
serves such blocks from ``mmap`` at first, but raises its mmap threshold each
time one is freed (up to 32 MiB), after which they come from the main heap;
freed there, they leave holes the heap rarely returns, and a burst of large
broadcasts leaves the process tens of MiB larger for good. A fixed threshold
keeps every block from 256 KiB up in its own mapping, given back to the
system when freed. The cost is one ``mmap``/``munmap`` pair per large block,
small beside copying the block.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc malloc.h
MMAP_THRESHOLD_BYTES = 256 * 1024


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold (no-op elsewhere); True if it was set."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
