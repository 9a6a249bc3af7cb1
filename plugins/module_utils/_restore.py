# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Restore orchestration: start QEMU from a save image and bring the guest back.

Nothing runs before the image has been judged safe to act on:

1. trust: the image decides what QEMU runs, so it must not be writable by anyone
   but root and its owner, nor sit in a directory others could swap it in;
2. the image itself: complete, supported, with our metadata (the command line);
3. identity: no other active guest (libvirt's included) holds its name or UUID;
   the guest itself already active means there is nothing to do;
4. the emulator is a QEMU system emulator, the decompressor is installed, and the
   disks are the ones the RAM was saved against.

Then QEMU starts from the recorded command line with ``-S -incoming defer``,
detached from the module, the stream flows in, and the guest is put in the
requested state. Any failure kills and reaps that QEMU, removes what the restore
created and leaves the image untouched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import DiskRecord, GuestRecord
from ansible_collections.savestate.qemu.plugins.module_utils._errors import (
    GuestConflictError,
    ImageError,
    MigrationError,
    MonitorError,
    PreconditionError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._host import check_identity
from ansible_collections.savestate.qemu.plugins.module_utils._image import SaveImage
from ansible_collections.savestate.qemu.plugins.module_utils._image_info import describe_image, load_image
from ansible_collections.savestate.qemu.plugins.module_utils._monitor import Monitor, parse_endpoint
from ansible_collections.savestate.qemu.plugins.module_utils._qemu_argv import (
    escape_option_value,
    iter_options,
    option_name,
    split_option_string,
)
from ansible_collections.savestate.qemu.plugins.module_utils._runtime import GuestLock, guest_key, runtime_dir
from ansible_collections.savestate.qemu.plugins.module_utils._stream import (
    Features,
    MigrationSettings,
    Stream,
    plan_restore,
)

STATE_CHOICES = ("as_saved", "running", "paused")
DISK_CHECK_CHOICES = ("strict", "warn", "ignore")
# Options of the recorded command line that a restore must not repeat: ours replace
# them (-S, -incoming) or they would undo the restore (-loadvm) or detach QEMU from
# our control before the stream is in (-daemonize).
DROPPED_FLAGS = ("S", "daemonize")
DROPPED_WITH_VALUE = ("incoming", "loadvm")
QEMU_PROGRAM_PREFIXES = ("qemu-system-", "qemu-kvm")
STARTUP_TIMEOUT = 60.0
MIB = 1024 * 1024


@dataclass(frozen=True)
class RestoreRequest:
    """What the user asked for (the restore module's options)."""

    path: str
    state: str = "as_saved"
    name: Optional[str] = None
    uuid: Optional[str] = None
    emulator: Optional[str] = None
    disk_check: str = "strict"
    remove_image: bool = False
    parallel_channels: int = 1
    timeout: float = 600.0
    trace: bool = False


@dataclass
class RestoreOutcome:
    changed: bool
    msg: str
    guest: dict[str, Any]
    image: Optional[dict[str, Any]]
    stats: Optional[dict[str, Any]] = None
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    trace: list[dict[str, Any]] = field(default_factory=list)


# --- trust -------------------------------------------------------------------------------

def _untrusted_writers(info: os.stat_result, allowed_uids: set[int]) -> Optional[str]:
    """Why users other than ``allowed_uids`` could write this file or directory, if they can."""
    if info.st_uid not in allowed_uids:
        return f"is owned by uid {info.st_uid}"
    if stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX:
        return None  # sticky: others may add files but not replace ours
    if info.st_mode & stat.S_IWOTH:
        return "is writable by every user"
    if info.st_mode & stat.S_IWGRP:
        return f"is writable by group {info.st_gid}"
    return None


def check_image_trust(path: str) -> None:
    """Refuse an image that a user other than root or its owner could have written.

    The image holds the command line QEMU will run, so whoever can change it can
    run programs as the user who restores. That covers the file itself and every
    directory on the way to it: whoever can write one of those can swap the image.
    """
    real = os.path.realpath(path)
    try:
        info = os.stat(real)
    except OSError as error:
        raise ImageError(f"{path}: cannot open the save image: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{path} is not a regular file")
    allowed = {0, info.st_uid}
    problem = _untrusted_writers(info, allowed)
    if problem:
        raise PreconditionError(
            f"refusing to restore {path}: the image {problem} (mode {stat.S_IMODE(info.st_mode):04o}). Its "
            "command line decides what QEMU runs, so only root and the image's owner may be able to "
            "change it; fix it with chmod go-w")
    directory = os.path.dirname(real)
    while True:
        problem = _untrusted_writers(os.stat(directory), allowed)
        if problem:
            raise PreconditionError(
                f"refusing to restore {path}: the directory {directory} {problem}, so users other than "
                "root and the image's owner could replace the image")
        if directory == "/":
            return
        directory = os.path.dirname(directory)


def check_emulator(emulator: str) -> None:
    """The emulator must be a QEMU system emulator binary that only root can replace."""
    program = os.path.basename(emulator)
    if not program.startswith(QEMU_PROGRAM_PREFIXES):
        raise PreconditionError(
            f"refusing to run {emulator!r}: the emulator must be a QEMU system emulator "
            "(qemu-system-* or qemu-kvm)")
    resolved = shutil.which(emulator) if os.sep not in emulator else emulator
    if not resolved or not os.path.isfile(resolved) or not os.access(resolved, os.X_OK):
        raise PreconditionError(f"the emulator {emulator} does not exist or is not executable on this host; "
                                "give the right path with the emulator option")
    problem = _untrusted_writers(os.stat(resolved), {0, os.geteuid()})
    if problem:
        raise PreconditionError(f"refusing to run {resolved}: it {problem}")


# --- disks -------------------------------------------------------------------------------

def disk_changes(disks: tuple[DiskRecord, ...]) -> list[str]:
    """What differs between the recorded disk fingerprints and the files now."""
    changes = []
    for disk in disks:
        if disk.size is None and disk.mtime_ns is None:
            continue  # not a local file when saved (block device, network): nothing to compare
        try:
            info = os.stat(disk.path)
        except FileNotFoundError:
            changes.append(f"{disk.path} is gone")
            continue
        except OSError as error:
            changes.append(f"{disk.path} cannot be read ({error.strerror})")
            continue
        if disk.size is not None and info.st_size != disk.size:
            changes.append(f"{disk.path} changed size ({disk.size} -> {info.st_size} bytes)")
        elif disk.mtime_ns is not None and info.st_mtime_ns != disk.mtime_ns:
            changes.append(f"{disk.path} was modified after the save")
    return changes


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
    """The recorded command line, made to wait for the incoming stream."""
    argv = list(record.argv or ())
    # iter_options gives a flag without a value (-daemonize, -S) its own index: count only real values
    values = {index for index, _name, _value in iter_options(argv) if option_name(argv[index]) is None}
    result = [emulator]
    skip_next = False
    for index, arg in enumerate(argv[1:], start=1):
        if skip_next:
            skip_next = False
            continue
        name = option_name(arg) if index not in values else None
        if name in DROPPED_FLAGS:
            continue
        if name in DROPPED_WITH_VALUE:
            skip_next = True
            continue
        if index in values and option_name(argv[index - 1]) in ("machine", "M") and record.machine:
            arg = _pin_machine_type(arg, record.machine)
        result.append(arg)
    if record.machine and not any(option_name(a) in ("machine", "M") for a in argv[1:]):
        result += ["-machine", record.machine]
    if extra_monitor is not None:
        result += ["-qmp", f"unix:{extra_monitor},server=on,wait=off"]
    return result + ["-S", "-incoming", "defer"]


def recorded_unix_monitor(record: GuestRecord) -> Optional[str]:
    """The recorded QMP endpoint, if it is a unix socket on the recorded command line."""
    if not record.qmp or not record.argv:
        return None
    try:
        endpoint = parse_endpoint(record.qmp)
    except MonitorError:
        return None
    if not endpoint.is_unix:
        return None
    return record.qmp if any(record.qmp in arg for arg in record.argv) else None


# --- the QEMU process ---------------------------------------------------------------------

class LaunchedQemu:
    """A QEMU started by the restore, detached from the module so that it outlives it.

    It runs in its own session with stdin on /dev/null and stdout/stderr in a log
    file of ours: nothing ties it to the module's pipes, and QEMU's own messages
    (a rejected stream on QEMU 7.2 exits with one) can be quoted on failure.
    """

    def __init__(self, argv: list[str], log_path: str, cwd: str) -> None:
        self.argv = argv
        self.log_path = log_path
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                            cwd=cwd, close_fds=True, start_new_session=True)
        except OSError as error:
            raise PreconditionError(f"cannot start {argv[0]}: {error.strerror}") from None
        finally:
            os.close(log_fd)

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> bool:
        return self.process.poll() is not None

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, os.fstat(log.fileno()).st_size - 4000))
                text = log.read().decode(errors="replace").strip()
        except OSError:
            return ""
        return "\n".join(line for line in text.splitlines() if line.strip())[-2000:]

    def reason(self) -> str:
        """QEMU's own words on why it stopped, for error messages."""
        code = self.process.poll()
        status = f"QEMU exited with status {code}" if code is not None else "QEMU is still running"
        tail = self.log_tail()
        return f"{status}: {tail}" if tail else status

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def wait_for_monitor(self, socket_path: str, timeout: float) -> None:
        """Until QEMU listens on its monitor (or exits, or ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.exited():
                raise MigrationError(f"QEMU did not start: {self.reason()}")
            if _accepts_connections(socket_path):
                return
            if time.monotonic() > deadline:
                raise MigrationError(f"QEMU did not open its monitor {socket_path} within {timeout:g} s")
            time.sleep(0.05)


def _accepts_connections(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


# --- the restore --------------------------------------------------------------------------

def _guest_summary(record: GuestRecord, pid: Optional[int], state: str, qmp: Optional[str]) -> dict[str, Any]:
    return {"name": record.name, "uuid": record.uuid, "pid": pid, "state": state, "qmp": qmp,
            "managed_by": "none"}


class GuestRestorer:
    """One restore of one image."""

    def __init__(self, request: RestoreRequest, image: SaveImage, record: GuestRecord,
                 check_mode: bool) -> None:
        self.request = request
        self.check_mode = check_mode
        self.image = image
        self.record = record
        self.warnings: list[str] = []
        self.trace: list[dict[str, Any]] = []

    def target_running(self) -> bool:
        if self.request.state == "as_saved":
            return self.image.was_running
        return self.request.state == "running"

    # -- checks ---------------------------------------------------------------------------

    def check_identity(self) -> Optional[RestoreOutcome]:
        """None if the guest is not active; an outcome if it already is."""
        identity = check_identity(self.record.name, self.record.uuid)
        if identity.name_only is not None:
            holder = identity.name_only
            raise GuestConflictError(
                f"domain '{self.record.name}' already exists with uuid {holder.uuid}: "
                f"{holder.describe()} is active under that name; the image is uuid {self.record.uuid}")
        if identity.uuid_only is not None:
            holder = identity.uuid_only
            raise GuestConflictError(
                f"domain '{holder.name}' is already defined with uuid {self.record.uuid}: "
                f"{holder.describe()} holds the image's UUID; the image is guest '{self.record.name}'")
        if identity.both is None:
            return None
        return self._already_active(identity.both)

    def _already_active(self, guest: Any) -> RestoreOutcome:
        description = describe_image(self.image, self.record)
        if guest.libvirt_managed:
            raise GuestConflictError(f"domain '{self.record.name}' is already active (managed by libvirt, "
                                     f"{guest.describe()})")
        endpoint = str(guest.endpoint) if guest.endpoint else None
        state = "unknown"
        changed = False
        if endpoint is not None:
            with Monitor(endpoint, trace=self.request.trace) as monitor:
                state = monitor.status()
                if self.request.state == "running" and state == "paused":
                    changed = True
                    if not self.check_mode:
                        monitor.execute("cont")
                        state = monitor.status()
                    else:
                        state = "running"
                self.trace = monitor.trace
        verb = "resumed" if changed else "left as it is"
        return RestoreOutcome(changed, f"domain '{self.record.name}' is already active; {verb}",
                              _guest_summary(self.record, guest.pid, state, endpoint), description,
                              before={"guest": {"state": "paused" if changed else state}},
                              after={"guest": {"state": state}}, trace=self.trace)

    def check_disks(self) -> None:
        if self.request.disk_check == "ignore":
            return
        changes = disk_changes(self.record.disks)
        if not changes:
            return
        summary = "; ".join(changes)
        if self.request.disk_check == "strict":
            raise PreconditionError(
                f"the guest's disks changed since the save ({summary}). Restoring RAM over changed disks "
                "corrupts the guest's file systems; if you know the change is harmless, use "
                "disk_check: warn or ignore")
        self.warnings.append(f"the guest's disks changed since the save: {summary}")

    def check_decompressor(self) -> None:
        compressor = self.image.format.compressor
        if compressor is not None and shutil.which(compressor.program) is None:
            raise PreconditionError(f"the image is {self.image.format.label}-compressed and {compressor.program} "
                                    "is not installed on this host")

    # -- the restore ------------------------------------------------------------------------

    def run(self) -> RestoreOutcome:
        emulator = self.request.emulator or self.record.emulator
        if not emulator or not self.record.argv:
            raise PreconditionError(f"{self.request.path} records no QEMU command line")
        check_emulator(emulator)
        self.check_decompressor()
        self.check_disks()
        target = "running" if self.target_running() else "paused"
        before = {"guest": {"state": "stopped"}, "image": {"exists": True}}
        after = {"guest": {"state": target},
                 "image": {"exists": not self.request.remove_image}}
        if self.check_mode:
            return RestoreOutcome(True, f"would restore guest '{self.record.name}' from {self.request.path}",
                                  _guest_summary(self.record, None, target, self.record.qmp),
                                  describe_image(self.image, self.record), None, before, after, self.warnings)
        key = guest_key(self.record.uuid, self.record.name, 0)
        with GuestLock(key, self.request.timeout, f"restore from {self.request.path}"):
            return self._restore_locked(emulator, key, target, before, after)

    def _restore_locked(self, emulator: str, key: str, target: str, before: dict[str, Any],
                        after: dict[str, Any]) -> RestoreOutcome:
        already = self.check_identity()  # again, under the lock: a parallel run may have won
        if already is not None:
            return already
        monitor_path = recorded_unix_monitor(self.record)
        private_monitor = None if monitor_path else os.path.join(runtime_dir(), f"{key}.qmp")
        argv = restore_argv(self.record, emulator, private_monitor)
        qemu = LaunchedQemu(argv, os.path.join(runtime_dir(), f"{key}.log"), "/")
        try:
            stats, state = self._load(qemu, monitor_path or private_monitor, target)
        except BaseException:
            qemu.kill()
            self._remove_leftovers(private_monitor, qemu.pid)
            raise
        description = describe_image(self.image, self.record)
        if self.request.remove_image:
            os.unlink(self.request.path)
        return RestoreOutcome(True, f"restored guest '{self.record.name}' from {self.request.path}",
                              _guest_summary(self.record, qemu.pid, state, self.record.qmp or monitor_path),
                              description, stats, before, after, self.warnings, self.trace)

    def _load(self, qemu: LaunchedQemu, monitor_path: str, target: str) -> tuple[dict[str, Any], str]:
        qemu.wait_for_monitor(monitor_path, min(self.request.timeout, STARTUP_TIMEOUT))
        monitor = Monitor(monitor_path, trace=self.request.trace)
        try:
            with monitor:
                stats = self._stream_in(monitor, qemu)
                if target == "running":
                    monitor.execute("cont")
                state = monitor.status()
                if state != target:
                    raise MigrationError(f"the guest is {state} after the restore, not {target}")
        except MonitorError as error:
            if qemu.exited():
                raise MigrationError(f"QEMU rejected the image: {qemu.reason()}") from None
            raise MigrationError(f"restore failed: {error}") from None
        finally:
            self.trace = monitor.trace
        return stats, state

    def _stream_in(self, monitor: Monitor, qemu: LaunchedQemu) -> dict[str, Any]:
        status = monitor.status()
        if status != "inmigrate":
            raise MigrationError(f"QEMU started in state {status!r} instead of waiting for the image")
        plan = plan_restore(self.image.format, Features.probe(monitor), self.request.parallel_channels)
        MigrationSettings(monitor).apply(plan)
        fd = os.open(self.request.path, os.O_RDONLY | os.O_CLOEXEC)
        started = time.monotonic()
        try:
            with Stream(monitor, plan, fd, self.image.stream_offset, self.request.path, outgoing=False) as stream:
                stream.start()
                try:
                    stream.wait(self.request.timeout)
                except MigrationError as error:
                    if qemu.exited():
                        raise MigrationError(f"QEMU rejected the image: {qemu.reason()}") from None
                    raise MigrationError(f"{error}") from None
        finally:
            os.close(fd)
        duration = time.monotonic() - started
        size = self.image.size
        return {"duration_s": round(duration, 3), "bytes": size,
                "throughput_mib_s": round(size / MIB / duration, 1) if duration > 0 else None}

    def _remove_leftovers(self, private_monitor: Optional[str], pid: int) -> None:
        """What a killed QEMU leaves: our private socket, a pidfile naming it."""
        if private_monitor and os.path.exists(private_monitor):
            os.unlink(private_monitor)
        for _index, name, value in iter_options(self.record.argv or ()):
            if name == "pidfile" and os.path.isfile(value):
                try:
                    with open(value, encoding="ascii", errors="replace") as pidfile:
                        if pidfile.read().strip() == str(pid):
                            os.unlink(value)
                except OSError:
                    pass


def restore_guest(request: RestoreRequest, check_mode: bool = False) -> RestoreOutcome:
    check_image_trust(request.path)
    image, record = load_image(request.path)
    if record.origin != "savestate":
        raise PreconditionError(
            f"{request.path} is a libvirt save image: it records no QEMU command line, only libvirt can "
            f"restore it (virsh restore {request.path})")
    if request.name is not None and record.name != request.name:
        raise PreconditionError(f"{request.path} is a save image of guest '{record.name}', not '{request.name}'")
    if request.uuid is not None and (record.uuid or "").lower() != request.uuid.lower():
        raise PreconditionError(f"{request.path} is a save image of uuid {record.uuid}, not {request.uuid}")
    restorer = GuestRestorer(request, image, record, check_mode)
    already = restorer.check_identity()
    if already is not None:
        return already
    return restorer.run()
