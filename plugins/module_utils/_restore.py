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

This file is the orchestration (request -> :func:`restore_guest` -> outcome, as for
a save); the checks are in ``_restore_trust``, starting QEMU is in ``_restore_launch``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._credentials import (
    Credentials,
    LaunchPlan,
    plan_authenticated,
    plan_unauthenticated,
    recorded_credentials,
)
from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import GuestRecord
from ansible_collections.savestate.qemu.plugins.module_utils._errors import (
    GuestConflictError,
    ImageError,
    MigrationError,
    MonitorError,
    PreconditionError,
    SaveStateError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._host import ActiveGuest, GuestScan, check_identity, scan_guests
from ansible_collections.savestate.qemu.plugins.module_utils._guest_agent import sync_guest_clock
from ansible_collections.savestate.qemu.plugins.module_utils._image import SaveImage
from ansible_collections.savestate.qemu.plugins.module_utils._image_auth import open_image
from ansible_collections.savestate.qemu.plugins.module_utils._image_info import describe_image
from ansible_collections.savestate.qemu.plugins.module_utils._image_key import load_key
from ansible_collections.savestate.qemu.plugins.module_utils._monitor import Monitor
from ansible_collections.savestate.qemu.plugins.module_utils._outcome import Outcome, guest_result, stats_result
from ansible_collections.savestate.qemu.plugins.module_utils._qemu_process import (
    LaunchedQemu,
    PrivateMonitor,
    UnitMonitor,
    without_private_monitor,
)
from ansible_collections.savestate.qemu.plugins.module_utils._restore_launch import (
    check_runs_as,
    connect_monitor,
    decompressor_failure,
    launch_directory,
    qemu_failure,
    remove_leftovers,
    restore_argv,
    restore_monitor,
)
from ansible_collections.savestate.qemu.plugins.module_utils._restore_trust import (
    check_authenticated,
    check_decompressor,
    check_disks,
    check_emulator,
    check_expected_identity,
    check_same_owner,
    holder,
)
from ansible_collections.savestate.qemu.plugins.module_utils._runtime import GuestLock, guest_key
from ansible_collections.savestate.qemu.plugins.module_utils._stream import (
    Features,
    MigrationSettings,
    Stream,
    plan_restore,
    time_left,
)
from ansible_collections.savestate.qemu.plugins.module_utils._systemd import (
    UNIT_OPTION_AUTO,
    booted_after_save,
    check_unit_free,
    plan_placement,
)

STATE_CHOICES = ("as_saved", "running", "paused")


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


class RestoreOutcome(Outcome):
    """What a restore returns (the shape save's outcome has too)."""


# --- the restore --------------------------------------------------------------------------

def _active_outcome(guest: ActiveGuest, request: RestoreRequest, check_mode: bool,
                    image: Optional[dict[str, Any]], why: str) -> RestoreOutcome:
    """The guest is already active: leave it, or resume it if it is paused and ``state=running``."""
    if guest.libvirt_managed:
        raise GuestConflictError(f"domain '{guest.name}' is already active (managed by libvirt, "
                                 f"{guest.describe()}); use virsh to manage it")
    endpoint = str(guest.endpoint) if guest.endpoint else None
    state, changed, trace = "unknown", False, []
    if endpoint is not None:
        monitor = Monitor(endpoint, trace=request.trace, peer_pid=guest.pid)
        try:
            with monitor:
                state, changed = _resume_if_asked(monitor, guest, request, check_mode)
        except SaveStateError as error:
            error.add_context(trace=monitor.trace)
            raise
        trace = monitor.trace
    verb = "resumed it" if changed else "left it as it is"
    return RestoreOutcome(changed, f"domain '{guest.name}' is already active{why}; {verb}",
                          guest_result(guest.name, guest.uuid, guest.pid, state, endpoint), image,
                          before={"guest": {"state": "paused" if changed else state}},
                          after={"guest": {"state": state}}, trace=trace)


def _resume_if_asked(monitor: Monitor, guest: ActiveGuest, request: RestoreRequest,
                     check_mode: bool) -> tuple[str, bool]:
    """The active guest's state once ``state=running`` is served, and whether that changed it."""
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
    return state, changed


class GuestRestorer:
    """One restore of one image."""

    def __init__(self, request: RestoreRequest, image: SaveImage, record: GuestRecord,
                 check_mode: bool, image_fd: int = -1, authenticated: bool = True,
                 image_file_uid: int = 0, scan: GuestScan = scan_guests) -> None:
        self.request = request
        self.scan = scan
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

    # -- checks (_restore_trust has them; this decides in which order) ----------------------

    def check_identity(self) -> Optional[RestoreOutcome]:
        """None if the guest is not active; an outcome if it already is (libvirt's words on conflicts)."""
        identity = check_identity(self.record.name, self.record.uuid, guests=self.scan())
        if identity.name_only is not None:
            raise GuestConflictError(
                f"domain '{self.record.name}' already exists with uuid {identity.name_only.uuid}: "
                f"{holder(identity.name_only)} is active under that name; the image is uuid {self.record.uuid}")
        if identity.uuid_only is not None:
            raise GuestConflictError(
                f"domain '{identity.uuid_only.name}' is already defined with uuid {self.record.uuid}: "
                f"{holder(identity.uuid_only)} holds the image's UUID; the image is guest '{self.record.name}'")
        if identity.both is None:
            return None
        check_same_owner(self.record, identity.both)
        return _active_outcome(identity.both, self.request, self.check_mode, self.describe(),
                               booted_after_save(self.record.saved_at, identity.both.pid))  # systemd (issue 15)

    def preflight(self) -> str:
        """Everything that can refuse the restore before QEMU runs; returns the emulator to run."""
        emulator = self.request.emulator or self.record.emulator
        if not emulator or not self.record.argv:
            raise PreconditionError(f"{self.request.path} records no QEMU command line")
        resolved = check_emulator(emulator)
        self.launch = self.launch_plan()
        check_decompressor(self.image)
        warning = check_disks(self.record.disks, self.request.disk_check)
        if warning:
            self.warnings.append(warning)
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
                              guest_result(self.record.name, self.record.uuid, None, self.target, self.record.qmp),
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
        with restore_monitor(key, placement, *self._expected_ids()) as monitor_socket:
            argv = restore_argv(self._record_without_private_monitor(), emulator, None)
            qemu = LaunchedQemu(argv + monitor_socket.qemu_options(), key, cwd, launch.credentials,
                                pass_fds=monitor_socket.pass_fds, placement=placement)
        try:
            stats, state = self._load(qemu, monitor_socket)
        except BaseException:
            qemu.kill()
            monitor_socket.remove()
            remove_leftovers(qemu, cwd, self.record.argv or ())
            raise
        placement.settle()  # the unit's own ExecStart=/Restart= apply again from here on
        self._remove_image()
        before, after = self._diff()
        guest = guest_result(self.record.name, self.record.uuid, qemu.pid, state,
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

    def _expected_ids(self) -> tuple[int, int]:
        """The real uid and gid the restored QEMU must end up with (after its own -runas drop too)."""
        credentials = self._helper_credentials()
        if credentials is not None:
            return credentials.uid, credentials.gid
        return os.geteuid(), os.getegid()

    def _record_without_private_monitor(self) -> GuestRecord:
        return replace(self.record, argv=tuple(without_private_monitor(self.record.argv or ())))

    def _load(self, qemu: LaunchedQemu, monitor_socket: PrivateMonitor | UnitMonitor) -> tuple[dict[str, Any], str]:
        monitor = connect_monitor(qemu, monitor_socket, self.request.trace, self.record)
        deadline = time.monotonic() + self.request.timeout
        try:
            with monitor:
                check_runs_as(qemu, *self._expected_ids())
                stats = self._stream_in(monitor, qemu)
                # Right after a slow load QEMU may still be busy: wait as long as the restore may take.
                if self.target == "running":
                    monitor.execute("cont", timeout=time_left(deadline, monitor.command_timeout))
                state = monitor.status(timeout=time_left(deadline, monitor.command_timeout))
                if state != self.target:
                    raise MigrationError(f"the guest is {state} after the restore, not {self.target}")
        except MonitorError as error:
            raise MigrationError(qemu_failure(qemu, error, "restore failed: ")) from None
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
        return stats_result(duration, self.image.size)

    def _stream_failure(self, qemu: LaunchedQemu, stream: Stream, error: SaveStateError, started: float) -> str:
        """Why the load failed, in QEMU's and the decompressor's own words."""
        timeout = self.request.timeout
        if time.monotonic() - started >= timeout and not qemu.exited():
            return (f"the image did not load within the timeout of {timeout:g} s; QEMU was stopped and the "
                    "image left as it was")
        decompressor = decompressor_failure(stream)
        text = qemu_failure(qemu, error)
        if decompressor is not None and decompressor not in text:
            text = f"the decompressor failed ({decompressor}); {text}"
        return text

    def _remove_image(self) -> None:
        """``remove_image``: only now, with the guest confirmed in its target state."""
        if not self.request.remove_image:
            return
        try:
            os.unlink(self.request.path)
        except OSError as error:
            self.warnings.append(f"the guest is restored, but the image could not be removed: "
                                 f"{error.strerror}")


# --- entry point --------------------------------------------------------------------------

def _consumed_image(request: RestoreRequest, check_mode: bool, scan: GuestScan) -> Optional[RestoreOutcome]:
    """With ``remove_image``, a missing image and the guest active: an earlier run restored it.

    The image no longer tells who the guest is, so this takes ``name`` or ``uuid``.
    """
    if not request.remove_image or os.path.lexists(request.path):
        return None
    if request.name is None and request.uuid is None:
        raise ImageError(f"{request.path} does not exist. If an earlier run restored it with remove_image, "
                         "give the guest's name or uuid as well, and a re-run finds the guest active")
    identity = check_identity(request.name, request.uuid, guests=scan())
    if identity.both is None or identity.conflict:
        wanted = " and ".join(f"{label} {value}" for label, value in (("name", request.name),
                                                                      ("uuid", request.uuid)) if value)
        raise ImageError(f"{request.path} does not exist, and no active guest has {wanted}")
    return _active_outcome(identity.both, request, check_mode, None,
                           f" and {request.path} is gone (restored by an earlier run with remove_image)")


def restore_guest(request: RestoreRequest, check_mode: bool = False, scan: GuestScan = scan_guests) -> RestoreOutcome:
    """Restore the image the request names (see the module docstring for the order).

    ``scan`` lists the active guests (this host's, unless a unit test hands in its own).
    A failure carries the image and the QMP conversation so far as its context.
    """
    consumed = _consumed_image(request, check_mode, scan)
    if consumed is not None:
        return consumed
    # Opened once: what is checked, verified and parsed is what QEMU is fed.
    with open_image(request.path, load_key(create=not check_mode)) as opened:
        record = opened.record
        restorer = GuestRestorer(request, opened.image, record, check_mode, opened.fd, opened.authenticated,
                                 opened.file_uid, scan)
        try:
            check_expected_identity(request.path, record, request.name, request.uuid)  # first: libvirt's way out
            check_authenticated(opened, request.path, request.allow_unauthenticated)
            return _run(restorer, record, request, check_mode)
        except SaveStateError as error:
            error.add_context(trace=restorer.trace, image=restorer.describe())
            raise


def _run(restorer: GuestRestorer, record: GuestRecord, request: RestoreRequest, check_mode: bool) -> RestoreOutcome:
    if check_mode:
        return restorer.check_identity() or restorer.predict()
    key = guest_key(record.uuid, record.name, 0)
    # The lock first: a restore or save of this guest running in parallel finishes before we look.
    with GuestLock(key, request.timeout, f"restore from {request.path}"):
        return restorer.check_identity() or restorer.restore(key)
