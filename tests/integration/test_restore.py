"""The restore module on real guests, QEMU 10.0 and 7.2: states, conflicts, checks, failures.

test_save.py already restores every format, odd paths, TCP monitors and the
save's restore_state override; this file covers what the restore module itself
decides. Every failure case ends with no QEMU and no decompressor left behind and
the image byte for byte as it was.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import uuid as uuidlib
from pathlib import Path

import pytest

from harness.guest import GuestSpec, qmp_execute
from harness.processes import kill_and_wait
from harness.qemu import QEMU72, SYSTEM_QEMU
from integration.ansible_runner import run_module
from integration.common import (
    RUNTIME_DIR,
    assert_continued,
    assert_frozen,
    cut,
    damaged_copy,
    failed,
    flip,
    kill_helper_once_running,
    nothing_started,
    ok,
    restore,
    restore_fails_cleanly,
    save,
)

pytestmark = pytest.mark.integration

# A NIC (no network behind it) brings an option ROM and a PCI device into the stream.
NIC = ("-device", "virtio-net-pci,netdev=n0", "-netdev", "user,id=n0")


def _exe(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/exe")


# --- states ---------------------------------------------------------------------------------

def test_states_and_overrides(qemu, guest_factory, workdir):
    """Running and paused images, as_saved/running/paused, an active paused guest resumed."""
    guest = guest_factory(GuestSpec(name="states", qemu=qemu))
    path = workdir / "states.save"
    guest.wait_tick_above(3)

    # A running guest comes back running, continuing its heartbeat; on this QEMU build.
    ok(save(guest, path))
    saved_tick = guest.last_tick()
    restored = ok(restore(path, diff=True))
    assert restored["changed"] and restored["guest"]["state"] == "running"
    assert restored["diff"] == {"before": {"guest": {"state": "stopped"}, "image": {"exists": True}},
                                "after": {"guest": {"state": "running"}, "image": {"exists": True}}}
    assert restored["image"]["metadata"]["qemu_version"].startswith(qemu.name + ".")
    assert _exe(restored["guest"]["pid"]) == str(qemu.binary), "restored by another QEMU build"
    assert restored["stats"]["bytes"] == path.stat().st_size
    assert_continued(guest, saved_tick)

    # Overridden to paused; already active and paused, as_saved leaves it alone, running resumes it.
    ok(save(guest, path))
    saved_tick = guest.last_tick()
    paused = ok(restore(path, state="paused"))
    assert paused["changed"] and paused["guest"]["state"] == "paused" and guest.status() == "paused"
    assert_frozen(guest)
    left = ok(restore(path))
    assert not left["changed"] and left["guest"]["state"] == "paused" and guest.status() == "paused"
    assert left["guest"]["pid"] == paused["guest"]["pid"]
    predicted = ok(restore(path, state="running", check=True, diff=True))
    assert predicted["changed"] and guest.status() == "paused"
    assert predicted["diff"]["after"]["guest"]["state"] == "running"
    resumed = ok(restore(path, state="running", diff=True))
    assert resumed["changed"] and resumed["guest"]["state"] == "running" and guest.status() == "running"
    assert resumed["diff"]["before"]["guest"]["state"] == "paused"
    assert_continued(guest, saved_tick)
    assert not ok(restore(path, state="running"))["changed"]
    assert not ok(restore(path, check=True))["changed"]

    # A paused guest comes back paused, and running when asked to.
    guest.qmp("stop")
    ok(save(guest, path))
    saved_tick = guest.last_tick()
    assert ok(restore(path))["guest"]["state"] == "paused"
    assert_frozen(guest)
    image = ok(save(guest, path))["image"]  # saved again, as restored: paused
    assert image["was_running"] is False
    assert ok(restore(path, state="running"))["guest"]["state"] == "running"
    assert_continued(guest, saved_tick)


# --- a damaged image: QEMU's reason, nothing left behind, the image untouched ----------------


def _section_name(stream: bytes, idstr: bytes) -> int:
    """Where a device section's name is: QEMU_VM_SECTION_FULL, section id, length, name, instance 0."""
    match = re.search(rb"\x04\x00\x00\x00.(?=" + bytes([len(idstr)]) + re.escape(idstr) + rb"\x00{4})",
                      stream, re.DOTALL)
    assert match, f"no {idstr!r} section in the stream"
    return match.end() + 1


def _rom(directory: Path, size: int) -> Path:
    rom = directory / f"{size}.rom"
    rom.write_bytes(bytes(size))
    return rom


