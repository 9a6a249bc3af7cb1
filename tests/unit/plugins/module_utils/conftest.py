"""Fixtures for the orchestration tests: a stand-in QEMU on real sockets (see tests/unit/fake_qemu.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._runtime import runtime_path
from ansible_collections.savestate.qemu.tests.unit.fake_qemu import CONTROL_ENV, FakeQemuHost, fake_emulator


@pytest.fixture
def emulator() -> Iterator[str]:
    """The stand-in QEMU binary, where restore's trust checks accept an emulator (root-owned, under /run).

    One per test: ansible-test runs each test in a forked process, where a session fixture's
    clean-up would never run.
    """
    if os.geteuid() != 0:
        pytest.skip("the stand-in emulator must be root-owned in a root-only directory")
    with fake_emulator() as path:
        yield path


@pytest.fixture
def qemu_host(emulator: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeQemuHost]:
    """This test's stand-in QEMU processes, each with a guest name and UUID no other test uses."""
    # Short: unix socket paths are limited to 107 bytes, and pytest's tmp_path can be long.
    directory = Path(tempfile.mkdtemp(prefix="ssq-qemu-", dir="/tmp"))
    monkeypatch.setenv(CONTROL_ENV, str(directory / "control.sock"))
    host = FakeQemuHost(directory, emulator)
    host.uuid = str(uuidlib.uuid4())
    host.name = f"unit-{host.uuid[:8]}"
    try:
        yield host
    finally:
        try:
            host.close()
        finally:
            shutil.rmtree(directory, ignore_errors=True)
            for name in os.listdir(runtime_path()):  # a restored QEMU's log, a monitor socket
                if name.startswith(host.uuid):
                    os.unlink(os.path.join(runtime_path(), name))
