"""Process memory settings for CPU inference (infer.py).

ResNet-38 on a VOC image at scale 2 makes activations of up to ~200 MB per layer, allocated and
freed layer by layer, 8 views per image. glibc's malloc serves every block above its mmap
threshold (at most 32 MB by default) with a fresh ``mmap`` and returns it with ``munmap`` when
freed, so each such activation faults in every one of its pages again (zero-filled by the
kernel): measured 2.9 million page faults and 6-7 s of system time per VOC image, against
73-79 s of user time. Served from the heap and kept there when freed, the same memory is reused
without faults: 0.7-0.9 million faults and 2 s of system time (A/B on the shared 2-core
development machine, same process layout otherwise).

Not every block is reused: torch allocates with ``posix_memalign``, whose alignment slack leaves
a freed block a little too small for the next request of the same size, so the heap fragments
and part of the large blocks still come fresh (a loop of 40 MB blocks: 102k faults by default,
60-72k with these settings). Whole process, 2 VOC-size images, at low load: 84-88 s instead of 89-98 s of wall time, and
160 s instead of 167-181 s of CPU time. The price: freed memory stays with the process until it
exits, and the heap fragments, so the peak resident size grows by about 1 GB (3.1 -> 4.2 GB for
one VOC image). infer.py therefore asks for it on its default CPU path only (the Winograd graph);
``--no-winograd`` stays the low-memory choice (docs/inference.md "Memory").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt parameter numbers (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap (ResNet-38's largest activation at scale 2 of a
# 500x500 image is about 0.26 GB).
HEAP_BLOCKS_UP_TO = 1 << 30


def keep_freed_memory(limit: int = HEAP_BLOCKS_UP_TO) -> bool:
    """Ask glibc's malloc to serve blocks up to ``limit`` bytes from the heap and never to give
    freed heap memory back to the OS. Returns whether it took effect (False off Linux/glibc,
    where it is a no-op)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, int(limit))) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    if not ok:
        logger.debug("mallopt refused the heap settings; freed memory is returned as usual")
    return ok
