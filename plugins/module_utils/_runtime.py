# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""State that must outlive one module run: per-guest locks, save journals, QEMU logs.

All of it lives in a private runtime directory (``/run/savestate-qemu`` for root,
mode 0700), which, like the QEMU processes it is about, does not survive a reboot.

- A lock (``flock``) per guest serialises saves and restores of that guest: a
  second run waits for the first, up to its timeout, and never interleaves.
- A save journal records, while a save runs, what the guest was doing before we
  paused it. If the module is killed mid-save the guest stays paused; the next run
  reads the journal and still knows whether to resume it, and which temporary file
  the interrupted run was writing.
- A restored QEMU writes its output to a log here, named after its pid.

The modules run as root and what names a guest (its ``-uuid``, ``-name``) comes
from processes and images anyone could have made, so: a file name is built only
from a validated UUID or a hash (:func:`guest_key`); the directory is opened once
and checked through its descriptor, and every file in it is opened relative to
that descriptor with ``O_NOFOLLOW`` (a symlink is never followed, a FIFO never
blocks), and must be a regular file of ours. Files are removed when no longer
needed: a lock when it is released, the rest by :func:`remove_stale_files` once
the run or the QEMU they belong to is gone.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import stat
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional
from uuid import UUID

from ansible_collections.savestate.qemu.plugins.module_utils._atomic_file import replace_file
from ansible_collections.savestate.qemu.plugins.module_utils._errors import PreconditionError
from ansible_collections.savestate.qemu.plugins.module_utils._proc import fd_stat, net_table
from ansible_collections.savestate.qemu.plugins.module_utils._proc import process_start_time as _start_time

ROOT_RUNTIME_DIR = "/run/savestate-qemu"
LOCK_POLL_INTERVAL = 0.1
# A file name in the runtime directory: one path component, never hidden, never "..".
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
JOURNAL_MAX_BYTES = 64 * 1024
MAX_PATH_FIELD = 4096
STARTING_LOG_SUFFIX = ".starting.log"
LEGACY_FILES = ("qemu-schema-facts.json",)  # an older release's single schema cache


class UnsafeEntryError(PreconditionError):
    """Something other than a regular file of ours sits at a runtime file's name."""


# --- the directory ---------------------------------------------------------------------------

def runtime_path() -> str:
    """Where the runtime directory is (nothing is created or checked)."""
    if os.geteuid() == 0:
        return ROOT_RUNTIME_DIR
    base = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, "savestate-qemu") if base else f"/tmp/savestate-qemu-{os.geteuid()}"


def _directory_problem(path: str, why: str) -> PreconditionError:
    uid = os.geteuid()
    return PreconditionError(
        f"the runtime directory {path} {why}; it must be a directory owned by uid {uid} with mode 0700, "
        "because the guest locks and save journals in it decide what saves and restores do. Remove it "
        f"(or correct it: chown {uid} {path}; chmod 0700 {path}) and run again")


