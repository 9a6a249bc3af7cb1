# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""The guest's clock after a restore, set through the QEMU guest agent.

A restored guest's clock stands where it was saved: the guest did not run in
between, and its clock source continues from the saved value. The QEMU guest agent
(``qemu-ga`` in the guest, on the virtio-serial port ``org.qemu.guest_agent.0``)
can set it: ``guest-set-time`` with the host's time, after which the agent writes
the hardware clock too (``hwclock -w``).

The port's host side is a chardev on the command line the restore ran. Only a unix
socket QEMU listens on (``-chardev socket,path=...,server=on``) can be reached; its
path comes from the image, so it is trusted no more than a QMP socket is: nothing
is sent before ``SO_PEERCRED`` shows that the restored QEMU serves our connection
(see _peer), and every wait is bounded (a guest need not run an agent at all, and
the agent's answers are the guest's words, read with a size limit).

The protocol is QMP's JSON, one message a line, without a greeting. A new client
first sends ``0xFF`` (the agent's parser drops what it had) and
``guest-sync-delimited`` with a random id; the answer comes after a ``0xFF``
sentinel, and anything before it (a stale answer, the parser's complaint about our
``0xFF``) is skipped.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import stat
import time
from collections.abc import Sequence
from typing import Any, Optional, Union

from ansible_collections.savestate.qemu.plugins.module_utils._errors import (
    GuestAgentError,
    MonitorBusyError,
    MonitorPeerError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._monitor import Endpoint, unix_endpoint
from ansible_collections.savestate.qemu.plugins.module_utils._peer import verify_peer
from ansible_collections.savestate.qemu.plugins.module_utils._qemu_argv import option_dict, option_values

AGENT_PORT_NAME = "org.qemu.guest_agent.0"
NO_AGENT = "no agent"
# How long an agent has to answer once connected (guest-sync, guest-ping): a running agent answers in
# milliseconds; a guest without one never does, and the restore must not wait long for it.
ANSWER_TIMEOUT = 5.0
# guest-set-time runs hwclock in the guest.
SET_TIME_TIMEOUT = 10.0
# A guest whose clock reads within this of the host's counts as synced.
CLOCK_TOLERANCE_S = 2.0
MAX_MESSAGE = 64 * 1024
SENTINEL = b"\xff"
_TRUE = frozenset(("", "on", "yes", "true", "y"))
_SERIAL_PORT_DRIVERS = frozenset(("virtserialport",))

ClockSynced = Union[bool, str]


# --- the channel on the command line --------------------------------------------------------

def agent_chardev(argv: Sequence[str]) -> Optional[dict[str, str]]:
    """The options of the chardev behind the ``org.qemu.guest_agent.0`` port, ``{}`` if it is missing.

    None when the command line has no such port.
    """
    chardev_id = None
    for value in option_values(argv, "device"):
        device = option_dict(value, implied_key="driver")
        if device.get("driver") in _SERIAL_PORT_DRIVERS and device.get("name") == AGENT_PORT_NAME:
            chardev_id = device.get("chardev", "")
    if chardev_id is None:
        return None
    chardevs = [option_dict(value, implied_key="backend") for value in option_values(argv, "chardev")]
    return next((options for options in chardevs if chardev_id and options.get("id") == chardev_id), {})


def agent_endpoint(argv: Sequence[str], cwd: str) -> tuple[Optional[Endpoint], Optional[str]]:
    """Where the agent's port listens; ``(None, None)`` without a port, ``(None, why)`` if unreachable."""
    options = agent_chardev(argv)
    if options is None:
        return None, None
    label = f"the guest agent's chardev {_printable(options.get('id', ''), 64)!r}"
    if not options:
        return None, f"the guest agent's port {AGENT_PORT_NAME} names no chardev on the command line"
    if options.get("backend") != "socket" or not options.get("path"):
        return None, f"{label} is not a unix socket (only a unix socket QEMU listens on can be reached)"
    if options.get("server", "off").lower() not in _TRUE or options.get("abstract", "off").lower() in _TRUE:
        return None, f"{label} is not a unix socket file QEMU listens on (server=on)"
    # QEMU resolved a relative path from its working directory, the restore's launch directory.
    return unix_endpoint(os.path.normpath(os.path.join(cwd, options["path"]))), None


# --- the agent ------------------------------------------------------------------------------

class GuestAgent:
    """One conversation with a guest agent, over a socket the guest's QEMU was shown to serve."""

    def __init__(self, sock: socket.socket, endpoint: Endpoint) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self._buffer = b""

    @classmethod
    def connect(cls, endpoint: Endpoint, qemu_pid: int, timeout: float = ANSWER_TIMEOUT) -> GuestAgent:
        """Connect, and refuse unless ``qemu_pid`` serves the socket: nothing is sent before that."""
        deadline = time.monotonic() + timeout
        path = str(endpoint.path)
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise GuestAgentError(f"the guest agent channel {_printable(path)} is not a socket")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as error:
            raise GuestAgentError(f"cannot reach the guest agent channel {_printable(path)}: "
                                  f"{error.strerror or error}") from None
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(path)
            verify_peer(sock, endpoint, qemu_pid, deadline)
        except (MonitorPeerError, MonitorBusyError):
            sock.close()
            raise GuestAgentError(f"the guest agent channel {_printable(path)} is not served by the restored "
                                  f"QEMU (pid {qemu_pid}); refusing to talk to it") from None
        except OSError as error:
            sock.close()
            raise GuestAgentError(f"cannot connect to the guest agent channel {_printable(path)}: "
                                  f"{error.strerror or error}") from None
        return cls(sock, endpoint)

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def sync(self, timeout: float = ANSWER_TIMEOUT) -> None:
        """Flush what an earlier client left and wait for our own sync id: the agent answers."""
        deadline = time.monotonic() + timeout
        sync_id = secrets.randbelow(2 ** 31 - 1) + 1
        self._send(SENTINEL + _encode("guest-sync-delimited", {"id": sync_id}), deadline)
        while True:
            self._skip_to_sentinel(deadline)
            answer = self._read_message(deadline, strict=False)
            if isinstance(answer, dict) and answer.get("return") == sync_id:
                return

    def execute(self, command: str, arguments: Optional[dict[str, Any]] = None,
                timeout: float = ANSWER_TIMEOUT) -> Any:
        """Run one command (after :meth:`sync`); the agent's error is a GuestAgentError."""
        deadline = time.monotonic() + timeout
        self._send(_encode(command, arguments), deadline)
        while True:
            answer = self._read_message(deadline, strict=True)
            if "return" in answer:
                return answer["return"]
            if "error" in answer:
                error = answer["error"] if isinstance(answer["error"], dict) else {}
                raise GuestAgentError(f"the guest agent refused {command}: "
                                      f"{_printable(error.get('class', ''), 64)}: {_printable(error.get('desc', ''))}")

    # -- the wire ----------------------------------------------------------------------------

    def _send(self, data: bytes, deadline: float) -> None:
        try:
            self.sock.settimeout(_left(deadline, "send to"))
            self.sock.sendall(data)
        except OSError as error:
            raise _io_error(error, "send to") from None

    def _receive(self, deadline: float) -> None:
        if len(self._buffer) > MAX_MESSAGE:
            raise GuestAgentError(f"the guest agent sent more than {MAX_MESSAGE} bytes without a message end")
        try:
            self.sock.settimeout(_left(deadline, "get an answer from"))
            data = self.sock.recv(65536)
        except OSError as error:
            raise _io_error(error, "get an answer from") from None
        if not data:
            raise GuestAgentError("the guest agent channel was closed before the agent answered")
        self._buffer += data

    def _skip_to_sentinel(self, deadline: float) -> None:
        while SENTINEL not in self._buffer:
            self._buffer = b""
            self._receive(deadline)
        self._buffer = self._buffer.split(SENTINEL, 1)[1]

    def _read_message(self, deadline: float, strict: bool) -> Any:
        """The next line as JSON; not JSON is an error (``strict``) or None."""
        while b"\n" not in self._buffer:
            self._receive(deadline)
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if strict and not isinstance(message, dict):
            raise GuestAgentError(f"the guest agent answered something that is not a QMP message: "
                                  f"{_printable(line.decode('utf-8', 'replace'))}")
        return message


def _encode(command: str, arguments: Optional[dict[str, Any]]) -> bytes:
    message: dict[str, Any] = {"execute": command}
    if arguments is not None:
        message["arguments"] = arguments
    return json.dumps(message).encode() + b"\n"


def _left(deadline: float, doing: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise GuestAgentError(f"timed out trying to {doing} the guest agent")
    return left


def _io_error(error: OSError, doing: str) -> GuestAgentError:
    if isinstance(error, socket.timeout):
        return GuestAgentError(f"timed out trying to {doing} the guest agent")
    return GuestAgentError(f"cannot {doing} the guest agent: {error.strerror or error}")


def _printable(text: Any, limit: int = 200) -> str:
    """The guest's words (or the image's) as one bounded line of printable text."""
    cleaned = "".join(char if char.isprintable() else "?" for char in str(text))
    return cleaned if len(cleaned) <= limit else cleaned[:limit] + "..."


# --- the restore's step -------------------------------------------------------------------

def set_guest_clock(agent: GuestAgent) -> Optional[str]:
    """Set the guest's clock to the host's; a note when the agent complained yet the clock is right.

    The agent sets the system clock first and then runs ``hwclock -w``; a guest
    without hwclock reports an error although its clock was set, so an error is
    checked against the guest's clock before it counts.
    """
    try:
        agent.execute("guest-set-time", {"time": time.time_ns()}, timeout=SET_TIME_TIMEOUT)
        return None
    except GuestAgentError as error:
        if not clock_is_right(agent):
            raise
        return f"the guest's clock is set, but its agent said: {error}"


def clock_is_right(agent: GuestAgent) -> bool:
    """Whether the guest's clock reads the host's time (``guest-get-time``), within the tolerance."""
    try:
        guest_ns = agent.execute("guest-get-time")
    except GuestAgentError:
        return False
    if not isinstance(guest_ns, int) or isinstance(guest_ns, bool):
        return False
    return abs(guest_ns - time.time_ns()) <= CLOCK_TOLERANCE_S * 1e9


def sync_guest_clock(argv: Sequence[str], cwd: str, qemu_pid: int, wanted: bool,
                     warnings: list[str]) -> ClockSynced:
    """Bring a restored guest's clock to the host's time; what ``guest.clock_synced`` reports.

    ``"no agent"`` when the command line has no guest agent port; ``False`` when not
    ``wanted`` (``sync_time: false``, or the guest is not running) or when the agent
    cannot be reached or does not answer (a warning says why); ``True`` once set.
    Never raises for the agent's sake: the guest is restored either way.
    """
    endpoint, unreachable = agent_endpoint(argv, cwd)
    if endpoint is None and unreachable is None:
        return NO_AGENT
    if not wanted:
        return False
    try:
        if endpoint is None:
            raise GuestAgentError(str(unreachable))
        with GuestAgent.connect(endpoint, qemu_pid, ANSWER_TIMEOUT) as agent:
            agent.sync(ANSWER_TIMEOUT)
            agent.execute("guest-ping", timeout=ANSWER_TIMEOUT)
            note = set_guest_clock(agent)
    except GuestAgentError as error:
        warnings.append(f"the guest is restored, but its clock was not synced to the host's: {error}. "
                        "It stands where it was at the save until something in the guest sets it (NTP)")
        return False
    if note:
        warnings.append(note)
    return True
