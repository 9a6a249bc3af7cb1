# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""The QEMU process a restore starts, and the private monitor it is reached through.

The restore talks to its QEMU over a monitor socket that no other process can
pose as, so nobody else receives the image's file descriptor or reports a state
of its choosing:

- QEMU started by us (or through a ``systemd-run --scope`` that execs in place)
  inherits a listening socket the restore bound in its root-only runtime
  directory (``-chardev socket,fd=N,server=on``);
- QEMU started by systemd in a unit cannot inherit it, so it binds the socket
  itself, in a directory only its user and root can enter, and the restore checks
  that the process serving it is the unit's QEMU (``SO_PEERCRED``).

The monitor paths on the recorded command line are QEMU's to bind, for later use.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Sequence
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._credentials import Credentials, popen_identity
from ansible_collections.savestate.qemu.plugins.module_utils._errors import PreconditionError
from ansible_collections.savestate.qemu.plugins.module_utils._qemu_argv import (
    escape_option_value,
    option_dict,
    option_name,
)
from ansible_collections.savestate.qemu.plugins.module_utils._systemd import Placement
from ansible_collections.savestate.qemu.plugins.module_utils._runtime import (
    claim_qemu_log,
    create_qemu_log,
    remove_qemu_log,
)

# The chardev id of the monitor a restore adds; a later restore of the same guest replaces it.
PRIVATE_MONITOR_ID = "savestate-monitor"
UNIT_MONITOR_ROOT = "/run/savestate-qemu-monitors"
LOG_TAIL_BYTES = 4000
LOG_TAIL_LINES = 8


