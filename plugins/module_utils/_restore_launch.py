# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Starting the restored QEMU: its command line, where it starts, its monitor, and why it failed.

QEMU runs the recorded command line, made to wait for the incoming stream, in the
working directory the saved QEMU ran in. The restore talks to it over a monitor of
its own; when QEMU fails, the messages here quote QEMU's (and the decompressor's)
own words, and what a killed QEMU left behind is removed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Optional

from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import GuestRecord
from ansible_collections.savestate.qemu.plugins.module_utils._errors import (
    MigrationError,
    MonitorError,
    MonitorPeerError,
    PreconditionError,
    QMPCommandError,
    SaveStateError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._monitor import Monitor
from ansible_collections.savestate.qemu.plugins.module_utils._proc import read_status
from ansible_collections.savestate.qemu.plugins.module_utils._qemu_argv import (
    escape_option_value,
    iter_options,
    option_values,
    parse_argv,
    split_option_string,
)
from ansible_collections.savestate.qemu.plugins.module_utils._qemu_process import (
    LaunchedQemu,
    PrivateMonitor,
    UnitMonitor,
)
from ansible_collections.savestate.qemu.plugins.module_utils._runtime import runtime_dir
from ansible_collections.savestate.qemu.plugins.module_utils._stream import Stream
from ansible_collections.savestate.qemu.plugins.module_utils._systemd import Placement

# Options of the recorded command line that a restore must not repeat: ours replace
# them (-S, -incoming) or they would undo the restore (-loadvm) or detach QEMU from
# our control before the stream is in (-daemonize). Each is dropped with the value
# QEMU's option table says it takes, and only where it stands as an option.
DROPPED_FLAGS = frozenset(("S", "daemonize"))
DROPPED_WITH_VALUE = frozenset(("incoming", "loadvm"))
STARTUP_TIMEOUT = 60.0
# How long a QEMU whose monitor dropped may take to exit before we stop waiting for its reason.
EXIT_GRACE = 5.0
# How long QEMU gets to exit after a failure it answered over QMP, or one of ours.
EXIT_GRACE_ANSWERED = 0.2
HELPER_GRACE = 1.0


# --- the command line ---------------------------------------------------------------------

def _pin_machine_type(value: str, machine: str) -> str:
    """``pc,accel=tcg`` -> ``pc-i440fx-7.2,accel=tcg``: restore on the exact saved machine."""
    parts = split_option_string(value)
    if parts and "=" not in parts[0]:
        parts[0] = machine
    else:
        parts = [f"type={machine}" if part.startswith("type=") else part for part in parts]
        if not any(part.startswith("type=") for part in parts):
            parts.insert(0, f"type={machine}")
    return ",".join(escape_option_value(part) for part in parts)


def restore_argv(record: GuestRecord, emulator: str, extra_monitor: Optional[str]) -> list[str]:
    """The recorded command line, made to wait for the incoming stream.

    It is split the way QEMU splits it (which options take a value comes from
    QEMU's own option tables), so a value is never mistaken for an option:
    ``-name -incoming`` keeps its name, ``-append -S`` its kernel argument.
    """
    argv = list(record.argv or ())
    result = [emulator]
    has_machine = False
    for argument in parse_argv(argv):
        if argument.name in DROPPED_FLAGS or argument.name in DROPPED_WITH_VALUE:
            continue  # the option and, if it takes one, its value
        words = argv[argument.index:argument.index + argument.span]
        if argument.name in ("machine", "M") and argument.value is not None:
            has_machine = True
            if record.machine:
                words = [words[0], _pin_machine_type(argument.value, record.machine)]
        result += words
    if record.machine and not has_machine:
        result += ["-machine", record.machine]
    if extra_monitor is not None:
        monitor = f"unix:{extra_monitor},server=on,wait=off"
        if monitor not in option_values(argv, "qmp"):  # a guest restored before already has it
            result += ["-qmp", monitor]
    return result + ["-S", "-incoming", "defer"]


def launch_directory(cwd: Optional[str]) -> tuple[str, Optional[str]]:
    """Where to start QEMU, and a warning when it cannot be where the saved QEMU ran.

    Relative paths on the recorded command line (disks, sockets, logs) resolve from
    QEMU's working directory, so the restored QEMU starts in the recorded one.
    """
    if cwd and os.path.isdir(cwd):
        return cwd, None
    if cwd:
        why = f"QEMU's working directory at the save, {cwd}, is gone"
    else:
        why = "the image does not record QEMU's working directory"
    return "/", f"{why}; QEMU starts in / instead, so relative paths on its command line resolve from /"


# --- the restore's monitor ----------------------------------------------------------------

def restore_monitor(key: str, placement: Placement, uid: int, gid: int) -> PrivateMonitor | UnitMonitor:
    """The restore's own monitor: inherited by QEMU, or bound by QEMU (as ``uid``/``gid``) when systemd starts it."""
    if not placement.starts_in_unit:
        return PrivateMonitor(os.path.join(runtime_dir(), f"{key}.qmp"))
    return UnitMonitor(key, uid, gid)


def connect_monitor(qemu: LaunchedQemu, monitor_socket: PrivateMonitor | UnitMonitor, trace: bool,
                    record: GuestRecord) -> Monitor:
    """The new QEMU's monitor, once it greets us; its start-up is not part of the load.

    An inherited socket queues our connection until QEMU serves it, so the wait
    is for QEMU's greeting (if QEMU exits first, the queued connection is reset).
    A socket QEMU binds itself is polled for until it appears, and its server
    must be QEMU's pid.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        peer = qemu.pid if monitor_socket.check_peer else None
        monitor = Monitor(monitor_socket.path, connect_timeout=max(deadline - time.monotonic(), 0.1),
                          trace=trace, peer_pid=peer)
        try:
            return monitor.connect()
        except MonitorPeerError:
            raise
        except MonitorError as error:
            if qemu.exited(EXIT_GRACE if not monitor_socket.check_peer else 0.0):
                raise MigrationError(start_failure(f"QEMU did not start: it {qemu.exit_status()}{qemu.said()}",
                                                   record)) from None
            if not monitor_socket.check_peer or time.monotonic() > deadline:
                raise MigrationError(f"QEMU did not answer on its monitor within {STARTUP_TIMEOUT:g} s "
                                     f"({error}){qemu.said()}") from None
        # QEMU binds its socket a few tens of ms after exec: a short poll keeps that off the restore.
        time.sleep(0.01)


def check_runs_as(qemu: LaunchedQemu, expected_uid: int, expected_gid: int) -> None:
    """The QEMU that greeted us runs as the saved one did, whatever started it (a unit's User= too)."""
    status = read_status(qemu.pid)
    if status is None:
        raise MigrationError(f"QEMU (pid {qemu.pid}) exited before the image was loaded{qemu.said()}")
    if (status.uid, status.gid) != (expected_uid, expected_gid):
        raise PreconditionError(
            f"the restored QEMU (pid {qemu.pid}) runs as uid {status.uid}, gid {status.gid}, but the saved one "
            f"ran as uid {expected_uid}, gid {expected_gid}; it was stopped before the image was loaded. "
            "A systemd unit's User=/Group= must match the user the guest ran as")


# --- when it fails ------------------------------------------------------------------------

def start_failure(text: str, record: GuestRecord) -> str:
    """Why QEMU did not start, with what to do when the machine type is the reason."""
    if "machine type" not in text or not record.machine:
        return text
    return (f"{text}. The guest was saved on machine type {record.machine} by QEMU "
            f"{record.qemu_version or '(unknown version)'}; restore it with a QEMU that has this "
            "machine type (the same version or a newer one)")


def decompressor_failure(stream: Stream) -> Optional[str]:
    """The decompressor's error, if it failed; it gets a moment to finish its last words."""
    helper = stream.helper
    if helper is None:
        return None
    try:
        helper.process.wait(HELPER_GRACE)
    except subprocess.TimeoutExpired:
        return None  # still running: not the cause
    if helper.process.returncode == -signal.SIGPIPE:
        return None  # QEMU stopped reading first: a consequence, not the cause
    return helper.failure()


def exit_grace(error: SaveStateError) -> float:
    """How long a failed load waits for QEMU to exit before it says why in QEMU's words.

    A dropped or silent monitor may be QEMU on its way out: it gets EXIT_GRACE. A QMP error
    reply means QEMU was up to answer it, and anything else is ours: EXIT_GRACE_ANSWERED.
    """
    if isinstance(error, MonitorError) and not isinstance(error, QMPCommandError):
        return EXIT_GRACE
    return EXIT_GRACE_ANSWERED


def qemu_failure(qemu: LaunchedQemu, error: SaveStateError, prefix: str = "") -> str:
    """Why the load failed in QEMU's words.

    QEMU 7.2 exits on a bad stream: the monitor drops a moment before the process ends,
    and only its output says why. Newer QEMU stays up (exit-on-error: false) and reports
    a summary over QMP, with the detail again only in its output.
    """
    error_text = f"{prefix}{error}"
    if qemu.exited(exit_grace(error)):
        return f"QEMU rejected the image: it {qemu.exit_status()}{qemu.said()}"
    return f"{error_text}{qemu.said()}"


def remove_leftovers(qemu: LaunchedQemu, cwd: str, argv: Sequence[str]) -> None:
    """What a killed QEMU leaves: its log and a pidfile naming it."""
    qemu.remove_log()
    for _index, name, value in iter_options(argv):
        if name != "pidfile" or not value:
            continue
        pidfile = os.path.join(cwd, value)  # QEMU resolved a relative one from its working directory
        try:
            with open(pidfile, encoding="ascii", errors="replace") as handle:
                if handle.read().strip() == str(qemu.pid):
                    os.unlink(pidfile)
        except OSError:
            pass
