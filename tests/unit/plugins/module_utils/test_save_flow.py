"""The save orchestration end to end, against a stand-in QEMU (no QEMU): every way a save ends.

The guest is a real process that owns its monitor socket (tests/unit/fake_qemu.py);
QMP is answered by a FakeQMPServer in this process, the stream is written into the
real image file the save created. Only the discovery of guests on /proc is replaced
(``scan``): the guest is handed in, everything else runs as it does on a host.
"""

from __future__ import annotations

import gzip
import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils import _save
from ansible_collections.savestate.qemu.plugins.module_utils._errors import (
    GuestNotFoundError,
    MigrationError,
    MonitorClosedError,
    MonitorError,
    PreconditionError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image import ImageFormat, read_image
from ansible_collections.savestate.qemu.plugins.module_utils._image_info import load_image
from ansible_collections.savestate.qemu.plugins.module_utils._runtime import (
    JournalStore,
    SaveJournal,
    guest_key,
    process_start_time,
)
from ansible_collections.savestate.qemu.plugins.module_utils._save import SaveRequest, save_guest
from ansible_collections.savestate.qemu.tests.unit.fake_qemu import STREAM, FakeQemuHost, Guest
from ansible_collections.savestate.qemu.tests.unit.fake_qmp import DROP
from ansible_collections.savestate.qemu.tests.unit.image_helpers import make_image, make_savestate_image, savestate_record

QEMU_7_2 = (7, 2, 0)


@pytest.fixture
def guest(qemu_host: FakeQemuHost) -> Guest:
    return Guest(qemu_host)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return tmp_path / "guest.save"


@pytest.fixture(autouse=True)
def no_journal_left(qemu_host: FakeQemuHost) -> Iterator[None]:
    yield
    store = JournalStore(guest_key(qemu_host.uuid, qemu_host.name, 0))
    assert store.load() is None, "a save left its journal behind"


def save(guest: Guest, path: Path, check_mode: bool = False, **options: object) -> _save.SaveOutcome:
    request = SaveRequest(path=str(path), name=guest.host.name, **{"timeout": 5.0, **options})  # type: ignore[arg-type]
    return save_guest(request, check_mode, scan=guest.scan)


def temp_files(path: Path) -> list[str]:
    return [name for name in os.listdir(path.parent) if name.endswith(".partial")]


def assert_resumed_and_clean(guest: Guest, path: Path) -> None:
    """What every failed save leaves: the guest running as before, no temporary file, no image."""
    assert guest.qemu.status == "running"
    assert "cont" in guest.commands()
    assert temp_files(path) == []
    assert not path.exists()


# --- saves that succeed ---------------------------------------------------------------------------

@pytest.mark.parametrize("version", [(10, 0, 2), QEMU_7_2], ids=["fdset", "fd"])
def test_a_save_writes_the_stream_into_a_signed_image_and_ends_the_guest(qemu_host, image, version):
    guest = Guest(qemu_host, version=version)
    outcome = save(guest, image, trace=True)

    assert outcome.changed and outcome.msg == f"saved guest {qemu_host.name!r} to {image}"
    assert outcome.guest["state"] == "stopped" and outcome.after["guest"] == {"state": "stopped"}
    assert outcome.before == {"guest": {"state": "running"}, "image": {"exists": False}}
    assert outcome.stats["bytes"] == image.stat().st_size and outcome.trace
    saved = read_image(str(image))
    assert saved.complete and saved.was_running
    with open(image, "rb") as handle:
        handle.seek(saved.stream_offset)
        assert handle.read() == STREAM
    _image, record = load_image(str(image))
    assert (record.name, record.uuid, record.emulator) == (qemu_host.name, qemu_host.uuid, guest.process.argv[0])
    assert guest.process.wait_gone()
    assert temp_files(image) == []
    commands = guest.commands()
    assert commands.index("stop") < commands.index("migrate") < commands.index("quit")


# A paused guest stays in QEMU's postmigrate state, as after any migration.
@pytest.mark.parametrize("after_save, state, qemu_state", [("running", "running", "running"),
                                                           ("paused", "paused", "postmigrate")])
def test_the_guest_can_stay_up_after_the_save(guest, image, after_save, state, qemu_state):
    outcome = save(guest, image, after_save=after_save, restore_state="paused")

    assert outcome.guest["state"] == state and guest.qemu.status == qemu_state
    assert not read_image(str(image)).was_running, "restore_state: paused is recorded in the image"
    assert not guest.process.exited
    # The migration settings the save changed are put back.
    assert guest.qemu.capabilities["events"] is False
    assert guest.qemu.parameters["max-bandwidth"] == 134217728


def test_a_paused_guest_is_saved_as_paused_and_left_paused(guest, image):
    guest.qemu.status = "paused"
    outcome = save(guest, image, after_save="paused")
    assert outcome.before["guest"] == {"state": "paused"}
    assert not read_image(str(image)).was_running
    assert "stop" not in guest.commands() and "cont" not in guest.commands()


def test_check_mode_touches_nothing(guest, image):
    outcome = save(guest, image, check_mode=True)
    assert outcome.changed and outcome.msg.startswith("would save")
    assert outcome.guest["state"] == "stopped"
    assert not image.exists() and guest.qemu.status == "running"
    assert "stop" not in guest.commands()


def test_the_disks_are_fingerprinted_as_qemu_left_them_on_exit(guest, image, tmp_path):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(4096))
    guest.qemu.disks = [{"device": "disk0", "inserted": {"file": str(disk), "drv": "raw", "ro": False}},
                        {"device": "cd0", "inserted": {"file": str(tmp_path / "cd.iso"), "drv": "raw", "ro": True}},
                        {"device": "nbd0", "inserted": {"file": "nbd://host/export", "drv": "raw", "ro": False}}]
    guest.qemu.on_quit = lambda: disk.write_bytes(bytes(8192))  # QEMU flushes its disks on the way out

    save(guest, image)
    _image, record = load_image(str(image))
    assert [(d.path, d.size) for d in record.disks] == [(str(disk), 8192), ("nbd://host/export", None)]


