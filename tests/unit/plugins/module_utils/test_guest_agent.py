"""The guest clock after a restore: the agent channel on the command line, and the agent conversation.

The agent here is a scripted fake on a real unix socket in this process (so
SO_PEERCRED names our pid, as it names the restored QEMU's in a restore). It
speaks the way qemu-ga does: JSON lines, a parse error for the client's 0xFF, and
a 0xFF sentinel before the answer to guest-sync-delimited.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._errors import GuestAgentError
from ansible_collections.savestate.qemu.plugins.module_utils._guest_agent import (
    NO_AGENT,
    GuestAgent,
    agent_endpoint,
    sync_guest_clock,
)
from ansible_collections.savestate.qemu.plugins.module_utils._monitor import unix_endpoint

PORT = "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0"
Handler = Callable[[dict[str, Any]], Any]


class FakeAgent:
    """qemu-ga's side of the channel; ``handlers`` answer commands (None: stay silent)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.received = b""
        self.commands: list[dict[str, Any]] = []
        self.set_times: list[int] = []
        self.handlers: dict[str, Handler | None] = {
            "guest-sync-delimited": lambda message: ("sync", message["arguments"]["id"]),
            "guest-ping": lambda message: {},
            "guest-set-time": self._set_time,
            "guest-get-time": lambda message: time.time_ns(),
        }
        self.before_sync = b""  # what a previous client left unread, sent first
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _set_time(self, message: dict[str, Any]) -> Any:
        self.set_times.append(message["arguments"]["time"])
        return {}

    def _serve(self) -> None:
        try:
            conn = self.listener.accept()[0]
        except OSError:
            return
        with conn:
            buffer = b""
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                self.received += data
                buffer += data
                if buffer.startswith(b"\xff"):
                    conn.sendall(self.before_sync + b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}\n')
                    buffer = buffer[1:]
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    self._answer(conn, json.loads(line))

    def _answer(self, conn: socket.socket, message: dict[str, Any]) -> None:
        self.commands.append(message)
        handler = self.handlers.get(message["execute"], lambda m: ("error", "CommandNotFound"))
        if handler is None:
            return
        answer = handler(message)
        if isinstance(answer, tuple) and answer[0] == "sync":
            conn.sendall(b"\xff" + json.dumps({"return": answer[1]}).encode() + b"\n")
        elif isinstance(answer, tuple) and answer[0] == "error":
            conn.sendall(json.dumps({"error": {"class": answer[1], "desc": answer[2] if len(answer) > 2 else ""}}).encode()
                         + b"\n")
        elif isinstance(answer, bytes):
            conn.sendall(answer)
        else:
            conn.sendall(json.dumps({"return": answer}).encode() + b"\n")

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ssq-a"))  # short: unix socket paths are limited to 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(sock_dir: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(sock_dir / "qga.sock")
    yield fake
    fake.close()


def argv_with_agent(path: str, extra: str = "server=on,wait=off") -> list[str]:
    return ["qemu-system-x86_64", "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=qga0,path={path},{extra}", "-device", PORT]


# --- the channel on the command line --------------------------------------------------------

def test_no_port_means_no_agent() -> None:
    argv = ["qemu-system-x86_64", "-chardev", "socket,id=qga0,path=/run/qga.sock,server=on", "-m", "128"]
    assert agent_endpoint(argv, "/") == (None, None)
    warnings: list[str] = []
    assert sync_guest_clock(argv, "/", os.getpid(), True, warnings) == NO_AGENT
    assert warnings == []


def test_channel_is_found_and_a_relative_path_resolves_from_qemus_directory() -> None:
    endpoint, note = agent_endpoint(argv_with_agent("run/qga.sock"), "/srv/vm1")
    assert note is None and endpoint == unix_endpoint("/srv/vm1/run/qga.sock")


def test_json_device_and_escaped_commas() -> None:
    argv = ["qemu-system-x86_64", "-chardev", "socket,id=qga0,path=/run/a,,b.sock,server=on,wait=off",
            "-device", json.dumps({"driver": "virtserialport", "chardev": "qga0", "name": "org.qemu.guest_agent.0"})]
    assert agent_endpoint(argv, "/") == (unix_endpoint("/run/a,b.sock"), None)


@pytest.mark.parametrize("chardev", [
    "socket,id=qga0,host=127.0.0.1,port=4444,server=on,wait=off",  # TCP
    "socket,id=qga0,path=/run/qga.sock,server=off",                 # QEMU connects out
    "socket,id=qga0,path=qga,abstract=on,server=on",                # abstract namespace
    "socket,id=qga0,fd=3,server=on",                                 # passed fd: gone after a restore
    "pty,id=qga0",
])
def test_channels_that_cannot_be_reached_are_reported_not_dialled(chardev: str) -> None:
    argv = ["qemu-system-x86_64", "-chardev", chardev, "-device", PORT]
    endpoint, note = agent_endpoint(argv, "/")
    assert endpoint is None and note
    warnings: list[str] = []
    assert sync_guest_clock(argv, "/", os.getpid(), True, warnings) is False
    assert len(warnings) == 1 and "clock was not synced" in warnings[0]


def test_port_without_its_chardev() -> None:
    endpoint, note = agent_endpoint(["qemu-system-x86_64", "-device", PORT], "/")
    assert endpoint is None and "names no chardev" in str(note)


