# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Every read of /proc the collection makes, in one place.

What a process puts in /proc is chosen by whoever runs it: its command line, its
``comm`` (which may hold spaces, parentheses and newlines), the directory it works
in. So every read here is bounded, every parse accepts any bytes without raising,
and a process that vanishes or hides (``EACCES``) between two reads is simply
"no answer" (None or empty), never an exception.

Text is decoded with ``os.fsdecode`` (UTF-8 with ``surrogateescape``), so a path or
argument that is not valid UTF-8 round-trips to the same bytes when it is used
again (``os.fsencode``). The /proc root is a parameter so that tests can build a
fake tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

PROC = "/proc"
MAX_CMDLINE = 4 << 20      # bytes; Linux caps argv+envp at 1/4 of the stack limit, far below in practice
MAX_SMALL_FILE = 64 << 10  # stat, status, comm, cgroup
MAX_TABLE_FILE = 64 << 20  # /proc/net/unix, tcp, tcp6 on a busy host
MAX_FDS = 1 << 16          # fds looked at per process
# States of a process that no longer runs: zombie (exited, not reaped) and dead.
GONE_STATES = frozenset("ZXx")


@dataclass(frozen=True)
class ProcStat:
    """What /proc/PID/stat says about a process."""

    comm: str
    state: str
    ppid: int
    start_time: int | None  # clock ticks after boot: tells a reused pid apart


@dataclass(frozen=True)
class ProcStatus:
    """A process's real credentials, from /proc/PID/status."""

    uid: int
    gid: int
    groups: tuple[int, ...]


# --- raw reads ------------------------------------------------------------------------

def read_bytes(path: str, limit: int = MAX_SMALL_FILE) -> bytes | None:
    """At most ``limit`` + 1 bytes of a file (so callers can tell it was cut), or None."""
    try:
        with open(path, "rb") as handle:
            return handle.read(limit + 1)
    except (OSError, ValueError):
        return None


def read_text(path: str, limit: int = MAX_SMALL_FILE) -> str | None:
    """A /proc file's text (cut at ``limit`` bytes), or None when it vanished or is unreadable."""
    raw = read_bytes(path, limit)
    return None if raw is None else os.fsdecode(raw[:limit])


def read_link(path: str) -> str | None:
    """A symlink's target (str paths decode with surrogateescape, so they round-trip), or None."""
    try:
        return os.readlink(path)
    except (OSError, ValueError):
        return None


def pids(proc_root: str = PROC) -> list[int]:
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return []
    return sorted(int(entry) for entry in entries if entry.isdigit() and entry.isascii())


# --- stat, status ---------------------------------------------------------------------

def parse_stat(text: str | None) -> ProcStat | None:
    """/proc/PID/stat; comm sits between the first ``(`` and the LAST ``)``, whatever it holds."""
    if not text or "(" not in text or ")" not in text:
        return None
    start, end = text.find("("), text.rfind(")")
    if end < start:
        return None
    fields = text[end + 1:].split()
    # fields[0] is the state (field 3), fields[1] the ppid (4), fields[19] the start time (22).
    if len(fields) < 2 or not _is_int(fields[1]):
        return None
    start_time = int(fields[19]) if len(fields) > 19 and _is_int(fields[19]) else None
    return ProcStat(comm=text[start + 1:end], state=fields[0], ppid=int(fields[1]), start_time=start_time)


def read_stat(pid: int, proc_root: str = PROC) -> ProcStat | None:
    return parse_stat(read_text(f"{proc_root}/{pid}/stat"))


def parse_status(text: str | None) -> ProcStatus | None:
    """Real uid, real gid and supplementary groups: the first field of ``Uid:``/``Gid:``, and ``Groups:``."""
    if not text:
        return None
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if sep and key in ("Uid", "Gid", "Groups") and key not in values:
            values[key] = rest.split()
    uids, gids = values.get("Uid") or [], values.get("Gid") or []
    if not uids or not gids or not _is_int(uids[0]) or not _is_int(gids[0]):
        return None
    groups = values.get("Groups", [])
    if not all(_is_int(group) for group in groups):
        return None
    return ProcStatus(uid=int(uids[0]), gid=int(gids[0]), groups=tuple(int(group) for group in groups))


def read_status(pid: int, proc_root: str = PROC) -> ProcStatus | None:
    return parse_status(read_text(f"{proc_root}/{pid}/status"))


def process_start_time(pid: int, proc_root: str = PROC) -> int | None:
    stat = read_stat(pid, proc_root)
    return stat.start_time if stat is not None else None


def boot_time(proc_root: str = PROC) -> int | None:
    """When the host booted, in seconds since the epoch (``btime`` of /proc/stat)."""
    for line in (read_text(f"{proc_root}/stat") or "").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == "btime" and fields[1].isdigit():
            return int(fields[1])
    return None


