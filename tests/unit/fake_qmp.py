"""A scripted QMP server on a real socket, in a thread, for unit tests of QMP clients.

It speaks the protocol the way QEMU does: a greeting, ``qmp_capabilities``, then
replies carrying the command's ``id``, and events at any time. Like QEMU it
serves one client at a time; further clients wait in the listen backlog and get
no greeting until the current one leaves. File descriptors sent with SCM_RIGHTS
are attached to the next command, as QEMU does, and kept open for the test to
inspect (``server.received_fds``).

Script it per command::

    with FakeQMPServer(tmp_path / "qmp.sock") as server:
        server.reply("query-status", {"status": "running", "running": True})
        server.error("stop", "GenericError", "nope")
        server.hang("migrate")              # never answers
        server.drop("quit")                 # hangs up instead of answering
        server.on("cont", lambda call: call.emit("RESUME") or {})
        ...
        server.calls                         # every command received, in order

Unknown commands get QEMU's ``CommandNotFound`` error.
"""

from __future__ import annotations

import array
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GREETING_VERSION = {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "fake"}
_HANG = object()
_DROP = object()
DROP = _DROP  # what a handler returns to hang up instead of answering (as ``drop`` does)


class FakeQMPError(Exception):
    """Raise from a handler to answer with a QMP error."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


@dataclass
class Call:
    """One command as the server received it."""

    command: str
    arguments: dict[str, Any]
    fds: list[int]
    msg_id: Any
    session: Session = field(repr=False)

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        """Send an event (before the reply, as QEMU often does)."""
        self.session.send_event(event, data)


class Session:
    """One client connection."""

    def __init__(self, server: FakeQMPServer, conn: socket.socket) -> None:
        self.server = server
        self.conn = conn
        self.buffer = b""
        self.pending_fds: list[int] = []
        self.lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        # -qmp-pretty monitors indent nested lines; the closing brace starts the last line.
        text = json.dumps(message, indent=4) if self.server.pretty else json.dumps(message)
        with self.lock:
            self.conn.sendall(text.replace("\n", "\r\n").encode() + b"\r\n")

    def send_event(self, event: str, data: dict[str, Any] | None = None) -> None:
        now = time.time()
        message: dict[str, Any] = {"event": event,
                                   "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}
        if data is not None:
            message["data"] = data
        self.send(message)

    def receive(self) -> dict[str, Any] | None:
        """The next JSON object from the client (None at EOF); collects SCM_RIGHTS fds."""
        decoder = json.JSONDecoder()
        while True:
            text = self.buffer.lstrip()
            if text:
                try:
                    message, end = decoder.raw_decode(text.decode())
                except ValueError:
                    pass
                else:
                    self.buffer = text.decode()[end:].encode()
                    return message
            fds = array.array("i")
            data, ancillary, _flags, _addr = self.conn.recvmsg(65536, socket.CMSG_SPACE(16 * fds.itemsize))
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            self.pending_fds.extend(fds)
            self.server.received_fds.extend(fds)
            if not data:
                return None
            self.buffer += data

    def serve(self) -> None:
        if not self.server.greet:
            self.server.stopped.wait()  # accepted, never greeted: what a busy QEMU monitor looks like
            return
        self.send({"QMP": {"version": self.server.version, "capabilities": []}})
        while not self.server.stopped.is_set():
            message = self.receive()
            if message is None:
                return
            if not self.handle(message):
                return

    def handle(self, message: dict[str, Any]) -> bool:
        command = message.get("execute", "")
        call = Call(command, dict(message.get("arguments") or {}), self.pending_fds, message.get("id"), self)
        self.pending_fds = []
        self.server.calls.append(call)
        try:
            value = self.server.answer(call)
        except FakeQMPError as error:
            self.send({"error": {"class": error.error_class, "desc": error.desc}, "id": call.msg_id})
            return True
        if value is _DROP:
            return False
        if value is _HANG:
            self.server.stopped.wait()
            return False
        self.send({"return": value, "id": call.msg_id})
        return True


class FakeQMPServer:
    """Listen on ``path`` (unix) or on ``("127.0.0.1", 0)`` with ``tcp=True``, or serve an
    already listening ``listener`` (a socket another process bound and listens on, as
    a QEMU does: the kernel then names that process as the server, see fake_qemu.py).

    ``greet=False`` accepts connections but never greets (a monitor held by another
    client); ``pretty=True`` sends multi-line JSON like ``-qmp-pretty``.
    """

    def __init__(self, path: str | Path | None = None, tcp: bool = False, greet: bool = True,
                 version: dict[str, Any] | None = None, pretty: bool = False,
                 listener: socket.socket | None = None) -> None:
        if [path is not None, tcp, listener is not None].count(True) != 1:
            raise ValueError("give a unix socket path, tcp=True or a listening socket")
        self.path = str(path) if path is not None else None
        self.tcp = tcp
        self.greet = greet
        self.pretty = pretty
        self.version = version or GREETING_VERSION
        self.script: dict[str, Any] = {}
        self.calls: list[Call] = []
        self.received_fds: list[int] = []
        self.sessions: list[Session] = []
        self.stopped = threading.Event()
        self._listener: socket.socket | None = listener
        self._thread = threading.Thread(target=self._run, name="fake-qmp", daemon=True)

    # -- scripting ------------------------------------------------------------------

    def reply(self, command: str, value: Any) -> None:
        self.script[command] = value

    def error(self, command: str, error_class: str, desc: str) -> None:
        def fail(call: Call) -> Any:
            raise FakeQMPError(error_class, desc)
        self.script[command] = fail

    def on(self, command: str, handler: Callable[[Call], Any]) -> None:
        self.script[command] = handler

    def hang(self, command: str) -> None:
        self.script[command] = lambda call: _HANG

    def drop(self, command: str) -> None:
        self.script[command] = lambda call: _DROP

    def answer(self, call: Call) -> Any:
        if call.command in self.script:
            action = self.script[call.command]
            return action(call) if callable(action) else action
        if call.command == "qmp_capabilities":
            return {}
        raise FakeQMPError("CommandNotFound", f"The command {call.command} has not been found")

    def commands(self) -> list[str]:
        return [call.command for call in self.calls]

    def calls_of(self, command: str) -> list[Call]:
        return [call for call in self.calls if call.command == command]

    # -- life cycle -----------------------------------------------------------------

    @property
    def address(self) -> str:
        """The endpoint as the monitor takes it: the socket path, or ``127.0.0.1:PORT``."""
        if self.tcp:
            return f"127.0.0.1:{self._listener.getsockname()[1]}"
        return str(self.path)

    def start(self) -> FakeQMPServer:
        if self._listener is not None:
            self._listener.settimeout(0.02)
            self._thread.start()
            return self
        if self.tcp:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
        else:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(self.path)
        listener.listen(4)
        listener.settimeout(0.1)
        self._listener = listener
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=10)
        for session in self.sessions:
            session.conn.close()
        if self._listener is not None:
            self._listener.close()
        for fd in self.received_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)

    def __enter__(self) -> FakeQMPServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                conn = self._listener.accept()[0]
            except (socket.timeout, OSError):
                continue
            session = Session(self, conn)
            self.sessions.append(session)
            try:
                session.serve()  # one client at a time, like QEMU
            except OSError:
                pass
            finally:
                conn.close()