# --- the conversation ---------------------------------------------------------------------

def test_clock_set_to_the_hosts_time(agent: FakeAgent) -> None:
    warnings: list[str] = []
    before = time.time_ns()
    assert sync_guest_clock(argv_with_agent(str(agent.path)), "/", os.getpid(), True, warnings) is True
    assert warnings == []
    assert [m["execute"] for m in agent.commands] == ["guest-sync-delimited", "guest-ping", "guest-set-time"]
    assert before <= agent.set_times[0] <= time.time_ns()
    assert agent.received.startswith(b"\xff")  # the agent's parser is flushed first


def test_stale_answers_before_the_sentinel_are_skipped(agent: FakeAgent) -> None:
    agent.before_sync = b'{"return": 7}\n\xff{"return": 12345}\n{"return": {}}\npartial'
    assert sync_guest_clock(argv_with_agent(str(agent.path)), "/", os.getpid(), True, []) is True
    assert len(agent.set_times) == 1


def test_not_wanted_is_false_without_a_word(agent: FakeAgent) -> None:
    warnings: list[str] = []
    assert sync_guest_clock(argv_with_agent(str(agent.path)), "/", os.getpid(), False, warnings) is False
    assert warnings == [] and agent.received == b""


def test_an_agent_that_never_answers_is_a_bounded_wait(agent: FakeAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    agent.handlers["guest-sync-delimited"] = None
    monkeypatch.setattr("ansible_collections.savestate.qemu.plugins.module_utils._guest_agent.ANSWER_TIMEOUT", 0.5)
    warnings: list[str] = []
    started = time.monotonic()
    assert sync_guest_clock(argv_with_agent(str(agent.path)), "/", os.getpid(), True, warnings) is False
    assert time.monotonic() - started < 3
    assert "timed out" in warnings[0] and agent.set_times == []


def test_default_wait_is_a_few_seconds() -> None:
    from ansible_collections.savestate.qemu.plugins.module_utils import _guest_agent
    assert 1 <= _guest_agent.ANSWER_TIMEOUT <= 10 and _guest_agent.SET_TIME_TIMEOUT <= 30


def test_refused_set_time_is_reported(agent: FakeAgent) -> None:
    agent.handlers["guest-set-time"] = lambda m: ("error", "GenericError", "The command guest-set-time has been disabled")
    agent.handlers["guest-get-time"] = lambda m: time.time_ns() - 3600 * 10**9
    warnings: list[str] = []
    assert sync_guest_clock(argv_with_agent(str(agent.path)), "/", os.getpid(), True, warnings) is False
    assert "has been disabled" in warnings[0]


def test_hwclock_failure_with_the_clock_set_counts_as_synced(agent: FakeAgent) -> None:
    agent.handlers["guest-set-time"] = lambda m: ("error", "GenericError", "hwclock failed to set hardware clock")
    warnings: list[str] = []
    assert sync_guest_clock(argv_with_agent(str(agent.path)), "/", os.getpid(), True, warnings) is True
    assert "clock is set" in warnings[0] and "hwclock" in warnings[0]


def test_a_flood_without_line_ends_is_bounded(agent: FakeAgent) -> None:
    agent.handlers["guest-ping"] = lambda m: b"x" * (200 * 1024)
    warnings: list[str] = []
    assert sync_guest_clock(argv_with_agent(str(agent.path)), "/", os.getpid(), True, warnings) is False
    assert "more than" in warnings[0]


def test_the_guests_words_are_escaped_and_bounded(agent: FakeAgent) -> None:
    agent.handlers["guest-ping"] = lambda m: ("error", "Generic\nError", "\x1b[31m" + "y" * 5000)
    warnings: list[str] = []
    assert sync_guest_clock(argv_with_agent(str(agent.path)), "/", os.getpid(), True, warnings) is False
    assert "\x1b" not in warnings[0] and "\n" not in warnings[0] and len(warnings[0]) < 700


# --- whom we talk to ------------------------------------------------------------------------

def test_a_socket_another_process_serves_gets_nothing(agent: FakeAgent) -> None:
    """The path comes from the image: unless the restored QEMU serves it, not a byte is sent."""
    warnings: list[str] = []
    assert sync_guest_clock(argv_with_agent(str(agent.path)), "/", 1, True, warnings) is False
    assert "not served by the restored QEMU (pid 1)" in warnings[0]
    time.sleep(0.2)
    assert agent.received == b""


def test_a_path_that_is_not_a_socket_is_not_connected(sock_dir: Path) -> None:
    regular = sock_dir / "qga.sock"
    regular.write_text("")
    with pytest.raises(GuestAgentError, match="is not a socket"):
        GuestAgent.connect(unix_endpoint(str(regular)), os.getpid())
    link = sock_dir / "link.sock"
    other = FakeAgent(sock_dir / "real.sock")
    try:
        link.symlink_to(other.path)
        with pytest.raises(GuestAgentError, match="is not a socket"):
            GuestAgent.connect(unix_endpoint(str(link)), os.getpid())
    finally:
        other.close()


def test_a_missing_socket_is_a_warning(sock_dir: Path) -> None:
    warnings: list[str] = []
    assert sync_guest_clock(argv_with_agent(str(sock_dir / "gone.sock")), "/", os.getpid(), True, warnings) is False
    assert "cannot reach" in warnings[0]