def process_started_at(pid: int, proc_root: str = PROC) -> float | None:
    """When ``pid`` started, in seconds since the epoch (boot time + its start ticks)."""
    ticks, booted = process_start_time(pid, proc_root), boot_time(proc_root)
    if ticks is None or booted is None:
        return None
    return booted + ticks / os.sysconf("SC_CLK_TCK")


def process_gone(pid: int, proc_root: str = PROC) -> bool:
    """Gone, or a zombie its parent has not reaped yet (it holds no resources)."""
    stat = read_stat(pid, proc_root)
    return stat is None or stat.state in GONE_STATES


def process_comm(pid: int, proc_root: str = PROC) -> str:
    comm = read_text(f"{proc_root}/{pid}/comm", limit=64)
    return comm.strip() if comm else "?"


# --- command line, links, cgroup -------------------------------------------------------

def parse_cmdline(raw: bytes) -> tuple[str, ...]:
    """NUL-separated arguments; an argument cannot hold a NUL, so none of ours does."""
    parts = raw.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()  # the terminating NUL; empty arguments in between are real (-append "")
    return tuple(os.fsdecode(part) for part in parts)


def read_cmdline(pid: int, proc_root: str = PROC, limit: int = MAX_CMDLINE) -> tuple[str, ...] | None:
    """The process's argv; () for a kernel thread; None when unreadable or longer than ``limit``."""
    raw = read_bytes(f"{proc_root}/{pid}/cmdline", limit)
    if raw is None or len(raw) > limit:
        return None
    return parse_cmdline(raw)


def read_exe(pid: int, proc_root: str = PROC) -> str | None:
    return read_link(f"{proc_root}/{pid}/exe")


def read_cwd(pid: int, proc_root: str = PROC) -> str | None:
    return read_link(f"{proc_root}/{pid}/cwd")


def read_cgroup(pid: int, proc_root: str = PROC) -> str:
    return read_text(f"{proc_root}/{pid}/cgroup") or ""


# --- file descriptors ------------------------------------------------------------------

def socket_inode(link_target: str | None) -> int | None:
    """``socket:[12345]`` -> 12345; anything else -> None."""
    if link_target and link_target.startswith("socket:[") and link_target.endswith("]"):
        inner = link_target[len("socket:["):-1]
        return int(inner) if inner.isdigit() and inner.isascii() and len(inner) < 20 else None
    return None


def fd_numbers(pid: int, proc_root: str = PROC) -> list[str]:
    """The fd numbers a process has open (as /proc names them); empty when unreadable."""
    try:
        entries = os.listdir(f"{proc_root}/{pid}/fd")
    except OSError:
        return []
    return [entry for entry in entries[:MAX_FDS] if entry.isdigit()]


def socket_inode_of_fd(pid: int, fd: int | str, proc_root: str = PROC) -> int | None:
    return socket_inode(read_link(f"{proc_root}/{pid}/fd/{fd}"))


def socket_inodes(pid: int, proc_root: str = PROC) -> set[int]:
    """Inodes of every socket the process has open."""
    found = (socket_inode_of_fd(pid, fd, proc_root) for fd in fd_numbers(pid, proc_root))
    return {inode for inode in found if inode is not None}


def net_table(name: str, proc_root: str = PROC, pid: int | None = None) -> list[str]:
    """The data lines of /proc/[PID/]net/NAME (header dropped); empty when unreadable."""
    path = f"{proc_root}/{pid}/net/{name}" if pid is not None else f"{proc_root}/net/{name}"
    text = read_text(path, limit=MAX_TABLE_FILE)
    return (text or "").splitlines()[1:]


def fd_stat(pid: int, fd: int, proc_root: str = PROC) -> os.stat_result | None:
    """What a process's fd ``fd`` refers to (the file, not the link); None if closed or unreadable."""
    try:
        return os.stat(f"{proc_root}/{pid}/fd/{fd}")
    except (OSError, ValueError):
        return None


def _is_int(text: str) -> bool:
    digits = text[1:] if text.startswith("-") else text
    return digits.isdigit() and digits.isascii() and len(digits) < 20


# --- bytes in results -------------------------------------------------------------------

def fs_bytes(text: str) -> bytes:
    """The exact bytes behind a string read from /proc (the inverse of ``os.fsdecode``)."""
    try:
        return os.fsencode(text)
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")  # a surrogate that no decode of ours produced


def is_plain_text(text: str) -> bool:
    """Whether JSON (and Ansible) can carry ``text`` as it is: valid UTF-8, no escaped bytes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_text(text: str) -> str:
    """``text`` for a module result: bytes that are not UTF-8 shown as ``\\xNN`` (Ansible refuses them raw)."""
    return text if is_plain_text(text) else fs_bytes(text).decode("utf-8", "backslashreplace")


def json_safe(value: Any) -> Any:
    """``value`` with every string made safe for a module result (see :func:`json_text`)."""
    if isinstance(value, str):
        return json_text(value)
    if isinstance(value, dict):
        return {json_safe(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value
