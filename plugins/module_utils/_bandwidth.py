# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""The save bandwidth measured on this host, kept for the next drain's estimate.

After a successful save, the save module records how fast the image went to disk
(``stats`` of its result) for the image's directory and format, in a small JSON file
in our private state directory (``_image_key.state_dir()``, 0700, ours alone):

    {"version": 1, "saves": [{"directory": "/var/lib/savestate/drain", "format": "raw",
      "bytes": 2147549184, "seconds": 1.84, "mib_s": 1112.5, "measured_at": 1764500000.0}]}

One entry per directory and format (the last save wins), at most ``MAX_ENTRIES``, the
oldest dropped. host_drain's check mode reads it (through drain_manifest) to estimate
how long a drain takes.

The file is input from disk: it is read only if it is a regular file of ours that
nobody else can write, at most ``MAX_FILE_BYTES``, without following links or
blocking on a FIFO; an envelope that does not parse is ignored whole, an entry that
does not validate is dropped. It is written atomically (a unique temporary file,
fsync, rename, fsync of the directory) under an flock on the directory, so that two
saves finishing at once each keep their entry. Neither reading nor writing ever
fails a save: a problem only means no record (``record_save`` says why, for a warning).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import stat
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._atomic_file import replace_file
from ansible_collections.savestate.qemu.plugins.module_utils._errors import SaveStateError
from ansible_collections.savestate.qemu.plugins.module_utils._image_key import open_private_dir, state_dir
from ansible_collections.savestate.qemu.plugins.module_utils._timestamps import utc_text

RECORD_NAME = "bandwidth.json"
RECORD_VERSION = 1
MAX_ENTRIES = 32
# 32 entries of a few hundred bytes each; anything much bigger is not ours.
MAX_FILE_BYTES = 64 * 1024
_MAX_PATH = 4096
_FORMAT = re.compile(r"^[a-z0-9]{1,16}$")
# No disk writes an exabyte per second: a figure out of these bounds is not a measurement.
_MAX_BYTES = 2 ** 62
_MAX_MIB_S = 1e7
_LOCK_WAIT_S = 2.0


@dataclass(frozen=True)
class Bandwidth:
    """One save's measurement: ``bytes`` of image written to ``directory`` in ``seconds``."""

    directory: str
    format: str
    bytes: int
    seconds: float
    mib_s: float
    measured_at: float  # seconds since the epoch, UTC

    def report(self) -> dict[str, Any]:
        """As drain_manifest returns it: the figures and the date in ISO 8601, UTC."""
        result = asdict(self)
        result["measured_at"] = utc_text(self.measured_at)
        return result


def _number(value: Any, low: float, high: float) -> Optional[float]:
    """``value`` as a finite float in [low, high], or None (bool is no number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and low <= number <= high else None


def _entry(raw: Any) -> Optional[Bandwidth]:
    """A validated entry, or None: types, lengths and ranges all checked."""
    if not isinstance(raw, Mapping):
        return None
    directory, image_format = raw.get("directory"), raw.get("format")
    if not isinstance(directory, str) or not directory.startswith("/") or len(directory) > _MAX_PATH \
            or "\0" in directory:
        return None
    if not isinstance(image_format, str) or not _FORMAT.match(image_format):
        return None
    size = raw.get("bytes")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= _MAX_BYTES:
        return None
    seconds = _number(raw.get("seconds"), 1e-9, 1e7)
    mib_s = _number(raw.get("mib_s"), 1e-6, _MAX_MIB_S)
    measured_at = _number(raw.get("measured_at"), 0, 1e11)
    if seconds is None or mib_s is None or measured_at is None:
        return None
    return Bandwidth(directory, image_format, size, seconds, mib_s, measured_at)


def parse_record(raw: bytes) -> list[Bandwidth]:
    """The valid entries of a record file's bytes; [] for anything that is not a record of ours."""
    if len(raw) > MAX_FILE_BYTES:
        return []
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return []
    if not isinstance(data, dict) or data.get("version") != RECORD_VERSION or not isinstance(data.get("saves"), list):
        return []
    entries = [entry for entry in map(_entry, data["saves"][:MAX_ENTRIES]) if entry is not None]
    return entries


