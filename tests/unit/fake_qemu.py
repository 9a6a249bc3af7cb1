"""A stand-in QEMU for unit tests of the save and restore orchestration: a real process, QMP from the test.

The orchestrators talk to "the guest's QEMU": a process that serves the monitor
socket (the kernel names it as the server, SO_PEERCRED), that a restore starts
from an emulator it trusts, and that exits on ``quit``. The stand-in is exactly
that and nothing more:

- ``fake-emulator`` is a small Python script installed as ``qemu-system-x86_64``
  in a directory only root can write (under /run), so restore's emulator trust
  checks accept it as they are; it refuses to run outside a test;
- it owns the monitor socket: it binds and listens on ``-qmp unix:PATH,server=on``
  itself, or takes the listening socket a restore passes it
  (``-chardev socket,id=savestate-monitor,fd=N``);
- it hands that listening socket to the test over a control socket (SCM_RIGHTS);
  a :class:`FakeQMPServer` thread in the test accepts on it and answers as QEMU
  would (:class:`FakeQemu`), so the test scripts the guest and sees every command;
- it exits when the test says so (``quit``, a crash, a refused start), printing
  what QEMU would print (a restore quotes QEMU's log).

The migration stream is real: QEMU's side of it (the fd or fdset a save or restore
passes) reaches the test with the command, and a thread writes or reads it, as
QEMU's migration thread does, while the monitor keeps answering.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from ansible_collections.savestate.qemu.plugins.module_utils._host import ActiveGuest
from ansible_collections.savestate.qemu.plugins.module_utils._monitor import unix_endpoint
from ansible_collections.savestate.qemu.plugins.module_utils._runtime import process_start_time, runtime_path
from ansible_collections.savestate.qemu.tests.unit.fake_qmp import DROP, Call, FakeQMPError, FakeQMPServer

CONTROL_ENV = "SAVESTATE_FAKE_QEMU_CONTROL"
EMULATOR_NAME = "qemu-system-x86_64"
MACHINE = "pc-i440fx-10.0"
# A stream as QEMU starts one: the file magic, version 3, a section; then filler.
STREAM = b"QEVM\x00\x00\x00\x03" + b"\x07\x00\x00\x00\x0epc-i440fx-10.0" + bytes(range(256)) * 64

EMULATOR_SCRIPT = '''#!{python}
"""A stand-in QEMU for the unit tests (tests/unit/fake_qemu.py); it does nothing outside them."""
import json, os, socket, sys

control = os.environ.get("{env}")
if not control:
    sys.exit("fake QEMU: run only by the unit tests ({env} is not set)")


def monitor(argv):
    """The listening monitor socket: inherited (restore), else bound from -qmp unix:PATH (a guest)."""
    for option, value in zip(argv, argv[1:]):
        if option == "-chardev" and "id=savestate-monitor" in value:
            fd = int(dict(part.split("=", 1) for part in value.split(",") if "=" in part)["fd"])
            return socket.socket(fileno=fd)
    for option, value in zip(argv, argv[1:]):
        if option == "-qmp" and value.startswith("unix:"):
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(value[len("unix:"):].split(",")[0])
            listener.listen(4)
            return listener
    sys.exit("fake QEMU: no monitor on the command line")


listener = monitor(sys.argv)
for option, value in zip(sys.argv, sys.argv[1:]):
    if option == "-pidfile":
        with open(value, "w") as pidfile:
            pidfile.write(str(os.getpid()))
channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
channel.connect(control)
hello = {{"pid": os.getpid(), "argv": sys.argv, "cwd": os.getcwd()}}
socket.send_fds(channel, [json.dumps(hello).encode()], [listener.fileno()])
channel.settimeout(120)  # never outlives a test by much
try:
    order = channel.recv(65536)
except OSError:
    order = b""
order = json.loads(order) if order else {{"status": 0}}
sys.stderr.write(order.get("say", ""))
sys.stderr.flush()
if order.get("signal"):
    os.kill(os.getpid(), order["signal"])
os._exit(order["status"])
'''


def _schema(file_transport: bool, exit_on_error: bool) -> list[dict[str, Any]]:
    """Just enough of QEMU's QAPI schema for what the collection reads from it."""
    migrate_members = [{"name": "uri", "type": "str"}]
    if file_transport:
        migrate_members.append({"name": "channels", "type": "[MigrationChannel]"})
    incoming_members = [{"name": "uri", "type": "str"}]
    if exit_on_error:
        incoming_members.append({"name": "exit-on-error", "type": "bool"})
    return [
        {"name": "migrate", "meta-type": "command", "arg-type": "q_obj_migrate-arg"},
        {"name": "q_obj_migrate-arg", "meta-type": "object", "members": migrate_members},
        {"name": "migrate-incoming", "meta-type": "command", "arg-type": "q_obj_migrate-incoming-arg"},
        {"name": "q_obj_migrate-incoming-arg", "meta-type": "object", "members": incoming_members},
        {"name": "[MigrationChannel]", "meta-type": "array", "element-type": "MigrationChannel"},
        {"name": "MigrationChannel", "meta-type": "object",
         "members": [{"name": "channel-type", "type": "str"}, {"name": "addr", "type": "MigrationAddress"}]},
        {"name": "MigrationAddress", "meta-type": "object",
         "variants": [{"case": "socket"}, {"case": "exec"}, {"case": "rdma"}, {"case": "file"}]},
    ]