# --- refusals before the guest is touched ------------------------------------------------------------

def assert_untouched(guest: Guest, image: Path) -> None:
    assert "stop" not in guest.commands() and guest.qemu.status == "running"
    assert temp_files(image) == [] and not image.exists()


def test_a_migration_blocker_refuses_the_save(guest, image):
    guest.qemu.blockers = ["non-migratable device: 0000:00:02.0/vfio"]
    with pytest.raises(PreconditionError, match="cannot migrate domain: non-migratable device: 0000:00:02.0/vfio"):
        save(guest, image)
    assert_untouched(guest, image)


@pytest.mark.parametrize("status", ["inmigrate", "shutdown", "internal-error"])
def test_a_guest_in_another_state_is_refused(guest, image, status):
    guest.qemu.status = status
    with pytest.raises(PreconditionError, match=f"is in state '{status}'; only a running or paused guest"):
        save(guest, image)


def test_not_enough_free_space_for_the_guests_ram_refuses_the_save(guest, image):
    guest.qemu.memory = 1 << 60
    with pytest.raises(PreconditionError, match="not enough free space in .*the guest has 1099511627776 MiB of RAM"):
        save(guest, image)
    assert_untouched(guest, image)


def test_an_image_of_another_guest_is_not_overwritten(guest, image):
    make_savestate_image(image)
    before = image.read_bytes()
    with pytest.raises(PreconditionError, match="holds a complete save image of another guest .'web01'"):
        save(guest, image)
    assert image.read_bytes() == before
    assert save(guest, image, force=True).changed  # unless forced


def test_a_file_that_is_no_image_is_not_overwritten(guest, image):
    image.write_text("precious")
    with pytest.raises(PreconditionError, match="exists and is not a save image"):
        save(guest, image)
    assert image.read_text() == "precious"


def test_a_missing_directory_or_a_directory_as_path(guest, tmp_path):
    with pytest.raises(PreconditionError, match="does not exist"):
        save(guest, tmp_path / "nowhere" / "g.save")
    with pytest.raises(PreconditionError, match="is a directory; path must name the image file"):
        save(guest, tmp_path)


def test_sparse_needs_a_newer_qemu(qemu_host, image):
    guest = Guest(qemu_host, version=QEMU_7_2)
    with pytest.raises(PreconditionError, match="sparse is not supported by this QEMU"):
        save(guest, image, image_format=ImageFormat.SPARSE)
    assert_untouched(guest, image)


# --- who the guest is ---------------------------------------------------------------------------------

def test_qemu_must_agree_with_the_names_given(guest, image):
    guest.qemu.name = "someone-else"
    with pytest.raises(PreconditionError, match=f"is named 'someone-else', not {guest.host.name!r}"):
        save(guest, image)
    guest.qemu.name = guest.host.name
    request = SaveRequest(path=str(image), uuid="11111111-2222-3333-4444-555555555555", socket=guest.qmp)
    with pytest.raises(PreconditionError, match="do not agree on one guest"):
        save_guest(request, scan=guest.scan)


