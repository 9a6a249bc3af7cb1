"""The restore's pure decisions on real files: the command line, trust, the emulator, disks, cwd.

Trust checks run on real files and directories under ``tmp_path``; other owners
are real ``chown`` calls (the tests run as root), never mocks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import DiskRecord, GuestRecord
from ansible_collections.savestate.qemu.plugins.module_utils._errors import (
    MigrationError,
    MonitorClosedError,
    MonitorTimeoutError,
    PreconditionError,
    QMPCommandError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._restore_launch import (
    EXIT_GRACE,
    EXIT_GRACE_ANSWERED,
    exit_grace,
    launch_directory,
    restore_argv,
)
from ansible_collections.savestate.qemu.plugins.module_utils._restore_trust import check_emulator, disk_changes

QEMU = "/usr/bin/qemu-system-x86_64"
OTHER_UID = 4321
MACHINE = "pc-i440fx-10.0"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the ownership cases chown files")


def record(*args: str, machine: str | None = MACHINE) -> GuestRecord:
    return GuestRecord(name="g", uuid="11111111-2222-3333-4444-555555555555", memory_kib=131072,
                       machine=machine, emulator=QEMU, argv=(QEMU, *args))


def after(argv: list[str], option: str) -> list[str]:
    """Every value of ``option`` in ``argv``."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == option]


# --- restore_argv ---------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ("-incoming", "defer", "-m", "128"),
    ("--incoming", "tcp:0:4444", "-m", "128"),
    ("-m", "128", "-loadvm", "snap1"),
    ("-m", "128", "--loadvm", "snap1", "-S"),
    ("-S", "-daemonize", "-incoming", "defer", "-m", "128", "--daemonize"),
])
def test_restore_argv_drops_what_would_undo_the_restore(args):
    argv = restore_argv(record(*args), QEMU, None)
    assert argv[:3] == [QEMU, "-m", "128"]
    assert argv[3:] == ["-machine", MACHINE, "-S", "-incoming", "defer"]
    for dropped in ("snap1", "tcp:0:4444", "-loadvm", "--loadvm", "--incoming", "-daemonize", "--daemonize"):
        assert dropped not in argv


@pytest.mark.parametrize("option, value, pinned", [
    ("-machine", "pc", MACHINE),
    ("-M", "pc", MACHINE),
    ("--machine", "pc,accel=tcg", f"{MACHINE},accel=tcg"),
    ("-machine", "type=pc,accel=kvm", f"type={MACHINE},accel=kvm"),
    ("-machine", "accel=kvm,type=q35", f"accel=kvm,type={MACHINE}"),
    ("-machine", "accel=tcg", f"type={MACHINE},accel=tcg"),
    ("-machine", "pc,memory-backend=a,,b", f"{MACHINE},memory-backend=a,,b"),
    ("-machine", "type=pc,,x,dump-guest-core=off", f"type={MACHINE},dump-guest-core=off"),
])
def test_restore_argv_pins_the_saved_machine_type(option, value, pinned):
    argv = restore_argv(record("-m", "128", option, value), QEMU, None)
    assert argv[1:5] == ["-m", "128", option, pinned]
    assert argv.count(option) == 1, "the machine must not be given twice"


def test_restore_argv_adds_the_machine_when_the_record_has_none_on_the_command_line():
    assert restore_argv(record("-m", "128"), QEMU, None)[3:5] == ["-machine", MACHINE]
    assert restore_argv(record("-m", "128", machine=None), QEMU, None) == \
        [QEMU, "-m", "128", "-S", "-incoming", "defer"]


def test_restore_argv_runs_the_emulator_and_adds_the_private_monitor_once():
    argv = restore_argv(record("-m", "128", "-qmp", "tcp:127.0.0.1:4444,server=on,wait=off"),
                        "/opt/qemu/bin/qemu-system-x86_64", "/run/savestate-qemu/g.qmp")
    assert argv[0] == "/opt/qemu/bin/qemu-system-x86_64"
    assert after(argv, "-qmp") == ["tcp:127.0.0.1:4444,server=on,wait=off",
                                   "unix:/run/savestate-qemu/g.qmp,server=on,wait=off"]
    # A guest saved after a restore already carries the private monitor on its command line.
    again = restore_argv(record(*argv[1:-3]), QEMU, "/run/savestate-qemu/g.qmp")
    assert after(again, "-qmp") == after(argv, "-qmp")


def test_restore_argv_keeps_everything_else_exactly():
    args = ("-name", "guest=a b,debug-threads=on", "-drive", "file=/x,,y.img,if=virtio", "-append", "",
            "-chardev", "file,id=s,path=rel/serial.log")
    assert restore_argv(record(*args), QEMU, None)[1:len(args) + 1] == list(args)


# The image trust checks (open_image, the MAC) are tested in test_image_auth.py.


# --- check_emulator -------------------------------------------------------------------------

@pytest.fixture
def emulator() -> Iterator[Path]:
    """A stand-in emulator where a trusted one lives: in directories only root can write (not /tmp)."""
    directory = Path(tempfile.mkdtemp(prefix="ssq-bin-", dir="/run"))
    directory.chmod(0o755)
    path = directory / "qemu-system-x86_64"
    shutil.copy("/bin/true", path)
    path.chmod(0o755)
    yield path
    shutil.rmtree(directory)