def _read(dir_fd: int) -> list[Bandwidth]:
    try:
        fd = os.open(RECORD_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return []  # none yet, a symbolic link (ELOOP), a FIFO without writer: no record
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022 \
                or info.st_size > MAX_FILE_BYTES:
            return []
        raw = os.read(fd, MAX_FILE_BYTES + 1)
    except OSError:
        return []
    finally:
        os.close(fd)
    return parse_record(raw)


def read_records(directory: Optional[str] = None) -> list[Bandwidth]:
    """Every valid entry recorded on this host ([] when there is none, or the state directory is unsafe)."""
    try:
        dir_fd = open_private_dir(directory or state_dir(), create=False)
    except (SaveStateError, OSError):
        return []
    if dir_fd is None:
        return []
    try:
        return _read(dir_fd)
    finally:
        os.close(dir_fd)


def _same_directory(recorded: str, wanted: str) -> bool:
    return os.path.normpath(recorded) == os.path.normpath(os.path.realpath(wanted))


def lookup(image_dir: str, state: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """The last measurement per image format for saves into ``image_dir``, as ``Bandwidth.report()`` dicts."""
    found: dict[str, Bandwidth] = {}
    for entry in read_records(state):
        if _same_directory(entry.directory, image_dir):
            if entry.format not in found or entry.measured_at > found[entry.format].measured_at:
                found[entry.format] = entry
    return {name: entry.report() for name, entry in sorted(found.items())}


def measurement(image_path: str, image_format: str, stats: Mapping[str, Any],
                now: Optional[float] = None) -> Optional[Bandwidth]:
    """What a save's ``stats`` say about the disk of ``image_path``; None if they say nothing usable."""
    return _entry({"directory": os.path.realpath(os.path.dirname(os.path.abspath(image_path))),
                   "format": image_format, "bytes": stats.get("bytes"), "seconds": stats.get("duration_s"),
                   "mib_s": stats.get("throughput_mib_s"), "measured_at": time.time() if now is None else now})


def _encode(entries: list[Bandwidth]) -> bytes:
    newest = sorted(entries, key=lambda entry: entry.measured_at, reverse=True)[:MAX_ENTRIES]
    return json.dumps({"version": RECORD_VERSION, "saves": [asdict(entry) for entry in newest]},
                      indent=1, sort_keys=True).encode("utf-8") + b"\n"


def _lock(dir_fd: int) -> bool:
    """An exclusive flock on the state directory for a short while; whether we got it."""
    deadline = time.monotonic() + _LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() > deadline:
                return False
        time.sleep(0.02)


def store(entry: Bandwidth, directory: Optional[str] = None) -> None:
    """Add ``entry`` to the record (replacing that directory's and format's); raises OSError or SaveStateError."""
    dir_fd = open_private_dir(directory or state_dir(), create=True)
    if dir_fd is None:
        raise OSError(errno.ENOENT, "the state directory is missing")
    try:
        if not _lock(dir_fd):
            raise OSError(errno.EWOULDBLOCK, "another save holds the record")
        kept = [old for old in _read(dir_fd) if (old.directory, old.format) != (entry.directory, entry.format)]
        replace_file(dir_fd, RECORD_NAME, _encode(kept + [entry]))
    finally:
        os.close(dir_fd)  # drops the flock


def record_save(image_path: str, image_format: str, stats: Optional[Mapping[str, Any]],
                directory: Optional[str] = None) -> Optional[str]:
    """Record a successful save's bandwidth; never raises. Returns why it was not recorded, or None."""
    if not stats:
        return None
    entry = measurement(image_path, image_format, stats)
    if entry is None:
        return None  # too short to time, or nothing written: nothing worth keeping
    try:
        store(entry, directory)
    except (SaveStateError, OSError, ValueError, TypeError) as error:
        where = os.path.join(directory or state_dir(), RECORD_NAME)
        return f"the save's bandwidth was not recorded in {where} (the next drain's estimate uses a default): " \
               f"{getattr(error, 'strerror', None) or error}"
    return None