def test_the_guest_can_be_named_by_its_socket_alone(guest, image):
    outcome = save_guest(SaveRequest(path=str(image), socket=guest.qmp, timeout=5.0), scan=guest.scan)
    assert outcome.guest["name"] == guest.host.name and outcome.guest["qmp"] == guest.qmp


def test_two_guests_with_one_name_need_a_uuid(guest, image):
    twin = guest.discovered(pid=1)
    with pytest.raises(PreconditionError, match="matches 2 active guests"):
        save_guest(SaveRequest(path=str(image), name=guest.host.name), scan=lambda: [guest.active, twin])


def test_a_libvirt_guest_is_left_to_libvirt(guest, image):
    guest.active = guest.discovered(managed_by="libvirt", libvirt_evidence=("its monitor is under /var/lib/libvirt",))
    with pytest.raises(PreconditionError, match=f"managed by libvirt .*virsh save {guest.host.name} <file>"):
        save(guest, image)


def test_a_guest_without_a_monitor_or_a_name(guest, image):
    guest.active = guest.discovered(qmp=())
    with pytest.raises(PreconditionError, match="has no QMP monitor on its command line"):
        save(guest, image)
    guest.active = guest.discovered()
    guest.qemu.name = None
    with pytest.raises(PreconditionError, match="has no name"):
        save_guest(SaveRequest(path=str(image), socket=guest.qmp, timeout=5.0), scan=guest.scan)


def test_a_guest_that_is_not_active_is_already_saved_or_not_found(guest, image):
    make_savestate_image(image, replace(savestate_record(), name=guest.host.name, uuid=guest.host.uuid))
    outcome = save_guest(SaveRequest(path=str(image), name=guest.host.name), scan=lambda: [])
    assert not outcome.changed and outcome.guest["state"] == "stopped" and "already saved" in outcome.msg
    with pytest.raises(GuestNotFoundError, match="holds no complete image of it"):
        save_guest(SaveRequest(path=str(image), name="another"), scan=lambda: [])
    with pytest.raises(GuestNotFoundError, match="no active QEMU guest matches name 'another'$"):
        save_guest(SaveRequest(path=str(image), name="another", after_save="paused"), scan=lambda: [])


# --- failures while the stream flows ---------------------------------------------------------------

def test_a_migration_that_does_not_finish_in_time_is_cancelled_and_the_guest_resumed(guest, image):
    guest.qemu.migrate = "hang"
    with pytest.raises(MigrationError, match=r"did not finish within the timeout of 0.3 s \(QEMU status active\); "
                                             "it was cancelled"):
        save(guest, image, timeout=0.3)
    assert "migrate_cancel" in guest.commands()
    assert_resumed_and_clean(guest, image)


def test_qemu_dying_mid_stream_fails_the_save_and_leaves_no_file(guest, image):
    guest.qemu.migrate = "hangup"
    with pytest.raises(MonitorClosedError, match="QEMU closed the monitor connection"):
        save(guest, image)
    assert guest.process.wait_gone()
    assert temp_files(image) == [] and not image.exists()


@pytest.mark.parametrize("version, desc, expected", [
    ((10, 0, 2), "Unable to write to file: Input/output error", "Unable to write to file: Input/output error"),
    (QEMU_7_2, None, "QEMU reports status failed and gives no reason"),
])
def test_qemu_failing_the_migration(qemu_host, image, version, desc, expected):
    guest = Guest(qemu_host, version=version)
    guest.qemu.migrate, guest.qemu.error_desc = "fail", desc
    with pytest.raises(MigrationError, match=f"QEMU's migration to the image failed: {expected}"):
        save(guest, image)
    assert_resumed_and_clean(guest, image)


def test_qemu_refusing_the_migration(guest, image):
    guest.process.server.error("migrate", "GenericError", "There's a migration process in progress")
    with pytest.raises(MigrationError, match="QEMU refused to start the migration: There's a migration process"):
        save(guest, image)
    assert_resumed_and_clean(guest, image)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a disk that fills up mid-stream."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mount_point)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.parametrize("version, expected", [
    ((10, 0, 2), "No space left on device"),
    (QEMU_7_2, r"No space left on device \(the file system of .* is full\)"),
])
def test_a_disk_that_fills_up_mid_stream(qemu_host, small_fs, version, expected):
    guest = Guest(qemu_host, version=version)
    guest.qemu.memory = 512 * 1024            # passes the free-space check ...
    guest.qemu.stream = STREAM * 200           # ... but the stream is larger than the disk
    image = small_fs / "guest.save"
    with pytest.raises(MigrationError, match=f"QEMU's migration to the image failed: {expected}"):
        save(guest, image)
    assert_resumed_and_clean(guest, image)
    assert os.statvfs(small_fs).f_bfree == os.statvfs(small_fs).f_blocks, "the partial file's space is freed"


