# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Who is on the other end of a socket, and who listens on one.

A QMP socket path or port is only a name: whoever bound it first answers. Before
we talk to a guest's monitor (and hand it file descriptors), we ask the kernel
who serves our connection:

* unix sockets: ``SO_PEERCRED`` gives the pid that called ``listen()``;
* TCP: our connection's server side is a socket in /proc/net/tcp{,6} whose local
  address is our peer address and whose remote address is our local one; the
  process holding its inode in /proc/PID/fd serves us. The server side gets an
  inode only once accepted, so we wait (within the connect deadline) for that.

And to find a guest from its socket (``save socket=...``), the listening socket at
a path or port and the processes holding it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import time
from typing import Any

from ansible_collections.savestate.qemu.plugins.module_utils._errors import MonitorBusyError, MonitorPeerError
from ansible_collections.savestate.qemu.plugins.module_utils._proc import (
    PROC,
    net_table,
    pids,
    process_comm,
    read_status,
    socket_inodes,
)
from ansible_collections.savestate.qemu.plugins.module_utils._sockets import unix_diag_sockets

_UCRED = struct.Struct("=iII")
_TCP_LISTEN = 0x0A
_UNIX_LISTEN = 10        # TCP_LISTEN as sock_diag reports a listening unix socket
_SO_ACCEPTCON = 0x10000  # /proc/net/unix Flags of a listening socket
_POLL_INTERVAL = 0.005


def unix_peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """``(pid, uid, gid)`` of the process that created the listening end of a unix connection."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid, uid, gid = _UCRED.unpack(raw)
    except (OSError, struct.error):
        return None
    return (pid, uid, gid) if pid > 0 else None


def describe_process(pid: int, proc_root: str = PROC) -> str:
    status = read_status(pid, proc_root)
    uid = f", uid {status.uid}" if status is not None else ""
    return f"pid {pid} ({process_comm(pid, proc_root)}{uid})"


# --- tcp -------------------------------------------------------------------------------

def _address(hex_address: str) -> tuple[Any, int] | None:
    """/proc/net/tcp's ``0100007F:1F90`` -> (IPv4Address('127.0.0.1'), 8080); None if malformed."""
    address, sep, port_hex = hex_address.rpartition(":")
    if not sep or len(address) not in (8, 32) or not port_hex or len(port_hex) > 4:
        return None
    try:
        port = int(port_hex, 16)
        raw = b"".join(struct.pack("=I", int(address[i:i + 8], 16)) for i in range(0, len(address), 8))
        return _normal(ipaddress.ip_address(raw)), port
    except (ValueError, struct.error):
        return None


def _normal(address: Any) -> Any:
    """IPv4-mapped IPv6 addresses (dual-stack sockets) as the IPv4 address they carry."""
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def _sockname(raw: Any) -> tuple[Any, int] | None:
    try:
        host = str(raw[0]).split("%", 1)[0]
        return _normal(ipaddress.ip_address(host)), int(raw[1])
    except (ValueError, TypeError, IndexError):
        return None


def tcp_rows(proc_root: str = PROC) -> list[tuple[tuple[Any, int], tuple[Any, int], int, int]]:
    """``(local, remote, state, inode)`` of every TCP socket in /proc/net/tcp and tcp6."""
    rows = []
    for table in ("tcp", "tcp6"):
        for line in net_table(table, proc_root):
            fields = line.split()
            if len(fields) < 10 or not fields[9].isdigit() or len(fields[3]) > 2:
                continue
            local, remote = _address(fields[1]), _address(fields[2])
            try:
                state = int(fields[3], 16)
            except ValueError:
                continue
            if local is not None and remote is not None:
                rows.append((local, remote, state, int(fields[9])))
    return rows


def tcp_server_inode(sock: socket.socket, proc_root: str = PROC) -> int | None:
    """The inode of the socket serving our TCP connection ``sock`` (0 while not yet accepted)."""
    try:
        ours, theirs = _sockname(sock.getsockname()), _sockname(sock.getpeername())
    except OSError:
        return None
    if ours is None or theirs is None:
        return None
    for local, remote, _state, inode in tcp_rows(proc_root):
        if local == theirs and remote == ours:
            return inode
    return None


