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
def test_the_process_runs_with_exactly_the_given_credentials(tmp_path: Path):
    log = tmp_path / "log"
    tmp_path.chmod(0o755)
    creds = credentials_of_user(NOBODY.pw_uid)
    process = LaunchedQemu(["/bin/sh", "-c", "id -u; id -g; id -G"], str(log), "/", creds)
    assert process.exited(10)
    uid, gid, groups = log.read_text().split("\n")[:3]
    assert (int(uid), int(gid)) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert {int(g) for g in groups.split()} == set(creds.groups)


def test_a_log_path_that_is_a_symlink_is_not_followed(tmp_path: Path):
    target = tmp_path / "target"
    target.write_text("keep")
    (tmp_path / "log").symlink_to(target)
    with pytest.raises(OSError):
        LaunchedQemu(["/bin/true"], str(tmp_path / "log"), "/")
    assert target.read_text() == "keep"
