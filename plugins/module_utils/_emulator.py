# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Which QEMU binaries we trust: the one definition of "an emulator".

A process counts as a guest, and a binary may be run by restore, only if it is a
trusted emulator: a regular file named ``qemu-system-*`` or ``qemu-kvm``, owned by
root and writable by nobody else, reached through directories that, from ``/``
down, only root can write. Then no other user can have put it there or can swap
it afterwards, so checking it once and then running the resolved path is safe.

A running QEMU whose binary was replaced (a package upgrade) shows its exe as
``PATH (deleted)``; the inode it runs is still reachable through /proc/PID/exe
and is checked there (root-owned, not writable by others, the right name).
"""

from __future__ import annotations

import os
import stat

from ansible_collections.savestate.qemu.plugins.module_utils._errors import PreconditionError
from ansible_collections.savestate.qemu.plugins.module_utils._proc import PROC, read_link

DELETED_SUFFIX = " (deleted)"
_UNSAFE_BITS = stat.S_IWGRP | stat.S_IWOTH


def is_emulator_name(path: str) -> bool:
    """``qemu-system-ARCH`` or ``qemu-kvm``, judged by the file name alone."""
    name = os.path.basename(path)
    return (name.startswith("qemu-system-") and len(name) > len("qemu-system-")) or name == "qemu-kvm"


def _file_problem(info: os.stat_result, what: str) -> str | None:
    if not stat.S_ISREG(info.st_mode):
        return f"{what} is not a regular file"
    if info.st_uid != 0:
        return f"{what} is owned by uid {info.st_uid}, not root"
    if info.st_mode & _UNSAFE_BITS:
        return f"{what} is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def _directory_problem(real_path: str) -> str | None:
    """The first directory from / down to ``real_path``'s parent that someone other than root may change."""
    directory = os.path.dirname(real_path)
    chain = []
    while True:
        chain.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for directory in reversed(chain):
        try:
            info = os.lstat(directory)
        except OSError as error:
            return f"its directory {directory} cannot be examined ({error.strerror})"
        if not stat.S_ISDIR(info.st_mode):
            return f"{directory} is not a directory"
        if info.st_uid != 0:
            return f"its directory {directory} is owned by uid {info.st_uid}, not root"
        if info.st_mode & _UNSAFE_BITS:
            return f"its directory {directory} is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def emulator_problem(path: str) -> str | None:
    """Why the binary at ``path`` is not a trusted emulator, or None when it is."""
    if not path or "\0" in path or not os.path.isabs(path):
        return f"{path!r} is not an absolute path"
    real = os.path.realpath(path)
    if not is_emulator_name(real):
        return f"{real} is not named qemu-system-* or qemu-kvm"
    try:
        info = os.lstat(real)
    except OSError as error:
        return f"{real} cannot be examined ({error.strerror})"
    return _file_problem(info, real) or _directory_problem(real)


def check_trusted_emulator(path: str) -> str:
    """The resolved real path of a trusted emulator, to run exactly that; PreconditionError otherwise."""
    problem = emulator_problem(path)
    if problem is not None:
        raise PreconditionError(f"{path} is not a trusted QEMU emulator: {problem}. Only a root-owned "
                                "qemu-system-*/qemu-kvm binary in directories only root can write is run.")
    return os.path.realpath(path)


def process_emulator(pid: int, proc_root: str = PROC) -> tuple[str | None, str | None, str | None]:
    """``(path, problem, note)`` for the binary process ``pid`` runs.

    ``path`` is the trusted real path (None when not trusted or unreadable),
    ``problem`` why it is not trusted, ``note`` a remark on a trusted one (deleted).
    """
    link = f"{proc_root}/{pid}/exe"
    target = read_link(link)
    if target is None:
        return None, "its executable cannot be read (/proc/PID/exe)", None
    try:
        running = os.stat(link)  # the inode the process runs, whatever its path says now
    except OSError as error:
        return None, f"its executable {target} cannot be examined ({error.strerror})", None
    if target.endswith(DELETED_SUFFIX):
        return _deleted_emulator(target[:-len(DELETED_SUFFIX)], running)
    problem = emulator_problem(target)
    if problem is not None:
        return None, f"its executable {target} is not a trusted emulator: {problem}", None
    try:
        on_disk = os.stat(target)
    except OSError as error:
        return None, f"its executable {target} cannot be examined ({error.strerror})", None
    if (on_disk.st_dev, on_disk.st_ino) != (running.st_dev, running.st_ino):
        # Another mount namespace (a container), or a file swapped under a name: not the file we checked.
        return None, f"its executable is not the file at {target} (another mount namespace?)", None
    return os.path.realpath(target), None, None


def _deleted_emulator(path: str, running: os.stat_result) -> tuple[str | None, str | None, str | None]:
    """A binary replaced since QEMU started: judge the still-open inode, and the path restore would run."""
    if not is_emulator_name(path):
        return None, f"its executable {path} (deleted) is not named qemu-system-* or qemu-kvm", None
    problem = _file_problem(running, f"its deleted executable {path}")
    if problem is not None:
        return None, problem, None
    return path, None, f"{path} was replaced or removed since QEMU started (package upgrade?)"
