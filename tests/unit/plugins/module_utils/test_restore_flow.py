"""The restore orchestration end to end, against a stand-in QEMU (no QEMU): every way a restore ends.

The restore starts the stand-in emulator (tests/unit/fake_qemu.py) exactly as it
starts QEMU: from an image signed with this host's key, after its trust checks (the
stand-in is root-owned in a root-only directory, as they require), with the private
monitor socket inherited. QMP is answered by a FakeQMPServer in this process, which
reads the stream from the very file descriptor the restore passes. Only the
discovery of active guests on /proc is replaced (``scan``).
"""

from __future__ import annotations

import gzip
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import DiskRecord, GuestRecord
from ansible_collections.savestate.qemu.plugins.module_utils._errors import (
    GuestConflictError,
    ImageError,
    MigrationError,
    PreconditionError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image import ImageFormat
from ansible_collections.savestate.qemu.plugins.module_utils._restore import RestoreRequest, restore_guest
from ansible_collections.savestate.qemu.plugins.module_utils._runtime import runtime_path
from ansible_collections.savestate.qemu.plugins.module_utils._save import SaveRequest, save_guest
from ansible_collections.savestate.qemu.tests.unit.fake_qemu import MACHINE, STREAM, FakeQemuHost, Guest
from ansible_collections.savestate.qemu.tests.unit.image_helpers import make_savestate_image, write_libvirt_fixture

QEMU_7_2 = (7, 2, 0)


def guest_record(host: FakeQemuHost, *args: str, **changes: object) -> GuestRecord:
    """The guest as a save records it, run by the stand-in emulator."""
    qmp = str(host.directory / "guest.qmp")
    argv = (host.emulator, "-name", f"guest={host.name}", "-uuid", host.uuid, "-m", "128", "-machine", "pc", *args,
            "-qmp", f"unix:{qmp},server=on,wait=off")
    record = GuestRecord(name=host.name, uuid=host.uuid, memory_kib=131072, vcpus=1, arch="x86_64", machine=MACHINE,
                         domain_type="qemu", emulator=host.emulator, qemu_version="10.0.2", argv=argv, qmp=qmp,
                         disks=(), saved_at="2026-11-30T08:00:00+00:00", cwd=str(host.directory),
                         owner_uid=os.getuid(), owner_gid=os.getgid(), owner_groups=(), owner_user="root")
    return replace(record, **changes)  # type: ignore[arg-type]


def saved_image(path: Path, host: FakeQemuHost, *args: str, was_running: bool = True, sign: bool = True,
                fmt: ImageFormat = ImageFormat.RAW, stream: bytes = STREAM, **changes: object) -> Path:
    return make_savestate_image(path, guest_record(host, *args, **changes), sign=sign, was_running=was_running,
                                fmt=fmt, stream=stream)


@pytest.fixture
def image(tmp_path: Path, qemu_host: FakeQemuHost) -> Path:
    return saved_image(tmp_path / "guest.save", qemu_host)


def restore(path: Path, check_mode: bool = False, scan=lambda: [], **options: object):
    return restore_guest(RestoreRequest(path=str(path), **{"timeout": 5.0, **options}), check_mode,  # type: ignore[arg-type]
                         scan=scan)


def assert_nothing_left(host: FakeQemuHost, image: Path) -> None:
    """What every failed restore leaves: no QEMU, no log, no monitor socket; the image as it was."""
    for process in host.processes:
        assert process.wait_gone(), f"QEMU pid {process.pid} was left running"
    assert not [name for name in os.listdir(runtime_path()) if name.startswith(host.uuid)]
    assert image.exists()


# --- restores that succeed -----------------------------------------------------------------------

@pytest.mark.parametrize("version", [(10, 0, 2), QEMU_7_2], ids=["fdset", "fd"])
def test_a_restore_starts_qemu_feeds_it_the_stream_and_resumes_the_guest(qemu_host, image, version):
    qemu_host.version = version
    outcome = restore(image, trace=True)

    process, qemu = qemu_host.processes[0], qemu_host.qemus[0]
    assert outcome.changed and outcome.msg == f"restored guest '{qemu_host.name}' from {image}"
    assert outcome.guest["pid"] == process.pid and outcome.guest["state"] == "running"
    assert qemu.received == STREAM and qemu.status == "running"
    assert outcome.stats["bytes"] == image.stat().st_size and outcome.trace
    assert outcome.before["guest"] == {"state": "stopped"} and outcome.after["guest"] == {"state": "running"}
    # The saved command line, waiting for the stream, in the saved working directory.
    assert process.argv[process.argv.index("-incoming") + 1] == "defer" and "-S" in process.argv
    assert process.cwd == str(qemu_host.directory)
    assert f"guest={qemu_host.name}" in process.argv and MACHINE in process.argv
    assert image.exists()


def test_a_paused_guest_is_restored_paused_and_the_image_removed_on_request(qemu_host, image):
    outcome = restore(image, state="paused", remove_image=True)
    assert outcome.guest["state"] == "paused" and "cont" not in qemu_host.processes[0].server.commands()
    assert not image.exists()


def test_a_compressed_image_goes_through_the_decompressor(qemu_host, tmp_path):
    image = saved_image(tmp_path / "gz.save", qemu_host, fmt=ImageFormat.GZIP, stream=gzip.compress(STREAM))
    restore(image)
    assert qemu_host.qemus[0].received == STREAM


def test_save_then_restore_round_trip(qemu_host, tmp_path):
    """The image a save wrote (of a stand-in guest) restores the same stream into a new stand-in QEMU."""
    guest = Guest(qemu_host)
    image = tmp_path / "round.save"
    save_guest(SaveRequest(path=str(image), name=qemu_host.name, timeout=5.0), scan=guest.scan)
    assert guest.process.wait_gone()

    outcome = restore(image, state="paused")
    assert qemu_host.qemus[-1].received == STREAM and outcome.guest["pid"] == qemu_host.processes[-1].pid


def test_check_mode_predicts_and_starts_nothing(qemu_host, image):
    outcome = restore(image, check_mode=True)
    assert outcome.changed and outcome.msg.startswith("would restore") and outcome.guest["pid"] is None
    assert qemu_host.processes == []


def test_a_changed_disk_is_refused_or_warned_about(qemu_host, tmp_path):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(4096))
    record_disk = DiskRecord(path=str(disk), format="raw", size=2048, mtime_ns=1)
    image = saved_image(tmp_path / "d.save", qemu_host, disks=(record_disk,))
    with pytest.raises(PreconditionError, match=r"disks changed since the save .*changed size \(2048 -> 4096"):
        restore(image)
    assert qemu_host.processes == [], "refused before QEMU runs"
    outcome = restore(image, disk_check="warn")
    assert outcome.changed and any("disks changed since the save" in warning for warning in outcome.warnings)


