# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""A synchronous QMP client for modules, built on qemu.qmp's asynchronous ``QMPClient``.

Modules are short-lived, single-threaded programs; they want a call that returns
or raises within a bound, never one that hangs. So every operation here runs on a
private event loop under ``asyncio.wait_for``:

* ``connect`` is bounded as a whole. A QMP socket serves one client at a time;
  a second client's connection is accepted by the kernel but QEMU never greets
  it. Such a connect ends in :class:`MonitorBusyError` naming, where the kernel
  tells us, the process that holds the monitor.
* every command has a timeout; QEMU's error replies become :class:`QMPCommandError`
  carrying QMP's error class and description;
* events are awaited with a timeout; ``listen()`` registers interest *before* the
  command that causes them, so that none is missed.

File descriptors travel over unix sockets only (SCM_RIGHTS). The fd is sent on
its own, right before the command that consumes it (``getfd``/``add-fd``); QEMU
attaches it to that next command. We never close the caller's fd: QEMU holds its
own copy once the command returned.

Every message in either direction can be recorded (``trace=True``) with secrets
redacted, for modules to return when the user asks for ``qmp_trace``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar, cast

from ansible_collections.savestate.qemu.plugins.module_utils._errors import (
    FdPassingUnsupportedError,
    MonitorBusyError,
    MonitorClosedError,
    MonitorError,
    MonitorTimeoutError,
    QMPCommandError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._peer import verify_peer
from ansible_collections.savestate.qemu.plugins.module_utils._sockets import describe_holders

try:
    from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, Message, QMPClient, QMPError, StateError
    from qemu.qmp.legacy import QEMUMonitorProtocol
    from qemu.qmp.message import DeserializationError
except ImportError:
    HAS_QEMU_QMP = False
    QEMU_QMP_IMPORT_ERROR: str | None = traceback.format_exc()

    # Stand-ins so that the ``except`` clauses below still work without qemu.qmp.
    class QMPError(Exception):  # type: ignore[no-redef]
        pass

    class ExecuteError(QMPError):  # type: ignore[no-redef]
        pass

    class ExecInterruptedError(QMPError):  # type: ignore[no-redef]
        pass

    class StateError(QMPError):  # type: ignore[no-redef]
        pass

    class DeserializationError(QMPError):  # type: ignore[no-redef]
        pass

    QMPClient = EventListener = Message = QEMUMonitorProtocol = None  # type: ignore[misc,assignment]
else:
    HAS_QEMU_QMP = True
    QEMU_QMP_IMPORT_ERROR = None

QEMU_QMP_REQUIREMENT = "qemu.qmp >= 0.0.4"

_T = TypeVar("_T")

REDACTED = "<redacted>"
# Argument names whose values are secrets wherever they appear.
_SECRET_KEYS = frozenset(("password", "passwd", "new-password", "passphrase", "secret",
                          "key", "private-key", "token", "cookie"))
# QOM types whose ``data`` property is the secret itself (object-add).
_SECRET_QOM_TYPES = frozenset(("secret", "secret_keyring"))
_HMP_SECRET = re.compile(r"pass|secret|key", re.IGNORECASE)


def qemu_qmp_recent_enough() -> bool:
    """Whether the qemu.qmp found is at least the floor (the module layer, _module.py, enforces it)."""
    # 0.0.4 renamed the legacy cmd() to cmd_raw() and made connect() accept a
    # socket object, which connect() below relies on; the rename marks the version.
    return HAS_QEMU_QMP and hasattr(QEMUMonitorProtocol, "cmd_raw")


# --- endpoints -----------------------------------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    """Where a QMP monitor listens: a unix socket path, or a TCP host and port."""

    kind: str  # 'unix' or 'tcp'
    path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def is_unix(self) -> bool:
        return self.kind == "unix"

    def __str__(self) -> str:
        if self.is_unix:
            return str(self.path)
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def unix_endpoint(path: str) -> Endpoint:
    return Endpoint(kind="unix", path=path)


def tcp_endpoint(host: str, port: int) -> Endpoint:
    return Endpoint(kind="tcp", host=host, port=port)


def parse_endpoint(text: str | Endpoint) -> Endpoint:
    """Accept ``/path``, ``unix:/path``, ``host:port``, ``[v6]:port`` and ``tcp:host:port``."""
    if isinstance(text, Endpoint):
        return text
    value = str(text).strip()
    if not value:
        raise MonitorError("The QMP endpoint is empty: give a unix socket path or host:port.")
    if value.startswith("unix:"):
        return unix_endpoint(value[len("unix:"):])
    if value.startswith("tcp:"):
        return _parse_host_port(value[len("tcp:"):], original=value)
    if value.startswith(("/", ".", "~")):
        return unix_endpoint(value)
    host, sep, port = value.rpartition(":")
    if sep and port.isdigit() and host:
        return _parse_host_port(value, original=value)
    return unix_endpoint(value)


def _parse_host_port(value: str, original: str) -> Endpoint:
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise MonitorError(f"{original!r} is not a QMP endpoint: expected host:port with a port from 1 to 65535.")
    return tcp_endpoint(host or "127.0.0.1", int(port))


# --- what the typed helpers return ---------------------------------------------------

@dataclass(frozen=True)
class BlockDevice:
    """One entry of ``query-block``: a drive and the image inserted in it, if any."""

    device: str          # the -drive id (empty for -blockdev/-device only setups)
    qdev: str | None     # the guest device's id or QOM path
    file: str | None     # the top image's file name
    format: str | None   # the top image's driver (raw, qcow2, ...)
    read_only: bool
    removable: bool
    inserted: bool

    @classmethod
    def from_qmp(cls, entry: dict[str, Any]) -> BlockDevice:
        inserted = entry.get("inserted") or {}
        return cls(device=entry.get("device", ""), qdev=entry.get("qdev"),
                   file=inserted.get("file"), format=inserted.get("drv"),
                   read_only=bool(inserted.get("ro", False)),
                   removable=bool(entry.get("removable", False)), inserted=bool(inserted))


# --- tracing -------------------------------------------------------------------------

def redact(message: Any) -> Any:
    """A copy of a QMP message with secret values replaced by ``<redacted>``."""
    return _redact_value(message, secret_object=False)


def _redact_value(value: Any, secret_object: bool) -> Any:
    if isinstance(value, list):
        return [_redact_value(item, secret_object) for item in value]
    if not isinstance(value, dict):
        return value
    is_secret_object = secret_object or value.get("qom-type") in _SECRET_QOM_TYPES
    redacted = {}
    for key, item in value.items():
        if _is_secret_key(key) or (is_secret_object and key == "data"):
            redacted[key] = REDACTED
        elif key == "command-line" and isinstance(item, str) and _HMP_SECRET.search(item):
            redacted[key] = REDACTED  # human-monitor-command "set_password vnc ...", "object_add secret,..."
        else:
            redacted[key] = _redact_value(item, is_secret_object and key == "props")
    return redacted


def _is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return lowered in _SECRET_KEYS or "password" in lowered


def _message_kind(direction: str, message: dict[str, Any]) -> str:
    if direction == "sent":
        return "command"
    if "QMP" in message:
        return "greeting"
    if "event" in message:
        return "event"
    return "reply"


def _plain(message: Any) -> Any:
    """qemu.qmp's Message as plain JSON-able Python data."""
    return json.loads(bytes(message)) if hasattr(message, "__bytes__") else json.loads(json.dumps(message))


def _timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


if HAS_QEMU_QMP:
    class _TracingClient(QMPClient):
        """QMPClient that reports every message; qemu.qmp provides these hooks for subclasses."""

        def __init__(self, name: str, recorder: Callable[[str, Any], None]) -> None:
            super().__init__(name)
            self._recorder = recorder

        def _cb_outbound(self, msg: Any) -> Any:
            self._recorder("sent", msg)
            return super()._cb_outbound(msg)

        def _cb_inbound(self, msg: Any) -> Any:
            self._recorder("received", msg)
            return super()._cb_inbound(msg)

        async def _do_recv(self) -> Any:
            """One message; also one spread over many lines, as ``-qmp-pretty`` monitors send them.

            qemu.qmp reads a message per line. A pretty-printed message starts with a
            line holding only ``{`` and ends with a line starting with its closing
            ``}`` (nested lines are indented), so we read on to such a line and retry.
            """
            data = await self._readline()
            while True:
                try:
                    return Message(data, eager=True)
                except DeserializationError:
                    if not data.startswith(b"{") or len(data) > self.readbuflen:
                        raise
                line = await self._readline()
                data += line
                while not line.startswith(b"}"):
                    line = await self._readline()
                    data += line


class _EventInbox:
    """An event listener plus the events it heard that no wait has consumed yet."""

    def __init__(self, names: frozenset[str], listener: Any) -> None:
        self.names = names
        self.listener = listener
        self.backlog: list[dict[str, Any]] = []

    def covers(self, names: frozenset[str]) -> bool:
        return not self.names or names <= self.names


def _event_names(names: str | Iterable[str]) -> frozenset[str]:
    return frozenset((names,)) if isinstance(names, str) else frozenset(names)


# --- the monitor ---------------------------------------------------------------------

class Monitor:
    """One QMP session. Use as a context manager; every call is bounded by a timeout."""

    def __init__(self, endpoint: str | Endpoint, connect_timeout: float = 5.0,
                 command_timeout: float = 30.0, trace: bool = False, peer_pid: int | None = None) -> None:
        if not HAS_QEMU_QMP:
            raise MonitorError(f"The Python library {QEMU_QMP_REQUIREMENT} is required on the managed host "
                               "to talk to QEMU's monitor; install it with pip.")
        self.endpoint = parse_endpoint(endpoint)
        self.connect_timeout = float(connect_timeout)
        self.command_timeout = float(command_timeout)
        # The guest's QEMU: the connection is refused unless this pid serves the socket.
        self.peer_pid = peer_pid
        self._tracing = trace
        self._trace: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._client: Any = None
        self._connected = False
        self._inboxes: list[_EventInbox] = []
        self._schema: dict[str, dict[str, Any]] | None = None

    # -- life cycle ----------------------------------------------------------------

    def __enter__(self) -> Monitor:
        return self.connect()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def connect(self) -> Monitor:
        """Connect and negotiate; on failure the session is closed (make a new Monitor to retry)."""
        if self._connected:
            return self
        if self._loop.is_closed():
            raise MonitorClosedError(f"This session with the QMP monitor at {self.endpoint} was closed; open a new one.")
        try:
            self._connect()
        except BaseException:
            self.close()
            raise
        return self

    def _connect(self) -> None:
        deadline = time.monotonic() + self.connect_timeout
        # Objects holding asyncio queues must be created on our loop (Python 3.9 binds them at creation).
        self._client = self._loop.run_until_complete(self._new_client())
        sock = self._open_socket(deadline)
        own_inode = os.fstat(sock.fileno()).st_ino
        if self.peer_pid is not None:
            try:
                # Before the greeting: nothing is read from, or sent to, an impostor.
                verify_peer(sock, self.endpoint, self.peer_pid, deadline)
            except MonitorBusyError:
                sock.close()  # TCP: never accepted, so another client holds the monitor; say which
                raise self._busy_error(own_inode) from None
            except BaseException:
                sock.close()
                raise
        try:
            self._await(self._client.connect(sock), max(deadline - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            sock.close()
            raise self._busy_error(own_inode) from None
        except QMPError as error:
            sock.close()
            raise self._session_error(error) from None
        self._connected = True
        self._schema = None

    def close(self) -> None:
        """End the session. A peer that is already gone (after ``quit``) is not an error."""
        if self._loop.is_closed():
            return
        try:
            if self._client is not None:
                with contextlib.suppress(EOFError, OSError, QMPError, asyncio.TimeoutError):
                    self._await(self._client.disconnect(), self.connect_timeout)
        finally:
            self._connected = False
            self._inboxes.clear()
            self._loop.close()

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def trace(self) -> list[dict[str, Any]]:
        """Every message sent and received so far (empty unless ``trace=True``), secrets redacted."""
        return list(self._trace)

    # -- commands ------------------------------------------------------------------

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        """Run one QMP command and return its ``return`` value."""
        self._require_session()
        limit = self.command_timeout if timeout is None else timeout
        try:
            return self._await(self._client.execute(command, arguments), limit)
        except asyncio.TimeoutError:
            raise MonitorTimeoutError(
                f"QMP command {command!r} got no reply from {self.endpoint} within {limit:g} s; "
                "QEMU may be stuck or very busy. Its outcome is unknown: query the guest before retrying.") from None
        except ExecuteError as error:
            raise QMPCommandError(command, error.error_class, str(error)) from None
        except (ExecInterruptedError, StateError, EOFError, OSError):
            self._connected = False
            raise MonitorClosedError(
                f"QEMU closed the monitor connection ({self.endpoint}) while running {command!r}: "
                "QEMU exited or was killed. The command's outcome is unknown.") from None
        except QMPError as error:
            raise MonitorError(f"QMP protocol error from {self.endpoint} running {command!r}: {error}") from None

    # -- events --------------------------------------------------------------------

    @contextlib.contextmanager
    def listen(self, names: str | Iterable[str]) -> Iterator[None]:
        """Collect events named ``names`` from now on, for :meth:`wait_event` inside the block.

        Enter it before the command whose events you want: an event QEMU sends
        before anyone listens is lost.
        """
        self._require_session()
        wanted = _event_names(names)
        inbox = _EventInbox(wanted, self._loop.run_until_complete(self._new_listener(wanted)))
        self._client.register_listener(inbox.listener)
        self._inboxes.append(inbox)
        try:
            yield
        finally:
            self._inboxes.remove(inbox)
            if self._client is not None and not self._loop.is_closed():
                with contextlib.suppress(QMPError, ValueError):
                    self._client.remove_listener(inbox.listener)

    def wait_event(self, names: str | Iterable[str], predicate: Callable[[dict[str, Any]], bool] | None = None,
                   timeout: float | None = None) -> dict[str, Any]:
        """The next event named ``names`` for which ``predicate`` holds.

        Inside :meth:`listen` (covering these names) events since the block began
        count; otherwise only events arriving from now on.
        """
        self._require_session()
        wanted = _event_names(names)
        limit = self.command_timeout if timeout is None else timeout
        inbox = next((i for i in reversed(self._inboxes) if i.covers(wanted)), None)
        if inbox is not None:
            return self._wait_in(inbox, wanted, predicate, limit)
        with self.listen(wanted):
            return self._wait_in(self._inboxes[-1], wanted, predicate, limit)

    def _wait_in(self, inbox: _EventInbox, wanted: frozenset[str],
                 predicate: Callable[[dict[str, Any]], bool] | None, limit: float) -> dict[str, Any]:
        def matches(event: dict[str, Any]) -> bool:
            return event.get("event") in wanted and (predicate is None or predicate(event))

        for index, event in enumerate(inbox.backlog):
            if matches(event):
                return inbox.backlog.pop(index)

        async def next_match() -> dict[str, Any]:
            while True:
                event: dict[str, Any] = _plain(await inbox.listener.get())
                if matches(event):
                    return event
                inbox.backlog.append(event)  # another wait in this block may want it

        try:
            return cast("dict[str, Any]", self._await(next_match(), limit))
        except asyncio.TimeoutError:
            raise MonitorTimeoutError(
                f"QEMU ({self.endpoint}) sent no {'/'.join(sorted(wanted))} event "
                f"{'matching what we wait for ' if predicate else ''}within {limit:g} s.") from None

    # -- file descriptors ------------------------------------------------------------

    def pass_named_fd(self, fd: int, name: str) -> None:
        """Give QEMU a copy of ``fd`` under ``name`` (``getfd``), e.g. for a ``fd:NAME`` URI."""
        self._send_fd(fd, "getfd")
        self.execute("getfd", {"fdname": name})

    def close_named_fd(self, name: str) -> None:
        self.execute("closefd", {"fdname": name})

    def add_fd(self, fd: int, fdset_id: int | None = None, opaque: str | None = None) -> int:
        """Add a copy of ``fd`` to an fdset (``add-fd``) and return the fdset's id."""
        arguments: dict[str, Any] = {}
        if fdset_id is not None:
            arguments["fdset-id"] = fdset_id
        if opaque is not None:
            arguments["opaque"] = opaque
        self._send_fd(fd, "add-fd")
        reply = self.execute("add-fd", arguments)
        fdset = reply.get("fdset-id") if isinstance(reply, dict) else None
        if not isinstance(fdset, int) or isinstance(fdset, bool):
            raise self._malformed("add-fd", "no integer 'fdset-id'")
        return fdset

    def remove_fdset(self, fdset_id: int) -> None:
        self.execute("remove-fd", {"fdset-id": fdset_id})

    @contextlib.contextmanager
    def named_fd(self, fd: int, name: str) -> Iterator[str]:
        """``pass_named_fd`` for the block; QEMU's copy is closed on the way out, whatever happens."""
        self.pass_named_fd(fd, name)
        with self._cleanup(lambda: self.close_named_fd(name)):
            yield name

    @contextlib.contextmanager
    def fdset(self, fds: list[int], opaque: str) -> Iterator[int]:
        """Put ``fds`` into one new fdset for the block (``/dev/fdset/ID``); removed on the way out."""
        if not fds:
            raise ValueError("fdset() needs at least one file descriptor")
        fdset_id = self.add_fd(fds[0], opaque=opaque)
        with self._cleanup(lambda: self.remove_fdset(fdset_id)):
            for fd in fds[1:]:
                self.add_fd(fd, fdset_id=fdset_id, opaque=opaque)
            yield fdset_id

    @contextlib.contextmanager
    def _cleanup(self, undo: Callable[[], None]) -> Iterator[None]:
        """Run ``undo`` after the block; "already gone" is fine, and never mask the block's own error."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(MonitorError):
                undo()
            raise
        try:
            undo()
        except QMPCommandError as error:
            if not _already_gone(error):
                raise
        except MonitorClosedError:
            pass  # QEMU went away (quit): its fds went with it

    def _send_fd(self, fd: int, command: str) -> None:
        self._require_session()
        if not self.endpoint.is_unix:
            raise FdPassingUnsupportedError(
                f"Cannot pass a file descriptor to QEMU over the TCP monitor {self.endpoint}: "
                "file descriptors travel only over unix sockets. Use a unix socket monitor "
                "(-qmp unix:PATH,server=on,wait=off) or a transport that needs no fd.")
        self._record("sent", {"fd": fd, "for": command}, kind="fd")
        try:
            # Sent alone, right before the command: QEMU hands it to the next command it reads.
            self._client.send_fd_scm(fd)
        except (StateError, OSError) as error:
            self._connected = False
            raise MonitorClosedError(f"Could not pass a file descriptor to QEMU ({self.endpoint}): {error}") from None

    # -- typed helpers ---------------------------------------------------------------

    def status(self, timeout: float | None = None) -> str:
        """QEMU's run state: running, paused, postmigrate, inmigrate, prelaunch, ..."""
        return self._field("query-status", "status", str, timeout)

    def running(self) -> bool:
        return self._field("query-status", "running", bool)

    def name(self) -> str | None:
        name = self._dict("query-name").get("name")
        if name is not None and not isinstance(name, str):
            raise self._malformed("query-name", "a 'name' that is not a string")
        return name

    def uuid(self) -> str:
        return self._field("query-uuid", "UUID", str)

    def version(self) -> tuple[int, int, int]:
        return self._version_numbers(self._dict("query-version"))

    def version_string(self) -> str:
        """``10.0.2`` plus the distribution's package string when there is one."""
        reply = self._dict("query-version")
        major, minor, micro = self._version_numbers(reply)
        package = str(reply.get("package") or "").strip()
        base = f"{major}.{minor}.{micro}"
        return f"{base} ({package})" if package else base

    def machine_type(self) -> str:
        """The resolved, versioned machine type (``pc-i440fx-10.0``, never the alias ``pc``).

        The QOM type of /machine is the concrete class, so aliases are already resolved.
        """
        qom_type = self.execute("qom-get", {"path": "/machine", "property": "type"})
        if not isinstance(qom_type, str):
            raise self._malformed("qom-get", "a machine type that is not a string")
        return qom_type[:-len("-machine")] if qom_type.endswith("-machine") else qom_type

    def memory_bytes(self) -> int:
        return self._field("query-memory-size-summary", "base-memory", int)

    def vcpus(self) -> int:
        return len(self._list("query-cpus-fast"))

    def block_devices(self) -> list[BlockDevice]:
        entries = self._list("query-block")
        if not all(isinstance(entry, dict) for entry in entries):
            raise self._malformed("query-block", "entries that are not objects")
        try:
            return [BlockDevice.from_qmp(entry) for entry in entries]
        except (AttributeError, TypeError) as error:
            raise self._malformed("query-block", f"malformed entries ({error})") from None

    def migration_capabilities(self) -> set[str]:
        """Capabilities this QEMU knows (whether on or off)."""
        return {name for name, _state in self._capabilities()}

    def enabled_migration_capabilities(self) -> set[str]:
        return {name for name, state in self._capabilities() if state}

    def migration_parameters(self) -> dict[str, Any]:
        return self._dict("query-migrate-parameters")

    def query_migrate(self, timeout: float | None = None) -> dict[str, Any]:
        return self._dict("query-migrate", timeout)

    def migration_blockers(self) -> list[str]:
        """Why an outgoing migration would be refused (QEMU >= 6.0 reports ``blocked-reasons``)."""
        reasons = self.query_migrate().get("blocked-reasons") or []
        return [str(reason) for reason in reasons] if isinstance(reasons, list) else []

    # -- validated replies -------------------------------------------------------------
    # The peer is QEMU, but a QEMU can be buggy or compromised: a reply of the wrong
    # shape is a MonitorError with the command's name, never a KeyError or TypeError.

    def _malformed(self, command: str, what: str) -> MonitorError:
        return MonitorError(f"The QMP peer at {self.endpoint} answered {command!r} with {what}; "
                            "it does not behave like QEMU.")

    def _dict(self, command: str, timeout: float | None = None) -> dict[str, Any]:
        reply = self.execute(command, timeout=timeout)
        if not isinstance(reply, dict):
            raise self._malformed(command, "something that is not an object")
        return dict(reply)

    def _list(self, command: str) -> list[Any]:
        reply = self.execute(command)
        if not isinstance(reply, list):
            raise self._malformed(command, "something that is not a list")
        return reply

    def _field(self, command: str, key: str, kind: type[_T], timeout: float | None = None) -> _T:
        value = self._dict(command, timeout).get(key)
        # bool is an int in Python; a size or a count must be a real integer.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self._malformed(command, f"no {kind.__name__} {key!r}")
        return value

    def _version_numbers(self, reply: dict[str, Any]) -> tuple[int, int, int]:
        qemu = reply.get("qemu")
        numbers = [qemu.get(key) if isinstance(qemu, dict) else None for key in ("major", "minor", "micro")]
        if not all(isinstance(number, int) and not isinstance(number, bool) for number in numbers):
            raise self._malformed("query-version", "no numeric qemu version")
        major, minor, micro = (cast(int, number) for number in numbers)
        return major, minor, micro

    def _capabilities(self) -> list[tuple[str, bool]]:
        entries = self._list("query-migrate-capabilities")
        if not all(isinstance(e, dict) and isinstance(e.get("capability"), str) for e in entries):
            raise self._malformed("query-migrate-capabilities", "entries without a capability name")
        return [(entry["capability"], bool(entry.get("state"))) for entry in entries]

    def has_command(self, name: str) -> bool:
        entity = self._schema_index().get(name)
        return entity is not None and entity.get("meta-type") == "command"

    def _schema_answer(self, question: Callable[[], bool]) -> bool:
        try:
            return question()
        except (KeyError, TypeError, AttributeError, ValueError):
            raise self._malformed("query-qmp-schema", "a schema of an unexpected shape") from None

    def supports_file_transport(self) -> bool:
        """Whether ``migrate`` takes ``file:`` destinations (QEMU 8.2+), read from the QAPI schema.

        The schema names the channel address union's variants; a ``file`` variant is the
        file transport. QEMU 7.2 has no ``channels`` argument at all.
        """
        def file_variant() -> bool:
            channels = self._command_argument("migrate", "channels")
            if channels is None:
                return False
            return "file" in self._variant_cases(self._find_member_type(channels["type"], "addr"))
        return self._schema_answer(file_variant)

    def supports_incoming_exit_on_error(self) -> bool:
        """Whether ``migrate-incoming`` takes ``exit-on-error`` (QEMU 9.1+)."""
        return self._schema_answer(lambda: self._command_argument("migrate-incoming", "exit-on-error") is not None)

    # -- schema ----------------------------------------------------------------------

    def _schema_index(self) -> dict[str, dict[str, Any]]:
        if self._schema is None:  # the schema is big; fetch it once per connection
            entities = self._list("query-qmp-schema")
            self._schema = {entity["name"]: entity for entity in entities
                            if isinstance(entity, dict) and isinstance(entity.get("name"), str)}
        return self._schema

    def _command_argument(self, command: str, argument: str) -> dict[str, Any] | None:
        entity = self._schema_index().get(command)
        if entity is None or entity.get("meta-type") != "command":
            return None
        return self._member(entity.get("arg-type"), argument)

    def _member(self, type_name: str | None, member: str) -> dict[str, Any] | None:
        entity = self._schema_index().get(type_name or "", {})
        return next((m for m in entity.get("members", []) if m.get("name") == member), None)

    def _find_member_type(self, type_name: str, member: str) -> str | None:
        """The type of ``member`` in ``type_name``, looking through an array to its element type."""
        entity = self._schema_index().get(type_name, {})
        if entity.get("meta-type") == "array":
            entity = self._schema_index().get(entity.get("element-type", ""), {})
        found = next((m for m in entity.get("members", []) if m.get("name") == member), None)
        return found["type"] if found else None

    def _variant_cases(self, type_name: str | None) -> set[str]:
        entity = self._schema_index().get(type_name or "", {})
        return {variant["case"] for variant in entity.get("variants", [])}

    # -- plumbing ----------------------------------------------------------------------

    async def _new_client(self) -> Any:
        return _TracingClient(f"savestate-{os.getpid()}", self._record)

    async def _new_listener(self, names: frozenset[str]) -> Any:
        return EventListener(sorted(names) or None)

    def _await(self, awaitable: Any, timeout: float) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(awaitable, timeout))

    def _require_session(self) -> None:
        if not self._connected:
            raise MonitorClosedError(f"Not connected to the QMP monitor at {self.endpoint} "
                                     "(never connected, closed, or QEMU hung up).")

    def _record(self, direction: str, message: Any, kind: str | None = None) -> None:
        if not self._tracing:
            return
        plain = _plain(message)
        self._trace.append({
            "time": _timestamp(),
            "endpoint": str(self.endpoint),
            "direction": direction,
            "kind": kind or _message_kind(direction, plain),
            "message": redact(plain),
        })

    def _open_socket(self, deadline: float) -> socket.socket:
        """Connect the transport ourselves, so that a failure here is told apart from a silent monitor."""
        endpoint = self.endpoint
        candidates: list[tuple[int, Any]]
        if endpoint.is_unix:
            candidates = [(socket.AF_UNIX, endpoint.path)]
        else:
            try:
                infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
            except socket.gaierror as error:
                raise MonitorError(f"Cannot resolve the QMP host {endpoint.host!r}: {error.strerror}.") from None
            candidates = [(info[0], info[4]) for info in infos]
        last_error: OSError | None = None
        for family, address in candidates:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                self._await(self._loop.sock_connect(sock, address), max(deadline - time.monotonic(), 0.001))
                return sock
            except asyncio.TimeoutError:
                sock.close()
                raise self._connect_timeout_error() from None
            except OSError as error:
                sock.close()
                last_error = error
        raise self._connect_error(last_error)

    def _connect_error(self, error: OSError | None) -> MonitorError:
        where = f"QMP socket {self.endpoint}" if self.endpoint.is_unix else f"QMP endpoint {self.endpoint}"
        if isinstance(error, FileNotFoundError):
            return MonitorError(f"There is no {where}: the guest is not running, or its monitor is elsewhere "
                                "(check -qmp / -chardev path= on its command line).")
        if isinstance(error, ConnectionRefusedError):
            if self.endpoint.is_unix:
                return MonitorError(f"Nothing listens on the {where} (connection refused): QEMU has probably "
                                    "exited and left the socket file behind.")
            return MonitorError(f"Connection to the {where} was refused: no QEMU monitor listens there.")
        if isinstance(error, PermissionError):
            return MonitorError(f"Permission denied connecting to the {where}: run the task as root or as "
                                "the user QEMU runs as (become: true).")
        reason = error.strerror if error is not None and error.strerror else str(error)
        return MonitorError(f"Cannot connect to the {where}: {reason}.")

    def _connect_timeout_error(self) -> MonitorError:
        if self.endpoint.is_unix:
            # A unix connect only blocks when the listen backlog is full: clients queue behind one that is served.
            return self._busy_error()
        return MonitorTimeoutError(f"No answer from the QMP endpoint {self.endpoint} within "
                                   f"{self.connect_timeout:g} s (host down or filtered?).")

    def _busy_error(self, own_inode: int | None = None) -> MonitorBusyError:
        # Our own abandoned connection is not the holder, even when the holder is this very process.
        holders = describe_holders(self.endpoint, exclude_inodes={own_inode} if own_inode else ())
        who = holders or "another client (we could not tell which process)"
        return MonitorBusyError(
            f"The QMP monitor at {self.endpoint} is busy: it accepted the connection but sent no greeting "
            f"within {self.connect_timeout:g} s. QMP serves one client at a time and {who} holds it. "
            "Disconnect that client and retry; a guest managed by libvirt is managed with virsh instead.")

    def _session_error(self, error: Exception) -> MonitorError:
        cause = getattr(error, "exc", None)
        if isinstance(cause, (EOFError, ConnectionResetError, BrokenPipeError)):
            return MonitorClosedError(f"QEMU closed the connection to {self.endpoint} before the QMP "
                                      "handshake finished (QEMU exiting, or the monitor refused us).")
        return MonitorError(f"The endpoint {self.endpoint} does not behave like a QMP monitor: {error}")


def _already_gone(error: QMPCommandError) -> bool:
    """QEMU's way of saying "no such fd/fdset": the thing we wanted to remove is already gone."""
    return error.error_class == "GenericError" and "not found" in error.description.lower()
