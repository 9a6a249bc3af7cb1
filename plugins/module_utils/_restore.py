# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Restore orchestration: start QEMU from a save image and bring the guest back.

Nothing runs before the image has been judged safe to act on:

1. trust: the image decides what QEMU runs, so it must not be writable by anyone
   but root and its owner, nor sit in a directory others could swap it in;
2. the image itself: complete, supported, with our metadata (the command line),
   of the guest the ``name``/``uuid`` options expect;
3. identity, under the guest's lock (the one saves take): no other active guest
   (libvirt's included) holds its name or UUID; the guest itself already active
   means there is nothing to do, or only to resume it;
4. the emulator is a QEMU system emulator, the decompressor is installed, and the
   disks are the ones the RAM was saved against.

Then QEMU starts from the recorded command line with ``-S -incoming defer``, in
the working directory it was saved in, detached from the module; the stream
flows in and the guest is put in the requested state. Any failure kills and reaps
that QEMU, removes what the restore created and leaves the image untouched; the
image is removed (``remove_image``) only once the guest is in its target state.
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
    SaveStateError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._host import (
    ActiveGuest,
    check_identity,
    guest_name,
    guest_uuid,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image import SaveImage
from ansible_collections.savestate.qemu.plugins.module_utils._image_info import describe_image, load_image
from ansible_collections.savestate.qemu.plugins.module_utils._monitor import Monitor, parse_endpoint
from ansible_collections.savestate.qemu.plugins.module_utils._systemd import (
    UNIT_OPTION_AUTO,
    Placement,
    booted_after_save,
    check_unit_free,
    plan_placement,
)
from ansible_collections.savestate.qemu.plugins.module_utils._qemu_argv import (
    escape_option_value,
    iter_options,
    option_name,
    option_values,
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
# How long a QEMU whose monitor dropped may take to exit before we stop waiting for its reason.
EXIT_GRACE = 5.0
HELPER_GRACE = 1.0
LOG_TAIL_BYTES = 4000
LOG_TAIL_LINES = 8
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
    unit: str = UNIT_OPTION_AUTO     # systemd (issue 15): auto, none, or a unit name


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


def _parents(path: str) -> list[str]:
    """``/a/b/c`` -> ``[/a/b, /a, /]``."""
    parents = []
    directory = os.path.dirname(path)
    while True:
        parents.append(directory)
        if directory == os.path.dirname(directory):
            return parents
        directory = os.path.dirname(directory)


def check_image_trust(path: str) -> None:
    """Refuse an image that a user other than root or its owner could have written.

    The image holds the command line QEMU will run, so whoever can change it can
    run programs as the user who restores. That covers the file itself and every
    directory on the way to it, along the path as given (a symbolic link there can
    be swapped) and along the resolved path: whoever can write one of those can
    swap the image.
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
    directories = _parents(os.path.abspath(path))
    directories += [directory for directory in _parents(real) if directory not in directories]
    for directory in directories:
        problem = _untrusted_writers(os.stat(directory), allowed)
        if problem:
            raise PreconditionError(
                f"refusing to restore {path}: the directory {directory} {problem}, so users other than "
                "root and the image's owner could replace the image; move the image, or fix the "
                "directory (chmod go-w, or chmod +t for a shared directory such as /tmp)")


def _qemu_program_name(path: str) -> bool:
    return os.path.basename(path).startswith(QEMU_PROGRAM_PREFIXES)


def check_emulator(emulator: str) -> str:
    """The emulator must be a QEMU system emulator binary that only root can replace.

    Returns the path to run. The name is checked before anything else: the image
    (or the user) could otherwise make a restore run any program.
    """
    if not _qemu_program_name(emulator):
        raise PreconditionError(
            f"refusing to run {emulator!r}: the emulator must be a QEMU system emulator "
            "(qemu-system-* or qemu-kvm)")
    resolved = shutil.which(emulator) if os.sep not in emulator else emulator
    if not resolved or not os.path.isfile(resolved) or not os.access(resolved, os.X_OK):
        raise PreconditionError(f"the emulator {emulator} does not exist or is not executable on this host; "
                                "give the right path with the emulator option")
    real = os.path.realpath(resolved)
    if not _qemu_program_name(real):
        raise PreconditionError(
            f"refusing to run {emulator!r}: it is a link to {real}, which is not a QEMU system emulator "
            "(qemu-system-* or qemu-kvm)")
    problem = _untrusted_writers(os.stat(resolved), {0, os.geteuid()})
    if problem:
        raise PreconditionError(f"refusing to run {resolved}: it {problem}")
    return resolved


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
    (why it refused to start, why it rejected the stream) can be quoted on failure.
    """

    def __init__(self, argv: list[str], log_path: str, cwd: str, placement: Optional[Placement] = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.placement = placement or Placement(None)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if self.placement.kind in ("persistent", "transient"):  # systemd (issue 15): QEMU is the unit's
                self.process: Any = self.placement.launch(argv, cwd, log_path)
            else:
                self.process = subprocess.Popen(self.placement.popen_argv(argv), stdin=subprocess.DEVNULL,
                                                stdout=log_fd, stderr=log_fd, cwd=cwd, close_fds=True,
                                                start_new_session=True)
        except OSError as error:
            os.unlink(log_path)
            raise PreconditionError(f"cannot start {argv[0]}: {error.strerror}") from None
        finally:
            os.close(log_fd)

    @property
    def pid(self) -> int:
        return self.process.pid

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
        try:
            os.unlink(self.log_path)
        except FileNotFoundError:
            pass

    def wait_for_monitor(self, socket_path: str, timeout: float) -> None:
        """Until QEMU listens on its monitor (or exits, or ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.exited():
                raise MigrationError(f"QEMU did not start: it {self.exit_status()}{self.said()}")
            if _accepts_connections(socket_path):
                return
            if time.monotonic() > deadline:
                raise MigrationError(f"QEMU did not open its monitor {socket_path} within {timeout:g} s"
                                     f"{self.said()}")
            # QEMU opens its monitor a few tens of ms after exec; a short poll keeps that off the
            # restore time, and a failed connect() on a missing socket costs microseconds.
            time.sleep(0.01)


def _accepts_connections(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


# --- the restore --------------------------------------------------------------------------

def _decompressor_failure(stream: Stream) -> Optional[str]:
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


def _holder(guest: ActiveGuest) -> str:
    return guest.describe() + (", managed by libvirt," if guest.libvirt_managed else "")


def _guest_summary(name: Optional[str], uuid: Optional[str], pid: Optional[int], state: str,
                   qmp: Optional[str]) -> dict[str, Any]:
    return {"name": name, "uuid": uuid, "pid": pid, "state": state, "qmp": qmp, "managed_by": "none"}


def _active_outcome(guest: ActiveGuest, request: RestoreRequest, check_mode: bool,
                    image: Optional[dict[str, Any]], why: str) -> RestoreOutcome:
    """The guest is already active: leave it, or resume it if it is paused and ``state=running``."""
    if guest.libvirt_managed:
        raise GuestConflictError(f"domain '{guest.name}' is already active (managed by libvirt, "
                                 f"{guest.describe()}); use virsh to manage it")
    endpoint = str(guest.endpoint) if guest.endpoint else None
    state, changed, trace = "unknown", False, []
    if endpoint is not None:
        with Monitor(endpoint, trace=request.trace) as monitor:
            state = monitor.status()
            if state == "inmigrate":
                raise PreconditionError(
                    f"domain '{guest.name}' is already active, but as a QEMU still waiting for or loading "
                    f"an incoming migration ({guest.describe()}): another restore is under way, or an "
                    f"interrupted one left this process behind. If nothing else is restoring it, end that "
                    f"process (kill {guest.pid}) and run the restore again")
            changed = request.state == "running" and state == "paused"
            if changed and not check_mode:
                monitor.execute("cont")
                state = monitor.status()
            elif changed:
                state = "running"
            trace = monitor.trace
    verb = "resumed it" if changed else "left it as it is"
    return RestoreOutcome(changed, f"domain '{guest.name}' is already active{why}; {verb}",
                          _guest_summary(guest.name, guest.uuid, guest.pid, state, endpoint), image,
                          before={"guest": {"state": "paused" if changed else state}},
                          after={"guest": {"state": state}}, trace=trace)


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
        self.emulator: Optional[str] = None

    @property
    def target(self) -> str:
        if self.request.state == "as_saved":
            return "running" if self.image.was_running else "paused"
        return self.request.state

    def describe(self) -> dict[str, Any]:
        return describe_image(self.image, self.record)

    # -- checks ---------------------------------------------------------------------------

    def check_identity(self) -> Optional[RestoreOutcome]:
        """None if the guest is not active; an outcome if it already is (libvirt's words on conflicts)."""
        identity = check_identity(self.record.name, self.record.uuid)
        if identity.name_only is not None:
            holder = identity.name_only
            raise GuestConflictError(
                f"domain '{self.record.name}' already exists with uuid {holder.uuid}: "
                f"{_holder(holder)} is active under that name; the image is uuid {self.record.uuid}")
        if identity.uuid_only is not None:
            holder = identity.uuid_only
            raise GuestConflictError(
                f"domain '{holder.name}' is already defined with uuid {self.record.uuid}: "
                f"{_holder(holder)} holds the image's UUID; the image is guest '{self.record.name}'")
        if identity.both is None:
            return None
        return _active_outcome(identity.both, self.request, self.check_mode, self.describe(),
                               booted_after_save(self.record.saved_at, identity.both.pid))  # systemd (issue 15)

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

    def preflight(self) -> str:
        """Everything that can refuse the restore before QEMU runs; returns the emulator to run."""
        emulator = self.request.emulator or self.record.emulator
        if not emulator or not self.record.argv:
            raise PreconditionError(f"{self.request.path} records no QEMU command line")
        resolved = check_emulator(emulator)
        self.check_decompressor()
        self.check_disks()
        return resolved

    # -- the restore ------------------------------------------------------------------------

    def _diff(self) -> tuple[dict[str, Any], dict[str, Any]]:
        before = {"guest": {"state": "stopped"}, "image": {"exists": True}}
        after = {"guest": {"state": self.target}, "image": {"exists": not self.request.remove_image}}
        return before, after

    def predict(self) -> RestoreOutcome:
        """Check mode: everything checked, nothing started, nothing created."""
        self.preflight()
        before, after = self._diff()
        return RestoreOutcome(True, f"would restore guest '{self.record.name}' from {self.request.path}",
                              _guest_summary(self.record.name, self.record.uuid, None, self.target,
                                             self.record.qmp),
                              self.describe(), None, before, after, self.warnings)

    def restore(self, key: str) -> RestoreOutcome:
        """Start QEMU and load the image; call with the guest's lock held and identity checked."""
        emulator = self.emulator = self.preflight()
        monitor_path = recorded_unix_monitor(self.record)
        private_monitor = None if monitor_path else os.path.join(runtime_dir(), f"{key}.qmp")
        cwd, warning = launch_directory(self.record.cwd)
        if warning:
            self.warnings.append(warning)
        placement = plan_placement(self.record.unit, self.request.unit, self.record.name)  # systemd (issue 15)
        check_unit_free(placement)
        if placement.note:
            self.warnings.append(placement.note)
        qemu = LaunchedQemu(restore_argv(self.record, emulator, private_monitor),
                            os.path.join(runtime_dir(), f"{key}.log"), cwd, placement)
        try:
            stats, state = self._load(qemu, monitor_path or private_monitor)
        except BaseException:
            qemu.kill()
            self._remove_leftovers(qemu, private_monitor, cwd)
            raise
        placement.settle()  # the unit's own ExecStart=/Restart= apply again from here on
        self._remove_image()
        before, after = self._diff()
        guest = _guest_summary(self.record.name, self.record.uuid, qemu.pid, state,
                               self.record.qmp or monitor_path or private_monitor)
        guest["unit"] = placement.describe()
        return RestoreOutcome(True, f"restored guest '{self.record.name}' from {self.request.path}",
                              guest, self.describe(), stats, before, after, self.warnings, self.trace)

    def _load(self, qemu: LaunchedQemu, monitor_path: str) -> tuple[dict[str, Any], str]:
        # QEMU's start-up is not part of the load: a tiny timeout must not fail a healthy start.
        try:
            qemu.wait_for_monitor(monitor_path, STARTUP_TIMEOUT)
        except MigrationError as error:
            if "machine type" not in str(error) or not self.record.machine:
                raise
            raise MigrationError(
                f"{error}. The guest was saved on machine type {self.record.machine} by QEMU "
                f"{self.record.qemu_version or '(unknown version)'}; restore it with a QEMU that has this "
                "machine type (the same version or a newer one)") from None
        monitor = Monitor(monitor_path, trace=self.request.trace)
        try:
            with monitor:
                stats = self._stream_in(monitor, qemu)
                if self.target == "running":
                    monitor.execute("cont")
                state = monitor.status()
                if state != self.target:
                    raise MigrationError(f"the guest is {state} after the restore, not {self.target}")
        except MonitorError as error:
            raise MigrationError(self._qemu_failure(qemu, f"restore failed: {error}")) from None
        finally:
            self.trace = monitor.trace
        return stats, state

    def _stream_in(self, monitor: Monitor, qemu: LaunchedQemu) -> dict[str, Any]:
        status = monitor.status()
        if status != "inmigrate":
            raise MigrationError(f"QEMU started in state {status!r} instead of waiting for the image")
        # The binary keys the cache of what QEMU's (large) QAPI schema says: a restore starts a new QEMU.
        plan = plan_restore(self.image.format, Features.probe(monitor, self.emulator),
                            self.request.parallel_channels)
        settings = MigrationSettings(monitor)
        settings.apply(plan)
        fd = os.open(self.request.path, os.O_RDONLY | os.O_CLOEXEC)
        started = time.monotonic()
        try:
            with Stream(monitor, plan, fd, self.image.stream_offset, self.request.path, outgoing=False) as stream:
                try:
                    stream.start()
                    stream.wait(self.request.timeout)
                except (MigrationError, MonitorError) as error:
                    raise MigrationError(self._stream_failure(qemu, stream, error, started)) from None
        finally:
            os.close(fd)
        duration = time.monotonic() - started
        # Capabilities set for the load stay on in the new QEMU: left there, mapped-ram and
        # multifd would change (or break) the next migration the operator starts by hand.
        settings.restore()
        size = self.image.size
        return {"duration_s": round(duration, 3), "bytes": size,
                "throughput_mib_s": round(size / MIB / duration, 1) if duration > 0 else None}

    def _stream_failure(self, qemu: LaunchedQemu, stream: Stream, error: SaveStateError, started: float) -> str:
        """Why the load failed, in QEMU's and the decompressor's own words."""
        timeout = self.request.timeout
        if time.monotonic() - started >= timeout and not qemu.exited():
            return (f"the image did not load within the timeout of {timeout:g} s; QEMU was stopped and the "
                    "image left as it was")
        decompressor = _decompressor_failure(stream)
        text = self._qemu_failure(qemu, str(error), EXIT_GRACE if isinstance(error, MonitorError) else 0.2)
        if decompressor is not None and decompressor not in text:
            text = f"the decompressor failed ({decompressor}); {text}"
        return text

    @staticmethod
    def _qemu_failure(qemu: LaunchedQemu, error_text: str, grace: float = EXIT_GRACE) -> str:
        # QEMU 7.2 exits on a bad stream: the monitor drops a moment before the process ends,
        # and only its output says why. Newer QEMU stays up (exit-on-error: false) and reports
        # a summary over QMP, with the detail again only in its output.
        if qemu.exited(grace):
            return f"QEMU rejected the image: it {qemu.exit_status()}{qemu.said()}"
        return f"{error_text}{qemu.said()}"

    def _remove_image(self) -> None:
        """``remove_image``: only now, with the guest confirmed in its target state."""
        if not self.request.remove_image:
            return
        try:
            os.unlink(self.request.path)
        except OSError as error:
            self.warnings.append(f"the guest is restored, but the image could not be removed: "
                                 f"{error.strerror}")

    def _remove_leftovers(self, qemu: LaunchedQemu, private_monitor: Optional[str], cwd: str) -> None:
        """What a killed QEMU leaves: its log, our private socket, a pidfile naming it."""
        qemu.remove_log()
        if private_monitor and os.path.exists(private_monitor):
            os.unlink(private_monitor)
        for _index, name, value in iter_options(self.record.argv or ()):
            if name != "pidfile" or not value:
                continue
            pidfile = os.path.join(cwd, value)  # QEMU resolved a relative one from its working directory
            try:
                with open(pidfile, encoding="ascii", errors="replace") as handle:
                    if handle.read().strip() == str(qemu.pid):
                        os.unlink(pidfile)
            except OSError:
                pass


# --- entry point --------------------------------------------------------------------------

def _check_expected_identity(request: RestoreRequest, record: GuestRecord) -> None:
    if record.origin != "savestate":
        raise PreconditionError(
            f"{request.path} is a libvirt save image: it records no QEMU command line, only libvirt can "
            f"restore it (virsh restore {request.path})")
    _check_command_line_identity(request.path, record)
    if request.name is not None and record.name != request.name:
        raise PreconditionError(f"{request.path} is a save image of guest '{record.name}', not '{request.name}'")
    if request.uuid is not None and (record.uuid or "").lower() != request.uuid.lower():
        raise PreconditionError(f"{request.path} is a save image of uuid {record.uuid}, not {request.uuid}")


def _check_command_line_identity(path: str, record: GuestRecord) -> None:
    """The identity checks go by the XML, QEMU runs the command line: they must agree.

    A save writes both from the same guest; a disagreement means a damaged or edited
    image, and restoring it could start a guest under a name or UUID no check saw.
    """
    argv = record.argv or ()
    name, uuid = guest_name(argv), guest_uuid(argv)
    if name != record.name:
        raise ImageError(f"{path}: the image's domain XML names the guest {record.name!r}, but its recorded "
                         f"command line runs {name!r}; the image is damaged or was edited by hand")
    if uuid is not None and uuid != (record.uuid or "").lower():
        raise ImageError(f"{path}: the image's domain XML has UUID {record.uuid}, but its recorded command "
                         f"line runs {uuid}; the image is damaged or was edited by hand")


def _consumed_image(request: RestoreRequest, check_mode: bool) -> Optional[RestoreOutcome]:
    """With ``remove_image``, a missing image and the guest active: an earlier run restored it.

    The image no longer tells who the guest is, so this takes ``name`` or ``uuid``.
    """
    if not request.remove_image or os.path.lexists(request.path):
        return None
    if request.name is None and request.uuid is None:
        raise ImageError(f"{request.path} does not exist. If an earlier run restored it with remove_image, "
                         "give the guest's name or uuid as well, and a re-run finds the guest active")
    identity = check_identity(request.name, request.uuid)
    if identity.both is None or identity.conflict:
        wanted = " and ".join(f"{label} {value}" for label, value in (("name", request.name),
                                                                      ("uuid", request.uuid)) if value)
        raise ImageError(f"{request.path} does not exist, and no active guest has {wanted}")
    return _active_outcome(identity.both, request, check_mode, None,
                           f" and {request.path} is gone (restored by an earlier run with remove_image)")


def restore_guest(request: RestoreRequest, check_mode: bool = False) -> RestoreOutcome:
    consumed = _consumed_image(request, check_mode)
    if consumed is not None:
        return consumed
    check_image_trust(request.path)
    image, record = load_image(request.path)
    _check_expected_identity(request, record)
    restorer = GuestRestorer(request, image, record, check_mode)
    if check_mode:
        return restorer.check_identity() or restorer.predict()
    key = guest_key(record.uuid, record.name, 0)
    # The lock first: a restore or save of this guest running in parallel finishes before we look.
    with GuestLock(key, request.timeout, f"restore from {request.path}"):
        return restorer.check_identity() or restorer.restore(key)