def test_a_gone_working_directory_starts_qemu_in_root(qemu_host, tmp_path):
    image = saved_image(tmp_path / "cwd.save", qemu_host, cwd=str(tmp_path / "gone"))
    outcome = restore(image)
    assert qemu_host.processes[0].cwd == "/" and "QEMU starts in / instead" in outcome.warnings[0]


# --- refusals before QEMU runs ---------------------------------------------------------------------

def test_an_image_without_this_hosts_signature_is_refused(qemu_host, tmp_path):
    image = saved_image(tmp_path / "unsigned.save", qemu_host, sign=False)
    with pytest.raises(PreconditionError, match="the image is not authenticated"):
        restore(image)
    assert qemu_host.processes == []


def test_an_untrusted_emulator_is_refused(qemu_host, tmp_path):
    impostor = tmp_path / "qemu-system-x86_64"
    impostor.write_bytes(Path(qemu_host.emulator).read_bytes())
    impostor.chmod(0o755)
    image = saved_image(tmp_path / "e.save", qemu_host, emulator=str(impostor))
    with pytest.raises(PreconditionError, match="is not a trusted QEMU emulator"):
        restore(image)
    with pytest.raises(PreconditionError, match="must be a QEMU system emulator"):
        restore(image, emulator="/bin/sh")
    assert qemu_host.processes == []