class PrivateMonitor:
    """A listening unix socket for the restored QEMU's monitor, bound by us; a context manager.

    Leaving the block closes our copy of the listener: from then on only QEMU holds it.
    """

    check_peer = False  # we bound it: SO_PEERCRED would name us, and nobody else can reach it

    def __init__(self, path: str) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _unlink_if_socket(path)
            self._socket.bind(path)
            self._socket.listen(4)
        except OSError as error:
            self._socket.close()
            raise PreconditionError(f"cannot create the restore's monitor socket {path}: "
                                    f"{error.strerror or error}") from None

    @property
    def fd(self) -> int:
        return self._socket.fileno()

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self.fd,)

    def qemu_options(self) -> list[str]:
        """What QEMU needs to serve its monitor on our listening socket (inherited as ``fd``)."""
        return ["-chardev", f"socket,id={PRIVATE_MONITOR_ID},fd={self.fd},server=on,wait=off",
                "-mon", f"chardev={PRIVATE_MONITOR_ID},mode=control"]

    def close(self) -> None:
        self._socket.close()

    def remove(self) -> None:
        _unlink_if_socket(self.path)

    def __enter__(self) -> PrivateMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class UnitMonitor:
    """The monitor of a QEMU that systemd starts: QEMU binds it in a directory of its own user's.

    ``/run/savestate-qemu-monitors`` (root, 0711: enterable, not listable) holds one
    directory per guest, owned by the user QEMU runs as, mode 0700. Only that user
    and root can bind there; the restore verifies the peer is QEMU's pid.
    """

    check_peer = True
    pass_fds: tuple[int, ...] = ()

    def __init__(self, key: str, uid: int, gid: int) -> None:
        self.directory = os.path.join(UNIT_MONITOR_ROOT, key)
        try:
            _private_directory(UNIT_MONITOR_ROOT, 0, 0, 0o711)
            _private_directory(self.directory, uid, gid, 0o700)
        except OSError as error:
            raise PreconditionError(f"cannot prepare the restore's monitor directory {self.directory}: "
                                    f"{error.strerror or error}") from None
        self.path = os.path.join(self.directory, "qmp.sock")
        _unlink_if_socket(self.path)

    def qemu_options(self) -> list[str]:
        return ["-chardev", f"socket,id={PRIVATE_MONITOR_ID},path={escape_option_value(self.path)},"
                            "server=on,wait=off",
                "-mon", f"chardev={PRIVATE_MONITOR_ID},mode=control"]

    def close(self) -> None:
        pass

    def remove(self) -> None:
        _unlink_if_socket(self.path)

    def __enter__(self) -> UnitMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _private_directory(path: str, uid: int, gid: int, mode: int) -> None:
    """``path`` as a real directory (never a link) owned by ``uid``:``gid`` with ``mode``."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _unlink_if_socket(path: str) -> None:
    try:
        if os.lstat(path).st_mode & 0o170000 == 0o140000:
            os.unlink(path)
    except FileNotFoundError:
        pass


def without_private_monitor(argv: Sequence[str]) -> list[str]:
    """``argv`` without the monitor an earlier restore added (its fd is meaningless now)."""
    result: list[str] = []
    skip_value = False
    for index, arg in enumerate(argv):
        if skip_value:
            skip_value = False
            continue
        name = option_name(arg) if index > 0 else None
        if name in ("chardev", "mon") and index + 1 < len(argv) and _names_private_monitor(name, argv[index + 1]):
            skip_value = True
            continue
        result.append(arg)
    return result


def _names_private_monitor(option: str, value: str) -> bool:
    key = "id" if option == "chardev" else "chardev"
    implied = "backend" if option == "chardev" else "chardev"
    return option_dict(value, implied_key=implied).get(key) == PRIVATE_MONITOR_ID


class LaunchedQemu:
    """A QEMU started by the restore, detached from the module so that it outlives it.

    It runs in its own session (or in the systemd unit ``placement`` names), as
    ``credentials`` (None: as we run), with stdin on /dev/null and stdout/stderr in
    a log file of ours: nothing ties it to the module's pipes, and QEMU's own
    messages (why it refused to start, why it rejected the stream) can be quoted on
    failure. ``pass_fds`` are inherited (not through a unit: systemd starts it).
    """

    def __init__(self, argv: list[str], key: str, cwd: str, credentials: Optional[Credentials] = None,
                 pass_fds: Sequence[int] = (), placement: Optional[Placement] = None) -> None:
        self.argv = argv
        self.credentials = credentials
        self.placement = placement or Placement(None)
        self.log_path, log_fd = create_qemu_log(key)
        try:
            if self.placement.starts_in_unit:
                self.process: Any = self.placement.launch(argv, cwd, self.log_path)
            else:
                # pylint: disable-next=ansible-bad-function  # QEMU outlives this call; run_command waits for its command
                self.process = subprocess.Popen(self._popen_argv(argv), stdin=subprocess.DEVNULL,
                                                stdout=log_fd, stderr=log_fd, cwd=cwd, close_fds=True,
                                                pass_fds=tuple(pass_fds), start_new_session=True,
                                                **self._popen_identity())
        except (OSError, subprocess.SubprocessError) as error:
            remove_qemu_log(self.log_path)
            reason = getattr(error, "strerror", None) or str(error)
            raise PreconditionError(f"cannot start {argv[0]}: {reason}") from None
        finally:
            os.close(log_fd)
        # Named after its pid: the next run removes it once this QEMU is gone.
        self.log_path = claim_qemu_log(self.log_path, self.process.pid)

    def _popen_argv(self, argv: list[str]) -> list[str]:
        if self.placement.execs_in_place and self.credentials is not None:
            return self.placement.popen_argv(argv, self.credentials.uid, self.credentials.gid)
        return self.placement.popen_argv(argv)

    def _popen_identity(self) -> dict[str, Any]:
        # A scope's systemd-run talks to the service manager as root and switches user itself.
        return {} if self.placement.execs_in_place else popen_identity(self.credentials)

    @property
    def pid(self) -> int:
        pid: int = self.process.pid
        return pid

    def exited(self, grace: float = 0.0) -> bool:
        """Whether QEMU has exited, waiting up to ``grace`` seconds for it to do so."""
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            return False
        return True

    def log_tail(self) -> str:
        """The end of QEMU's output, one line per message."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, os.fstat(log.fileno()).st_size - LOG_TAIL_BYTES))
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return " / ".join(lines[-LOG_TAIL_LINES:])

    def said(self) -> str:
        """``; QEMU said: ...`` with QEMU's own messages, or nothing when it printed none."""
        tail = self.log_tail()
        return f"; QEMU said: {tail}" if tail else ""

    def exit_status(self) -> str:
        code = self.process.returncode
        if code is not None and code < 0:
            return f"was killed by signal {-code}"
        return f"exited with status {code}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.placement.settle()

    def remove_log(self) -> None:
        remove_qemu_log(self.log_path)
