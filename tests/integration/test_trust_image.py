"""Images are authenticated and opened once: a forged or planted image, or a planted journal, achieves nothing.

The attacker is an unprivileged user (``setpriv --reuid=nobody``) or, for a rewritten
command line, whoever held the image's descriptor (issue 12, item 2). Every test
asserts the effect is blocked: no program of the attacker's runs, no QEMU starts,
the image is not rolled back, nothing hangs.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import subprocess
import uuid as uuidlib
from dataclasses import replace
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils import _image
from ansible_collections.savestate.qemu.plugins.module_utils._image import (
    HEADER_SIZE,
    SaveHeader,
    journal_directory,
    read_image,
    rewrite_data_area,
)
from harness.guest import GuestSpec
from integration.ansible_runner import run_module
from integration.common import failed, nothing_started, ok, restore, save
from unit.image_helpers import write_libvirt_fixture

pytestmark = pytest.mark.integration

ATTACKER = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
NOBODY = 65534
# How long save_image_define may take on a small image, planted FIFO or not.
DEFINE_BOUND = 60.0


def _as_attacker(*argv: str, stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*ATTACKER, *argv], input=stdin, capture_output=True, timeout=30, check=check)


def _helper_script(directory: Path) -> tuple[Path, Path]:
    """A program that, if anything runs it, leaves a marker: the effect every test looks for."""
    directory.mkdir(mode=0o755, exist_ok=True)
    marker = directory / "helper-ran"
    helper = directory / "helper.sh"
    helper.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    helper.chmod(0o755)
    return helper, marker


def _with_bridge_helper(xml: str, helper: Path) -> str:
    """The recorded argv plus a -netdev whose helper QEMU executes at start-up (issue 12, item 2)."""
    forged = xml.replace("</savestate:argv>",
                         "<savestate:arg>-netdev</savestate:arg>"
                         f"<savestate:arg>bridge,id=evil,br=br0,helper={helper}</savestate:arg></savestate:argv>")
    assert forged != xml
    return forged


def _rewrite_in_place(path: Path, xml: str) -> None:
    """What a process holding the image's descriptor can do: new XML, same stream, old MAC element."""
    image = read_image(str(path))
    fd = os.open(path, os.O_RDWR)
    try:
        rewrite_data_area(fd, image.header, xml, image.cookie, path=str(path))
    finally:
        os.close(fd)


def _saved(guest_factory, qemu, workdir: Path, name: str) -> tuple[Path, object]:
    guest = guest_factory(GuestSpec(name=name, qemu=qemu))
    path = workdir / f"{name}.save"
    ok(save(guest, path))
    return path, guest


# --- (a) a rewritten command line ------------------------------------------------------------

def test_a_rewritten_command_line_is_refused_and_runs_nothing(qemu, guest_factory, workdir):
    path, _guest = _saved(guest_factory, qemu, workdir, "forged")
    helper, marker = _helper_script(workdir / "attacker")
    _rewrite_in_place(path, _with_bridge_helper(read_image(str(path)).xml, helper))
    info = ok(run_module("save_image_info", {"path": str(path)}))
    assert info["authenticated"] is False
    assert info["authentication_problem"] == "MAC mismatch: the header or data area changed after signing"

    before = path.read_bytes()
    failed(restore(path), f"refusing to restore {path}: the image is not authenticated (MAC mismatch",
           "allow_unauthenticated")
    failed(restore(path, check=True), "not authenticated")
    assert not marker.exists(), "the forged helper ran"
    assert path.read_bytes() == before
    nothing_started(workdir)

    # Other stored fields: the restore state in the header, another QEMU binary in argv[0].
    header = SaveHeader.unpack(before[:HEADER_SIZE])
    flipped = bytearray(before)
    flipped[:HEADER_SIZE] = replace(header, was_running=not header.was_running).pack()
    path.write_bytes(bytes(flipped))
    failed(restore(path), "MAC mismatch")
    nothing_started(workdir)


# --- (b) an image planted by another user -------------------------------------------------------

def test_an_image_planted_in_tmp_is_refused(qemu, guest_factory, workdir):
    path, _guest = _saved(guest_factory, qemu, workdir, "planted")
    helper, marker = _helper_script(Path("/tmp") / f"ssq-attacker-{uuidlib.uuid4().hex[:8]}")
    genuine = path.read_bytes()
    forged = workdir / "forged.save"
    forged.write_bytes(genuine)
    _rewrite_in_place(forged, _with_bridge_helper(read_image(str(forged)).xml, helper))
    planted = Path("/tmp") / f"ssq-planted-{uuidlib.uuid4().hex[:8]}.save"
    try:
        for content in (forged.read_bytes(), genuine):  # even a copy of a genuine, signed image
            if planted.exists():
                planted.unlink()
            _as_attacker("sh", "-c", f"umask 077; cat > {planted}", stdin=content)
            assert planted.stat().st_uid == NOBODY
            failed(restore(planted), f"refusing the save image {planted}: it is owned by uid {NOBODY}")
            assert not marker.exists(), "the planted image's helper ran"
            nothing_started(workdir)
            nothing_started(helper.parent)  # a QEMU the planted image could have started runs its helper
    finally:
        planted.unlink(missing_ok=True)
        for leftover in helper.parent.iterdir():
            leftover.unlink()
        helper.parent.rmdir()


