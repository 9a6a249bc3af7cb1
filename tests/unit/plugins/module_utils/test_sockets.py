"""Who holds a socket: real sockets of this test process, and fake /proc tables."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._monitor import tcp_endpoint, unix_endpoint
from ansible_collections.savestate.qemu.plugins.module_utils._sockets import (
    ProcessRef,
    TcpRow,
    decode_tcp_address,
    describe_holders,
    monitor_holders,
    socket_owners,
    tcp_clients,
    unix_client_inodes,
    unix_diag_sockets,
    unix_path_of_fd,
)


def me() -> ProcessRef:
    """This process (at test time: ansible-test units may run each test in a fork)."""
    return ProcessRef(os.getpid(), Path("/proc/self/comm").read_text().strip())


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ssq-u"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def test_the_kernel_names_the_client_of_a_unix_socket(sock_dir):
    path = str(sock_dir / "mon.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(2)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            served = listener.accept()[0]
            with served, socket.socket(socket.AF_UNIX) as waiting:
                waiting.connect(path)  # queued, never accepted: belongs to nobody yet

                assert unix_client_inodes(path) == {_inode(client)}
                assert socket_owners({_inode(client)}) == {_inode(client): [me()]}
                assert monitor_holders(unix_endpoint(path)) == ([me()], [])
                assert describe_holders(unix_endpoint(path)) == f"another client (pid {me().pid}, comm {me().comm})"
                assert describe_holders(unix_endpoint(path), exclude_inodes={_inode(client)}) == ""


def test_relative_bind_paths_are_matched_by_the_socket_file(sock_dir, monkeypatch):
    monkeypatch.chdir(sock_dir)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind("rel.sock")  # the kernel keeps the name as given
        listener.listen(1)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect("rel.sock")
            served = listener.accept()[0]
            with served:
                assert unix_client_inodes(str(sock_dir / "rel.sock")) == {_inode(client)}


def test_nobody_holds_an_idle_socket(sock_dir):
    path = str(sock_dir / "idle.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        assert any(info.name == path for info in unix_diag_sockets())
        assert describe_holders(unix_endpoint(path)) == ""
    assert describe_holders(unix_endpoint(str(sock_dir / "missing.sock"))) == ""


def test_the_client_of_a_local_tcp_connection():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            served = listener.accept()[0]
            with served:
                assert monitor_holders(tcp_endpoint("127.0.0.1", port)) == ([me()], [])
                assert _inode(client) in tcp_clients(port, _rows_from_proc())[0]


def _rows_from_proc():
    from ansible_collections.savestate.qemu.plugins.module_utils._sockets import tcp_table
    return tcp_table()


def test_tcp_clients_from_the_table():
    server_side = TcpRow(local="0100007F:115C", remote="0100007F:9C40", state=1, inode=11)
    client_side = TcpRow(local="0100007F:9C40", remote="0100007F:115C", state=1, inode=22)
    remote_only = TcpRow(local="0100007F:115C", remote="0501A8C0:C350", state=1, inode=33)
    queued = TcpRow(local="0100007F:115C", remote="0100007F:9C41", state=1, inode=0)  # not accepted yet
    listening = TcpRow(local="00000000:115C", remote="00000000:0000", state=10, inode=44)
    rows = [server_side, client_side, remote_only, queued, listening]

    assert tcp_clients(4444, rows) == ({22}, ["192.168.1.5:50000"])
    assert tcp_clients(4445, rows) == (set(), [])


@pytest.mark.parametrize("hex_address, text", [
    ("0100007F:1F90", "127.0.0.1:8080"),
    ("00000000:0016", "0.0.0.0:22"),
    ("00000000000000000000000001000000:0050", "[::1]:80"),
])
def test_decode_tcp_address(hex_address, text):
    assert decode_tcp_address(hex_address) == text


def test_libvirt_holders_are_called_libvirt(tmp_path):
    proc = tmp_path / "proc"
    for pid, comm, inode in ((812, "virtqemud", 501), (900, "python3", 502)):
        (proc / str(pid) / "fd").mkdir(parents=True)
        (proc / str(pid) / "comm").write_text(comm + "\n")
        (proc / str(pid) / "fd" / "9").symlink_to(f"socket:[{inode}]")
        (proc / str(pid) / "fd" / "1").symlink_to("/dev/null")
    (proc / "net").mkdir()
    (proc / "net" / "tcp").write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:115C 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 601 1\n"
        "   1: 0100007F:9C40 0100007F:115C 01 00000000:00000000 00:00000000 00000000     0        0 501 1\n")

    owners = socket_owners({501, 502, 999}, str(proc))
    assert owners == {501: [ProcessRef(812, "virtqemud")], 502: [ProcessRef(900, "python3")]}
    assert describe_holders(tcp_endpoint("127.0.0.1", 4444), proc_root=str(proc)) == "libvirt (virtqemud, pid 812)"


def test_unix_path_of_an_inherited_fd(tmp_path):
    proc = tmp_path / "proc"
    (proc / "42" / "fd").mkdir(parents=True)
    (proc / "42" / "net").mkdir()
    (proc / "42" / "fd" / "7").symlink_to("socket:[3141]")
    (proc / "42" / "fd" / "8").symlink_to("socket:[2718]")
    (proc / "42" / "net" / "unix").write_text(
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 3141 /run/libvirt/qemu/domain-1-a/monitor.sock\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 2718 @abstract\n")

    assert unix_path_of_fd(42, 7, str(proc)) == "/run/libvirt/qemu/domain-1-a/monitor.sock"
    assert unix_path_of_fd(42, 8, str(proc)) is None   # abstract: no file to connect to
    assert unix_path_of_fd(42, 9, str(proc)) is None   # no such fd
    assert unix_path_of_fd(43, 7, str(proc)) is None   # no such process
