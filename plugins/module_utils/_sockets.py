# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Who holds a socket: answers from /proc and the kernel's socket diagnostics.

Two questions need this. Which process holds a QMP monitor that does not greet us
(QMP serves one client; the other one is usually libvirt, a qmp-shell or a
forgotten script)? And which socket path did libvirt hand QEMU as ``fd=NN``?

Processes own sockets through ``/proc/PID/fd/N -> socket:[INODE]``. The server
side of an accepted unix connection carries the listener's path, but /proc does
not say who is at the other end; the kernel's ``sock_diag`` netlink interface
(what ``ss -xp`` uses) does, so we ask it. For TCP, /proc/net/tcp lists both
ends of a local connection. Every lookup is best effort: an unreadable entry or a
kernel without ``unix_diag`` means "we cannot tell", never an exception.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ansible_collections.savestate.qemu.plugins.module_utils._proc import (
    fd_numbers,
    net_table,
    pids,
    process_comm,
    socket_inode_of_fd,
)

LIBVIRT_COMMS = frozenset(("libvirtd", "virtqemud", "virsh", "virt-qemu-run"))

# linux/sock_diag.h, linux/unix_diag.h, linux/netlink.h
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_UDIAG_SHOW_NAME = 0x1
_UDIAG_SHOW_VFS = 0x2
_UDIAG_SHOW_PEER = 0x4
_UNIX_DIAG_NAME = 0
_UNIX_DIAG_VFS = 1
_UNIX_DIAG_PEER = 2
_TCP_ESTABLISHED = 1
_NLMSG_HEADER = struct.Struct("=IHHII")
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")
_UNIX_DIAG_MSG = struct.Struct("=BBBBIII")
_RTATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class ProcessRef:
    pid: int
    comm: str

    @property
    def is_libvirt(self) -> bool:
        return self.comm in LIBVIRT_COMMS


@dataclass(frozen=True)
class UnixSocketInfo:
    inode: int
    name: str | None
    vfs_inode: int | None
    peer: int | None
    state: int


# --- processes (the /proc reads themselves live in _proc) --------------------------------

def socket_owners(inodes: Iterable[int], proc_root: str = "/proc") -> dict[int, list[ProcessRef]]:
    """Which processes have each socket inode open (a scan of every /proc/PID/fd)."""
    wanted = set(inodes)
    owners: dict[int, list[ProcessRef]] = {}
    if not wanted:
        return owners
    for pid in pids(proc_root):
        fds = fd_numbers(pid, proc_root)  # empty when gone, or not ours to read
        found = {inode for inode in (socket_inode_of_fd(pid, fd, proc_root) for fd in fds) if inode in wanted}
        for inode in found:
            owners.setdefault(inode, []).append(ProcessRef(pid, process_comm(pid, proc_root)))
    return owners


# --- unix sockets ----------------------------------------------------------------------

def unix_socket_table(proc_root: str = "/proc", pid: int | None = None) -> dict[int, str]:
    """Inode -> bound path of every named unix socket in /proc/[PID/]net/unix."""
    table: dict[int, str] = {}
    for line in net_table("unix", proc_root, pid):
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[6].isdigit():
            table[int(fields[6])] = fields[7]
    return table


def unix_path_of_fd(pid: int, fd: int | str, proc_root: str = "/proc") -> str | None:
    """The path a unix socket fd of ``pid`` is bound to (libvirt's ``-chardev socket,fd=NN``)."""
    inode = socket_inode_of_fd(pid, fd, proc_root)
    if inode is None:
        return None
    path = unix_socket_table(proc_root, pid).get(inode)
    if path is None:
        path = unix_socket_table(proc_root).get(inode)
    return path if path and not path.startswith("@") else None


def unix_diag_sockets() -> list[UnixSocketInfo]:
    """Every unix socket in our network namespace, with its peer, from the kernel's sock_diag."""
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as diag:
            request = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0,
                                          _UDIAG_SHOW_NAME | _UDIAG_SHOW_VFS | _UDIAG_SHOW_PEER,
                                          0xFFFFFFFF, 0xFFFFFFFF)
            header = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY,
                                        _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
            diag.settimeout(2.0)
            diag.send(header + request)
            return _read_diag_replies(diag)
    except (OSError, struct.error):
        return []  # no netlink, no unix_diag module, or a sandbox: we cannot tell


def _read_diag_replies(diag: socket.socket) -> list[UnixSocketInfo]:
    sockets: list[UnixSocketInfo] = []
    while True:
        data = diag.recv(65536)
        if not data:
            return sockets
        offset = 0
        while offset + _NLMSG_HEADER.size <= len(data):
            length, kind = _NLMSG_HEADER.unpack_from(data, offset)[:2]
            if length < _NLMSG_HEADER.size or kind in (_NLMSG_DONE, _NLMSG_ERROR):
                return sockets
            sockets.append(_parse_unix_diag(data[offset + _NLMSG_HEADER.size:offset + length]))
            offset += (length + 3) & ~3


