"""The restored QEMU's process and private monitor, with real processes and sockets."""

from __future__ import annotations

import os
import pwd
import socket
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._credentials import credentials_of_user
from ansible_collections.savestate.qemu.plugins.module_utils._errors import PreconditionError
from ansible_collections.savestate.qemu.plugins.module_utils._qemu_process import (
    LaunchedQemu,
    PrivateMonitor,
    without_private_monitor,
)

NOBODY = pwd.getpwnam("nobody")


def test_without_private_monitor_drops_only_an_earlier_restores_monitor():
    argv = ["qemu", "-chardev", "socket,id=savestate-monitor,fd=7,server=on,wait=off",
            "-mon", "chardev=savestate-monitor,mode=control", "-chardev", "socket,id=mine,path=/x,server=on",
            "-mon", "chardev=mine,mode=control", "-name", "savestate-monitor"]
    assert without_private_monitor(argv) == ["qemu", "-chardev", "socket,id=mine,path=/x,server=on",
                                             "-mon", "chardev=mine,mode=control", "-name", "savestate-monitor"]


def test_the_private_monitor_is_a_listening_socket_only_its_holder_serves(tmp_path: Path):
    path = str(tmp_path / "m.qmp")
    with PrivateMonitor(path) as monitor:
        options = monitor.qemu_options()
        assert f"fd={monitor.fd}" in options[1]
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)  # queued until the holder accepts
        client.close()
    monitor.remove()
    assert not os.path.exists(path)


def test_the_private_monitor_replaces_a_stale_socket_but_never_another_file(tmp_path: Path):
    stale = tmp_path / "s.qmp"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(stale))
    with PrivateMonitor(str(stale)):
        pass
    regular = tmp_path / "f.qmp"
    regular.write_text("keep")
    with pytest.raises(PreconditionError, match="cannot create"):
        PrivateMonitor(str(regular))
    assert regular.read_text() == "keep"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_the_process_runs_with_exactly_the_given_credentials():
    creds = credentials_of_user(NOBODY.pw_uid)
    process = LaunchedQemu(["/bin/sh", "-c", "id -u; id -g; id -G"], f"name-test-{os.getpid()}", "/", creds)
    try:
        assert process.exited(10)
        uid, gid, groups = Path(process.log_path).read_text().split("\n")[:3]
    finally:
        process.remove_log()
    assert (int(uid), int(gid)) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert {int(g) for g in groups.split()} == set(creds.groups)
