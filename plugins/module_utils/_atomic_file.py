# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Replace a small file atomically and durably.

A reader sees the old content or the new one, never a mix, and once
:func:`replace_file` returns the new content survives a crash: the data is
written under a unique temporary name, fsynced, renamed over the file, and the
directory is fsynced (the rename is only durable once the directory is).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import Optional


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def open_directory(path: str) -> int:
    """A descriptor of the directory ``path`` for :func:`replace_file`; raises OSError."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def replace_file(dir_fd: int, name: str, data: bytes, mode: int = 0o600, temporary: Optional[str] = None) -> None:
    """Make ``name`` in the directory ``dir_fd`` hold ``data``, with ``mode``; raises OSError.

    The temporary file is created with O_EXCL and O_NOFOLLOW, so nothing planted
    in the directory is followed or reused, and it is removed on every failure.
    Its name is random unless the caller names it (``temporary``: a name its own
    clean-up recognizes).
    """
    temporary = temporary or f".{name}.{os.getpid()}.{secrets.token_hex(8)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                 dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask took away
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    finally:
        with contextlib.suppress(OSError):  # renamed into place: nothing left to remove
            os.unlink(temporary, dir_fd=dir_fd)
