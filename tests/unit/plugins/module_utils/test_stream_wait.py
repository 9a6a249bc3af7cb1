"""Stream.wait against a scripted QMP server: a QEMU slow to answer is busy, not failed (issue 17)."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._errors import MigrationError, MonitorClosedError
from ansible_collections.savestate.qemu.plugins.module_utils._image import ImageFormat
from ansible_collections.savestate.qemu.plugins.module_utils._monitor import Monitor
from ansible_collections.savestate.qemu.plugins.module_utils._stream import Stream, StreamPlan
from ansible_collections.savestate.qemu.tests.unit.fake_qmp import Call, FakeQMPServer

# The monitor's per-command limit in these tests; QEMU answers later than that.
COMMAND_TIMEOUT = 0.5


@pytest.fixture
def server() -> Iterator[FakeQMPServer]:
    directory = Path(tempfile.mkdtemp(prefix="ssq-u"))  # unix socket paths must stay short
    try:
        with FakeQMPServer(directory / "qmp.sock") as fake:
            yield fake
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _answers_after(seconds: float, status: str) -> Any:
    def answer(call: Call) -> dict[str, Any]:
        time.sleep(seconds)  # a QEMU loading in its main loop: the monitor waits for it
        return {"status": status}
    return answer


def _wait(server: FakeQMPServer, timeout: float) -> dict[str, Any]:
    with Monitor(server.address, connect_timeout=5, command_timeout=COMMAND_TIMEOUT) as monitor:
        plan = StreamPlan("fdset", ImageFormat.RAW)
        with Stream(monitor, plan, fd=-1, stream_offset=0, path="/nonexistent", outgoing=False) as stream:
            return stream.wait(timeout)


def test_an_answer_later_than_the_command_timeout_is_waited_for(server):
    server.on("query-migrate", _answers_after(4 * COMMAND_TIMEOUT, "completed"))
    assert _wait(server, timeout=30)["status"] == "completed"


def test_the_overall_timeout_still_ends_the_wait_and_says_so(server):
    server.on("query-migrate", _answers_after(3.0, "active"))
    started = time.monotonic()
    with pytest.raises(MigrationError, match=r"did not finish within the timeout of 1 s \(QEMU was too busy to answer\)"):
        _wait(server, timeout=1)
    assert time.monotonic() - started < 2.5


def test_a_qemu_that_dies_is_noticed_at_once(server):
    server.drop("query-migrate")  # the monitor hangs up, as when QEMU exits
    started = time.monotonic()
    with pytest.raises(MonitorClosedError):
        _wait(server, timeout=60)
    assert time.monotonic() - started < 5
