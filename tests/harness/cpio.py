"""A minimal writer for the cpio "newc" format the Linux kernel unpacks as initramfs.

Written here so that building the test guest needs no cpio binary and no root:
device nodes are entries in the archive, not files on the build host.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member; ``data`` is the file body (or the target of a symlink)."""

    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0


def directory(name: str, perms: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | perms)


def regular(name: str, data: bytes, perms: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | perms, data)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, perms: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFCHR | perms, rdev_major=major, rdev_minor=minor)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _member(ino: int, entry: Entry) -> bytes:
    name = entry.name.encode() + b"\0"
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(entry.mode) else 1,  # nlink
        0,  # mtime: fixed, so that the archive is reproducible
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev_major,
        entry.rdev_minor,
        len(name),
        0,  # check (unused by newc)
    )
    header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
    head = header + name
    return head + _pad4(len(head)) + entry.data + _pad4(len(entry.data))


def newc_archive(entries: list[Entry]) -> bytes:
    """Return the archive bytes for ``entries`` followed by the trailer."""
    members = [_member(ino, entry) for ino, entry in enumerate(entries, start=1)]
    members.append(_member(0, Entry(TRAILER, 0)))
    return b"".join(members)
