"""emulator_info, run as Ansible runs it: real emulators, images made here."""

from __future__ import annotations

import os

import pytest

from ansible_collections.savestate.qemu.tests.unit.image_helpers import make_savestate_image
from ansible_collections.savestate.qemu.tests.unit.module_runner import run_module

SYSTEM_QEMU = "/usr/bin/qemu-system-x86_64"
pytestmark = pytest.mark.skipif(not os.path.exists(SYSTEM_QEMU), reason="QEMU is not installed")


def test_emulators_and_the_emulators_images_record_are_described(tmp_path) -> None:
    image = make_savestate_image(tmp_path / "web01.save")
    broken = tmp_path / "broken.save"
    broken.write_bytes(b"not an image")
    result = run_module("emulator_info", {"emulators": [SYSTEM_QEMU, "/bin/sh"], "images": [str(image), str(broken)]},
                        check=True)
    assert not result["failed"] and not result["changed"], result["_stdout"]
    assert result["images"][str(image)] == {"emulator": SYSTEM_QEMU, "machine": "pc-i440fx-10.0", "format": "raw",
                                            "problem": None}
    assert result["images"][str(broken)]["problem"]
    assert set(result["emulators"]) == {SYSTEM_QEMU, "/bin/sh"}  # the image's emulator is described once
    qemu = result["emulators"][SYSTEM_QEMU]
    assert qemu["problem"] is None and "pc" in qemu["aliases"] and "raw" in qemu["formats"]
    assert "not a QEMU system emulator" in result["emulators"]["/bin/sh"]["problem"]


def test_nothing_to_ask_is_an_empty_answer() -> None:
    result = run_module("emulator_info", {})
    assert not result["failed"] and result["emulators"] == {} and result["images"] == {}, result["_stdout"]
