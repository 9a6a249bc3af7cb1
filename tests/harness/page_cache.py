"""Reading a file cold: its pages out of the page cache, without root or drop_caches.

POSIX_FADV_DONTNEED evicts only clean pages, so the file is flushed first; what a
test or benchmark reads afterwards comes from the disk (or from its throttled device).
"""

from __future__ import annotations

import os
from pathlib import Path


def evict(path: Path) -> None:
    """Flush ``path`` and drop its pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
