"""Fault injection beyond test_save.py and test_restore.py: what docs/reliability.md lists.

The rule every case checks: the guest is active in its prior state or a complete,
restorable image exists (never neither); nothing half-written stays at the target
path; no QEMU or helper process is left; the message says what happened.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import threading
import time

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._errors import SaveStateError
from ansible_collections.savestate.qemu.plugins.module_utils._image import read_image, write_new_image
from ansible_collections.savestate.qemu.plugins.module_utils._image_auth import signing_xml
from ansible_collections.savestate.qemu.plugins.module_utils._image_key import load_key
from harness.guest import GuestSpec
from harness.processes import qemu_processes
from integration.ansible_runner import run_module
from integration.common import (
    assert_continued,
    damaged_copy,
    flip,
    nothing_started,
    ok,
    restore,
    restore_fails_cleanly,
    save,
)

pytestmark = pytest.mark.integration


def _incoming_qemu(workdir, timeout: float = 60.0) -> int:
    """The pid of the QEMU a restore started (it waits with -incoming)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in qemu_processes(str(workdir)):
            if "-incoming" in process.argv:
                return process.pid
        time.sleep(0.01)
    raise TimeoutError("the restore started no QEMU")


def test_restored_qemu_killed_mid_load(qemu, guest_factory, workdir):
    """SIGKILL the new QEMU while bzip2 feeds it: a clean failure, and the image still restores."""
    guest = guest_factory(GuestSpec(name="killed-load", qemu=qemu, fill_mib=32))
    path = workdir / "killed-load.save.bz2"
    ok(save(guest, path, format="bzip2"))
    saved_tick = guest.last_tick()
    image = path.read_bytes()

    def kill_incoming() -> None:
        pid = _incoming_qemu(workdir)
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_incoming)
    killer.start()
    message = restore_fails_cleanly(path, guest.spec.uuid, workdir, "QEMU")
    killer.join()
    assert "killed by signal 9" in message or "exited" in message, message
    assert path.read_bytes() == image

    ok(restore(path))
    assert_continued(guest, saved_tick)


# Header fields and XML places a bit flip can hit; each must end in a refusal before
# QEMU starts, never in a traceback or a guest started from a damaged record.
HEADER_FLIPS = {
    "magic": 3,
    "version": 16,
    "data_len (high byte)": 23,
    "format": 28,
    "cookie offset": 35,
}


def test_header_and_xml_bit_flips_are_refused(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="flipped", qemu=qemu))
    good = workdir / "good.save"
    ok(save(guest, good))
    data = good.read_bytes()
    xml_start = 92
    positions = dict(HEADER_FLIPS)
    positions["XML root element"] = xml_start + 1
    positions["domain name"] = data.index(b"<name>flipped") + len("<name>")
    positions["closing tag"] = data.index(b"</domain>") + 2
    positions["metadata namespace"] = data.index(b"xmlns:savestate=") + 20
    positions["XML terminator"] = data.index(b"\0", xml_start)

    for label, position in positions.items():
        path = damaged_copy(good, workdir / f"{label}.save", flip(position))
        result = restore(path)
        assert result["failed"], f"{label}: a damaged image was restored"
        assert str(path) in result["msg"] or "image" in result["msg"], f"{label}: {result['msg']}"
        assert "Traceback" not in result["_stdout"], label
        nothing_started(workdir)


def _hostile_copy(good, target, xml: str) -> None:
    """``good``'s stream behind a data area holding ``xml``, signed with the host key when the XML parses.

    Signed, these test the checks behind the MAC (as if the key had leaked): each must hold on its own.
    """
    image = read_image(str(good))
    try:
        xml, seal = signing_xml(xml, load_key())
    except SaveStateError:
        seal = None  # XML we refuse to parse cannot be signed: the parser refuses it on restore
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        header = write_new_image(fd, xml, None, image.was_running, image.format, seal=seal)
        with open(good, "rb") as source:
            source.seek(image.stream_offset)
            os.write(fd, source.read())
        os.pwrite(fd, b"LibvirtQemudSave", 0)
        assert header.stream_offset > 0
    finally:
        os.close(fd)


def test_hostile_images_are_refused_before_anything_runs(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="target", qemu=qemu))
    good = workdir / "good.save"
    ok(save(guest, good))
    xml = read_image(str(good)).xml

    laughs = ('<?xml version="1.0"?>\n<!DOCTYPE domain [<!ENTITY a "aaaaaaaaaa">'
              + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(8))
              + "]>\n" + xml.replace("<name>target</name>", "<name>&i;</name>"))
    _hostile_copy(good, workdir / "laughs.save", laughs)
    restore_fails_cleanly(workdir / "laughs.save", guest.spec.uuid, workdir, "DOCTYPE")

    external = ('<?xml version="1.0"?>\n<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/shadow">]>\n'
                + xml.replace("<name>target</name>", "<name>&x;</name>"))
    _hostile_copy(good, workdir / "external.save", external)
    restore_fails_cleanly(workdir / "external.save", guest.spec.uuid, workdir, "DOCTYPE")

    oversized = damaged_copy(good, workdir / "oversized.save",
                             lambda data: data.__setitem__(slice(20, 24), struct.pack("<I", 0xFFFFFFF0)))
    restore_fails_cleanly(oversized, guest.spec.uuid, workdir, "data")

    other_program = re.sub(r"<savestate:emulator>[^<]*</savestate:emulator>",
                           "<savestate:emulator>/bin/sh</savestate:emulator>", xml)
    assert other_program != xml
    _hostile_copy(good, workdir / "shell.save", other_program)
    restore_fails_cleanly(workdir / "shell.save", guest.spec.uuid, workdir,
                          "must be a QEMU system emulator")

    renamed = xml.replace("<name>target</name>", "<name>impostor</name>", 1)
    _hostile_copy(good, workdir / "impostor.save", renamed)
    restore_fails_cleanly(workdir / "impostor.save", guest.spec.uuid, workdir,
                          "recorded command line runs 'target'")
    ok(restore(good))  # the untouched original still restores


def test_image_replaced_by_another_guests_image(qemu, guest_factory, workdir):
    """The file at the path now holds another guest: restore brings back that guest, only if asked."""
    first = guest_factory(GuestSpec(name="replaced", qemu=qemu))
    second = guest_factory(GuestSpec(name="replacement", qemu=qemu))
    path, other = workdir / "replaced.save", workdir / "replacement.save"
    ok(save(first, path))
    ok(save(second, other))
    os.replace(other, path)
    message = restore_fails_cleanly(path, second.spec.uuid, workdir, "not 'replaced'", name="replaced")
    assert "'replacement'" in message
    result = ok(run_module("save_image_info", {"path": str(path)}))
    assert result["image"]["name"] == "replacement"