class FakeQemu:
    """QEMU's side of QMP for one stand-in process: its run state, its migration, its stream.

    Knobs a test sets before the call under test (all plain attributes):

    ``migrate``      what an outgoing migration does: ``"complete"``, ``"hang"`` (stays
                     active), ``"fail"`` (QEMU reports failed, with ``error_desc`` if set)
                     or ``"hangup"`` (QEMU dies mid-stream: the monitor hangs up)
    ``incoming``     the same for an incoming one: ``"complete"``, ``"hang"``, ``"fail"``,
                     ``"exit"`` (QEMU 7.2: exits on a bad stream, saying ``error_desc``)
                     or ``"hangup"``
    ``stream``       the bytes an outgoing migration writes; ``received`` what an
                     incoming one read
    """

    def __init__(self, process: FakeProcess, name: str, uuid: str, version: tuple[int, int, int] = (10, 0, 2),
                 status: str = "running") -> None:
        self.process = process
        self.name = name
        self.uuid = uuid
        self.version = version
        self.status = "inmigrate" if "-incoming" in process.argv else status
        self.memory = 128 * 1024 * 1024
        self.blockers: list[str] = []
        self.disks: list[dict[str, Any]] = []
        self.migrate = "complete"
        self.incoming = "complete"
        self.error_desc: str | None = None
        self.stream = STREAM
        self.received: bytes | None = None
        self.migration: dict[str, Any] = {}
        self.capabilities = {"events": False, "xbzrle": False}
        self.parameters: dict[str, Any] = {"max-bandwidth": 134217728}
        if version >= (9, 0, 0):
            self.capabilities.update({"multifd": False, "mapped-ram": False})
            self.parameters.update({"multifd-channels": 2, "direct-io": False})
        self.named_fds: dict[str, int] = {}
        self.fdsets: dict[int, list[int]] = {}
        self.on_quit: Callable[[], None] | None = None

    # -- wiring --------------------------------------------------------------------------

    def serve(self, server: FakeQMPServer) -> None:
        simple = {
            "query-name": lambda call: {"name": self.name},
            "query-uuid": lambda call: {"UUID": self.uuid},
            "query-version": lambda call: {"qemu": dict(zip(("major", "minor", "micro"), self.version)),
                                           "package": ""},
            "query-status": lambda call: {"status": self.status, "running": self.status == "running",
                                          "singlestep": False},
            "qom-get": lambda call: f"{MACHINE}-machine",
            "query-memory-size-summary": lambda call: {"base-memory": self.memory},
            "query-cpus-fast": lambda call: [{"cpu-index": 0, "thread-id": self.process.pid}],
            "query-block": lambda call: self.disks,
            "query-kvm": lambda call: {"enabled": False, "present": False},
            "query-target": lambda call: {"arch": "x86_64"},
            "query-migrate-capabilities": lambda call: [{"capability": name, "state": state}
                                                        for name, state in self.capabilities.items()],
            "query-migrate-parameters": lambda call: dict(self.parameters),
            "query-qmp-schema": lambda call: _schema(self.version >= (8, 2, 0), self.version >= (9, 1, 0)),
            "query-migrate": self._query_migrate,
            "migrate-set-capabilities": self._set_capabilities,
            "migrate-set-parameters": lambda call: self.parameters.update(call.arguments) or {},
            "getfd": self._getfd,
            "closefd": self._closefd,
            "add-fd": self._add_fd,
            "remove-fd": self._remove_fd,
            "stop": self._stop,
            "cont": self._cont,
            "migrate": self._migrate,
            "migrate-incoming": self._migrate_incoming,
            "migrate_cancel": self._cancel,
            "quit": self._quit,
        }
        for command, handler in simple.items():
            server.on(command, handler)

    def _query_migrate(self, call: Call) -> Any:
        if self.migrate == "hangup" and self.migration.get("status") == "active":
            self.process.exit(1, "qemu: terminating on signal 9\n")
            return DROP
        if not self.migration and self.blockers:
            return {"blocked-reasons": list(self.blockers)}
        return dict(self.migration)

    def _set_capabilities(self, call: Call) -> dict[str, Any]:
        for entry in call.arguments["capabilities"]:
            if entry["capability"] not in self.capabilities:
                raise FakeQMPError("GenericError", f"Capability '{entry['capability']}' not found")
            self.capabilities[entry["capability"]] = entry["state"]
        return {}

    def _getfd(self, call: Call) -> dict[str, Any]:
        if not call.fds:
            raise FakeQMPError("GenericError", "No file descriptor supplied via SCM_RIGHTS")
        self.named_fds[call.arguments["fdname"]] = call.fds[-1]
        return {}

    def _remove_fd(self, call: Call) -> dict[str, Any]:
        for fd in self.fdsets.pop(call.arguments["fdset-id"], []):
            self._close(fd)
        return {}

    def _closefd(self, call: Call) -> dict[str, Any]:
        name = call.arguments["fdname"]
        if name not in self.named_fds:
            raise FakeQMPError("GenericError", f"File descriptor named '{name}' not found")
        self._close(self.named_fds.pop(name))
        return {}

    def _add_fd(self, call: Call) -> dict[str, Any]:
        fdset = call.arguments.get("fdset-id", len(self.fdsets))
        self.fdsets.setdefault(fdset, []).append(call.fds[-1])
        return {"fdset-id": fdset, "fd": call.fds[-1]}

    def _close(self, fd: int) -> None:
        """Close a descriptor QEMU received, once: the server's clean-up must not close its number again."""
        received = self.process.server.received_fds
        if fd in received:
            received.remove(fd)
            os.close(fd)

    def _stop(self, call: Call) -> dict[str, Any]:
        if self.status == "running":
            self.status = "paused"
            call.emit("STOP")
        return {}

    def _cont(self, call: Call) -> dict[str, Any]:
        if self.status == "inmigrate":
            raise FakeQMPError("GenericError", "Migration is not finalized yet")
        self.status = "running"
        call.emit("RESUME")
        return {}

    def _quit(self, call: Call) -> dict[str, Any]:
        if self.on_quit is not None:
            self.on_quit()
        self.process.exit(0, "")
        return {}

    def _cancel(self, call: Call) -> dict[str, Any]:
        if self.migration.get("status") == "active":
            self._finish(call, "cancelled")
        return {}

    # -- the stream ------------------------------------------------------------------------

    def _stream_fd(self, arguments: dict[str, Any]) -> tuple[int, int | None]:
        """The fd QEMU streams through, and the offset of a ``file:`` channel (None: the fd's position).

        An ``fd:NAME`` target is taken off the monitor's list (a later ``closefd`` finds no such
        name) and closed when the stream ends, as QEMU does: a compressor sees the end of it.
        """
        if "uri" in arguments:
            uri = arguments["uri"]
            if not uri.startswith("fd:") or uri[3:] not in self.named_fds:
                raise FakeQMPError("GenericError", f"unsupported or unknown migration URI {uri}")
            return self.named_fds.pop(uri[3:]), None
        address = arguments["channels"][0]["addr"]
        fdset = int(address["filename"].rsplit("/", 1)[1])
        return self.fdsets[fdset][0], int(address["offset"])

    def _migrate(self, call: Call) -> dict[str, Any]:
        if self.blockers:
            raise FakeQMPError("GenericError", self.blockers[0])
        fd, offset = self._stream_fd(call.arguments)
        self.status = "finish-migrate"
        self.migration = {"status": "active"}
        if self.migrate in ("complete", "fail"):
            threading.Thread(target=self._write_stream, args=(call, fd, offset), daemon=True).start()
        return {}

    def _write_stream(self, call: Call, fd: int, offset: int | None) -> None:
        try:
            if self.migrate == "fail":
                raise OSError(0, self.error_desc or "")
            written = 0
            while written < len(self.stream):  # a full disk first writes short, then fails
                chunk = self.stream[written:written + 65536]
                written += os.write(fd, chunk) if offset is None else os.pwrite(fd, chunk, offset + written)
        except OSError as error:
            self.status = "paused"
            desc = self.error_desc if self.version < (8, 0, 0) else (self.error_desc or error.strerror)
            self._finish(call, "failed", desc)
            return
        finally:
            if offset is None:
                self._close(fd)
        self.status = "postmigrate"
        self._finish(call, "completed")

    def _migrate_incoming(self, call: Call) -> dict[str, Any]:
        fd, offset = self._stream_fd(call.arguments)
        self.migration = {"status": "active"}
        if self.incoming in ("complete", "fail", "exit", "hangup"):
            threading.Thread(target=self._read_stream, args=(call, fd, offset), daemon=True).start()
        return {}

    def _read_stream(self, call: Call, fd: int, offset: int | None) -> None:
        chunks = []
        while True:
            chunk = os.read(fd, 65536) if offset is None else os.pread(fd, 65536, offset + sum(map(len, chunks)))
            if not chunk:
                break
            chunks.append(chunk)
        if offset is None:
            self._close(fd)
        self.received = b"".join(chunks)
        if self.incoming == "exit":
            self.process.exit(1, f"qemu-system-x86_64: {self.error_desc}\nqemu-system-x86_64: load of migration "
                                 "failed: Invalid argument\n")
            self.process.hang_up()
        elif self.incoming == "hangup":  # QEMU crashes while loading
            self.process.exit(1, "", signal=11)
            self.process.hang_up()
        elif self.incoming == "fail":
            self._finish(call, "failed", self.error_desc)
        else:
            self.status = "paused"
            self._finish(call, "completed")

    def _finish(self, call: Call, status: str, desc: str | None = None) -> None:
        self.migration = {"status": status, **({"error-desc": desc} if desc else {})}
        call.emit("MIGRATION", {"status": status})