def test_images_that_do_not_say_how_to_run_the_guest(qemu_host, tmp_path):
    with pytest.raises(PreconditionError, match="is a libvirt save image"):
        restore(write_libvirt_fixture(tmp_path))
    image = saved_image(tmp_path / "n.save", qemu_host)
    with pytest.raises(PreconditionError, match=f"is a save image of guest '{qemu_host.name}', not 'other'"):
        restore(image, name="other")
    with pytest.raises(PreconditionError, match="is a save image of uuid"):
        restore(image, uuid="11111111-2222-3333-4444-555555555555")


def test_an_image_whose_command_line_runs_another_guest_is_damaged(qemu_host, tmp_path):
    image = saved_image(tmp_path / "x.save", qemu_host, name="renamed")
    with pytest.raises(ImageError, match="names the guest 'renamed', but its recorded command line runs"):
        restore(image)


def test_a_missing_decompressor_is_reported(qemu_host, tmp_path, monkeypatch):
    image = saved_image(tmp_path / "z.save", qemu_host, fmt=ImageFormat.ZSTD, stream=b"\x28\xb5\x2f\xfd" + bytes(64))
    monkeypatch.setenv("PATH", str(tmp_path))  # the host has no zstd
    with pytest.raises(PreconditionError, match="zstd-compressed and zstd is not installed"):
        restore(image)


# --- the guest is already active -----------------------------------------------------------------

def test_an_active_guest_is_left_as_it_is_or_resumed(qemu_host, image):
    guest = Guest(qemu_host)
    outcome = restore(image, scan=guest.scan)
    assert not outcome.changed and "is already active" in outcome.msg and outcome.guest["pid"] == guest.process.pid

    guest.qemu.status = "paused"
    assert restore(image, check_mode=True, scan=guest.scan, state="running").changed
    assert guest.qemu.status == "paused"
    outcome = restore(image, scan=guest.scan, state="running")
    assert outcome.changed and "resumed it" in outcome.msg and guest.qemu.status == "running"
    assert len(qemu_host.processes) == 1, "no second QEMU"


def test_a_guest_still_loading_an_incoming_migration_is_not_touched(qemu_host, image):
    guest = Guest(qemu_host)
    guest.qemu.status = "inmigrate"
    with pytest.raises(PreconditionError, match="still waiting for or loading an incoming migration"):
        restore(image, scan=guest.scan)


@pytest.mark.parametrize("changes, message", [
    ({"managed_by": "libvirt"}, "is already active .managed by libvirt"),
    ({"name": "other"}, "is already defined with uuid"),
    ({"uuid": "11111111-2222-3333-4444-555555555555"}, "already exists with uuid 11111111"),
    ({"uid": 4321}, "runs as uid 4321, but the saved guest ran as"),
])
def test_conflicts_with_active_guests(qemu_host, tmp_path, changes, message):
    image = saved_image(tmp_path / "c.save", qemu_host)
    guest = Guest(qemu_host)
    guest.active = guest.discovered(**changes)
    with pytest.raises(GuestConflictError, match=message):
        restore(image, scan=guest.scan)


def test_a_consumed_image_of_an_active_guest_is_done(qemu_host, tmp_path):
    gone = tmp_path / "gone.save"
    guest = Guest(qemu_host)
    outcome = restore(gone, remove_image=True, name=qemu_host.name, scan=guest.scan)
    assert not outcome.changed and "restored by an earlier run with remove_image" in outcome.msg
    with pytest.raises(ImageError, match="give the guest's name or uuid as well"):
        restore(gone, remove_image=True, scan=guest.scan)
    with pytest.raises(ImageError, match=f"no active guest has name {qemu_host.name}"):
        restore(gone, remove_image=True, name=qemu_host.name)


# --- QEMU fails to start or to load -------------------------------------------------------------

def test_qemu_refusing_to_start_is_reported_in_its_words(qemu_host, tmp_path):
    image = saved_image(tmp_path / "m.save", qemu_host, "-pidfile", "guest.pid")
    qemu_host.refuse_start = "qemu-system-x86_64: unsupported machine type 'pc-i440fx-10.0'\n"
    with pytest.raises(MigrationError, match=r"QEMU did not start: it exited with status 1; QEMU said: "
                                             r"qemu-system-x86_64: unsupported machine type .*saved on machine type "
                                             r"pc-i440fx-10.0 by QEMU 10.0.2"):
        restore(image)
    assert_nothing_left(qemu_host, image)
    assert not (qemu_host.directory / "guest.pid").exists(), "the pidfile naming the dead QEMU is removed"


