"""The QMP client against a scripted QMP server on real sockets (no mocks of the client)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._errors import (
    FdPassingUnsupportedError,
    MonitorBusyError,
    MonitorClosedError,
    MonitorError,
    MonitorTimeoutError,
    QMPCommandError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._monitor import (
    REDACTED,
    BlockDevice,
    Endpoint,
    Monitor,
    parse_endpoint,
    redact,
)
from ansible_collections.savestate.qemu.tests.unit.fake_qmp import FakeQMPError, FakeQMPServer

# Slices of QEMU's real query-qmp-schema (type names are QEMU's opaque numbers).
SCHEMA_10_0 = [
    {"name": "migrate", "ret-type": "0", "meta-type": "command", "arg-type": "155"},
    {"name": "155", "meta-type": "object", "members": [
        {"name": "uri", "default": None, "type": "str"}, {"name": "channels", "default": None, "type": "[443]"},
        {"name": "detach", "default": None, "type": "bool"}, {"name": "resume", "default": None, "type": "bool"}]},
    {"name": "[443]", "element-type": "443", "meta-type": "array"},
    {"name": "443", "meta-type": "object", "members": [{"name": "channel-type", "type": "661"},
                                                       {"name": "addr", "type": "662"}]},
    {"name": "662", "tag": "transport", "meta-type": "object", "members": [{"name": "transport", "type": "776"}],
     "variants": [{"case": "socket", "type": "394"}, {"case": "exec", "type": "777"},
                  {"case": "rdma", "type": "604"}, {"case": "file", "type": "778"}]},
    {"name": "migrate-incoming", "ret-type": "0", "meta-type": "command", "arg-type": "156"},
    {"name": "156", "meta-type": "object", "members": [
        {"name": "uri", "default": None, "type": "str"}, {"name": "channels", "default": None, "type": "[443]"},
        {"name": "exit-on-error", "default": None, "type": "bool"}]},
    {"name": "add-fd", "ret-type": "12", "meta-type": "command", "arg-type": "13"},
    {"name": "MIGRATION", "meta-type": "event", "arg-type": "14"},
]
SCHEMA_7_2 = [
    {"name": "migrate", "ret-type": "0", "meta-type": "command", "arg-type": "150"},
    {"name": "150", "meta-type": "object", "members": [
        {"name": "uri", "type": "str"}, {"name": "blk", "default": None, "type": "bool"},
        {"name": "inc", "default": None, "type": "bool"}, {"name": "detach", "default": None, "type": "bool"},
        {"name": "resume", "default": None, "type": "bool"}]},
    {"name": "migrate-incoming", "ret-type": "0", "meta-type": "command", "arg-type": "151"},
    {"name": "151", "meta-type": "object", "members": [{"name": "uri", "type": "str"}]},
    {"name": "MIGRATION", "meta-type": "event", "arg-type": "14"},
]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ssq-u"))  # unix socket paths must stay short
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(sock_dir: Path) -> Iterator[FakeQMPServer]:
    with FakeQMPServer(sock_dir / "qmp.sock") as fake:
        yield fake


@pytest.fixture
def monitor(server: FakeQMPServer) -> Iterator[Monitor]:
    with Monitor(server.address, connect_timeout=5, command_timeout=5, trace=True) as session:
        yield session


# --- endpoints -----------------------------------------------------------------------

@pytest.mark.parametrize("text, expected, shown", [
    ("/run/qemu/a.sock", Endpoint("unix", path="/run/qemu/a.sock"), "/run/qemu/a.sock"),
    ("unix:/run/qemu/a.sock", Endpoint("unix", path="/run/qemu/a.sock"), "/run/qemu/a.sock"),
    ("/tmp/odd:1234", Endpoint("unix", path="/tmp/odd:1234"), "/tmp/odd:1234"),
    ("./rel.sock", Endpoint("unix", path="./rel.sock"), "./rel.sock"),
    ("qmp.sock", Endpoint("unix", path="qmp.sock"), "qmp.sock"),
    ("127.0.0.1:4444", Endpoint("tcp", host="127.0.0.1", port=4444), "127.0.0.1:4444"),
    ("tcp:localhost:4444", Endpoint("tcp", host="localhost", port=4444), "localhost:4444"),
    ("tcp::4444", Endpoint("tcp", host="127.0.0.1", port=4444), "127.0.0.1:4444"),
    ("[::1]:4444", Endpoint("tcp", host="::1", port=4444), "[::1]:4444"),
    ("tcp:[::1]:4444", Endpoint("tcp", host="::1", port=4444), "[::1]:4444"),
])
def test_parse_endpoint_forms(text, expected, shown):
    endpoint = parse_endpoint(text)
    assert endpoint == expected
    assert str(endpoint) == shown
    assert parse_endpoint(endpoint) is endpoint


@pytest.mark.parametrize("text", ["", "  ", "tcp:host", "tcp:host:0", "tcp:host:70000", "tcp:host:port"])
def test_parse_endpoint_rejects_nonsense(text):
    with pytest.raises(MonitorError, match="endpoint"):
        parse_endpoint(text)


# --- connecting ----------------------------------------------------------------------

def test_connect_negotiates_then_executes(server, monitor):
    server.reply("query-status", {"status": "running", "running": True})

    assert monitor.execute("query-status") == {"status": "running", "running": True}
    assert server.commands() == ["qmp_capabilities", "query-status"]
    assert monitor.connected


def test_tcp_endpoint_works_too():
    with FakeQMPServer(tcp=True) as server:
        server.reply("query-name", {"name": "over-tcp"})
        with Monitor(server.address, connect_timeout=5) as monitor:
            assert monitor.endpoint.kind == "tcp"
            assert monitor.name() == "over-tcp"


def test_pretty_printed_monitor(sock_dir):
    with FakeQMPServer(sock_dir / "pretty.sock", pretty=True) as server:
        server.reply("query-block", [{"device": "disk0", "inserted": {"file": "/a", "drv": "raw", "ro": False}}])
        server.on("stop", lambda call: call.emit("STOP") or {})
        with Monitor(server.address, trace=True) as monitor:
            assert monitor.block_devices()[0].file == "/a"
            with monitor.listen("STOP"):
                monitor.execute("stop")
                assert monitor.wait_event("STOP", timeout=2)["event"] == "STOP"
            assert monitor.trace[0]["kind"] == "greeting"


def test_garbage_instead_of_qmp(sock_dir):
    path = str(sock_dir / "garbage.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)

        def answer_garbage():
            conn = listener.accept()[0]
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                conn.recv(100)

        thread = threading.Thread(target=answer_garbage, daemon=True)
        thread.start()
        with pytest.raises(MonitorError, match="does not behave like a QMP monitor"):
            Monitor(path, connect_timeout=2).connect()
        thread.join(5)


def test_missing_socket_says_so(sock_dir):
    with pytest.raises(MonitorError, match="There is no QMP socket") as caught:
        Monitor(str(sock_dir / "absent.sock"), connect_timeout=2).connect()
    assert not isinstance(caught.value, MonitorBusyError)


def test_stale_socket_file_is_refused(sock_dir):
    path = sock_dir / "stale.sock"
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(path))
    leftover.close()  # the file stays, nobody listens: what a dead QEMU leaves behind

    with pytest.raises(MonitorError, match="connection refused"):
        Monitor(str(path), connect_timeout=2).connect()


def test_tcp_connection_refused():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: refuses connections
        with pytest.raises(MonitorError, match="refused"):
            Monitor(f"127.0.0.1:{port}", connect_timeout=2).connect()


def test_silent_monitor_is_busy_within_the_timeout(sock_dir):
    with FakeQMPServer(sock_dir / "silent.sock", greet=False) as server:
        started = time.monotonic()
        with pytest.raises(MonitorBusyError) as caught:
            Monitor(server.address, connect_timeout=0.5).connect()
        elapsed = time.monotonic() - started

    assert elapsed < 2.0
    message = str(caught.value)
    assert "busy" in message and str(server.address) in message and "0.5 s" in message


def test_busy_monitor_names_the_client_that_holds_it(server):
    holder = Monitor(server.address, connect_timeout=5)
    holder.connect()  # the fake serves one client at a time, like QEMU
    try:
        with pytest.raises(MonitorBusyError) as caught:
            Monitor(server.address, connect_timeout=0.5).connect()
    finally:
        holder.close()

    # The holder is this very test process; our own abandoned attempt is not reported.
    assert f"another client (pid {os.getpid()}, comm " in str(caught.value)


def test_monitor_serves_the_next_client_after_close(server):
    server.reply("query-name", {})
    for _attempt in range(2):
        with Monitor(server.address, connect_timeout=2) as monitor:
            assert monitor.name() is None


def test_a_closed_session_cannot_be_reused(server):
    monitor = Monitor(server.address)
    monitor.connect()
    monitor.close()
    monitor.close()  # twice is fine
    with pytest.raises(MonitorClosedError):
        monitor.execute("query-status")
    with pytest.raises(MonitorClosedError):
        monitor.connect()


# --- commands ------------------------------------------------------------------------

def test_error_reply_carries_class_and_description(server, monitor):
    server.error("cont", "GenericError", "Migration is not finalized yet")

    with pytest.raises(QMPCommandError) as caught:
        monitor.execute("cont")
    error = caught.value
    assert (error.command, error.error_class, error.description) == (
        "cont", "GenericError", "Migration is not finalized yet")
    assert str(error) == "QMP command 'cont' failed: GenericError: Migration is not finalized yet"
    # The session survives an error reply.
    server.reply("query-name", {"name": "x"})
    assert monitor.name() == "x"


def test_unknown_command(monitor):
    with pytest.raises(QMPCommandError, match="CommandNotFound"):
        monitor.execute("no-such-command")


def test_arguments_with_hyphens_reach_the_server(server, monitor):
    server.reply("migrate-set-parameters", {})
    monitor.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40, "multifd-channels": 4})
    assert server.calls_of("migrate-set-parameters")[0].arguments == {"max-bandwidth": 1 << 40,
                                                                      "multifd-channels": 4}


def test_command_timeout(server, monitor):
    server.hang("query-migrate")

    started = time.monotonic()
    with pytest.raises(MonitorTimeoutError, match="'query-migrate' got no reply .* within 0.3 s"):
        monitor.execute("query-migrate", timeout=0.3)
    assert time.monotonic() - started < 2.0


def test_connection_dropped_mid_command(server, monitor):
    server.drop("quit")

    with pytest.raises(MonitorClosedError, match="closed the monitor connection .* 'quit'"):
        monitor.execute("quit")
    with pytest.raises(MonitorClosedError):
        monitor.execute("query-status")
    monitor.close()  # tolerates the peer being gone


# --- typed helpers -------------------------------------------------------------------

def test_typed_helpers(server, monitor):
    server.reply("query-status", {"status": "paused", "running": False})
    server.reply("query-name", {"name": "web1"})
    server.reply("query-uuid", {"UUID": "6f1e9a4c-3b1d-4c61-9a0e-3f5d2f0d6a11"})
    server.reply("query-version", {"qemu": {"major": 7, "minor": 2, "micro": 22},
                                   "package": "Debian 1:7.2+dfsg-7+deb12u18"})
    server.reply("qom-get", "pc-q35-7.2-machine")
    server.reply("query-memory-size-summary", {"base-memory": 2 << 30})
    server.reply("query-cpus-fast", [{"cpu-index": 0}, {"cpu-index": 1}])
    server.reply("query-migrate-capabilities", [{"capability": "events", "state": True},
                                                {"capability": "mapped-ram", "state": False}])
    server.reply("query-migrate-parameters", {"max-bandwidth": 134217728})
    server.reply("query-migrate", {"blocked-reasons": ["State blocked by non-migratable device 'x'"]})

    assert monitor.status() == "paused"
    assert monitor.running() is False
    assert monitor.name() == "web1"
    assert monitor.uuid() == "6f1e9a4c-3b1d-4c61-9a0e-3f5d2f0d6a11"
    assert monitor.version() == (7, 2, 22)
    assert monitor.version_string() == "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)"
    assert monitor.machine_type() == "pc-q35-7.2"
    assert server.calls_of("qom-get")[0].arguments == {"path": "/machine", "property": "type"}
    assert monitor.memory_bytes() == 2 << 30
    assert monitor.vcpus() == 2
    assert monitor.migration_capabilities() == {"events", "mapped-ram"}
    assert monitor.enabled_migration_capabilities() == {"events"}
    assert monitor.migration_parameters() == {"max-bandwidth": 134217728}
    assert monitor.migration_blockers() == ["State blocked by non-migratable device 'x'"]


def test_no_blockers_when_qemu_reports_none(server, monitor):
    server.reply("query-migrate", {})
    assert monitor.migration_blockers() == []
    assert monitor.query_migrate() == {}


def test_block_devices(server, monitor):
    server.reply("query-block", [
        {"device": "disk0", "qdev": "/machine/peripheral-anon/device[0]/virtio-backend", "removable": False,
         "locked": False, "type": "unknown",
         "inserted": {"file": "/srv/a b.qcow2", "drv": "qcow2", "ro": False, "node-name": "#block123"}},
        {"device": "", "qdev": "ide0-cd0", "removable": True, "locked": False, "type": "unknown"},
    ])

    assert monitor.block_devices() == [
        BlockDevice(device="disk0", qdev="/machine/peripheral-anon/device[0]/virtio-backend",
                    file="/srv/a b.qcow2", format="qcow2", read_only=False, removable=False, inserted=True),
        BlockDevice(device="", qdev="ide0-cd0", file=None, format=None, read_only=False, removable=True,
                    inserted=False),
    ]


@pytest.mark.parametrize("schema, file_transport, exit_on_error", [
    (SCHEMA_10_0, True, True),
    (SCHEMA_7_2, False, False),
])
def test_features_come_from_the_schema(server, monitor, schema, file_transport, exit_on_error):
    server.reply("query-qmp-schema", schema)

    assert monitor.supports_file_transport() is file_transport
    assert monitor.supports_incoming_exit_on_error() is exit_on_error
    assert monitor.has_command("migrate")
    assert not monitor.has_command("MIGRATION")  # an event, not a command
    assert not monitor.has_command("no-such-command")
    assert server.commands().count("query-qmp-schema") == 1  # cached for the connection


def test_schema_is_fetched_again_on_a_new_connection(server):
    server.reply("query-qmp-schema", SCHEMA_7_2)
    for _attempt in range(2):
        with Monitor(server.address) as monitor:
            assert monitor.has_command("migrate")
    assert server.commands().count("query-qmp-schema") == 2


# --- events --------------------------------------------------------------------------

def _stop_with_events(call):
    call.emit("STOP")
    call.emit("MIGRATION", {"status": "setup"})
    call.emit("MIGRATION", {"status": "completed"})
    return {}


def test_events_heard_inside_listen_are_not_lost(server, monitor):
    server.on("stop", _stop_with_events)

    with monitor.listen(["STOP", "MIGRATION"]):
        monitor.execute("stop")  # the events arrive before the reply
        completed = monitor.wait_event("MIGRATION", lambda e: e["data"]["status"] == "completed", timeout=2)
        stop = monitor.wait_event("STOP", timeout=2)  # heard earlier, kept for this wait

    assert completed["data"] == {"status": "completed"}
    assert stop["event"] == "STOP" and "timestamp" in stop


def test_wait_event_times_out(server, monitor):
    server.on("cont", lambda call: {})

    with monitor.listen("RESUME"):
        monitor.execute("cont")
        started = time.monotonic()
        with pytest.raises(MonitorTimeoutError, match="no RESUME event within 0.3 s"):
            monitor.wait_event("RESUME", timeout=0.3)
    assert time.monotonic() - started < 2.0


def test_wait_event_outside_listen_sees_only_new_events(server, monitor):
    server.on("stop", lambda call: call.emit("STOP") or {})
    monitor.execute("stop")  # its STOP went by before anyone listened

    with pytest.raises(MonitorTimeoutError):
        monitor.wait_event("STOP", timeout=0.3)


def test_events_end_up_in_the_trace(server, monitor):
    server.on("stop", _stop_with_events)
    with monitor.listen("STOP"):
        monitor.execute("stop")
        monitor.wait_event("STOP", timeout=2)

    assert [e["message"]["event"] for e in monitor.trace if e["kind"] == "event"] == [
        "STOP", "MIGRATION", "MIGRATION"]


# --- file descriptors ----------------------------------------------------------------

def _same_file(fd: int, path: Path) -> bool:
    mine, theirs = os.stat(path), os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


@pytest.fixture
def data_file(sock_dir: Path) -> Iterator[tuple[Path, int]]:
    path = sock_dir / "image.bin"
    path.write_bytes(b"savestate")
    fd = os.open(path, os.O_RDONLY)
    yield path, fd
    os.close(fd)


def test_named_fd_arrives_with_getfd(server, monitor, data_file):
    path, fd = data_file
    server.reply("getfd", {})
    server.reply("closefd", {})

    monitor.pass_named_fd(fd, "migfile")

    getfd = server.calls_of("getfd")[0]
    assert getfd.arguments == {"fdname": "migfile"}
    assert len(getfd.fds) == 1 and _same_file(getfd.fds[0], path)
    assert os.pread(getfd.fds[0], 9, 0) == b"savestate"
    os.fstat(fd)  # ours stays open
    monitor.close_named_fd("migfile")
    assert server.calls_of("closefd")[0].arguments == {"fdname": "migfile"}


def test_named_fd_context_closes_on_success_and_failure(server, monitor, data_file):
    _path, fd = data_file
    server.reply("getfd", {})
    server.reply("closefd", {})

    with monitor.named_fd(fd, "a") as name:
        assert name == "a"
    with pytest.raises(RuntimeError, match="boom"):
        with monitor.named_fd(fd, "b"):
            raise RuntimeError("boom")

    assert [c.arguments["fdname"] for c in server.calls_of("closefd")] == ["a", "b"]


def test_cleanup_ignores_an_fd_already_gone(server, monitor, data_file):
    _path, fd = data_file
    server.reply("getfd", {})
    server.error("closefd", "GenericError", "File descriptor named 'a' not found")

    with monitor.named_fd(fd, "a"):
        pass


def test_cleanup_error_is_reported_when_the_block_succeeded(server, monitor, data_file):
    _path, fd = data_file
    server.reply("getfd", {})
    server.error("closefd", "GenericError", "something else went wrong")

    with pytest.raises(QMPCommandError, match="something else"):
        with monitor.named_fd(fd, "a"):
            pass


def test_cleanup_never_masks_the_blocks_own_error(server, monitor, data_file):
    _path, fd = data_file
    server.reply("getfd", {})
    server.error("closefd", "GenericError", "something else went wrong")

    with pytest.raises(RuntimeError, match="the real problem"):
        with monitor.named_fd(fd, "a"):
            raise RuntimeError("the real problem")


def test_cleanup_after_qemu_quit(server, monitor, data_file):
    _path, fd = data_file
    server.reply("getfd", {})
    server.drop("quit")

    with monitor.named_fd(fd, "a"):
        with pytest.raises(MonitorClosedError):
            monitor.execute("quit")
    # No closefd could be sent, and none was needed: QEMU is gone.


def _add_fd(call):
    fdset = call.arguments.get("fdset-id", 3)
    if not call.fds:
        raise FakeQMPError("GenericError", "No file descriptor supplied via SCM_RIGHTS")
    return {"fdset-id": fdset, "fd": 40 + len(call.session.server.calls_of("add-fd"))}


def test_fdset_adds_every_fd_and_removes_the_set(server, monitor, data_file, sock_dir):
    path, fd = data_file
    second = os.open(path, os.O_RDONLY)
    server.on("add-fd", _add_fd)
    server.reply("remove-fd", {})
    try:
        with monitor.fdset([fd, second], opaque="save") as fdset_id:
            assert fdset_id == 3
            assert server.commands()[-2:] == ["add-fd", "add-fd"]
    finally:
        os.close(second)

    first_call, second_call = server.calls_of("add-fd")
    assert first_call.arguments == {"opaque": "save"}
    assert second_call.arguments == {"fdset-id": 3, "opaque": "save"}
    assert all(len(c.fds) == 1 and _same_file(c.fds[0], path) for c in (first_call, second_call))
    assert server.calls_of("remove-fd")[0].arguments == {"fdset-id": 3}


def test_fdset_is_removed_when_adding_a_later_fd_fails(server, monitor, data_file):
    _path, fd = data_file
    calls = []

    def add_fd_then_fail(call):
        calls.append(call)
        if len(calls) == 2:
            raise FakeQMPError("GenericError", "too many fds")
        return {"fdset-id": 7, "fd": 40}

    server.on("add-fd", add_fd_then_fail)
    server.reply("remove-fd", {})

    with pytest.raises(QMPCommandError, match="too many fds"):
        with monitor.fdset([fd, fd], opaque="save"):
            pytest.fail("the block must not run")
    assert server.calls_of("remove-fd")[0].arguments == {"fdset-id": 7}


def test_fdset_removal_ignores_a_set_already_gone(server, monitor, data_file):
    _path, fd = data_file
    server.on("add-fd", _add_fd)
    server.error("remove-fd", "GenericError", "File descriptor named 'fdset-id:3' not found")

    with monitor.fdset([fd], opaque="x"):
        pass


def test_add_fd_returns_the_fdset_id(server, monitor, data_file):
    _path, fd = data_file
    server.on("add-fd", _add_fd)
    assert monitor.add_fd(fd, fdset_id=9) == 9
    assert server.calls_of("add-fd")[0].arguments == {"fdset-id": 9}


def test_no_fd_passing_over_tcp(data_file):
    _path, fd = data_file
    with FakeQMPServer(tcp=True) as server:
        server.reply("getfd", {})
        with Monitor(server.address) as monitor:
            with pytest.raises(FdPassingUnsupportedError, match="only over unix sockets"):
                monitor.pass_named_fd(fd, "x")
            with pytest.raises(FdPassingUnsupportedError):
                with monitor.fdset([fd], opaque="x"):
                    pytest.fail("the block must not run")
        assert server.commands() == ["qmp_capabilities"]  # nothing was sent
        assert server.received_fds == []


# --- the trace -----------------------------------------------------------------------

def test_trace_records_both_directions_in_order(server, monitor, data_file):
    _path, fd = data_file
    server.reply("query-status", {"status": "running", "running": True})
    server.reply("getfd", {})
    monitor.status()
    monitor.pass_named_fd(fd, "f")

    trace = monitor.trace
    assert [(e["direction"], e["kind"]) for e in trace] == [
        ("received", "greeting"), ("sent", "command"), ("received", "reply"),
        ("sent", "command"), ("received", "reply"),
        ("sent", "fd"), ("sent", "command"), ("received", "reply")]
    assert trace[3]["message"]["execute"] == "query-status"
    assert trace[4]["message"]["return"] == {"status": "running", "running": True}
    assert trace[5]["message"] == {"fd": fd, "for": "getfd"}
    assert all(e["endpoint"] == server.address and e["time"].endswith("+00:00") for e in trace)


def test_trace_redacts_secrets(server, monitor):
    server.reply("object-add", {})
    server.reply("set_password", {})
    server.reply("human-monitor-command", "")
    monitor.execute("object-add", {"qom-type": "secret", "id": "sec0", "data": "hunter2", "format": "raw"})
    monitor.execute("set_password", {"protocol": "vnc", "password": "hunter2"})
    monitor.execute("human-monitor-command", {"command-line": "set_password vnc hunter2"})

    sent = [e["message"] for e in monitor.trace if e["kind"] == "command"][1:]
    assert sent[0]["arguments"] == {"qom-type": "secret", "id": "sec0", "data": REDACTED, "format": "raw"}
    assert sent[1]["arguments"] == {"protocol": "vnc", "password": REDACTED}
    assert sent[2]["arguments"] == {"command-line": REDACTED}
    assert "hunter2" not in repr(monitor.trace)
    # What QEMU received is untouched.
    assert server.calls_of("object-add")[0].arguments["data"] == "hunter2"


@pytest.mark.parametrize("message, expected", [
    ({"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s", "props": {"data": "x"}}},
     {"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s", "props": {"data": REDACTED}}}),
    ({"execute": "object-add", "arguments": {"qom-type": "memory-backend-ram", "id": "m", "data": "keep"}},
     {"execute": "object-add", "arguments": {"qom-type": "memory-backend-ram", "id": "m", "data": "keep"}}),
    ({"execute": "blockdev-add", "arguments": {"driver": "luks", "key-secret": "sec0"}},
     {"execute": "blockdev-add", "arguments": {"driver": "luks", "key-secret": "sec0"}}),
    ({"execute": "x", "arguments": {"nested": [{"Password": "p", "token": "t", "name": "n"}]}},
     {"execute": "x", "arguments": {"nested": [{"Password": REDACTED, "token": REDACTED, "name": "n"}]}}),
    ({"execute": "human-monitor-command", "arguments": {"command-line": "info status"}},
     {"execute": "human-monitor-command", "arguments": {"command-line": "info status"}}),
])
def test_redact(message, expected):
    assert redact(message) == expected


def test_trace_is_off_by_default(server):
    server.reply("query-name", {})
    with Monitor(server.address) as monitor:
        monitor.name()
        assert monitor.trace == []
