# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""State that must outlive one module run: per-guest locks and save journals.

Both live in a private runtime directory (``/run/savestate-qemu`` for root, mode
0700), which, like the QEMU processes it is about, does not survive a reboot.

- A lock (``flock``) per guest serialises saves and restores of that guest: a
  second run waits for the first, up to its timeout, and never interleaves.
- A save journal records, while a save runs, what the guest was doing before we
  paused it. If the module is killed mid-save the guest stays paused; the next run
  reads the journal and still knows whether to resume it, and which temporary file
  the interrupted run was writing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._errors import PreconditionError

ROOT_RUNTIME_DIR = "/run/savestate-qemu"
LOCK_POLL_INTERVAL = 0.1


def runtime_dir() -> str:
    """Create (if needed) and return the private runtime directory."""
    if os.geteuid() == 0:
        path = ROOT_RUNTIME_DIR
    else:
        base = os.environ.get("XDG_RUNTIME_DIR")
        path = os.path.join(base, "savestate-qemu") if base else f"/tmp/savestate-qemu-{os.geteuid()}"
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise PreconditionError(
            f"the runtime directory {path} must be owned by uid {os.geteuid()} with mode 0700; "
            "someone else could tamper with save journals there")
    return path


def guest_key(uuid: Optional[str], name: Optional[str], pid: int) -> str:
    """A file-name-safe key for a guest: its UUID, else its name, else its pid."""
    if uuid and uuid.strip("0-"):
        return uuid.lower()
    if name:
        return "name-" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:100]
    return f"pid-{pid}"


class GuestLock:
    """An exclusive flock on ``<runtime>/<key>.lock``; a context manager."""

    def __init__(self, key: str, timeout: float, holder: str) -> None:
        self.path = os.path.join(runtime_dir(), f"{key}.lock")
        self.timeout = timeout
        self.holder = holder
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() > deadline:
                    other = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise PreconditionError(
                        f"another savestate.qemu operation on this guest is still running "
                        f"({other or 'unknown'}); gave up waiting after {self.timeout:g} s") from None
                time.sleep(LOCK_POLL_INTERVAL)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.holder}, pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> GuestLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def process_start_time(pid: int) -> Optional[int]:
    """Clock ticks since boot at which ``pid`` started: tells a reused pid apart."""
    # Imported here to keep this change to the one function; _proc owns every /proc read.
    from ansible_collections.savestate.qemu.plugins.module_utils._proc import process_start_time as start_time

    return start_time(pid)


@dataclass
class SaveJournal:
    """What an interrupted save must not forget (see module docstring)."""

    pid: int
    process_start: Optional[int]
    was_running: bool
    temp_path: str
    final_path: str
    image_format: str
    helper_pid: Optional[int] = None

    def matches_process(self, pid: int) -> bool:
        return self.pid == pid and self.process_start == process_start_time(pid)


class JournalStore:
    """Read, write and remove the save journal of one guest."""

    def __init__(self, key: str) -> None:
        self.path = os.path.join(runtime_dir(), f"{key}.save-journal.json")

    def load(self) -> Optional[SaveJournal]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                data: dict[str, Any] = json.load(handle)
            return SaveJournal(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            self.remove()  # unreadable: treat as absent rather than block every save
            return None

    def store(self, journal: SaveJournal) -> None:
        temp = self.path + ".tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(asdict(journal)).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, self.path)

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