def _edited(source: Path, target: Path, old: str, new: str) -> Path:
    """A copy of ``source`` whose recorded command line has ``old`` replaced by ``new``."""
    shutil.copy(source, target)
    xml = ok(run_module("save_image_info", {"path": str(target)}))["xml"]
    old_arg, new_arg = f"<savestate:arg>{old}</savestate:arg>", f"<savestate:arg>{new}</savestate:arg>"
    assert old_arg in xml
    ok(run_module("save_image_define", {"path": str(target), "xml": xml.replace(old_arg, new_arg)}))
    return target


def test_damaged_streams_fail_cleanly(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="damaged", qemu=qemu, extra_args=NIC))
    good, compressed = workdir / "good.save", workdir / "good.save.zst"
    ok(save(guest, compressed, format="zstd", after_save="running"))
    image = ok(save(guest, good))["image"]
    saved_tick = guest.last_tick()
    offset, stream = image["stream_offset"], good.read_bytes()[image["stream_offset"]:]
    rejected = "QEMU rejected the image: it exited with status 1" if qemu.name == "7.2" else \
        "QEMU's migration from the image failed: load of migration failed"
    cases = {  # what was damaged: (how, QEMU's words)
        "cut mid-stream": (cut(offset + len(stream) // 2), "load of migration failed: Input/output error"),
        "stream version": (flip(offset + 7), "Unsupported migration stream version"),
        "machine type": (flip(offset + stream.index(image["machine"].encode())), "Machine type received is"),
        "device section": (flip(offset + _section_name(stream, b"timer")), "Unknown savevm section or instance"),
        "RAM block": (flip(offset + stream.index(b"\x06pc.ram") + 1), "Unknown ramblock"),
    }
    for label, (edit, reason) in cases.items():
        path = damaged_copy(good, workdir / f"{label}.save", edit)
        message = restore_fails_cleanly(path, guest.spec.uuid, workdir, rejected, reason, remove_image=True)
        assert "QEMU said: qemu-system-x86_64: " in message, label

    # Another device set than the stream's: QEMU names what does not fit.
    nic = NIC[1]
    for label, replacement, reason in (
            ("other device", "virtio-rng-pci", 'Unknown ramblock "0000:00:02.0/virtio-net-pci.rom"'),
            ("bigger ROM", f"{nic},romfile={_rom(workdir, 300_000)}",
             "Size mismatch: 0000:00:02.0/virtio-net-pci.rom: 0x40000 != 0x80000")):
        path = _edited(good, workdir / f"{label}.save", nic, replacement)
        restore_fails_cleanly(path, guest.spec.uuid, workdir, rejected, reason)

    data = good.read_bytes()
    cut_compressed = damaged_copy(compressed, workdir / "cut.save.zst", cut(len(compressed.read_bytes()) * 2 // 3))
    restore_fails_cleanly(cut_compressed, guest.spec.uuid, workdir, "zstd exited with status 1", "premature end",
                          rejected)
    partial = damaged_copy(good, workdir / "partial.save", lambda d: d.__setitem__(slice(12, 16), b"Part"))
    restore_fails_cleanly(partial, guest.spec.uuid, workdir, "save image is incomplete")
    assert good.read_bytes() == data

    ok(restore(good, remove_image=True))
    assert not good.exists(), "remove_image: the image stays until the guest is back"
    assert_continued(guest, saved_tick)


def test_timeout_and_a_dying_decompressor(qemu, guest_factory, workdir):
    """bzip2 decompresses a few MiB/s of random RAM: slow enough to time out and to kill."""
    guest = guest_factory(GuestSpec(name="slow-load", qemu=qemu, fill_mib=32))
    path = workdir / "slow.save.bz2"
    ok(save(guest, path, format="bzip2"))
    saved_tick = guest.last_tick()

    restore_fails_cleanly(path, guest.spec.uuid, workdir, "did not load within the timeout of 0.5 s",
                          "QEMU was stopped", timeout=0.5)
    killer = kill_helper_once_running("bzip2", workdir)
    message = restore_fails_cleanly(path, guest.spec.uuid, workdir, "bzip2 was killed by signal 9")
    killer.join()
    assert message.startswith(("the decompressor failed", "bzip2", "QEMU's migration")), message

    ok(restore(path))
    assert_continued(guest, saved_tick)


# --- checks before anything runs ---------------------------------------------------------------

def test_conflicts_with_hand_started_guests(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="contested", qemu=qemu))
    path = workdir / "contested.save"
    ok(save(guest, path))

    predicted = ok(restore(path, check=True, diff=True))
    assert predicted["changed"] and predicted["guest"]["state"] == "running" and predicted["guest"]["pid"] is None
    assert predicted["diff"]["after"]["guest"]["state"] == "running"
    nothing_started(workdir)
    assert not list(RUNTIME_DIR.glob(f"{guest.spec.uuid}*")), "check mode left runtime files"

    # A QEMU of this very guest still waiting for a stream: an interrupted restore's leftover.
    waiting = subprocess.Popen(guest.argv + ["-incoming", "defer"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_socket(guest.qmp_socket)
        failed(restore(path), "already active, but as a QEMU still waiting for or loading an incoming migration",
               f"kill {waiting.pid}")
    finally:
        waiting.kill()
        waiting.wait()

    impostor = guest_factory(GuestSpec(name="contested", qemu=qemu), subdir="impostor")
    for check in (True, False):
        failed(restore(path, check=check), f"domain 'contested' already exists with uuid {impostor.spec.uuid}",
               f"pid {impostor.pid}")
    nothing_started(guest.workdir)
    impostor.stop()
    holder = guest_factory(GuestSpec(name="holder", uuid=guest.spec.uuid, qemu=qemu))
    failed(restore(path), f"domain 'holder' is already defined with uuid {guest.spec.uuid}", f"pid {holder.pid}")
    nothing_started(guest.workdir)
    holder.stop()

    failed(restore(path, name="other"), f"{path} is a save image of guest 'contested', not 'other'")
    other_uuid = str(uuidlib.uuid4())
    failed(restore(path, uuid=other_uuid), f"is a save image of uuid {guest.spec.uuid}, not {other_uuid}")
    nothing_started(guest.workdir)
    restored = ok(restore(path, name="contested", uuid=guest.spec.uuid.upper(), remove_image=True))
    assert restored["changed"] and not path.exists()

    # The image is gone; the name says which guest an earlier run restored.
    again = ok(restore(path, name="contested", remove_image=True, diff=True))
    assert not again["changed"] and again["guest"]["pid"] == restored["guest"]["pid"]
    assert again["guest"]["state"] == "running"
    failed(restore(path, remove_image=True), "does not exist", "give the guest's name or uuid")
    failed(restore(path, name="nobody", remove_image=True), "does not exist, and no active guest has name nobody")


def _wait_for_socket(path: Path, timeout: float = 30.0) -> None:
    """Until something listens on the unix socket ``path`` (a stale file does not count)."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(str(path)) == 0:
                return
        assert time.monotonic() < deadline, f"nothing listens on {path}"
        time.sleep(0.05)


def test_conflicts_with_libvirt_guests(guest_factory, libvirt_host, workdir):
    """libvirt's guests count as active guests; ours never touches them, nor restores libvirt's images."""
    guest = guest_factory(GuestSpec(name="lv-contested"))
    path = workdir / "lv-contested.save"
    ok(save(guest, path))

    other_uuid = str(uuidlib.uuid4())
    cases = (("lv-contested", other_uuid, f"domain 'lv-contested' already exists with uuid {other_uuid}"),
             ("lv-holder", guest.spec.uuid, f"domain 'lv-holder' is already defined with uuid {guest.spec.uuid}"),
             ("lv-contested", guest.spec.uuid, "domain 'lv-contested' is already active (managed by libvirt"))
    for name, uuid, message in cases:
        libvirt_host.define_guest(name, uuid)
        libvirt_host.virsh("start", name)
        failed(restore(path), message, "managed by libvirt")
        nothing_started(guest.workdir)
        if name == "lv-contested" and uuid == guest.spec.uuid:
            break
        kill_and_wait(libvirt_host.qemu_pid(name))  # virsh destroy is unreliable in embedded mode
        libvirt_host.virsh("undefine", name)

    libvirt_image = workdir / "libvirt.save"
    libvirt_host.save("lv-contested", libvirt_image)
    failed(restore(libvirt_image), "is a libvirt save image", f"virsh restore {libvirt_image}")
    nothing_started(libvirt_host.root)


def test_untrusted_images_and_emulators_are_refused(qemu, guest_factory, workdir):
    """The image decides what runs: refused when others could have written it, before anything runs."""
    guest = guest_factory(GuestSpec(name="trust", qemu=qemu))
    path = workdir / "trust.save"
    ok(save(guest, path))
    saved_tick = guest.last_tick()

    for mode in (0o620, 0o602):
        path.chmod(mode)
        failed(restore(path), f"refusing the save image {path}: it is writable by group or others "
               f"(mode {mode:04o})", "chmod go-w")
        nothing_started(workdir)
    path.chmod(0o600)
    (workdir / "link.save").symlink_to(path)
    failed(restore(workdir / "link.save"), "refusing a symbolic link as save image")
    os.link(path, workdir / "hardlink.save")
    failed(restore(path), "it has 2 hard links")
    (workdir / "hardlink.save").unlink()
    nothing_started(workdir)
    shared = workdir / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    moved = shared / path.name
    path.rename(moved)

    failed(restore(moved, emulator="/nonexistent/qemu-system-x86_64"), "/nonexistent/qemu-system-x86_64",
           "does not exist")
    failed(restore(moved, emulator="/bin/true"), "refusing to run '/bin/true'", "QEMU system emulator")
    disguised = workdir / "qemu-system-x86_64"
    disguised.symlink_to("/bin/true")
    failed(restore(moved, emulator=str(disguised)), "is a link to /usr/bin/true", "not a QEMU system emulator")
    nothing_started(workdir)

    ok(restore(moved))
    assert_continued(guest, saved_tick)


def test_changed_disks(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="disky", qemu=qemu, disk_mib=4))
    path = workdir / "disky.save"
    ok(save(guest, path))
    saved_tick = guest.last_tick()

    os.utime(guest.disk)
    failed(restore(path), f"{guest.disk} was modified after the save", "disk_check: warn or ignore")
    nothing_started(workdir)
    warned = ok(restore(path, disk_check="warn"))
    assert any(f"{guest.disk} was modified after the save" in w for w in warned.get("warnings", [])), warned
    assert_continued(guest, saved_tick)

    ok(save(guest, path))
    saved_tick = guest.last_tick()
    with open(guest.disk, "ab") as disk:
        disk.write(b"\0" * 512)
    failed(restore(path), f"{guest.disk} changed size (4194304 -> 4194816 bytes)")
    ignored = ok(restore(path, disk_check="ignore"))
    assert not ignored.get("warnings")
    assert_continued(guest, saved_tick)


def test_relative_paths_resolve_where_qemu_ran(qemu, guest_factory, workdir, monkeypatch):
    """QEMU restarts in the working directory it was saved in: its relative paths still work."""
    rundir = workdir / "rel"
    rundir.mkdir()
    monkeypatch.chdir(rundir)
    guest = guest_factory(GuestSpec(name="rel", qemu=qemu, extra_args=("-qmp", "unix:rel.qmp,server=on,wait=off")))
    monkeypatch.undo()
    assert (guest.workdir / "rel.qmp").is_socket()
    path = workdir / "rel.save"
    image = ok(save(guest, path))["image"]
    assert image["metadata"]["cwd"] == str(guest.workdir)
    (guest.workdir / "rel.qmp").unlink(missing_ok=True)
    saved_tick = guest.last_tick()

    restored = ok(restore(path))
    assert not restored.get("warnings")
    assert qmp_execute(str(guest.workdir / "rel.qmp"), "query-status")["status"] == "running"
    assert_continued(guest, saved_tick)


# --- across QEMU versions --------------------------------------------------------------------

@pytest.mark.skipif(not QEMU72.binary.exists(), reason="QEMU 7.2 is not unpacked; run make setup")
def test_across_qemu_versions(guest_factory, workdir):
    """Older to newer on the same versioned machine type works; newer to older fails at start-up.

    The recorded command line of a 7.2 guest carries ``-L`` at 7.2's firmware, so
    QEMU 10.0 loads the same ROMs; the NIC's option ROM and the disk are part of
    the stream. QEMU 7.2 does not know ``pc-i440fx-10.0`` and exits at once.
    """
    old = guest_factory(GuestSpec(name="from-7.2", qemu=QEMU72, disk_mib=4, extra_args=NIC))
    new = guest_factory(GuestSpec(name="from-10.0", qemu=SYSTEM_QEMU))
    old_image, new_image = workdir / "from-7.2.save", workdir / "from-10.0.save"
    assert ok(save(old, old_image))["image"]["machine"] == "pc-i440fx-7.2"
    assert ok(save(new, new_image))["image"]["machine"] == "pc-i440fx-10.0"
    saved_tick = old.last_tick()

    upgraded = ok(restore(old_image, emulator=str(SYSTEM_QEMU.binary)))
    assert _exe(upgraded["guest"]["pid"]) == str(SYSTEM_QEMU.binary)
    assert old.qmp("query-machines") and old.qmp("qom-get", {"path": "/machine", "property": "type"}) \
        == "pc-i440fx-7.2-machine"
    assert_continued(old, saved_tick)
    # Saved again, it keeps the machine it runs: the 7.2 one.
    assert ok(save(old, old_image))["image"]["machine"] == "pc-i440fx-7.2"

    before = new_image.read_bytes()
    failed(restore(new_image, emulator=str(QEMU72.binary)),
           "QEMU did not start: it exited with status 1; QEMU said: qemu-system-x86_64: unsupported machine type",
           "saved on machine type pc-i440fx-10.0 by QEMU 10.0.")
    assert new_image.read_bytes() == before
    nothing_started(workdir / "from-10.0")
