"""The harness itself: a guest boots on each QEMU build, beats, answers QMP, and goes away."""

from __future__ import annotations

import pytest

from harness.guest import GuestSpec
from harness.processes import qemu_processes

pytestmark = pytest.mark.integration


def test_guest_boots_beats_and_answers_qmp(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="smoke", qemu=qemu, disk_mib=1))

    first = guest.wait_tick_above(2)
    assert guest.wait_tick_above(first + 3) > first + 3
    assert guest.status() == "running"
    assert guest.qmp("query-name") == {"name": "smoke"}
    assert guest.qmp("query-version")["qemu"]["major"] == int(qemu.name.split(".")[0])
    assert guest.disk.read_bytes()[:5] == b"tick "

    guest.stop()
    assert not guest.is_alive()
    assert qemu_processes(str(workdir)) == []


def test_fill_and_tcp_monitor(qemu, guest_factory):
    guest = guest_factory(GuestSpec(name="filled", qemu=qemu, fill_mib=32, qmp="tcp"))

    assert b"filled 32 MiB" in guest.serial_bytes()
    assert guest.status() == "running"
    guest.qmp("stop")
    assert guest.status() == "paused"