def test_a_full_disk_before_the_stream_fails_cleanly(guest, small_fs):
    filler = small_fs / "filler"
    with open(filler, "wb") as handle:
        try:
            handle.write(bytes(2 * 1024 * 1024))
        except OSError:
            pass
    guest.qemu.memory = 0
    image = small_fs / "guest.save"
    with pytest.raises(MigrationError, match="failed: No space left on device"):
        save(guest, image)
    assert_resumed_and_clean(guest, image)


# --- after the image is in place ---------------------------------------------------------------------

def test_quit_failing_after_the_rename_keeps_the_image(guest, image):
    guest.process.server.error("quit", "GenericError", "quit is not allowed now")
    with pytest.raises(MonitorError, match="quit is not allowed now"):
        save(guest, image)
    assert read_image(str(image)).complete, "the image was sealed before the guest was ended"
    assert temp_files(image) == []


def test_qemu_not_exiting_after_quit(guest, image, monkeypatch):
    monkeypatch.setattr(_save, "QUIT_TIMEOUT", 0.2)  # the wait for the exit, not the behaviour under test
    guest.process.server.reply("quit", {})            # answers, but does not exit
    with pytest.raises(MigrationError, match=rf"the image is saved, but QEMU \(pid {guest.process.pid}\) did not "
                                             "exit within 0.2 s of 'quit'"):
        save(guest, image)
    assert read_image(str(image)).complete


def test_qemu_closing_the_connection_on_quit_is_normal(guest, image):
    def quit_and_hang_up(call):
        guest.process.exit(0, "")
        guest.process.hang_up()
        return DROP
    guest.process.server.on("quit", quit_and_hang_up)
    assert save(guest, image).guest["state"] == "stopped"


# --- a save that a killed run left behind ------------------------------------------------------------

def write_journal(guest: Guest, image: Path, temp: Path, was_running: bool = True,
                  final: Path | None = None) -> JournalStore:
    store = JournalStore(guest_key(guest.host.uuid, guest.host.name, guest.process.pid))
    store.store(SaveJournal(guest.process.pid, process_start_time(guest.process.pid), was_running, str(temp),
                            str(final or image), "raw"))
    return store


def orphan(guest: Guest, image: Path) -> Path:
    """The temporary file a killed run left: the whole stream, the partial magic."""
    temp = image.parent / f".{image.name}.abc123.partial"
    make_savestate_image(temp, replace(savestate_record(), name=guest.host.name, uuid=guest.host.uuid),
                         finalize=False)
    return temp


def postmigrate(guest: Guest, status: str = "completed") -> None:
    guest.qemu.status = "postmigrate" if status == "completed" else "paused"
    guest.qemu.migration = {"status": status}


def test_an_interrupted_save_that_qemu_finished_is_sealed_and_not_streamed_again(guest, image):
    temp = orphan(guest, image)
    write_journal(guest, image, temp)
    postmigrate(guest)

    outcome = save(guest, image)
    assert outcome.changed and read_image(str(image)).complete
    assert not temp.exists()
    assert "migrate" not in guest.commands() and guest.process.wait_gone()


def test_an_interrupted_save_killed_after_the_rename_only_ends_the_guest(guest, image):
    make_savestate_image(image, replace(savestate_record(), name=guest.host.name, uuid=guest.host.uuid))
    write_journal(guest, image, image.parent / ".gone.partial")
    postmigrate(guest)
    assert save(guest, image).guest["state"] == "stopped"
    assert "migrate" not in guest.commands()


@pytest.mark.parametrize("status", ["failed", "cancelled", "none"])
def test_an_interrupted_save_that_did_not_finish_is_discarded_and_done_again(guest, image, status):
    temp = orphan(guest, image)
    write_journal(guest, image, temp)
    postmigrate(guest, status)

    outcome = save(guest, image)
    assert outcome.changed and not temp.exists()
    assert "migrate" in guest.commands()
    assert read_image(str(image)).was_running, "the journal remembers the guest was running before the killed run"


def test_an_interrupted_save_to_another_path_of_a_running_guest_is_done_again(guest, image, tmp_path):
    temp = orphan(guest, image)
    write_journal(guest, image, temp, final=tmp_path / "elsewhere.save")
    postmigrate(guest)
    outcome = save(guest, image)
    assert outcome.changed and guest.commands().count("cont") >= 1 and "migrate" in guest.commands()


