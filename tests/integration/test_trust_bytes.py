"""Bytes that are not UTF-8 in a guest's working directory and command line (QEMU 10.0 and 7.2).

Linux paths are bytes. A guest whose working directory and disk-like paths hold
bytes that are not UTF-8 must be saved, inspected and restored with those exact
bytes, never failing halfway (a save that fails after pausing the guest) and
never with a traceback.
"""

from __future__ import annotations

import os

import pytest

from harness.guest import GuestSpec
from integration.ansible_runner import run_module
from integration.common import assert_continued, ok, restore, save

pytestmark = pytest.mark.integration

ODD = os.fsdecode(b"odd-\xff\xfe-dir")


def test_a_guest_in_a_directory_that_is_not_utf8_saves_and_comes_back(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="bytes-cwd", qemu=qemu, run_in_workdir=True), subdir=ODD)
    assert os.fsencode(os.readlink(f"/proc/{guest.pid}/cwd")).endswith(b"\xff\xfe-dir")
    path = workdir / "bytes-cwd.save"
    tick = guest.wait_tick_above(3)

    saved = ok(save(guest, path))
    assert "\\xff\\xfe" in saved["image"]["metadata"]["cwd"]  # shown escaped: JSON cannot carry the raw bytes
    info = ok(run_module("save_image_info", {"path": str(path)}))
    assert info["authenticated"] is True

    restored = ok(restore(path))
    pid = restored["guest"]["pid"]
    # The restored QEMU runs in the same directory, byte for byte, and writes the same serial log.
    assert os.fsencode(os.readlink(f"/proc/{pid}/cwd")) == os.fsencode(str(guest.workdir))
    assert_continued(guest, tick)
