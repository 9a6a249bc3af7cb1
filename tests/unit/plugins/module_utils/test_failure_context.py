"""Failures of save and restore carry their context (trace, guest, image), against the stand-in QEMU.

The module layer returns that context with the message (``_module.failure_result``);
these tests drive the orchestrators' entry points as the modules do.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._errors import MigrationError, PreconditionError
from ansible_collections.savestate.qemu.plugins.module_utils._module import failure_result
from ansible_collections.savestate.qemu.plugins.module_utils._restore import RestoreRequest, restore_guest
from ansible_collections.savestate.qemu.plugins.module_utils._save import SaveRequest, save_guest
from ansible_collections.savestate.qemu.tests.unit.fake_qemu import FakeQemuHost, Guest
from ansible_collections.savestate.qemu.tests.unit.plugins.module_utils.test_restore_flow import saved_image


def _sent(trace: list[dict]) -> list[str]:
    return [entry["message"].get("execute") for entry in trace if entry["direction"] == "sent"]


def test_a_failed_save_returns_the_guest_and_the_conversation(qemu_host: FakeQemuHost, tmp_path: Path):
    guest = Guest(qemu_host)
    guest.qemu.blockers = ["non-migratable device: 0000:00:02.0/vfio"]
    request = SaveRequest(path=str(tmp_path / "guest.save"), name=qemu_host.name, timeout=5.0, trace=True)
    with pytest.raises(PreconditionError, match="cannot migrate domain") as raised:
        save_guest(request, scan=guest.scan)
    result = failure_result(raised.value, trace_requested=True)
    assert result["guest"] == {"name": qemu_host.name, "uuid": qemu_host.uuid, "pid": guest.process.pid,
                               "state": None, "qmp": result["guest"]["qmp"], "managed_by": "none"}
    assert result["guest"]["qmp"]
    # Up to the question whose answer refused the save: query-migrate reports the blockers.
    assert _sent(result["qmp_trace"]) == ["qmp_capabilities", "query-name", "query-uuid", "query-status", "query-migrate"]
    assert "image" not in result


def test_a_failed_restore_returns_the_image_and_the_new_qemus_conversation(qemu_host: FakeQemuHost, tmp_path: Path):
    qemu_host.configure = lambda qemu: setattr(qemu, "incoming", "fail") \
        or setattr(qemu, "error_desc", "Unknown savevm section or instance 'foo' 0")
    image = saved_image(tmp_path / "guest.save", qemu_host)
    with pytest.raises(MigrationError, match="Unknown savevm section") as raised:
        restore_guest(RestoreRequest(path=str(image), timeout=5.0, trace=True), scan=lambda: [])
    result = failure_result(raised.value, trace_requested=True)
    assert result["image"]["path"] == str(image) and result["image"]["name"] == qemu_host.name
    assert "migrate-incoming" in _sent(result["qmp_trace"]), result["qmp_trace"]
    assert "guest" not in result


def test_a_refused_active_guest_returns_what_its_monitor_said(qemu_host: FakeQemuHost, tmp_path: Path):
    guest = Guest(qemu_host)
    guest.qemu.status = "inmigrate"
    image = saved_image(tmp_path / "guest.save", qemu_host)
    with pytest.raises(PreconditionError, match="still waiting for or loading") as raised:
        restore_guest(RestoreRequest(path=str(image), timeout=5.0, trace=True), scan=guest.scan)
    result = failure_result(raised.value, trace_requested=True)
    assert _sent(result["qmp_trace"]) == ["qmp_capabilities", "query-status"]
    assert result["image"]["uuid"] == qemu_host.uuid
