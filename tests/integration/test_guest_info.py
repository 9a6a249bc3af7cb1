"""Active-guest discovery and guest_info on real QEMU guests (10.0 and 7.2) and a libvirt guest.

The host may run other people's guests at the same time: every assertion picks our
own guests out of the listing by pid or name, never by position or count.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid as uuidlib

import pytest
from qemu.qmp import QMPClient

from ansible_collections.savestate.qemu.plugins.module_utils._errors import MonitorBusyError
from ansible_collections.savestate.qemu.plugins.module_utils._host import guest_by_endpoint, read_guest, scan_guests
from ansible_collections.savestate.qemu.plugins.module_utils._monitor import Monitor
from harness.guest import QMP_STYLES, GuestSpec
from integration.ansible_runner import run_module

pytestmark = pytest.mark.integration

# One name per monitor style; the chardev one carries QEMU's ",," escape of a comma.
NAMES = {"unix": "gi-unix", "tcp": "gi-tcp", "chardev": "gi,chardev", "pretty": "gi pretty"}


def _spec(qemu, style: str) -> GuestSpec:
    name = NAMES[style]
    return GuestSpec(name=name, qemu=qemu, qmp=style,
                     name_option=f"guest={name.replace(',', ',,')},debug-threads=on")


def _by_pid(guests: list[dict]) -> dict[int, dict]:
    return {entry["pid"]: entry for entry in guests}


def test_every_monitor_style_is_found_and_reported(qemu, guest_factory):
    guests = {style: guest_factory(_spec(qemu, style), subdir=style) for style in QMP_STYLES}
    # Through our own client: the harness' plain qemu.qmp cannot parse -qmp-pretty's multi-line JSON.
    with Monitor(guests["pretty"].qmp_address) as pretty:
        pretty.execute("stop")

    # Discovery from /proc alone.
    for style, guest in guests.items():
        found = read_guest(guest.pid)
        assert found is not None, style
        assert (found.name, found.uuid) == (guest.spec.name, guest.spec.uuid), style
        assert str(found.endpoint) == guest.qmp_address, style
        assert found.pidfile == str(guest.pidfile)
        assert found.managed_by is None and found.libvirt_evidence == ()
        assert guest_by_endpoint(guest.qmp_address).pid == guest.pid
        assert guest.pid in {g.pid for g in scan_guests()}

    # guest_info through Ansible, in check mode too: the same answer, nothing changed.
    for check in (False, True):
        result = run_module("guest_info", {"timeout": 5}, check=check)
        assert not result["failed"] and result["changed"] is False, result.get("msg")
        reported = _by_pid(result["guests"])
        for style, guest in guests.items():
            entry = reported[guest.pid]
            identity = (entry["name"], entry["uuid"], entry["qmp"])
            assert identity == (guest.spec.name, guest.spec.uuid, guest.qmp_address), style
            assert entry["state"] == ("paused" if style == "pretty" else "running"), entry["state_reason"]
            assert entry["state_reason"] is None
            assert entry["managed_by"] == "none"
            assert entry["machine"] == f"pc-i440fx-{qemu.name}"
            assert entry["memory_mib"] == guest.spec.memory
            assert entry["argv"] == guest.argv
    assert guests["unix"].status() == "running"
    with Monitor(guests["pretty"].qmp_address) as pretty:
        assert pretty.status() == "paused"


def test_filters_and_trace(qemu, guest_factory):
    guest = guest_factory(GuestSpec(name="gi-filter", qemu=qemu))

    by_name = run_module("guest_info", {"name": "gi-filter", "qmp_trace": True})
    assert [g["pid"] for g in by_name["guests"] if g["pid"] == guest.pid] == [guest.pid]
    assert all(g["name"] == "gi-filter" for g in by_name["guests"])
    sent = [e["message"]["execute"] for e in by_name["qmp_trace"]
            if e["kind"] == "command" and e["endpoint"] == guest.qmp_address]
    assert sent == ["qmp_capabilities", "query-status", "qom-get", "query-memory-size-summary"]

    by_uuid = run_module("guest_info", {"uuid": guest.spec.uuid.upper()})
    assert [g["pid"] for g in by_uuid["guests"]] == [guest.pid]
    assert "qmp_trace" not in by_uuid

    nobody = run_module("guest_info", {"name": "gi-filter", "uuid": str(uuidlib.uuid4())})
    assert nobody["guests"] == []


def test_busy_monitor_is_reported_within_the_timeout(qemu, guest_factory):
    guest = guest_factory(GuestSpec(name="gi-busy", qemu=qemu))
    loop = asyncio.new_event_loop()
    holder = QMPClient("holder")
    loop.run_until_complete(holder.connect(guest.qmp_address))  # the one client slot is taken
    try:
        started = time.monotonic()
        with pytest.raises(MonitorBusyError) as caught:
            Monitor(guest.qmp_address, connect_timeout=1.0).connect()
        assert time.monotonic() - started < 3.0
        assert f"another client (pid {os.getpid()}, comm " in str(caught.value)

        started = time.monotonic()
        result = run_module("guest_info", {"name": "gi-busy", "timeout": 1})
        elapsed = time.monotonic() - started
        entry = _by_pid(result["guests"])[guest.pid]
        assert entry["state"] == "unknown"
        assert "is busy" in entry["state_reason"] and f"pid {os.getpid()}" in entry["state_reason"]
        assert entry["machine"] == "pc" and entry["memory_mib"] == guest.spec.memory  # from argv
        assert elapsed < 30  # Ansible's own start-up dominates; the probe gave up after 1 s
    finally:
        loop.run_until_complete(holder.disconnect())
        loop.close()

    assert _by_pid(run_module("guest_info", {"name": "gi-busy"})["guests"])[guest.pid]["state"] == "running"


def test_monitor_on_a_real_guest(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="gi-monitor", qemu=qemu, disk_mib=1))
    file_transport = qemu.name != "7.2"
    data = workdir / "fd passing.bin"
    data.write_bytes(b"x" * 4096)
    fd = os.open(data, os.O_RDWR)
    try:
        with Monitor(guest.qmp_address, trace=True) as monitor:
            assert monitor.name() == "gi-monitor" and monitor.uuid() == guest.spec.uuid
            assert ".".join(map(str, monitor.version()[:2])) == qemu.name
            assert monitor.version_string().startswith(qemu.version())
            assert monitor.machine_type() == f"pc-i440fx-{qemu.name}"
            assert monitor.memory_bytes() == guest.spec.memory << 20
            assert monitor.vcpus() == 1
            disk = next(d for d in monitor.block_devices() if d.device == "disk0")
            assert (disk.file, disk.format, disk.read_only, disk.inserted) == (str(guest.disk), "raw", False, True)
            assert {"events", "postcopy-ram"} <= monitor.migration_capabilities()
            assert "max-bandwidth" in monitor.migration_parameters()
            assert monitor.migration_blockers() == []
            assert monitor.supports_file_transport() is file_transport
            assert monitor.supports_incoming_exit_on_error() is file_transport
            assert monitor.has_command("add-fd") and not monitor.has_command("no-such-command")

            with monitor.listen(["STOP", "RESUME"]):
                monitor.execute("stop")
                monitor.execute("cont")
                assert monitor.wait_event("RESUME", timeout=10)["event"] == "RESUME"
                assert monitor.wait_event("STOP", timeout=10)["event"] == "STOP"
            assert monitor.status() == "running"

            with monitor.fdset([fd], opaque="gi-test") as fdset_id:
                sets = monitor.execute("query-fdsets")
                ours = next(s for s in sets if s["fdset-id"] == fdset_id)
                assert [f["opaque"] for f in ours["fds"]] == ["gi-test"]
            assert all(s["fdset-id"] != fdset_id for s in monitor.execute("query-fdsets"))

            with monitor.named_fd(fd, "gi-named"):
                pass
            os.fstat(fd)  # still ours
    finally:
        os.close(fd)
    kinds = {entry["kind"] for entry in monitor.trace}
    assert {"greeting", "command", "reply", "event", "fd"} <= kinds


def test_libvirt_guest_is_found_and_left_to_libvirt(qemu, libvirt_host):
    uuid = str(uuidlib.uuid4())
    libvirt_host.define_guest("gi-libvirt", uuid, qemu=qemu)
    libvirt_host.start("gi-libvirt")
    pid = libvirt_host.qemu_pid("gi-libvirt")

    found = read_guest(pid)
    assert (found.name, found.uuid, found.managed_by) == ("gi-libvirt", uuid, "libvirt")
    assert "libvirt's masterKey0 secret object" in found.libvirt_evidence
    # libvirt passes the monitor as an fd; its path comes from the socket inode.
    assert found.endpoint is not None and str(found.endpoint).startswith(str(libvirt_host.root))
    assert str(found.endpoint).endswith("monitor.sock")

    result = run_module("guest_info", {"uuid": uuid, "qmp_trace": True})
    (entry,) = result["guests"]
    assert (entry["pid"], entry["name"], entry["managed_by"], entry["state"]) == (
        pid, "gi-libvirt", "libvirt", "unknown")
    assert "libvirt manages this guest" in entry["state_reason"]
    assert entry["qmp"] == str(found.endpoint)
    assert entry["memory_mib"] == 128 and entry["machine"].startswith("pc-i440fx-")
    assert result["qmp_trace"] == []  # libvirt's monitor was not touched
    assert libvirt_host.domain_state("gi-libvirt") == "running"
