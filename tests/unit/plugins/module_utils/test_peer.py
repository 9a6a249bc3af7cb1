"""Who serves a QMP socket: the Monitor refuses a peer that is not the guest's pid.

The servers here are real fake-QMP servers in ANOTHER process, so the kernel's
answer (SO_PEERCRED, /proc/net/tcp + /proc/PID/fd) is the real one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._errors import MonitorError, MonitorPeerError
from ansible_collections.savestate.qemu.plugins.module_utils._monitor import Monitor, tcp_endpoint, unix_endpoint
from ansible_collections.savestate.qemu.plugins.module_utils._peer import (
    tcp_listener_inodes,
    tcp_server_inode,
    unix_listener_inodes,
    unix_peer_credentials,
    verify_peer,
)
from ansible_collections.savestate.qemu.plugins.module_utils._proc import socket_inodes
from ansible_collections.savestate.qemu.tests.unit.fake_qmp import FakeQMPServer
from ansible_collections.savestate.qemu.tests.unit.module_runner import COLLECTIONS_ROOT

TESTS_DIR = Path(__file__).resolve().parents[3]
SERVER = """
import sys, time
from ansible_collections.savestate.qemu.tests.unit.fake_qmp import FakeQMPServer
kind, where = sys.argv[1], sys.argv[2]
server = FakeQMPServer(where, tcp=False) if kind == "unix" else FakeQMPServer(tcp=True)
server.reply("query-status", {"status": "running", "running": True})
server.start()
print(server.address, flush=True)
time.sleep(60)
"""


class OtherProcess:
    """A fake QMP server running in a child process."""

    def __init__(self, kind: str, where: str = "") -> None:
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, kind, where], cwd=TESTS_DIR,
                                        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(COLLECTIONS_ROOT)})
        self.address = self.process.stdout.readline().strip()
        assert self.address, "the server process did not start"
        self.pid = self.process.pid

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    import shutil
    import tempfile
    path = Path(tempfile.mkdtemp(prefix="ssq-p"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def unix_server(sock_dir) -> Iterator[OtherProcess]:
    server = OtherProcess("unix", str(sock_dir / "qmp.sock"))
    yield server
    server.stop()


@pytest.fixture
def tcp_server() -> Iterator[OtherProcess]:
    server = OtherProcess("tcp")
    yield server
    server.stop()


def test_unix_peer_is_the_listening_process(unix_server):
    with Monitor(unix_server.address, peer_pid=unix_server.pid, connect_timeout=5) as monitor:
        assert monitor.status() == "running"
    with pytest.raises(MonitorPeerError) as refused:
        Monitor(unix_server.address, peer_pid=os.getpid(), connect_timeout=5).connect()
    message = str(refused.value)
    assert f"served by pid {unix_server.pid} (python" in message and f"uid {os.getuid()})" in message
    assert f"not by the guest's QEMU pid {os.getpid()}" in message and "refusing" in message


def test_unix_impostor_gets_no_command(sock_dir):
    """Refused before the greeting is read: the impostor never sees qmp_capabilities."""
    with FakeQMPServer(sock_dir / "qmp.sock") as server:
        with pytest.raises(MonitorPeerError):
            Monitor(server.address, peer_pid=1, connect_timeout=2).connect()
        time.sleep(0.1)
        assert server.calls == []


def test_tcp_peer_is_the_process_holding_the_accepted_socket(tcp_server):
    with Monitor(tcp_server.address, peer_pid=tcp_server.pid, connect_timeout=5) as monitor:
        assert monitor.status() == "running"
    with pytest.raises(MonitorPeerError) as refused:
        Monitor(tcp_server.address, peer_pid=os.getpid(), connect_timeout=5).connect()
    assert f"pid {tcp_server.pid} (python" in str(refused.value)
    assert f"not by the guest's QEMU pid {os.getpid()}" in str(refused.value)


def test_tcp_server_side_and_listener_inodes(tcp_server):
    host, port = tcp_server.address.rsplit(":", 1)
    listeners = tcp_listener_inodes(host, int(port))
    assert len(listeners) == 1
    assert listeners <= socket_inodes(tcp_server.pid)
    with socket.create_connection((host, int(port))) as sock:
        deadline = time.monotonic() + 5
        while not tcp_server_inode(sock) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tcp_server_inode(sock) in socket_inodes(tcp_server.pid)
        verify_peer(sock, tcp_endpoint(host, int(port)), tcp_server.pid, deadline)


def test_unix_listener_inode_and_credentials(unix_server):
    inodes = unix_listener_inodes(unix_server.address)
    assert len(inodes) == 1
    assert inodes <= socket_inodes(unix_server.pid)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(unix_server.address)
        assert unix_peer_credentials(sock) == (unix_server.pid, os.getuid(), os.getgid())
        with pytest.raises(MonitorPeerError):
            verify_peer(sock, unix_endpoint(unix_server.address), unix_server.pid + 1, time.monotonic() + 1)
    assert unix_listener_inodes(unix_server.address + ".nothing") == set()


def test_without_peer_pid_nothing_is_checked(sock_dir):
    with FakeQMPServer(sock_dir / "qmp.sock") as server:
        server.reply("query-status", {"status": "paused", "running": False})
        with Monitor(server.address) as monitor:
            assert monitor.status() == "paused"


@pytest.mark.parametrize("command, reply, call", [
    ("query-status", {}, lambda m: m.status()),
    ("query-status", {"status": 3}, lambda m: m.status()),
    ("query-status", [], lambda m: m.running()),
    ("query-name", "x", lambda m: m.name()),
    ("query-name", {"name": 5}, lambda m: m.name()),
    ("query-uuid", {}, lambda m: m.uuid()),
    ("query-version", {}, lambda m: m.version()),
    ("query-version", {"qemu": {"major": "10"}}, lambda m: m.version_string()),
    ("query-version", {"qemu": []}, lambda m: m.version()),
    ("qom-get", {}, lambda m: m.machine_type()),
    ("query-memory-size-summary", {"base-memory": "1"}, lambda m: m.memory_bytes()),
    ("query-memory-size-summary", {"base-memory": True}, lambda m: m.memory_bytes()),
    ("query-cpus-fast", {}, lambda m: m.vcpus()),
    ("query-block", [1], lambda m: m.block_devices()),
    ("query-migrate-capabilities", [{}], lambda m: m.migration_capabilities()),
    ("query-migrate-capabilities", {}, lambda m: m.enabled_migration_capabilities()),
    ("query-migrate-parameters", [], lambda m: m.migration_parameters()),
    ("query-migrate", "x", lambda m: m.migration_blockers()),
    ("query-qmp-schema", {}, lambda m: m.has_command("x")),
    ("query-qmp-schema", [{"name": "migrate", "meta-type": "command", "arg-type": "a"},
                          {"name": "a", "members": [{"name": "channels"}]}], lambda m: m.supports_file_transport()),
    ("add-fd", {}, lambda m: m.add_fd(0)),
])
def test_a_peer_answering_junk_is_a_monitor_error(sock_dir, command, reply, call):
    with FakeQMPServer(sock_dir / "qmp.sock") as server:
        server.reply(command, reply)
        with Monitor(server.address, peer_pid=os.getpid()) as monitor:
            with pytest.raises(MonitorError, match="does not behave like QEMU"):
                call(monitor)