def tcp_listener_inodes(host: str | None, port: int, proc_root: str = PROC) -> set[int]:
    """Inodes of the listening TCP sockets that accept connections to ``host:port``."""
    wanted = _sockname((host or "127.0.0.1", port))
    found = set()
    for local, _remote, state, inode in tcp_rows(proc_root):
        if state != _TCP_LISTEN or local[1] != port or not inode:
            continue
        if wanted is None or local[0] == wanted[0] or local[0].is_unspecified or (
                wanted[0].is_loopback and local[0].is_loopback):
            found.add(inode)
    return found


# --- unix ------------------------------------------------------------------------------

def unix_listener_inodes(path: str, proc_root: str = PROC) -> set[int]:
    """Inodes of the listening unix sockets bound at ``path`` (by file inode, else by name)."""
    try:
        file_inode: int | None = os.stat(path).st_ino
    except OSError:
        return set()  # nothing is bound there (any more)
    diag = unix_diag_sockets()
    if diag:
        return {info.inode for info in diag
                if info.state == _UNIX_LISTEN and info.inode and info.vfs_inode == file_inode}
    # No sock_diag: /proc/net/unix names the path as it was bound (maybe relative, maybe since replaced).
    absolute = os.path.abspath(path)
    found = set()
    for line in net_table("unix", proc_root):
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[6].isdigit() and fields[7] in (path, absolute):
            try:
                if int(fields[3], 16) & _SO_ACCEPTCON:
                    found.add(int(fields[6]))
            except ValueError:
                continue
    return found


def holders(inodes: set[int], proc_root: str = PROC, candidates: list[int] | None = None) -> list[int]:
    """Pids that have any of ``inodes`` open (checking ``candidates`` first when given)."""
    if not inodes:
        return []
    found = [pid for pid in (candidates or []) if socket_inodes(pid, proc_root) & inodes]
    if found:
        return found
    return [pid for pid in pids(proc_root) if socket_inodes(pid, proc_root) & inodes]


# --- verification ------------------------------------------------------------------------

def verify_peer(sock: socket.socket, endpoint: Any, expected_pid: int, deadline: float,
                proc_root: str = PROC) -> None:
    """Refuse (MonitorPeerError) unless ``expected_pid`` serves our connection ``sock`` to ``endpoint``."""
    if getattr(endpoint, "is_unix", False):
        credentials = unix_peer_credentials(sock)
        if credentials is None:
            raise MonitorPeerError(f"Cannot tell which process serves the QMP socket {endpoint} (no SO_PEERCRED); "
                                   f"refusing to talk to it as the guest's QEMU pid {expected_pid}.")
        if credentials[0] != expected_pid:
            pid, uid = credentials[0], credentials[1]
            raise _mismatch(endpoint, f"pid {pid} ({process_comm(pid, proc_root)}, uid {uid})", expected_pid)
        return
    while True:
        inode = tcp_server_inode(sock, proc_root)
        if inode:
            break
        if inode is None or time.monotonic() >= deadline:
            if inode == 0:  # queued, never accepted: QEMU serves another client
                raise MonitorBusyError(f"The QMP monitor at {endpoint} did not accept our connection within the "
                                       "connect timeout: it serves another client.")
            raise MonitorPeerError(f"Cannot find the server side of our connection to the QMP endpoint {endpoint} "
                                   f"in /proc/net/tcp; refusing to talk to it as the guest's QEMU pid {expected_pid}.")
        time.sleep(_POLL_INTERVAL)
    if inode in socket_inodes(expected_pid, proc_root):
        return
    owners = holders({inode}, proc_root)
    who = ", ".join(describe_process(pid, proc_root) for pid in owners) or "a process we cannot see"
    raise _mismatch(endpoint, who, expected_pid)


def _mismatch(endpoint: Any, who: str, expected_pid: int) -> MonitorPeerError:
    return MonitorPeerError(f"The QMP socket {endpoint} is served by {who}, not by the guest's QEMU pid "
                            f"{expected_pid}; refusing to talk to it.")
