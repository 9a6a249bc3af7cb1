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
import subprocess
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._credentials import (
    Credentials,
    LaunchPlan,
    plan_authenticated,
    plan_unauthenticated,
    recorded_credentials,
)
from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import DiskRecord, GuestRecord
from ansible_collections.savestate.qemu.plugins.module_utils._emulator import check_trusted_emulator
from ansible_collections.savestate.qemu.plugins.module_utils._errors import (
    GuestConflictError,
    MonitorPeerError,
    ImageError,
    MigrationError,
    MonitorError,
    PreconditionError,
    SaveStateError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._guest_agent import sync_guest_clock
from ansible_collections.savestate.qemu.plugins.module_utils._host import (
    ActiveGuest,
    check_identity,
    guest_name,
    guest_uuid,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image import SaveImage
from ansible_collections.savestate.qemu.plugins.module_utils._image_auth import OpenedImage, open_image
from ansible_collections.savestate.qemu.plugins.module_utils._image_info import describe_image
from ansible_collections.savestate.qemu.plugins.module_utils._image_key import load_key
from ansible_collections.savestate.qemu.plugins.module_utils._monitor import Monitor
from ansible_collections.savestate.qemu.plugins.module_utils._qemu_process import (
    LaunchedQemu,
    PrivateMonitor,
    UnitMonitor,
    without_private_monitor,
)
from ansible_collections.savestate.qemu.plugins.module_utils._systemd import (
    UNIT_OPTION_AUTO,
    Placement,
    booted_after_save,
    check_unit_free,
    plan_placement,
)
from ansible_collections.savestate.qemu.plugins.module_utils._proc import read_status
from ansible_collections.savestate.qemu.plugins.module_utils._qemu_argv import (
    escape_option_value,
    iter_options,
    option_values,
    parse_argv,
    split_option_string,
)
from ansible_collections.savestate.qemu.plugins.module_utils._runtime import (
    GuestLock,
    guest_key,
    runtime_dir,
)
from ansible_collections.savestate.qemu.plugins.module_utils._stream import (
    Features,
    MigrationSettings,
    Stream,
    plan_restore,
    time_left,
)

STATE_CHOICES = ("as_saved", "running", "paused")
DISK_CHECK_CHOICES = ("strict", "warn", "ignore")
# Options of the recorded command line that a restore must not repeat: ours replace
# them (-S, -incoming) or they would undo the restore (-loadvm) or detach QEMU from
# our control before the stream is in (-daemonize). Each is dropped with the value
# QEMU's option table says it takes, and only where it stands as an option.
DROPPED_FLAGS = frozenset(("S", "daemonize"))
DROPPED_WITH_VALUE = frozenset(("incoming", "loadvm"))
QEMU_PROGRAM_PREFIXES = ("qemu-system-", "qemu-kvm")
STARTUP_TIMEOUT = 60.0
# How long a QEMU whose monitor dropped may take to exit before we stop waiting for its reason.
EXIT_GRACE = 5.0
HELPER_GRACE = 1.0
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
    allow_unauthenticated: bool = False
    unit: str = UNIT_OPTION_AUTO     # systemd (issue 15): auto, none, or a unit name
    sync_time: bool = True           # the guest's clock to the host's through its agent (issue 14)


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

def check_authenticated(request: RestoreRequest, opened: OpenedImage) -> None:
    """Refuse an image without a valid MAC of this host's key, unless the operator opted in.

    The image's command line decides what QEMU runs and as whom; only images this
    host (or its fleet, sharing the key) wrote are trusted to say so.
    """
    if opened.authenticated or request.allow_unauthenticated:
        return
    raise PreconditionError(
        f"refusing to restore {request.path}: the image is not authenticated ({opened.auth_problem}). Its "
        "command line decides what QEMU runs, so restore only trusts images signed with this host's key "
        "(a fleet shares one key: the savestate.qemu.image_key role). If you know where this image comes "
        "from, set allow_unauthenticated: true")


def _qemu_program_name(path: str) -> bool:
    return os.path.basename(path).startswith(QEMU_PROGRAM_PREFIXES)


def check_emulator(emulator: str) -> str:
    """The emulator must be a trusted QEMU system emulator: a root-owned binary only root can replace.

    Returns the resolved real path to run. The name is checked before anything else: the image
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
    # Resolved once: every directory on the real path is checked, and that path is what runs.
    return check_trusted_emulator(resolved)


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
        with Monitor(endpoint, trace=request.trace, peer_pid=guest.pid) as monitor:
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
                 check_mode: bool, image_fd: int = -1, authenticated: bool = True,
                 image_file_uid: int = 0) -> None:
        self.request = request
        self.image_fd = image_fd            # the image, opened and verified once: the stream comes from it
        self.authenticated = authenticated  # false only with allow_unauthenticated
        self.image_file_uid = image_file_uid
        self.check_mode = check_mode
        self.image = image
        self.record = record
        self.warnings: list[str] = []
        self.trace: list[dict[str, Any]] = []
        self.emulator: Optional[str] = None
        self.launch = LaunchPlan(None, "not planned yet")

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
        self._check_same_owner(identity.both)
        return _active_outcome(identity.both, self.request, self.check_mode, self.describe(),
                               booted_after_save(self.record.saved_at, identity.both.pid))  # systemd (issue 15)

    def _check_same_owner(self, guest: ActiveGuest) -> None:
        """An active guest with the image's name and UUID is the guest itself only if it runs as its user.

        Anyone can start a QEMU with any name and UUID; taking another user's for the
        saved guest would report a restore that did not happen.
        """
        recorded = recorded_credentials(self.record)
        if recorded is None or guest.uid == recorded.uid:
            return
        raise GuestConflictError(
            f"domain '{self.record.name}' is held by {_holder(guest)}, which runs as uid {guest.uid}, but the "
            f"saved guest ran as {recorded.describe()}: another user's QEMU holds the guest's name and UUID; "
            "refusing to restore over it or to report it as the restored guest")

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
        self.launch = self.launch_plan()
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
        launch = self.launch
        cwd, warning = launch_directory(self.record.cwd)
        if warning:
            self.warnings.append(warning)
        placement = plan_placement(self.record.unit, self.request.unit, self.record.name)  # systemd (issue 15)
        check_unit_free(placement)
        if placement.note:
            self.warnings.append(placement.note)
        with self._monitor_socket(key, placement) as monitor_socket:
            argv = restore_argv(self._record_without_private_monitor(), emulator, None)
            qemu = LaunchedQemu(argv + monitor_socket.qemu_options(), key, cwd, launch.credentials,
                                pass_fds=monitor_socket.pass_fds, placement=placement)
        try:
            stats, state = self._load(qemu, monitor_socket)
        except BaseException:
            qemu.kill()
            monitor_socket.remove()
            self._remove_leftovers(qemu, cwd)
            raise
        placement.settle()  # the unit's own ExecStart=/Restart= apply again from here on
        self._remove_image()
        before, after = self._diff()
        guest = _guest_summary(self.record.name, self.record.uuid, qemu.pid, state,
                               self.record.qmp or monitor_socket.path)
        guest["user"] = launch.describe_user
        guest["unit"] = placement.describe()
        guest["clock_synced"] = sync_guest_clock(self.record.argv or (), cwd, qemu.pid,  # issue 14: _guest_agent
                                                 self.request.sync_time and state == "running", self.warnings)
        return RestoreOutcome(True, f"restored guest '{self.record.name}' from {self.request.path}",
                              guest, self.describe(), stats, before, after, self.warnings, self.trace)

    def launch_plan(self) -> LaunchPlan:
        """Whose credentials the new QEMU gets: the saved QEMU's, never more (see _credentials)."""
        recorded = recorded_credentials(self.record)
        if self.authenticated:
            return plan_authenticated(recorded, self.record.argv or (), os.geteuid())
        return plan_unauthenticated(recorded, self.record.argv or (), self.image_file_uid, os.geteuid())

    def _helper_credentials(self) -> Optional[Credentials]:
        """Whom the decompressor runs as: the user QEMU ends up as (after its own -runas drop too)."""
        if self.launch.credentials is not None:
            return self.launch.credentials
        recorded = recorded_credentials(self.record)
        if os.geteuid() == 0 and self.authenticated and recorded is not None:
            return recorded
        return None

    def _monitor_socket(self, key: str, placement: Placement) -> PrivateMonitor | UnitMonitor:
        """The restore's own monitor: inherited by QEMU, or bound by QEMU when systemd starts it."""
        if not placement.starts_in_unit:
            return PrivateMonitor(os.path.join(runtime_dir(), f"{key}.qmp"))
        uid, gid = self._expected_ids()
        return UnitMonitor(key, uid, gid)

    def _expected_ids(self) -> tuple[int, int]:
        """The real uid and gid the restored QEMU must end up with (after its own -runas drop too)."""
        credentials = self._helper_credentials()
        if credentials is not None:
            return credentials.uid, credentials.gid
        return os.geteuid(), os.getegid()

    def _record_without_private_monitor(self) -> GuestRecord:
        return replace(self.record, argv=tuple(without_private_monitor(self.record.argv or ())))

    def _load(self, qemu: LaunchedQemu, monitor_socket: PrivateMonitor | UnitMonitor) -> tuple[dict[str, Any], str]:
        monitor = self._connect(qemu, monitor_socket)
        deadline = time.monotonic() + self.request.timeout
        try:
            with monitor:
                self._check_runs_as_expected(qemu)
                stats = self._stream_in(monitor, qemu)
                # Right after a slow load QEMU may still be busy: wait as long as the restore may take.
                if self.target == "running":
                    monitor.execute("cont", timeout=time_left(deadline, monitor.command_timeout))
                state = monitor.status(timeout=time_left(deadline, monitor.command_timeout))
                if state != self.target:
                    raise MigrationError(f"the guest is {state} after the restore, not {self.target}")
        except MonitorError as error:
            raise MigrationError(self._qemu_failure(qemu, f"restore failed: {error}")) from None
        finally:
            self.trace = monitor.trace
        return stats, state

    def _connect(self, qemu: LaunchedQemu, monitor_socket: PrivateMonitor | UnitMonitor) -> Monitor:
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
                              trace=self.request.trace, peer_pid=peer)
            try:
                return monitor.connect()
            except MonitorPeerError:
                raise
            except MonitorError as error:
                if qemu.exited(EXIT_GRACE if not monitor_socket.check_peer else 0.0):
                    raise MigrationError(self._start_failure(f"QEMU did not start: it {qemu.exit_status()}"
                                                             f"{qemu.said()}")) from None
                if not monitor_socket.check_peer or time.monotonic() > deadline:
                    raise MigrationError(f"QEMU did not answer on its monitor within {STARTUP_TIMEOUT:g} s "
                                         f"({error}){qemu.said()}") from None
            # QEMU binds its socket a few tens of ms after exec: a short poll keeps that off the restore.
            time.sleep(0.01)

    def _check_runs_as_expected(self, qemu: LaunchedQemu) -> None:
        """The QEMU that greeted us runs as the saved one did, whatever started it (a unit's User= too)."""
        expected_uid, expected_gid = self._expected_ids()
        status = read_status(qemu.pid)
        if status is None:
            raise MigrationError(f"QEMU (pid {qemu.pid}) exited before the image was loaded{qemu.said()}")
        if (status.uid, status.gid) != (expected_uid, expected_gid):
            raise PreconditionError(
                f"the restored QEMU (pid {qemu.pid}) runs as uid {status.uid}, gid {status.gid}, but the saved one "
                f"ran as uid {expected_uid}, gid {expected_gid}; it was stopped before the image was loaded. "
                "A systemd unit's User=/Group= must match the user the guest ran as")

    def _start_failure(self, text: str) -> str:
        if "machine type" not in text or not self.record.machine:
            return text
        return (f"{text}. The guest was saved on machine type {self.record.machine} by QEMU "
                f"{self.record.qemu_version or '(unknown version)'}; restore it with a QEMU that has this "
                "machine type (the same version or a newer one)")

    def _stream_in(self, monitor: Monitor, qemu: LaunchedQemu) -> dict[str, Any]:
        status = monitor.status()
        if status != "inmigrate":
            raise MigrationError(f"QEMU started in state {status!r} instead of waiting for the image")
        # The binary keys the cache of what QEMU's (large) QAPI schema says: a restore starts a new QEMU.
        plan = plan_restore(self.image.format, Features.probe(monitor, self.emulator),
                            self.request.parallel_channels)
        settings = MigrationSettings(monitor)
        settings.apply(plan)
        # The file opened, checked and verified once, never the path again (a copy: Stream closes its own).
        fd = os.dup(self.image_fd)
        started = time.monotonic()
        try:
            with Stream(monitor, plan, fd, self.image.stream_offset, self.request.path, outgoing=False,
                        helper_credentials=self._helper_credentials()) as stream:
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

    def _remove_leftovers(self, qemu: LaunchedQemu, cwd: str) -> None:
        """What a killed QEMU leaves: its log and a pidfile naming it."""
        qemu.remove_log()
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
    # Opened once: what is checked, verified and parsed is what QEMU is fed.
    with open_image(request.path, load_key(create=not check_mode)) as opened:
        record = opened.record
        _check_expected_identity(request, record)  # first: libvirt's images get libvirt's way out
        check_authenticated(request, opened)
        restorer = GuestRestorer(request, opened.image, record, check_mode, opened.fd, opened.authenticated,
                                 opened.file_uid)
        if check_mode:
            return restorer.check_identity() or restorer.predict()
        key = guest_key(record.uuid, record.name, 0)
        # The lock first: a restore or save of this guest running in parallel finishes before we look.
        with GuestLock(key, request.timeout, f"restore from {request.path}"):
            return restorer.check_identity() or restorer.restore(key)