def _parse_unix_diag(payload: bytes) -> UnixSocketInfo:
    state, _pad, inode = _UNIX_DIAG_MSG.unpack_from(payload)[2:5]
    name = vfs_inode = peer = None
    offset = _UNIX_DIAG_MSG.size
    while offset + _RTATTR.size <= len(payload):
        length, kind = _RTATTR.unpack_from(payload, offset)
        if length < _RTATTR.size:
            break
        value = payload[offset + _RTATTR.size:offset + length]
        if kind == _UNIX_DIAG_NAME:
            name = _socket_name(value)
        elif kind == _UNIX_DIAG_VFS and len(value) >= 4:
            vfs_inode = struct.unpack_from("=I", value)[0]
        elif kind == _UNIX_DIAG_PEER and len(value) >= 4:
            peer = struct.unpack_from("=I", value)[0]
        offset += (length + 3) & ~3
    return UnixSocketInfo(inode=inode, name=name, vfs_inode=vfs_inode, peer=peer, state=state)


def _socket_name(raw: bytes) -> str:
    """A unix socket's bound name: a path (NUL-terminated as bound), or ``@name`` when abstract."""
    if raw[:1] == b"\0":
        return "@" + os.fsdecode(raw[1:].replace(b"\0", b""))
    return os.fsdecode(raw.split(b"\0", 1)[0])


def unix_client_inodes(path: str, sockets: list[UnixSocketInfo] | None = None) -> set[int]:
    """Inodes of the client sockets connected to the unix socket at ``path``.

    An accepted connection's server side carries the listener's path (and file
    inode); its peer is the client. Connections still waiting in the accept queue
    belong to no process yet (inode 0) and are left out.
    """
    try:
        file_inode: int | None = os.stat(path).st_ino
    except OSError:
        file_inode = None
    absolute = os.path.abspath(path)
    clients = set()
    for info in sockets if sockets is not None else unix_diag_sockets():
        same_socket = info.name in (path, absolute) or (file_inode is not None and info.vfs_inode == file_inode)
        if same_socket and info.inode and info.state == _TCP_ESTABLISHED and info.peer:
            clients.add(info.peer)
    return clients


# --- tcp -------------------------------------------------------------------------------

@dataclass(frozen=True)
class TcpRow:
    local: str
    remote: str
    state: int
    inode: int

    @property
    def local_port(self) -> int:
        return int(self.local.rsplit(":", 1)[1], 16)


def tcp_table(proc_root: str = "/proc") -> list[TcpRow]:
    rows = []
    for table in ("tcp", "tcp6"):
        for line in net_table(table, proc_root):
            fields = line.split()
            if len(fields) >= 10 and fields[9].isdigit() and len(fields[3]) <= 2 and ":" in fields[1]:
                rows.append(TcpRow(local=fields[1], remote=fields[2], state=int(fields[3], 16), inode=int(fields[9])))
    return rows


def decode_tcp_address(hex_address: str) -> str:
    """/proc/net/tcp's ``0100007F:1F90`` -> ``127.0.0.1:8080`` (IPv6 as ``[::1]:8080``).

    The kernel prints each 32-bit word of the address in host byte order.
    """
    address, port_hex = hex_address.rsplit(":", 1)
    port = int(port_hex, 16)
    raw = b"".join(struct.pack("=I", int(address[i:i + 8], 16)) for i in range(0, len(address), 8))
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw)}:{port}"
    return f"[{socket.inet_ntop(socket.AF_INET6, raw)}]:{port}"


def tcp_clients(port: int, rows: list[TcpRow]) -> tuple[set[int], list[str]]:
    """For connections QEMU accepted on ``port``: local client inodes, and remote client addresses."""
    inodes: set[int] = set()
    remote: list[str] = []
    for server in rows:
        if server.state != _TCP_ESTABLISHED or server.local_port != port or not server.inode:
            continue
        peer = next((r for r in rows if r.local == server.remote and r.remote == server.local), None)
        if peer is not None and peer.inode:
            inodes.add(peer.inode)
        elif peer is None:
            remote.append(decode_tcp_address(server.remote))
    return inodes, remote


# --- the answer ------------------------------------------------------------------------

def monitor_holders(endpoint: Any, exclude_inodes: Iterable[int] = (), proc_root: str = "/proc"
                    ) -> tuple[list[ProcessRef], list[str]]:
    """Processes (and remote addresses) connected to the monitor ``endpoint`` (an ``Endpoint``)."""
    remote: list[str] = []
    if endpoint.is_unix:
        clients = unix_client_inodes(endpoint.path)
    else:
        clients, remote = tcp_clients(endpoint.port, tcp_table(proc_root))
    clients -= set(exclude_inodes)
    owners = socket_owners(clients, proc_root)
    processes = sorted({ref for refs in owners.values() for ref in refs}, key=lambda ref: ref.pid)
    return processes, remote


def describe_holders(endpoint: Any, exclude_inodes: Iterable[int] = (), proc_root: str = "/proc") -> str:
    """Who holds the monitor, in words ("libvirt (virtqemud, pid 812)"), or "" if we cannot tell."""
    try:
        processes, remote = monitor_holders(endpoint, exclude_inodes, proc_root)
    except (OSError, ValueError):
        return ""
    parts = [f"libvirt ({ref.comm}, pid {ref.pid})" if ref.is_libvirt
             else f"another client (pid {ref.pid}, comm {ref.comm})" for ref in processes]
    parts += [f"a client at {address}" for address in remote]
    return " and ".join(parts)