def _open_directory(path: str) -> int:
    """Create (if needed), open and check the runtime directory; its descriptor."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as error:
        raise PreconditionError(f"cannot create the runtime directory {path}: {error.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise _directory_problem(path, _why_not_a_directory(path, error)) from None
    info = os.fstat(fd)
    mode = stat.S_IMODE(info.st_mode)
    why = None
    if info.st_uid != os.geteuid():
        why = f"is owned by uid {info.st_uid}"
    elif mode & 0o077:
        why = f"has mode {mode:04o}"
    if why is not None:
        os.close(fd)
        raise _directory_problem(path, why)
    if mode != 0o700:
        os.fchmod(fd, 0o700)  # ours and closed to others, but made under a umask that left us out
    return fd


def _why_not_a_directory(path: str, error: OSError) -> str:
    try:
        info = os.lstat(path)
    except OSError:
        return f"cannot be opened ({error.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    return f"cannot be opened ({error.strerror})"


def _ours(info: os.stat_result) -> bool:
    """A regular file of ours with no other name (0 names: removed since we opened it, which is fine)."""
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and info.st_nlink <= 1


def _checked_name(name: str) -> str:
    if not FILE_NAME.fullmatch(name):
        raise PreconditionError(f"refusing the runtime file name {name!r}: not a plain file name")
    return name


class RuntimeDir:
    """The runtime directory, opened once and checked through its descriptor; a context manager.

    Every file is reached relative to the descriptor, so a path swapped after the
    check changes nothing, and with ``O_NOFOLLOW`` so no symlink in it is followed.
    """

    def __init__(self) -> None:
        self.path = runtime_path()
        self.fd = _open_directory(self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RuntimeDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def join(self, name: str) -> str:
        return os.path.join(self.path, _checked_name(name))

    def open(self, name: str, flags: int, mode: int = 0o600) -> int:
        """Open a regular file of ours; FileNotFoundError if there is none (and no ``O_CREAT``).

        UnsafeEntryError if something else is there: a symlink (never followed), a
        FIFO or socket (never blocked on), a directory, a file of another owner or
        one with other names (a hard link).
        """
        try:
            fd = os.open(_checked_name(name), flags | OPEN_FLAGS, mode, dir_fd=self.fd)
        except FileNotFoundError:
            raise
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR):
                raise UnsafeEntryError(f"{self.join(name)} is not a regular file ({error.strerror})") from None
            raise PreconditionError(f"cannot open {self.join(name)}: {error.strerror}") from None
        if not _ours(os.fstat(fd)):
            os.close(fd)
            raise UnsafeEntryError(f"{self.join(name)} is not a regular file of uid {os.geteuid()} "
                                   "with a single name")
        return fd

    def remove_unsafe(self, name: str) -> None:
        """Remove what sits at ``name`` unless it is a regular file of ours (someone's lock, say)."""
        info = self.lstat(name)
        if info is not None and not _ours(info):
            self.unlink(name)

    def lstat(self, name: str) -> Optional[os.stat_result]:
        try:
            return os.lstat(_checked_name(name), dir_fd=self.fd)
        except FileNotFoundError:
            return None

    def same_file(self, name: str, fd: int) -> bool:
        """Whether ``name`` is (still) the file open at ``fd``."""
        info, held = self.lstat(name), os.fstat(fd)
        return info is not None and (info.st_dev, info.st_ino) == (held.st_dev, held.st_ino)

    def unlink(self, name: str) -> None:
        """Remove an entry (a symlink itself, never what it points to); absent is fine."""
        try:
            try:
                os.unlink(_checked_name(name), dir_fd=self.fd)
            except IsADirectoryError:
                os.rmdir(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise PreconditionError(f"cannot remove {self.join(name)}: {error.strerror}") from None

    def replace(self, source: str, target: str) -> None:
        os.replace(_checked_name(source), _checked_name(target), src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def entries(self) -> list[str]:
        return os.listdir(self.fd)

    def read(self, name: str, limit: int) -> Optional[bytes]:
        """The content of ``name``; None when absent, ``b""`` when it is not a file of ours or too big."""
        try:
            fd = self.open(name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except UnsafeEntryError:
            return b""
        try:
            data = os.read(fd, limit + 1)
        finally:
            os.close(fd)
        return data if len(data) <= limit else b""

    def write(self, name: str, data: bytes) -> None:
        """Replace ``name`` with ``data`` atomically (a temporary file named after this process, then a rename)."""
        temporary = f"{_checked_name(name)}.{os.getpid()}.tmp"  # TEMP_FILE: the sweep removes a killed run's
        self.unlink(temporary)  # a leftover of a killed process that had our pid
        try:
            replace_file(self.fd, name, data, temporary=temporary)
        except OSError as error:
            raise PreconditionError(f"cannot write {self.join(name)}: {error.strerror}") from None


def runtime_dir() -> str:
    """Create (if needed) and check the runtime directory; its path."""
    with RuntimeDir() as directory:
        return directory.path


def read_runtime_file(name: str, limit: int) -> Optional[bytes]:
    """See :meth:`RuntimeDir.read`."""
    with RuntimeDir() as directory:
        return directory.read(name, limit)


def write_runtime_file(name: str, data: bytes) -> None:
    """See :meth:`RuntimeDir.write`."""
    with RuntimeDir() as directory:
        directory.write(name, data)


# --- guest keys ------------------------------------------------------------------------------

def canonical_uuid(value: object) -> Optional[str]:
    """``value`` as a UUID in QEMU's (canonical, lower-case) form; None if it is not one, or nil."""
    if not isinstance(value, str) or len(value) != 36:
        return None
    try:
        parsed = UUID(value)
    except ValueError:
        return None
    text = str(parsed)
    return text if text == value.lower() and parsed.int != 0 else None


def guest_key(uuid: Optional[str], name: Optional[str], pid: int) -> str:
    """A file-name-safe key for a guest, the same for every run that sees the same guest.

    Its UUID when it is a valid one, else a hash of its name, else its pid: nothing
    a process or an image says reaches a file name unchecked (``-uuid /home/u/k``
    is no UUID). A save and a restore see the same UUID and name, so the same key.
    """
    canonical = canonical_uuid(uuid)
    if canonical is not None:
        return canonical
    if isinstance(name, str) and name:
        return "name-" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"pid-{int(pid)}"


# --- locks -----------------------------------------------------------------------------------

def _flock_until(fd: int, deadline: float) -> bool:
    """Take an exclusive flock on ``fd``, polling until ``deadline``; whether we got it."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(LOCK_POLL_INTERVAL)


class GuestLock:
    """An exclusive flock on ``<runtime>/<key>.lock``; a context manager.

    The file is removed when the lock is released. That is safe with the usual
    protocol: the holder unlinks it while still holding the flock, and whoever
    locks a file checks afterwards that it is still the one at the path (else it
    waited on a removed file, and starts over on the new one).
    """

    def __init__(self, key: str, timeout: float, holder: str) -> None:
        self.name = _checked_name(f"{key}.lock")
        self.path = os.path.join(runtime_path(), self.name)
        self.timeout = timeout
        self.holder = holder
        self._dir: Optional[RuntimeDir] = None
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        directory = RuntimeDir()
        try:
            fd = self._lock(directory, time.monotonic() + self.timeout)
        except BaseException:
            directory.close()
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{self.holder}, pid {os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # who holds the lock is only told to a run that gives up waiting
        self._dir, self._fd = directory, fd

    def _lock(self, directory: RuntimeDir, deadline: float) -> int:
        while True:
            fd = self._open(directory)
            try:
                if not _flock_until(fd, deadline):
                    other = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    raise PreconditionError(
                        f"another savestate.qemu operation on this guest is still running "
                        f"({other or 'unknown'}); gave up waiting after {self.timeout:g} s")
                if directory.same_file(self.name, fd):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the holder we waited for removed it: lock the file that is there now

    def _open(self, directory: RuntimeDir) -> int:
        flags = os.O_RDWR | os.O_CREAT
        try:
            return directory.open(self.name, flags)
        except UnsafeEntryError:
            directory.remove_unsafe(self.name)  # no lock of ours (a symlink, a FIFO): remove it, never follow it
            return directory.open(self.name, flags)

    def release(self) -> None:
        fd, directory = self._fd, self._dir
        if fd is None or directory is None:
            return
        self._fd = self._dir = None
        try:
            if directory.same_file(self.name, fd):
                directory.unlink(self.name)  # still holding the flock, see the class docstring
        except (OSError, PreconditionError):
            pass  # a lock file left behind is harmless, and the next restore's cleanup removes it
        finally:
            os.close(fd)  # closing drops the flock
            directory.close()

    def __enter__(self) -> GuestLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _try_lock(key: str) -> Optional[GuestLock]:
    """The guest's lock if nobody holds it, without waiting; None otherwise."""
    lock = GuestLock(key, 0, "removing stale runtime files")
    try:
        lock.acquire()
    except PreconditionError:
        return None
    return lock


def process_start_time(pid: int) -> Optional[int]:
    """Clock ticks since boot at which ``pid`` started: tells a reused pid apart."""
    return _start_time(pid)


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


# What a journal may hold: field -> accepted types (exact: ``True`` is no pid).
JOURNAL_FIELDS: dict[str, tuple[type, ...]] = {
    "pid": (int,), "process_start": (int, type(None)), "was_running": (bool,), "temp_path": (str,),
    "final_path": (str,), "image_format": (str,), "helper_pid": (int, type(None)),
}
JOURNAL_OPTIONAL_FIELDS = frozenset(("helper_pid",))
POSITIVE_FIELDS = frozenset(("pid", "helper_pid"))


def _valid_journal_field(name: str, value: Any) -> bool:
    if type(value) not in JOURNAL_FIELDS[name]:
        return False
    if isinstance(value, int) and not isinstance(value, bool):
        return (1 if name in POSITIVE_FIELDS else 0) <= value < 2 ** 63
    if isinstance(value, str):
        return len(value) <= MAX_PATH_FIELD and "\0" not in value
    return True


def journal_from_json(data: bytes) -> Optional[SaveJournal]:
    """The journal ``data`` holds; None for anything but a journal with every field of its type."""
    try:
        fields = json.loads(data)
    except ValueError:  # not JSON, or not UTF-8
        return None
    if not isinstance(fields, dict) or not set(fields) <= set(JOURNAL_FIELDS):
        return None
    if not set(JOURNAL_FIELDS) - JOURNAL_OPTIONAL_FIELDS <= set(fields):
        return None
    if not all(_valid_journal_field(name, value) for name, value in fields.items()):
        return None
    return SaveJournal(**fields)


class JournalStore:
    """Read, write and remove the save journal of one guest (call with its lock held)."""

    def __init__(self, key: str) -> None:
        self.name = _checked_name(f"{key}.save-journal.json")
        self.path = os.path.join(runtime_path(), self.name)

    def load(self) -> Optional[SaveJournal]:
        """The journal; a missing one is None, and so is garbage (removed rather than block every save)."""
        with RuntimeDir() as directory:
            data = directory.read(self.name, JOURNAL_MAX_BYTES)
            if data is None:
                return None
            journal = journal_from_json(data)
            if journal is None:
                directory.unlink(self.name)
            return journal

    def store(self, journal: SaveJournal) -> None:
        write_runtime_file(self.name, json.dumps(asdict(journal)).encode())

    def remove(self) -> None:
        with RuntimeDir() as directory:
            directory.unlink(self.name)


# --- logs of restored QEMUs ------------------------------------------------------------------

def create_qemu_log(key: str) -> tuple[str, int]:
    """A new, empty log for the QEMU a restore is about to start: its path and a descriptor to write it.

    Call with the guest's lock held; once QEMU runs, :func:`claim_qemu_log` names
    its pid in the file name. What earlier runs left behind is removed first.
    """
    remove_stale_files(held_key=key)
    name = _checked_name(key + STARTING_LOG_SUFFIX)
    with RuntimeDir() as directory:
        directory.unlink(name)
        return directory.join(name), directory.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)


def claim_qemu_log(path: str, pid: int) -> str:
    """Record that QEMU ``pid`` writes the log at ``path`` (from create_qemu_log); its new path."""
    name = os.path.basename(path)
    if not name.endswith(STARTING_LOG_SUFFIX):
        raise PreconditionError(f"{path} is not a log made by create_qemu_log")
    claimed = f"{name[:-len(STARTING_LOG_SUFFIX)]}.qemu-{int(pid)}.log"
    try:
        with RuntimeDir() as directory:
            directory.replace(name, claimed)
            return directory.join(claimed)
    except (OSError, PreconditionError):
        return path  # QEMU runs: the log keeps its name, and is removed under the guest's lock later


def remove_qemu_log(path: str) -> None:
    """Remove a log made by create_qemu_log (a QEMU that did not start, or was killed)."""
    with RuntimeDir() as directory:
        directory.unlink(os.path.basename(path))


# --- cleaning up -----------------------------------------------------------------------------

# Files of one guest, by kind; the key is the guest's (see guest_key).
GUEST_FILES = (
    ("lock", re.compile(r"(?P<key>.+)\.lock")),
    ("log", re.compile(r"(?P<key>.+)\.qemu-(?P<pid>[0-9]{1,10})\.log")),
    ("starting", re.compile(r"(?P<key>.+)\.starting\.log")),
    ("socket", re.compile(r"(?P<key>.+)\.qmp")),
    ("journal", re.compile(r"(?P<key>.+)\.save-journal\.json")),
)
# A temporary file of RuntimeDir.write, named after the process writing it.
TEMP_FILE = re.compile(r".+\.(?P<pid>[0-9]{1,10})\.tmp")


def _bound_unix_paths() -> set[str]:
    """Paths unix sockets are bound to (in this network namespace)."""
    rows = (line.split(maxsplit=7) for line in net_table("unix"))
    return {fields[7] for fields in rows if len(fields) == 8}


def _socket_listens(path: str) -> bool:
    """Whether something accepts connections on the unix socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # busy (EAGAIN), or unreachable to us: not ours to remove
    finally:
        probe.close()
    return True


def _writes_to(pid: int, info: os.stat_result) -> bool:
    """Whether process ``pid`` has the file ``info`` as its standard output or error."""
    for fd in (1, 2):
        target = fd_stat(pid, fd)
        if target is not None and (target.st_dev, target.st_ino) == (info.st_dev, info.st_ino):
            return True
    return False


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return pid > 0


@dataclass(frozen=True)
class _Entry:
    name: str
    kind: str
    key: str
    pid: Optional[int] = None


def _guest_file(name: str) -> Optional[_Entry]:
    for kind, pattern in GUEST_FILES:
        match = pattern.fullmatch(name)
        if match and FILE_NAME.fullmatch(match["key"] + ".lock"):
            pid = match.groupdict().get("pid")
            return _Entry(name, kind, match["key"], int(pid) if pid else None)
    return None


class _Sweep:
    """Which entries of the runtime directory are stale; see :func:`remove_stale_files`."""

    def __init__(self, directory: RuntimeDir) -> None:
        self.directory = directory
        self._bound: Optional[set[str]] = None

    def in_use(self, entry: _Entry) -> bool:
        """Whether a live QEMU uses the file: cheap to tell, and no lock needed to ask."""
        info = self.directory.lstat(entry.name)
        if info is None:
            return False
        if entry.kind == "log" and entry.pid is not None:
            return _writes_to(entry.pid, info)
        if entry.kind == "socket":
            return stat.S_ISSOCK(info.st_mode) and self._listens(self.directory.join(entry.name))
        return False

    def stale(self, entry: _Entry) -> bool:
        """Whether the file can go; call with the guest's lock held (no run is using it)."""
        if entry.kind == "journal":
            journal = JournalStore(entry.key).load()
            return journal is not None and not journal.matches_process(journal.pid)
        return entry.kind != "lock" and not self.in_use(entry)

    def _listens(self, path: str) -> bool:
        if self._bound is None:
            self._bound = _bound_unix_paths()
        return path in self._bound or _socket_listens(path)

    def clean_guest(self, key: str, entries: list[_Entry], held: bool) -> None:
        """Remove the guest's stale files; ``held``: the caller holds its lock (else we try to take it)."""
        # Logs and sockets of live QEMUs are the usual entries: only take the lock for a reason.
        if all(entry.kind in ("log", "socket") and self.in_use(entry) for entry in entries):
            return
        lock = None if held else _try_lock(key)
        if lock is None and not held:
            return  # a run is using this guest's files right now
        try:
            for entry in entries:
                if self.stale(entry):
                    self.directory.unlink(entry.name)
        finally:
            if lock is not None:
                lock.release()  # which removes the lock file too

    def clean_temp(self, name: str) -> None:
        match = TEMP_FILE.fullmatch(name)
        if match and not _process_exists(int(match["pid"])):
            self.directory.unlink(name)


def remove_stale_files(held_key: Optional[str] = None) -> None:
    """Remove what no run and no QEMU needs any more.

    Logs of QEMUs that are gone, private monitor sockets nothing listens on,
    journals of guests that are gone, locks and temporary files of killed runs.
    A guest's files are removed under its lock, taken without waiting: what a run
    in progress uses is never touched. The caller may hold one guest's lock
    (``held_key``): that guest's files are cleaned too. Failures are ignored: the
    next run tries again.
    """
    try:
        with RuntimeDir() as directory:
            sweep = _Sweep(directory)
            guests: dict[str, list[_Entry]] = {}
            for name in directory.entries():
                entry = _guest_file(name)
                if entry is not None:
                    guests.setdefault(entry.key, []).append(entry)
                elif name in LEGACY_FILES:
                    directory.unlink(name)
                else:
                    sweep.clean_temp(name)
            for key, entries in guests.items():
                try:
                    sweep.clean_guest(key, entries, held=key == held_key)
                except (OSError, PreconditionError):
                    pass
    except (OSError, PreconditionError):
        pass