# --- (c) a planted journal ------------------------------------------------------------------

def _planted_old_journal(image: Path, forged_xml: str, target: Path) -> None:
    """The sidecar journal today's main reads: "old" bytes holding a forged command line."""
    raw = image.read_bytes()
    header = SaveHeader.unpack(raw[:HEADER_SIZE])
    new_header, data = _image.new_data_area_header(header, forged_xml, None)
    old = new_header.pack() + data
    info = image.stat()
    body = struct.pack("<QQI", info.st_ino, info.st_size, len(old)) + old
    journal = struct.pack("<8sQQI32s", b"SSQJRNL1", info.st_ino, info.st_size, len(old),
                          hashlib.sha256(body).digest()) + old
    _as_attacker("sh", "-c", f"cat > {target}", stdin=journal)


def test_a_planted_journal_neither_hangs_nor_rolls_back(qemu, guest_factory, workdir):
    tmp_dir = Path("/tmp") / f"ssq-journal-{uuidlib.uuid4().hex[:8]}"
    tmp_dir.mkdir(mode=0o1777)
    tmp_dir.chmod(0o1777)  # like /tmp: anyone may add files
    guest = guest_factory(GuestSpec(name="journal", qemu=qemu))
    path = tmp_dir / "journal.save"
    helper, marker = _helper_script(workdir / "attacker")
    try:
        ok(save(guest, path))
        sidecar = Path(f"{path}.savestate-journal")
        private = Path(journal_directory())
        assert stat.S_IMODE(private.stat().st_mode) == 0o700 and private.stat().st_uid == 0
        refused = _as_attacker("sh", "-c", f"mkfifo {private}/x.journal", check=False)
        assert refused.returncode != 0, "nobody could plant a journal in the private directory"

        # A FIFO where the old sidecar journal was: nothing may open it.
        _as_attacker("mkfifo", str(sidecar))
        before = path.read_bytes()
        result = ok(run_module("save_image_define", {"path": str(path)}, timeout=DEFINE_BOUND))
        assert not result["changed"] and path.read_bytes() == before
        assert ok(run_module("save_image_info", {"path": str(path)}, timeout=DEFINE_BOUND))["authenticated"]
        sidecar.unlink()

        # An intact journal in today's format and a symbolic link to one: never rolled back.
        attacker_file = tmp_dir / "old-bytes"
        _planted_old_journal(path, _with_bridge_helper(read_image(str(path)).xml, helper), attacker_file)
        for planted in ("file", "symlink"):
            if planted == "file":
                os.rename(attacker_file, sidecar)
            else:
                _as_attacker("ln", "-s", str(attacker_file), str(sidecar))
            result = ok(run_module("save_image_define", {"path": str(path), "restore_state": "paused"},
                                   timeout=DEFINE_BOUND))
            assert result["authenticated"] and not result["recovered"]
            assert "helper=" not in read_image(str(path)).xml, "the planted journal was rolled back"
            if planted == "file":
                os.rename(sidecar, attacker_file)
            else:
                sidecar.unlink()
        restored = ok(restore(path))
        assert restored["guest"]["state"] == "paused"
        assert not marker.exists()
    finally:
        for leftover in tmp_dir.iterdir():
            leftover.unlink()
        tmp_dir.rmdir()


# --- (d) an image edited by save_image_define restores --------------------------------------

def test_an_edited_image_is_signed_again_and_restores(qemu, guest_factory, workdir):
    path, guest = _saved(guest_factory, qemu, workdir, "edited")
    edited = ok(run_module("save_image_define", {"path": str(path), "restore_state": "paused"}))
    assert edited["changed"] and edited["authenticated"] is True
    info = ok(run_module("save_image_info", {"path": str(path)}))
    assert info["authenticated"] is True and info["authentication_problem"] is None
    restored = ok(restore(path))
    assert restored["guest"]["state"] == "paused" and guest.status() == "paused"


# --- (e) libvirt's image ----------------------------------------------------------------------

def test_libvirts_image_is_readable_but_not_authenticated(tmp_path):
    path = write_libvirt_fixture(tmp_path)
    info = ok(run_module("save_image_info", {"path": str(path)}))
    assert info["origin"] == "libvirt" and info["authenticated"] is False
    assert info["authentication_problem"] == "no MAC (libvirt's image or saved before signing)"
    failed(run_module("save_image_define", {"path": str(path), "restore_state": "paused"}),
           "not authenticated", "allow_unauthenticated")