def test_a_qemu_binary_is_accepted(emulator):
    assert check_emulator(str(emulator)) == str(emulator)
    assert check_emulator("qemu-system-x86_64") == shutil.which("qemu-system-x86_64")


@pytest.mark.parametrize("program", ["/bin/true", "/bin/sh", "/usr/bin/env", "qemu-img", "/opt/kvm"])
def test_other_programs_are_refused_by_name(program):
    with pytest.raises(PreconditionError, match="must be a QEMU system emulator"):
        check_emulator(program)


def test_a_link_to_another_program_is_refused(tmp_path):
    disguised = tmp_path / "qemu-system-x86_64"
    disguised.symlink_to("/bin/true")
    with pytest.raises(PreconditionError, match=f"is a link to {os.path.realpath('/bin/true')}"):
        check_emulator(str(disguised))


def test_a_missing_or_unusable_emulator(emulator, tmp_path):
    with pytest.raises(PreconditionError, match="does not exist or is not executable"):
        check_emulator(str(tmp_path / "qemu-system-aarch64"))
    emulator.chmod(0o644)
    with pytest.raises(PreconditionError, match="does not exist or is not executable"):
        check_emulator(str(emulator))


@pytest.mark.parametrize("mode, owner, problem", [(0o775, 0, "is writable by group or others"),
                                                  (0o757, 0, "is writable by group or others"),
                                                  (0o755, OTHER_UID, f"is owned by uid {OTHER_UID}, not root")])
def test_an_emulator_others_can_replace_is_refused(emulator, mode, owner, problem):
    emulator.chmod(mode)
    os.chown(emulator, owner, -1)
    with pytest.raises(PreconditionError, match=f"not a trusted QEMU emulator: {emulator} {problem}"):
        check_emulator(str(emulator))


def test_an_emulator_in_a_directory_others_can_write_is_refused(emulator):
    emulator.parent.chmod(0o1777)  # sticky does not help: the binary itself could be swapped before it runs
    with pytest.raises(PreconditionError, match=f"its directory {emulator.parent} is writable by group or others"):
        check_emulator(str(emulator))


def test_the_resolved_path_is_what_runs(emulator, tmp_path):
    link = tmp_path / "qemu-system-x86_64"
    link.symlink_to(emulator)
    assert check_emulator(str(link)) == str(emulator)


# --- disk_changes -----------------------------------------------------------------------------

def fingerprint(path: Path) -> DiskRecord:
    info = path.stat()
    return DiskRecord(path=str(path), format="raw", size=info.st_size, mtime_ns=info.st_mtime_ns)


def test_unchanged_disks_pass(tmp_path):
    disk = tmp_path / "a.raw"
    disk.write_bytes(bytes(4096))
    network = DiskRecord(path="nbd://host/export", size=None, mtime_ns=None)  # nothing to compare
    assert disk_changes((fingerprint(disk), network)) == []


def test_changed_disks_are_named(tmp_path):
    touched, grown, gone = (tmp_path / name for name in ("touched.raw", "grown.raw", "gone.raw"))
    for disk in (touched, grown, gone):
        disk.write_bytes(bytes(4096))
    records = tuple(fingerprint(disk) for disk in (touched, grown, gone))
    os.utime(touched, ns=(0, records[0].mtime_ns + 1))
    with open(grown, "ab") as handle:
        handle.write(b"x")
    gone.unlink()
    assert disk_changes(records) == [f"{touched} was modified after the save",
                                     f"{grown} changed size (4096 -> 4097 bytes)",
                                     f"{gone} is gone"]


def test_size_alone_is_compared_when_that_is_all_the_record_has(tmp_path):
    disk = tmp_path / "a.raw"
    disk.write_bytes(bytes(10))
    os.utime(disk, ns=(0, 1))
    assert disk_changes((DiskRecord(path=str(disk), size=10),)) == []
    assert disk_changes((DiskRecord(path=str(disk), size=11),)) == [f"{disk} changed size (11 -> 10 bytes)"]


# --- launch_directory ---------------------------------------------------------------------------

def test_qemu_starts_where_it_ran(tmp_path):
    assert launch_directory(str(tmp_path)) == (str(tmp_path), None)


def test_a_gone_or_unrecorded_directory_falls_back_to_root_with_a_warning(tmp_path):
    gone = tmp_path / "gone"
    directory, warning = launch_directory(str(gone))
    assert directory == "/" and f"working directory at the save, {gone}, is gone" in warning
    directory, warning = launch_directory(None)
    assert directory == "/" and "does not record QEMU's working directory" in warning
    assert "relative paths on its command line resolve from /" in warning


@pytest.mark.parametrize("error, grace", [
    (MonitorClosedError("the monitor closed"), EXIT_GRACE),
    (MonitorTimeoutError("no reply"), EXIT_GRACE),
    (QMPCommandError("cont", "GenericError", "Resetting the VM failed"), EXIT_GRACE_ANSWERED),
    (MigrationError("migration failed"), EXIT_GRACE_ANSWERED),
])
def test_only_a_lost_monitor_waits_for_qemu_to_exit(error, grace):
    """A QMP error reply came from a QEMU that was up to send it: its failure is reported at once."""
    assert exit_grace(error) == grace
