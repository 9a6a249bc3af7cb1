"""A hostile QMP server, run as an unprivileged user by the security tests.

It binds a unix socket where a guest's monitor is expected, speaks just enough
QMP to look like QEMU (greeting, then ``{"return": {}}`` to everything, a
"running" status), and records every connection and every file descriptor it
was handed in a log file, so a test can assert that nobody talked to it.

    python3 impostor.py SOCKET_PATH LOG_PATH
"""

from __future__ import annotations

import array
import json
import os
import socket
import sys

GREETING = {"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": ""},
                    "capabilities": []}}


def _answer(command: str) -> dict:
    if command == "query-status":
        return {"return": {"status": "running", "running": True}}
    return {"return": {}}


def _serve(conn: socket.socket, log) -> None:
    conn.sendall(json.dumps(GREETING).encode() + b"\r\n")
    buffer = b""
    while True:
        fds = array.array("i")
        data, ancdata, _flags, _addr = conn.recvmsg(65536, socket.CMSG_LEN(16 * fds.itemsize))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        if fds:
            log.write(f"received fds {list(fds)}\n")
            log.flush()
        if not data:
            return
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if not line.strip():
                continue
            message = json.loads(line)
            log.write(f"command {message.get('execute')}\n")
            log.flush()
            reply = _answer(message.get("execute", ""))
            if "id" in message:
                reply["id"] = message["id"]
            conn.sendall(json.dumps(reply).encode() + b"\r\n")


def main(path: str, log_path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("listening\n")
        log.flush()
        while True:
            conn = server.accept()[0]
            log.write("connection\n")
            log.flush()
            try:
                _serve(conn, log)
            except (OSError, ValueError):
                pass
            finally:
                conn.close()


if __name__ == "__main__":
    os.umask(0o077)
    main(sys.argv[1], sys.argv[2])
