# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Save orchestration: pause a guest, write its image, then end, resume or keep it paused.

The order of things is what makes a save safe:

1. everything that can rule the save out is checked before the guest is touched
   (migration blockers, format support, compressor, directory, free space, an
   image of another guest at the path);
2. the guest is paused and a journal records whether it was running;
3. the image is written under a temporary name in the target directory with the
   partial magic; QEMU streams into it directly;
4. only after QEMU reports ``completed``: fsync, final magic, fsync, rename into
   place, fsync the directory;
5. then ``after_save``: quit QEMU (default), resume it, or leave it paused.

Any failure before step 4 ends cancels the migration, resumes a guest that was
running, removes the temporary file and leaves an earlier image untouched.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._credentials import process_credentials
from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import (
    DiskRecord,
    GuestRecord,
    build_domain_xml,
)
from ansible_collections.savestate.qemu.plugins.module_utils._emulator import emulator_problem
from ansible_collections.savestate.qemu.plugins.module_utils._errors import (
    GuestNotFoundError,
    ImageError,
    MigrationError,
    MonitorClosedError,
    MonitorError,
    PreconditionError,
    SaveStateError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._host import (
    ActiveGuest,
    GuestScan,
    find_guests,
    guest_serving,
    scan_guests,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image import (
    ImageFormat,
    SaveHeader,
    finalize_image,
    read_image,
    rewrite_data_area,
    write_new_image,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image_auth import signing_xml
from ansible_collections.savestate.qemu.plugins.module_utils._image_info import (
    describe_image,
    load_image,
    parse_image_xml,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image_key import ImageKey, config_dir, load_key
from ansible_collections.savestate.qemu.plugins.module_utils._monitor import Monitor
from ansible_collections.savestate.qemu.plugins.module_utils._outcome import MIB, Outcome, guest_result, stats_result
from ansible_collections.savestate.qemu.plugins.module_utils._proc import process_gone, read_cwd
from ansible_collections.savestate.qemu.plugins.module_utils._systemd import (
    check_unit_stopped,
    guest_unit,
    stop_unit_before_quit,
)
from ansible_collections.savestate.qemu.plugins.module_utils._runtime import (
    GuestLock,
    JournalStore,
    SaveJournal,
    guest_key,
    process_start_time,
)
from ansible_collections.savestate.qemu.plugins.module_utils._stream import (
    Features,
    MigrationSettings,
    Stream,
    StreamPlan,
    plan_save,
    time_left,
)
from ansible_collections.savestate.qemu.plugins.module_utils._timestamps import utc_text
from ansible_collections.savestate.qemu.plugins.module_utils._uuid_compare import same_uuid, uuid_form

AFTER_SAVE_CHOICES = ("stop", "running", "paused")
RESTORE_STATE_CHOICES = ("running", "paused")
# QEMU states in which a migration of ours (or of a killed earlier run) is under way.
MIGRATING_STATES = ("finish-migrate",)
QUIT_TIMEOUT = 60.0


@dataclass(frozen=True)
class SaveRequest:
    """What the user asked for (the save module's options)."""

    path: str
    name: Optional[str] = None
    uuid: Optional[str] = None
    socket: Optional[str] = None
    image_format: ImageFormat = ImageFormat.RAW
    parallel_channels: Optional[int] = None   # None: _stream.default_channels (issue 17)
    bypass_cache: bool = False
    restore_state: Optional[str] = None
    after_save: str = "stop"
    force: bool = False
    timeout: float = 600.0
    trace: bool = False

    def identity(self) -> str:
        given = [f"{label} {value!r}" for label, value in
                 (("name", self.name), ("uuid", self.uuid), ("socket", self.socket)) if value]
        return ", ".join(given)


class SaveOutcome(Outcome):
    """What a save returns (the shape restore's outcome has too)."""


# --- finding the guest --------------------------------------------------------------


def locate_guest(request: SaveRequest, scan: GuestScan = scan_guests) -> Optional[ActiveGuest]:
    """The one active guest every identifier given points at, or None if none does.

    Identifiers that point at different guests are an error: the user meant one guest.
    """
    guests = scan()
    matches: dict[int, ActiveGuest] = {}
    pointed: list[tuple[str, set[int]]] = []
    if request.name is not None or request.uuid is not None:
        found = find_guests(name=request.name, uuid=request.uuid, guests=guests)
        pointed.append(("name/uuid", {g.pid for g in found}))
        matches.update({g.pid: g for g in found})
    if request.socket is not None:
        # The guest that owns the listening socket, not whoever names it on a command line.
        found_by_socket = guest_serving(request.socket, guests=guests)
        pointed.append(("socket", {found_by_socket.pid} if found_by_socket else set()))
        if found_by_socket is not None:
            matches[found_by_socket.pid] = found_by_socket
    common = set.intersection(*(pids for _label, pids in pointed)) if pointed else set()
    if len(common) == 1:
        return matches[common.pop()]
    if len(common) > 1:
        raise PreconditionError(f"{request.identity()} matches {len(common)} active guests "
                                f"(pids {sorted(common)}); give a uuid or socket to pick one")
    if any(pids for _label, pids in pointed):
        described = "; ".join(f"{label} -> {', '.join(matches[p].describe() for p in sorted(pids)) or 'none'}"
                              for label, pids in pointed)
        raise PreconditionError(f"the identifiers given do not agree on one guest: {described}")
    return None


def refuse_libvirt_guest(guest: ActiveGuest) -> None:
    if guest.libvirt_managed:
        handle = guest.name or guest.uuid or str(guest.pid)
        raise PreconditionError(
            f"guest {guest.describe()} is managed by libvirt ({', '.join(guest.libvirt_evidence)}); "
            f"save it with libvirt instead: virsh save {handle} <file> (or virsh managedsave {handle})")


def monitor_endpoint(request: SaveRequest, guest: ActiveGuest) -> str:
    if request.socket:
        return request.socket
    if guest.endpoint is None:
        raise PreconditionError(
            f"guest {guest.describe()} has no QMP monitor on its command line (-qmp or "
            "-chardev socket + -mon mode=control); savestate.qemu saves through QMP")
    return str(guest.endpoint)


def check_identity_over_qmp(monitor: Monitor, request: SaveRequest) -> tuple[Optional[str], str]:
    """Ask QEMU who it is; every identifier given must agree. Returns (name, uuid)."""
    name, uuid = monitor.name(), uuid_form(monitor.uuid())
    if request.name is not None and request.name != name:
        raise PreconditionError(f"the guest at {monitor.endpoint} is named {name!r}, not {request.name!r}")
    if request.uuid is not None and not same_uuid(request.uuid, uuid):
        raise PreconditionError(f"the guest at {monitor.endpoint} has UUID {uuid}, not {request.uuid}")
    return name, uuid


# --- the image at the target path --------------------------------------------------

@dataclass(frozen=True)
class ExistingImage:
    """What is at the target path before the save."""

    exists: bool
    complete: bool = False
    name: Optional[str] = None
    uuid: Optional[str] = None
    description: Optional[dict[str, Any]] = None
    problem: Optional[str] = None  # set when it is not a readable save image

    def belongs_to(self, name: Optional[str], uuid: Optional[str]) -> bool:
        return self.complete and self.name == name and (uuid is None or same_uuid(self.uuid, uuid))

    def summary(self) -> dict[str, Any]:
        if not self.exists:
            return {"exists": False}
        return {"exists": True, "complete": self.complete, "name": self.name, "uuid": self.uuid}


def inspect_target(path: str) -> ExistingImage:
    if not os.path.lexists(path):
        return ExistingImage(exists=False)
    try:
        image, record = load_image(path, allow_incomplete=True)
    except (ImageError, OSError) as error:
        return ExistingImage(exists=True, problem=str(error))
    return ExistingImage(True, image.complete, record.name, record.uuid, describe_image(image, record))


def check_target(request: SaveRequest, existing: ExistingImage, name: Optional[str], uuid: str) -> None:
    directory = os.path.dirname(request.path) or "."
    if not os.path.isdir(directory):
        raise PreconditionError(f"the directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PreconditionError(f"the directory {directory} is not writable")
    if os.path.isdir(request.path):
        raise PreconditionError(f"{request.path} is a directory; path must name the image file")
    if request.force or not existing.exists:
        return
    if existing.problem is not None:
        raise PreconditionError(f"{request.path} exists and is not a save image ({existing.problem}); "
                                "refusing to overwrite it (use force: true to replace it)")
    if existing.complete and not existing.belongs_to(name, uuid):
        raise PreconditionError(
            f"{request.path} holds a complete save image of another guest ({existing.name!r}, uuid "
            f"{existing.uuid}); refusing to overwrite it (use force: true to replace it)")


def check_free_space(directory: str, needed: int) -> None:
    usage = shutil.disk_usage(directory)
    if usage.free < needed:
        raise PreconditionError(
            f"not enough free space in {directory}: {usage.free // MIB} MiB free, the guest has "
            f"{needed // MIB} MiB of RAM and the image can be as large")


def check_compressor(image_format: ImageFormat) -> None:
    compressor = image_format.compressor
    if compressor is not None and shutil.which(compressor.program) is None:
        raise PreconditionError(
            f"Compression program for save image format {image_format.label} isn't available: "
            f"{compressor.program} is not on PATH; install it or choose another format")


# --- the guest record written into the image -----------------------------------------

def disk_records(monitor: Monitor) -> tuple[DiskRecord, ...]:
    """Fingerprints (size, mtime) of the guest's writable disk files."""
    records = []
    for device in monitor.block_devices():
        if not device.inserted or not device.file or device.read_only:
            continue
        records.append(fingerprint_disk(DiskRecord(path=device.file, format=device.format,
                                                   node=device.device or device.qdev)))
    return tuple(records)


def fingerprint_disk(disk: DiskRecord) -> DiskRecord:
    try:
        info = os.stat(disk.path)
    except OSError:
        return replace(disk, size=None, mtime_ns=None)  # not a local file (e.g. nbd:, rbd:)
    if stat.S_ISBLK(info.st_mode):
        return replace(disk, size=None, mtime_ns=None, source_type="block")
    return replace(disk, size=info.st_size, mtime_ns=info.st_mtime_ns)


def emulator_path(guest: ActiveGuest) -> str:
    """The binary to run on restore: the trusted emulator QEMU runs, or, if it was replaced since
    (upgrade), the trusted emulator now at that path or at argv[0]'s. Restore checks it again."""
    candidates = [guest.exe] if guest.exe else []
    found = shutil.which(guest.argv[0]) if guest.argv else None
    candidates += [found] if found else []
    for candidate in candidates:
        if emulator_problem(candidate) is None:
            return os.path.realpath(candidate)
    return guest.exe or (guest.argv[0] if guest.argv else "")


def process_cwd(pid: int) -> Optional[str]:
    """QEMU's working directory: relative paths on its command line resolve from it."""
    return read_cwd(pid)


def build_record(monitor: Monitor, guest: ActiveGuest, name: Optional[str], uuid: str,
                 endpoint: str) -> GuestRecord:
    if not name:
        raise PreconditionError(
            f"guest {guest.describe()} has no name (-name); a save image records the guest's name, "
            "so start QEMU with -name to save it")
    kvm = _qmp_dict(monitor, "query-kvm")
    # Who the saved QEMU runs as: the restore starts the new QEMU with exactly these, never more.
    owner = process_credentials(guest.uid, guest.gid, guest.groups)
    return GuestRecord(
        name=name,
        uuid=uuid,
        memory_kib=monitor.memory_bytes() // 1024,
        vcpus=monitor.vcpus(),
        arch=_target_arch(monitor),
        machine=monitor.machine_type(),
        domain_type="kvm" if kvm.get("enabled") else "qemu",
        emulator=emulator_path(guest),
        qemu_version=monitor.version_string(),
        argv=tuple(guest.argv),
        qmp=endpoint,
        disks=disk_records(monitor),
        saved_at=utc_text(),
        cwd=process_cwd(guest.pid),
        owner_uid=owner.uid,
        owner_gid=owner.gid,
        owner_groups=owner.groups,
        owner_user=owner.user,
        unit=guest_unit(guest.pid),  # systemd (issue 15): the restore starts the guest in it again
    )


def _qmp_dict(monitor: Monitor, command: str) -> dict[str, Any]:
    """A query's answer, which must be a JSON object (a hostile or broken peer may send anything)."""
    answer = monitor.execute(command)
    if not isinstance(answer, dict):
        raise MonitorError(f"QEMU's answer to {command} is not an object: {answer!r:.200}")
    return answer


def _target_arch(monitor: Monitor) -> str:
    arch = _qmp_dict(monitor, "query-target").get("arch")
    if not isinstance(arch, str) or not arch:
        raise MonitorError("QEMU's answer to query-target names no architecture")
    return arch


# --- the save itself -------------------------------------------------------------------

def guest_summary(guest: ActiveGuest, state: Optional[str], name: Optional[str], uuid: Optional[str],
                  endpoint: Optional[str]) -> dict[str, Any]:
    return guest_result(name, uuid, guest.pid, state, endpoint, guest.managed_by)


class GuestSaver:
    """One save of one active guest over an open monitor."""

    def __init__(self, request: SaveRequest, guest: ActiveGuest, monitor: Monitor,
                 name: Optional[str], uuid: str, endpoint: str) -> None:
        self.request = request
        self.guest = guest
        self.monitor = monitor
        self.name = name
        self.uuid = uuid
        self.endpoint = endpoint
        self.journals = JournalStore(guest_key(uuid, name, guest.pid))
        self.settings = MigrationSettings(monitor)
        self.warnings: list[str] = []

    # -- entry point ---------------------------------------------------------------------

    def run(self, check_mode: bool) -> SaveOutcome:
        status = self.monitor.status()
        existing = inspect_target(self.request.path)
        before = {"guest": {"state": status}, "image": existing.summary()}
        if status == "postmigrate" and self._journal() is None:
            return self._postmigrate_without_journal(existing, before, check_mode)
        plan = self._precheck(existing, status)
        if check_mode:
            return self._outcome(True, f"would save {self._label()} to {self.request.path}", before,
                                 self._predicted_state(), None, None)
        return self._save(plan, before)

    def _label(self) -> str:
        return f"guest {self.name!r}"

    def _journal(self) -> Optional[SaveJournal]:
        journal = self.journals.load()
        if journal is not None and not journal.matches_process(self.guest.pid):
            self.journals.remove()  # left by a QEMU process that is gone
            return None
        return journal

    def _predicted_state(self) -> str:
        return {"stop": "stopped", "running": "running", "paused": "paused"}[self.request.after_save]

    # -- checks before touching the guest ------------------------------------------------

    def _precheck(self, existing: ExistingImage, status: str) -> StreamPlan:
        if status not in ("running", "paused", "postmigrate"):
            raise PreconditionError(f"{self._label()} is in state {status!r}; only a running or paused "
                                    "guest can be saved")
        blockers = self.monitor.migration_blockers()
        if blockers:
            raise PreconditionError(f"cannot migrate domain: {'; '.join(blockers)}")
        plan = plan_save(self.request.image_format, Features.probe(self.monitor, self.guest.exe),
                         self.request.parallel_channels, self.request.bypass_cache)
        check_compressor(self.request.image_format)
        check_target(self.request, existing, self.name, self.uuid)
        check_free_space(os.path.dirname(self.request.path) or ".", self.monitor.memory_bytes())
        return plan

    # -- the save --------------------------------------------------------------------------

    def _save(self, plan: StreamPlan, before: dict[str, Any]) -> SaveOutcome:
        journal = self._journal()
        resumed = self._finish_interrupted_save(journal) if journal else None
        if resumed is not None:
            return self._after_save(resumed, before, None)
        key = load_key()  # before the guest stops: a key problem must not cost it a pause
        if key is None:
            raise PreconditionError(f"the host's image key could not be created in {config_dir()}")
        status = self.monitor.status()
        was_running = journal.was_running if journal else status == "running"
        if status == "running":
            self.monitor.execute("stop")
        try:
            image_path, stats = self._write_image(plan, was_running, key)
        except BaseException:
            self._recover(was_running)
            raise
        return self._after_save(image_path, before, stats)

    def _write_image(self, plan: StreamPlan, was_running: bool, key: ImageKey) -> tuple[str, dict[str, Any]]:
        directory = os.path.dirname(os.path.abspath(self.request.path))
        try:
            fd, temp_path = tempfile.mkstemp(dir=directory, suffix=".partial",
                                             prefix=f".{os.path.basename(self.request.path)}.")
        except OSError as error:
            raise MigrationError(f"cannot create the image in {directory}: {error.strerror}") from None
        journal = SaveJournal(self.guest.pid, process_start_time(self.guest.pid), was_running,
                              temp_path, self.request.path, plan.image_format.label)
        try:
            self.journals.store(journal)
            self.settings.apply(plan)
            record = build_record(self.monitor, self.guest, self.name, self.uuid, self.endpoint)
            restore_running = was_running if self.request.restore_state is None \
                else self.request.restore_state == "running"
            xml, seal = signing_xml(build_domain_xml(record), key)
            header = write_new_image(fd, xml, None, restore_running, plan.image_format, seal=seal)
            started = time.monotonic()
            with Stream(self.monitor, plan, fd, header.stream_offset, temp_path, outgoing=True) as stream:
                stream.start()
                if stream.helper is not None:
                    journal.helper_pid = stream.helper.process.pid
                    self.journals.store(journal)
                stream.wait(self.request.timeout)
            self._seal(fd, header, temp_path)
            duration = time.monotonic() - started
        except OSError as error:
            raise MigrationError(f"writing the image in {directory} failed: {error.strerror or error}"
                                 f"{_discard(temp_path)}") from None
        except SaveStateError as error:
            note = _discard(temp_path)
            if note:
                raise MigrationError(f"{error}{note}") from error
            raise
        except BaseException:
            _discard(temp_path)
            raise
        finally:
            os.close(fd)
        size = os.stat(self.request.path).st_size
        return self.request.path, stats_result(duration, size)

    def _seal(self, fd: int, header: SaveHeader, temp_path: str) -> None:
        """fsync, final magic, fsync, rename into place, fsync the directory."""
        finalize_image(fd, header)
        os.rename(temp_path, self.request.path)
        _fsync_directory(os.path.dirname(os.path.abspath(self.request.path)))

    def _recover(self, was_running: bool) -> None:
        """After a failed save: put the guest back as it was, as far as QEMU is still there."""
        try:
            self.settings.restore()
            if was_running and self.monitor.status() != "running":
                self.monitor.execute("cont")
        except MonitorError:
            pass  # QEMU is gone; the failure message says what happened
        finally:
            self.journals.remove()

    # -- finishing what a killed run started --------------------------------------------

    def _finish_interrupted_save(self, journal: SaveJournal) -> Optional[str]:
        """Complete or clean up a save whose module was killed; return the image path if done.

        A killed run leaves the guest paused and, maybe, QEMU still streaming into the
        temporary file. If QEMU finished (postmigrate) and the file is whole, seal it;
        otherwise discard it and let this run save again.
        """
        info = self._wait_for_orphan_migration()
        status = self.monitor.status()
        if status == "postmigrate" and info.get("status") == "completed":
            if journal.final_path == self.request.path and _helper_gone(journal.helper_pid):
                if os.path.exists(journal.temp_path):
                    self._seal_orphan(journal.temp_path)
                    return self.request.path
                if inspect_target(self.request.path).belongs_to(self.name, self.uuid):
                    return self.request.path  # killed after the rename: only after_save is left
            if not journal.was_running:
                raise PreconditionError(
                    f"{self._label()} was saved by an interrupted run to {journal.final_path} and sits in "
                    "QEMU's postmigrate state; QEMU cannot save it again without resuming it, which a "
                    "paused guest must not be. Re-run with that path, or resume or end the guest first")
            self.monitor.execute("cont")
            self.monitor.execute("stop")
        _remove_quietly(journal.temp_path)
        return None

    def _wait_for_orphan_migration(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.request.timeout
        while True:
            # A busy QEMU (still streaming over a slow disk) answers late: that is no failure.
            info = self.monitor.query_migrate(timeout=time_left(deadline, 1.0))
            if info.get("status") in ("none", "completed", "failed", "cancelled"):
                return info
            if time.monotonic() > deadline:
                self.monitor.execute("migrate_cancel")
                raise MigrationError("a migration started by an interrupted save is still running; "
                                     "it was cancelled, re-run the save")
            time.sleep(0.1)

    def _seal_orphan(self, temp_path: str) -> None:
        fd = os.open(temp_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            image = read_image(temp_path, allow_incomplete=True)
            self._seal(fd, image.header, temp_path)
        except ImageError as error:
            raise MigrationError(f"the interrupted save's file {temp_path} is unusable ({error}); "
                                 "remove it and re-run") from error
        finally:
            os.close(fd)

    # -- after the image is in place -------------------------------------------------------

    def _after_save(self, image_path: str, before: dict[str, Any],
                    stats: Optional[dict[str, Any]]) -> SaveOutcome:
        after_save = self.request.after_save
        try:
            if after_save == "stop":
                self._end_guest()
                self._refresh_fingerprints(image_path)
                state = "stopped"
            else:
                self.settings.restore()
                if after_save == "running":
                    self.monitor.execute("cont")
                state = self.monitor.status() if after_save == "running" else "paused"
        finally:
            self.journals.remove()
        return self._outcome(True, f"saved {self._label()} to {image_path}", before, state,
                             describe_image(*load_image(image_path)), stats)

    def _end_guest(self) -> None:
        # systemd (issue 15): a unit's pending stop job keeps its Restart= from booting the guest afresh
        unit = guest_unit(self.guest.pid)
        stop_unit_before_quit(unit)
        try:
            self.monitor.execute("quit")
        except MonitorClosedError:
            pass  # QEMU closed the connection while answering: it is on its way out
        except MonitorError:
            if unit is None:
                raise  # with a unit, its stop job's SIGTERM may have ended QEMU first
        self.monitor.close()
        deadline = time.monotonic() + QUIT_TIMEOUT
        while not _process_gone(self.guest.pid):
            if time.monotonic() > deadline:
                raise MigrationError(f"the image is saved, but QEMU (pid {self.guest.pid}) did not exit "
                                     f"within {QUIT_TIMEOUT:g} s of 'quit'")
            time.sleep(0.01)
        check_unit_stopped(unit, self.guest.pid)

    def _refresh_fingerprints(self, image_path: str) -> None:
        """Record the disks as QEMU left them on exit; restore compares against these."""
        image = read_image(image_path)
        record = parse_image_xml(image)
        disks = tuple(fingerprint_disk(disk) for disk in record.disks)
        if disks == record.disks:
            return
        fd = os.open(image_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            xml, seal = signing_xml(build_domain_xml(replace(record, disks=disks)), load_key())
            rewrite_data_area(fd, image.header, xml, image.cookie, path=image_path, seal=seal)
        finally:
            os.close(fd)

    # -- a guest QEMU already migrated away ---------------------------------------------

    def _postmigrate_without_journal(self, existing: ExistingImage, before: dict[str, Any],
                                     check_mode: bool) -> SaveOutcome:
        """QEMU finished a migration we have no record of (an earlier after_save: paused)."""
        if not existing.belongs_to(self.name, self.uuid):
            raise PreconditionError(
                f"{self._label()} is in QEMU's postmigrate state: its state was already migrated "
                "elsewhere, and QEMU cannot save it again without resuming it first")
        after_save = self.request.after_save
        if after_save == "paused":
            return self._outcome(False, f"{self._label()} is already saved to {self.request.path}",
                                 before, "paused", existing.description, None)
        if check_mode:
            return self._outcome(True, f"would {'end' if after_save == 'stop' else 'resume'} "
                                 f"{self._label()}, already saved", before, self._predicted_state(),
                                 existing.description, None)
        return self._after_save(self.request.path, before, None)

    def _outcome(self, changed: bool, msg: str, before: dict[str, Any], state: str,
                 image: Optional[dict[str, Any]], stats: Optional[dict[str, Any]]) -> SaveOutcome:
        after_image = {"exists": True, "complete": True, "name": self.name, "uuid": self.uuid} \
            if changed or image else before["image"]
        return SaveOutcome(
            changed=changed, msg=msg,
            guest=guest_summary(self.guest, state, self.name, self.uuid, self.endpoint),
            image=image, stats=stats, before=before,
            after={"guest": {"state": state}, "image": after_image},
            warnings=self.warnings, trace=self.monitor.trace)


# --- when the guest is not active --------------------------------------------------------

def already_saved(request: SaveRequest) -> SaveOutcome:
    """No active guest: unchanged if a complete image of that guest is at the path."""
    existing = inspect_target(request.path)
    if request.after_save == "stop" and existing.complete and _image_matches_request(existing, request):
        summary = existing.summary()
        return SaveOutcome(
            changed=False, msg=f"guest {existing.name!r} is not active and already saved to {request.path}",
            guest=guest_result(existing.name, existing.uuid, None, "stopped", None),
            image=existing.description, before={"guest": {"state": "stopped"}, "image": summary},
            after={"guest": {"state": "stopped"}, "image": summary})
    hint = f"; {request.path} holds no complete image of it" if request.after_save == "stop" else ""
    raise GuestNotFoundError(f"no active QEMU guest matches {request.identity()}{hint}")


def _image_matches_request(existing: ExistingImage, request: SaveRequest) -> bool:
    if request.name is not None and existing.name != request.name:
        return False
    if request.uuid is not None and not same_uuid(existing.uuid, request.uuid):
        return False
    if request.socket is not None and existing.description is not None:
        metadata = existing.description.get("metadata") or {}
        return metadata.get("qmp") == request.socket
    return True


def save_guest(request: SaveRequest, check_mode: bool = False, scan: GuestScan = scan_guests) -> SaveOutcome:
    """Save the guest the request identifies (see the module docstring for the order).

    The guest's lock is taken before its monitor is opened: QMP serves one client,
    so a second save must queue on the lock rather than find the monitor busy. Once
    it has the lock, the guest may be gone (the first save ended it): look again.
    ``scan`` lists the active guests (this host's, unless a unit test hands in its own).
    """
    guest = locate_guest(request, scan)
    if guest is None:
        return already_saved(request)
    key = guest_key(guest.uuid, guest.name, guest.pid)
    with GuestLock(key, request.timeout, f"save to {request.path}"):
        guest = locate_guest(request, scan)
        if guest is None:
            return already_saved(request)
        refuse_libvirt_guest(guest)
        endpoint = monitor_endpoint(request, guest)
        # Only the guest's own QEMU may serve this socket: it is about to receive the image's fd.
        monitor = Monitor(endpoint, trace=request.trace, peer_pid=guest.pid)
        try:
            with monitor:
                name, uuid = check_identity_over_qmp(monitor, request)
                return GuestSaver(request, guest, monitor, name, uuid, endpoint).run(check_mode)
        except SaveStateError as error:
            # What a bug report needs: the conversation so far and the guest (its state is not known now).
            error.add_context(trace=monitor.trace, guest=guest_summary(guest, None, guest.name, guest.uuid, endpoint))
            raise


# --- small helpers ---------------------------------------------------------------------

def _process_gone(pid: int) -> bool:
    """Gone, or a zombie its parent has not reaped yet (it holds no resources)."""
    return process_gone(pid)


def _helper_gone(pid: Optional[int]) -> bool:
    return pid is None or _process_gone(pid)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _discard(temp_path: str) -> str:
    """Remove a failed save's temporary file; a note for the error message if we cannot."""
    try:
        _remove_quietly(temp_path)
    except OSError as error:
        return f"; the temporary file {temp_path} could not be removed ({error.strerror}), delete it by hand"
    return ""


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