@pytest.mark.parametrize("version", [(10, 0, 2), QEMU_7_2])
def test_qemu_rejecting_the_stream(qemu_host, image, version):
    qemu_host.version = version
    qemu_host.configure = lambda qemu: setattr(qemu, "incoming", "fail" if version >= (9, 1, 0) else "exit") \
        or setattr(qemu, "error_desc", "Unknown savevm section or instance 'foo' 0")
    expected = ("QEMU's migration from the image failed: Unknown savevm section" if version >= (9, 1, 0)
                else "QEMU rejected the image: it exited with status 1; QEMU said: .*Unknown savevm section")
    with pytest.raises(MigrationError, match=expected):
        restore(image)
    assert_nothing_left(qemu_host, image)


def test_qemu_crashing_while_loading(qemu_host, image):
    qemu_host.configure = lambda qemu: setattr(qemu, "incoming", "hangup")
    with pytest.raises(MigrationError, match=f"QEMU rejected the image: it was killed by signal {signal.SIGSEGV}"):
        restore(image)
    assert_nothing_left(qemu_host, image)


def test_a_load_that_does_not_finish_in_time(qemu_host, image):
    qemu_host.configure = lambda qemu: setattr(qemu, "incoming", "hang")
    with pytest.raises(MigrationError, match="the image did not load within the timeout of 0.3 s; QEMU was stopped"):
        restore(image, timeout=0.3)
    assert_nothing_left(qemu_host, image)


def test_a_corrupt_compressed_stream_names_the_decompressor(qemu_host, tmp_path):
    image = saved_image(tmp_path / "bad.save", qemu_host, fmt=ImageFormat.GZIP, stream=b"\x1f\x8b\x08\x00" + bytes(64))
    qemu_host.configure = lambda qemu: setattr(qemu, "incoming", "fail") or setattr(qemu, "error_desc", "load failed")
    with pytest.raises(MigrationError, match="load failed .gzip exited with status 1: gzip: stdin: invalid compressed"):
        restore(image)
    assert_nothing_left(qemu_host, image)


def test_qemu_not_waiting_for_the_stream(qemu_host, image):
    qemu_host.configure = lambda qemu: setattr(qemu, "status", "prelaunch")
    with pytest.raises(MigrationError, match="QEMU started in state 'prelaunch' instead of waiting for the image"):
        restore(image)
    assert_nothing_left(qemu_host, image)


def test_a_guest_that_does_not_end_up_in_the_state_asked_for(qemu_host, image):
    qemu_host.configure = lambda qemu: qemu.process.server.reply("cont", {})  # accepted, but it stays paused
    with pytest.raises(MigrationError, match="the guest is paused after the restore, not running"):
        restore(image)
    assert_nothing_left(qemu_host, image)


def test_an_unauthenticated_image_never_runs_qemu_as_root_even_when_allowed(qemu_host, tmp_path):
    image = saved_image(tmp_path / "unsigned.save", qemu_host, sign=False)
    with pytest.raises(PreconditionError, match="is not signed by this host's key and would run QEMU as root"):
        restore(image, allow_unauthenticated=True)
    assert qemu_host.processes == []


def test_a_command_line_with_another_uuid_is_damaged(qemu_host, tmp_path):
    image = saved_image(tmp_path / "u.save", qemu_host, uuid="11111111-2222-3333-4444-555555555555")
    with pytest.raises(ImageError, match="has UUID 11111111-2222-3333-4444-555555555555, but its recorded command"):
        restore(image)


def test_qemu_refusing_to_resume(qemu_host, image):
    qemu_host.configure = lambda qemu: qemu.process.server.error("cont", "GenericError", "Resetting the VM failed")
    with pytest.raises(MigrationError, match="restore failed: .*Resetting the VM failed"):
        restore(image)
    assert_nothing_left(qemu_host, image)
