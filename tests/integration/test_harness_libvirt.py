"""The libvirt harness: a guest started by libvirt's embedded driver beats, saves and restores."""

from __future__ import annotations

import time
import uuid

import pytest

from harness.processes import qemu_processes

pytestmark = pytest.mark.integration


def test_libvirt_guest_saves_and_restores(libvirt_host, workdir):
    libvirt_host.define_guest("lvsmoke", str(uuid.uuid4()))
    libvirt_host.start("lvsmoke")
    assert libvirt_host.domain_state("lvsmoke") == "running"
    assert libvirt_host.qemu_pid("lvsmoke") is not None

    image = workdir / "lvsmoke.save"
    libvirt_host.save("lvsmoke", image)
    saved_tick = libvirt_host.last_tick("lvsmoke")
    assert image.read_bytes()[:16] == b"LibvirtQemudSave"
    assert libvirt_host.domain_state("lvsmoke") == "shut off"

    libvirt_host.restore(image)
    assert libvirt_host.domain_state("lvsmoke") == "running"
    deadline = time.monotonic() + 30
    while libvirt_host.last_tick("lvsmoke") <= saved_tick + 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    serial = libvirt_host.serial_log("lvsmoke").read_bytes()
    assert saved_tick > 0
    assert libvirt_host.last_tick("lvsmoke") > saved_tick + 3, "heartbeat did not continue"
    assert serial.count(b"READY") == 1, "the guest rebooted instead of resuming"
    libvirt_host.close()
    assert qemu_processes(str(libvirt_host.root)) == []