class FakeProcess:
    """One running stand-in QEMU: its pid, command line, and the QMP server the test runs for it."""

    def __init__(self, channel: socket.socket, hello: dict[str, Any], listener: socket.socket) -> None:
        self.channel = channel
        self.pid: int = hello["pid"]
        self.argv: list[str] = hello["argv"]
        self.cwd: str = hello["cwd"]
        self.server = FakeQMPServer(listener=listener)
        self.exited = False

    def exit(self, status: int, say: str, signal: int = 0) -> None:
        """Make the process print ``say`` and exit with ``status`` or die of ``signal`` (as QEMU does on
        quit, a fatal error or a crash)."""
        if self.exited:
            return
        self.exited = True
        try:
            self.channel.sendall(json.dumps({"status": status, "say": say, "signal": signal}).encode())
        except OSError:
            pass
        self.channel.close()
        # Like a dead QEMU: nobody listens on the monitor any more, nobody can connect.
        self.server.stopped.set()

    def hang_up(self) -> None:
        """Close every session and the listener: what the kernel does when QEMU dies."""
        self.server.stopped.set()
        for session in self.server.sessions:
            try:
                session.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def wait_gone(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not os.path.exists(f"/proc/{self.pid}") or _zombie(self.pid):
                return True
            time.sleep(0.01)
        return False


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


class FakeQemuHost:
    """The test's side: the control socket every stand-in QEMU of this test reports to.

    ``configure(qemu)`` is called for each new process before it is served (set its
    name, its knobs); ``refuse_start`` makes new processes exit at once instead, with
    that message (a QEMU that refuses its command line).
    """

    def __init__(self, directory: Path, emulator: str) -> None:
        self.directory = directory
        self.emulator = emulator
        self.control_path = str(directory / "control.sock")
        self.processes: list[FakeProcess] = []
        self.qemus: list[FakeQemu] = []
        self.configure: Callable[[FakeQemu], None] = lambda qemu: None
        self.name = "fake"
        self.uuid = "00000000-0000-4000-8000-000000000000"
        self.version = (10, 0, 2)
        self.refuse_start: str | None = None
        self._popens: list[subprocess.Popen[bytes]] = []
        self._arrived = threading.Condition()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.control_path)
        self._listener.listen(8)
        self._listener.settimeout(0.02)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="fake-qemu-control", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                channel = self._listener.accept()[0]
            except (socket.timeout, OSError):
                continue
            channel.settimeout(10)
            fds = array.array("i")
            data, ancillary, _flags, _addr = channel.recvmsg(65536, socket.CMSG_SPACE(fds.itemsize))
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            listener = socket.socket(fileno=fds[0])
            process = FakeProcess(channel, json.loads(data), listener)
            if self.refuse_start is not None:
                listener.close()  # nobody serves the monitor: a waiting client is reset once QEMU is gone
                process.exit(1, self.refuse_start)
            else:
                qemu = FakeQemu(process, self.name, self.uuid, self.version)
                qemu.serve(process.server)
                self.configure(qemu)  # after serve: it may replace a command's handler
                process.server.start()
                self.qemus.append(qemu)
            with self._arrived:
                self.processes.append(process)
                self._arrived.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> FakeProcess:
        """The ``count``-th process to report (1-based), once it has."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.processes) >= count, timeout):
                raise TimeoutError(f"no stand-in QEMU number {count} reported within {timeout} s")
            return self.processes[count - 1]

    def start_guest(self, *args: str) -> tuple[FakeProcess, FakeQemu, str]:
        """A running guest, as an operator starts one: ``qemu-system-x86_64 -name NAME ... -qmp unix:...``."""
        qmp = str(self.directory / f"qmp{len(self.processes)}.sock")
        argv = [self.emulator, "-name", f"guest={self.name}", "-uuid", self.uuid, "-m", "128",
                "-machine", "pc", *args, "-qmp", f"unix:{qmp},server=on,wait=off"]
        # pylint: disable-next=consider-using-with  # reaped in close()
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.directory)
        self._popens.append(popen)
        process = self.wait_for(len(self.processes) + 1)
        return process, self.qemus[-1], qmp

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(5)
        self._listener.close()
        for process in self.processes:
            process.exit(0, "")
            process.server.stop()
        for popen in self._popens:
            try:
                popen.wait(5)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()


class Guest:
    """A running stand-in guest: its process, its QEMU state, and how discovery would see it."""

    def __init__(self, host: FakeQemuHost, *args: str, version: tuple[int, int, int] = (10, 0, 2)) -> None:
        host.version = version
        self.host = host
        self.process, self.qemu, self.qmp = host.start_guest(*args)
        self.active = self.discovered()

    def discovered(self, **changes: object) -> ActiveGuest:
        """What _host.scan_guests reports for this process (it is not a trusted binary, so it is handed in)."""
        process = self.process
        guest = ActiveGuest(pid=process.pid, argv=tuple(process.argv), exe=process.argv[0], name=self.host.name,
                            uuid=self.host.uuid, qmp=(unix_endpoint(self.qmp),), pidfile=None, managed_by=None,
                            libvirt_evidence=(), uid=os.getuid(), gid=os.getgid(), groups=(),
                            start_time=process_start_time(process.pid), cwd=process.cwd)
        return replace(guest, **changes)  # type: ignore[arg-type]

    def scan(self) -> list[ActiveGuest]:
        return [] if self.process.exited else [self.active]

    def commands(self) -> list[str]:
        return self.process.server.commands()


@contextmanager
def fake_emulator() -> Iterator[str]:
    """The stand-in installed where a trusted emulator lives: root-owned, in directories only root can write."""
    directory = tempfile.mkdtemp(prefix="ssq-fake-qemu-", dir="/run")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, EMULATOR_NAME)
    with open(path, "w", encoding="utf-8") as script:
        script.write(EMULATOR_SCRIPT.format(python=sys.executable, env=CONTROL_ENV))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        # What the monitor layer cached about this binary's QAPI schema (_stream.SchemaFactsCache).
        digest = hashlib.sha256(os.fsencode(os.path.realpath(path))).hexdigest()[:32]
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(runtime_path(), f"schema-facts-{digest}.json"))