def test_an_interrupted_save_of_a_paused_guest_to_another_path_is_refused(guest, image, tmp_path):
    temp = orphan(guest, image)
    store = write_journal(guest, image, temp, was_running=False, final=tmp_path / "elsewhere.save")
    postmigrate(guest)
    with pytest.raises(PreconditionError, match="was saved by an interrupted run to .*elsewhere.save"):
        save(guest, image)
    assert "cont" not in guest.commands()
    store.remove()


def test_an_interrupted_migration_still_running_is_cancelled(guest, image):
    temp = orphan(guest, image)
    store = write_journal(guest, image, temp)
    guest.qemu.status, guest.qemu.migration = "paused", {"status": "active"}
    with pytest.raises(MigrationError, match="a migration started by an interrupted save is still running; it was "
                                             "cancelled"):
        save(guest, image, timeout=0.3)
    assert "migrate_cancel" in guest.commands()
    assert store.load() is not None, "the next run finds the cancelled migration and saves again"
    store.remove()


def test_an_unusable_interrupted_file_is_reported(guest, image):
    temp = image.parent / ".guest.save.x.partial"
    temp.write_bytes(b"garbage")
    store = write_journal(guest, image, temp)
    postmigrate(guest)
    with pytest.raises(MigrationError, match="the interrupted save's file .* is unusable"):
        save(guest, image)
    store.remove()


def test_a_journal_of_a_process_that_is_gone_is_ignored(guest, image):
    store = JournalStore(guest_key(guest.host.uuid, guest.host.name, 0))
    store.store(SaveJournal(guest.process.pid, 1, False, str(image) + ".partial", str(image), "raw"))
    outcome = save(guest, image)
    assert outcome.changed and read_image(str(image)).was_running


# --- a guest QEMU already migrated, with no journal ---------------------------------------------------

def test_postmigrate_without_a_journal(guest, image):
    postmigrate(guest)
    with pytest.raises(PreconditionError, match="is in QEMU's postmigrate state"):
        save(guest, image)
    make_savestate_image(image, replace(savestate_record(), name=guest.host.name, uuid=guest.host.uuid))
    outcome = save(guest, image, after_save="paused")
    assert not outcome.changed and "already saved" in outcome.msg
    outcome = save(guest, image, check_mode=True)
    assert outcome.changed and outcome.msg.startswith("would end")
    assert save(guest, image, after_save="running").guest["state"] == "running"


def test_helpers_of_no_interest(tmp_path):
    """The image of another format at the path is described without error (used by the before/after diff)."""
    path = make_image(tmp_path / "other.save")
    assert _save.inspect_target(str(path)).complete


def test_a_compressed_save_streams_through_the_compressor(guest, image):
    outcome = save(guest, image, image_format=ImageFormat.GZIP)
    saved = read_image(str(image))
    assert outcome.changed and saved.format == ImageFormat.GZIP
    with open(image, "rb") as handle:
        handle.seek(saved.stream_offset)
        assert gzip.decompress(handle.read()) == STREAM


def test_qemu_must_agree_with_the_uuid_given(guest, image):
    request = SaveRequest(path=str(image), uuid=guest.host.uuid, socket=guest.qmp)
    guest.qemu.uuid = "11111111-2222-3333-4444-555555555555"
    with pytest.raises(PreconditionError, match="has UUID 11111111-2222-3333-4444-555555555555, not"):
        save_guest(request, scan=guest.scan)


def test_a_peer_answering_nonsense_once_the_guest_is_paused_gets_it_resumed(guest, image):
    guest.process.server.reply("query-target", {"arch": ""})
    with pytest.raises(MonitorError, match="names no architecture"):
        save(guest, image)
    assert_resumed_and_clean(guest, image)
    guest.process.server.reply("query-kvm", ["not", "an", "object"])
    with pytest.raises(MonitorError, match="answer to query-kvm is not an object"):
        save(guest, image)
    assert_resumed_and_clean(guest, image)


def test_a_sparse_save_turns_mapped_ram_on_for_the_save_only(guest, image):
    outcome = save(guest, image, image_format=ImageFormat.SPARSE, parallel_channels=2, after_save="running")
    assert outcome.changed and read_image(str(image)).format == ImageFormat.SPARSE
    set_calls = guest.process.server.calls_of("migrate-set-capabilities")
    assert {"capability": "mapped-ram", "state": True} in set_calls[0].arguments["capabilities"]
    assert guest.qemu.capabilities["mapped-ram"] is False and guest.qemu.parameters["multifd-channels"] == 2
