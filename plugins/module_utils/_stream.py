# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""How the migration stream moves between QEMU and the image file.

The stream never passes through Python. Per route:

``fdset``  QEMU 8.2+ over a unix monitor: the image fd goes into an fdset and QEMU
           migrates to ``file:/dev/fdset/N`` at the stream offset (a ``channels``
           address, so no path ever needs quoting). Raw and sparse images.
``fd``     QEMU 7.2 (no ``file:``) over a unix monitor: ``getfd`` the image fd,
           positioned at the stream offset, and migrate to ``fd:NAME``. Raw images.
``socket`` compressed images: QEMU writes into (or reads from) one end of a
           socketpair, the compressor (or decompressor) runs between the other end
           and the image fd. A socket stays a valid ``fd:`` target on every QEMU.
``path``   a TCP monitor cannot carry fds: QEMU 8.2+ opens the image path itself
           (``channels`` file address with offset). Raw and sparse images.
``exec``   a TCP monitor on a QEMU without ``file:`` (or any compressed format over
           TCP): QEMU runs ``/bin/sh -c`` appending to the image; the path is
           single-quoted with :func:`shlex.quote`. The only shell command we ever build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._credentials import Credentials, popen_identity
from ansible_collections.savestate.qemu.plugins.module_utils._errors import (
    MigrationError,
    MonitorError,
    MonitorTimeoutError,
    PreconditionError,
    QMPCommandError,
    SaveStateError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image import Compressor, ImageFormat
from ansible_collections.savestate.qemu.plugins.module_utils._runtime import read_runtime_file, write_runtime_file

# QEMU's default max-bandwidth is 128 MiB/s; a save to a file must not be throttled.
# This is the value libvirt uses for "unlimited" (INT64_MAX rounded down to MiB).
UNLIMITED_BANDWIDTH = 9223372036853727232
TERMINAL_STATUSES = ("completed", "failed", "cancelled")
POLL_INTERVAL = 0.05
# How often the wait for QEMU's MIGRATION event wakes up to check on the helper.
EVENT_SLICE = 0.25
# Bigger socket buffers than the default let QEMU and the compressor run in parallel.
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
# How long a cancel may wait for QEMU to let go of the stream (it has to flush what it holds).
CANCEL_TIMEOUT = 30.0
FD_NAME = "savestate-stream"
FDSET_OPAQUE = "savestate-stream"


def time_left(deadline: float, floor: float) -> float:
    """Seconds until ``deadline`` (``time.monotonic()``), never less than ``floor``.

    What bounds a QMP call made while a stream flows or right after it: the time the
    operation has left, not the monitor's fixed per-command limit.
    """
    return max(deadline - time.monotonic(), floor)


@dataclass(frozen=True)
class Features:
    """What this QEMU and this monitor endpoint allow, detected over QMP."""

    can_pass_fds: bool
    file_transport: bool
    mapped_ram: bool
    multifd: bool
    direct_io: bool
    # QEMU 8.2.0 to 9.0.1 opened file: targets with O_TRUNC, wiping the header in
    # front of the stream offset (fixed by QEMU commit 6d3279655a). No QMP feature
    # tells this apart, so this one check goes by version.
    file_offset_truncates: bool

    exit_on_error: bool = False

    @classmethod
    def probe(cls, monitor: Any, binary: Optional[str] = None) -> Features:
        """Ask QEMU. What only the QAPI schema tells (a big reply) is cached per QEMU binary."""
        capabilities = monitor.migration_capabilities()
        version = monitor.version()
        schema_facts = SchemaFactsCache.lookup(binary, version)
        if schema_facts is None:
            schema_facts = {"file_transport": monitor.supports_file_transport(),
                            "exit_on_error": monitor.supports_incoming_exit_on_error()}
            SchemaFactsCache.store(binary, version, schema_facts)
        return cls(
            can_pass_fds=monitor.endpoint.is_unix,
            file_transport=schema_facts["file_transport"],
            mapped_ram="mapped-ram" in capabilities,
            multifd="multifd" in capabilities,
            direct_io="direct-io" in monitor.migration_parameters(),
            file_offset_truncates=(8, 2, 0) <= version < (9, 0, 2),
            exit_on_error=schema_facts["exit_on_error"],
        )


class SchemaFactsCache:
    """Facts read from ``query-qmp-schema``, kept per QEMU binary in the runtime directory.

    The schema is QEMU's largest reply (over 100 ms to fetch and parse); what we read
    from it depends only on the binary, so it is keyed by the binary's path, size,
    mtime and reported version, and recomputed whenever one of them changes. Each
    binary has one file, named by a hash of its path (never by the path itself).
    """

    FILE_PREFIX = "schema-facts-"
    MAX_BYTES = 4096
    FACTS = ("file_transport", "exit_on_error")

    @classmethod
    def _key(cls, binary: Optional[str], version: tuple[int, int, int]) -> Optional[tuple[str, str]]:
        """The file name for ``binary`` and what identifies this build of it."""
        if not binary:
            return None
        try:
            path = os.path.realpath(binary)
            info = os.stat(path)
        except (OSError, ValueError):
            return None
        digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:32]
        return f"{cls.FILE_PREFIX}{digest}.json", f"{path}:{info.st_size}:{info.st_mtime_ns}:{'.'.join(map(str, version))}"

    @classmethod
    def lookup(cls, binary: Optional[str], version: tuple[int, int, int]) -> Optional[dict[str, bool]]:
        key = cls._key(binary, version)
        if key is None:
            return None
        try:
            data = read_runtime_file(key[0], cls.MAX_BYTES)
            record = json.loads(data) if data else None
        except (OSError, ValueError, SaveStateError):
            return None
        if not isinstance(record, dict) or record.get("binary") != key[1]:
            return None
        facts = record.get("facts")
        if not isinstance(facts, dict) or set(facts) != set(cls.FACTS):
            return None
        return facts if all(isinstance(value, bool) for value in facts.values()) else None

    @classmethod
    def store(cls, binary: Optional[str], version: tuple[int, int, int], facts: dict[str, bool]) -> None:
        key = cls._key(binary, version)
        if key is None:
            return
        try:
            write_runtime_file(key[0], json.dumps({"binary": key[1], "facts": facts}).encode())
        except (OSError, SaveStateError):
            pass  # a cache: failing to write it costs the next run 100 ms, nothing more


@dataclass(frozen=True)
class StreamPlan:
    """The route and migration settings chosen for one save or restore."""

    route: str
    image_format: ImageFormat
    capabilities: dict[str, bool] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    bypass_cache: bool = False
    exit_on_error: bool = False

    @property
    def compressor(self) -> Optional[Compressor]:
        return self.image_format.compressor

    def describe(self) -> str:
        details = [f"route {self.route}", f"format {self.image_format.label}"]
        details += [f"{name}={value}" for name, value in sorted(self.parameters.items())
                    if name != "max-bandwidth"]
        return ", ".join(details)


def _sparse_settings(features: Features, parallel_channels: int, bypass_cache: bool,
                     outgoing: bool) -> tuple[dict[str, bool], dict[str, Any]]:
    if not (features.mapped_ram and features.multifd):
        raise PreconditionError(
            "save image format sparse is not supported by this QEMU binary: it needs the "
            "mapped-ram migration capability (QEMU 9.0 or newer)")
    if bypass_cache and not features.direct_io:
        raise PreconditionError(
            "bypass_cache needs the direct-io migration parameter (QEMU 9.1 or newer)")
    parameters: dict[str, Any] = {"multifd-channels": parallel_channels}
    if bypass_cache:
        parameters["direct-io"] = True
    if outgoing:
        parameters["max-bandwidth"] = UNLIMITED_BANDWIDTH
    return {"mapped-ram": True, "multifd": True}, parameters


# A sparse save is written by several multifd threads at once. Measured (docs/performance.md, issue 17,
# interleaved medians on a 2-core host): 2 channels saved 1/2/4 GiB guests in 0.62/1.25/2.72 s where
# 1 channel took 0.71/1.68/3.21 s (libvirt's plain mapped-ram: 0.70/1.69/3.21 s). More threads than
# cores only contend for them; 4 caps the page-copy threads a large host gets by default. Restores keep 1:
# a cold load is bound by the disk, and 2 channels did not load faster there.
SPARSE_CHANNELS_CAP = 4


def default_channels(image_format: ImageFormat) -> int:
    """A save's multifd channels when the user gives none: one per core (at most 4) for sparse, else 1."""
    if image_format != ImageFormat.SPARSE:
        return 1
    return max(1, min(usable_cores(), SPARSE_CHANNELS_CAP))


def usable_cores() -> int:
    """The cores this process may run on (a cpuset or affinity mask can allow fewer than the host has)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _check_options(image_format: ImageFormat, parallel_channels: int, bypass_cache: bool) -> None:
    if parallel_channels < 1:
        raise PreconditionError("number of parallel save channels cannot be less than 1")
    if image_format != ImageFormat.SPARSE:
        if parallel_channels > 1:
            raise PreconditionError(
                "Parallel save is only supported with the 'sparse' save image format")
        if bypass_cache:
            raise PreconditionError(
                "bypass_cache is only supported with the 'sparse' save image format: QEMU "
                "does O_DIRECT I/O only on mapped-ram's multifd channels")


def plan_save(image_format: ImageFormat, features: Features, parallel_channels: Optional[int] = None,
              bypass_cache: bool = False) -> StreamPlan:
    """Choose how a save streams into the image; raise PreconditionError if it cannot."""
    parallel_channels = default_channels(image_format) if parallel_channels is None else parallel_channels
    _check_options(image_format, parallel_channels, bypass_cache)
    capabilities: dict[str, bool] = {"mapped-ram": False} if features.mapped_ram else {}
    parameters: dict[str, Any] = {"max-bandwidth": UNLIMITED_BANDWIDTH}
    if image_format == ImageFormat.SPARSE:
        capabilities, parameters = _sparse_settings(features, parallel_channels, bypass_cache, True)
    elif features.multifd:
        capabilities["multifd"] = False

    file_ok = features.file_transport and not features.file_offset_truncates
    if image_format.compressor is not None:
        route = "socket" if features.can_pass_fds else "exec"
    elif features.can_pass_fds:
        route = "fdset" if file_ok else "fd"
    else:
        route = "path" if file_ok else "exec"
    if image_format == ImageFormat.SPARSE and route not in ("fdset", "path"):
        raise PreconditionError("save image format sparse needs QEMU's file: migration transport")
    return StreamPlan(route, image_format, capabilities, parameters, bypass_cache)


def plan_restore(image_format: ImageFormat, features: Features, parallel_channels: int = 1,
                 bypass_cache: bool = False) -> StreamPlan:
    """Choose how a restore feeds the image to QEMU (always over a unix monitor)."""
    if not features.can_pass_fds:
        raise PreconditionError("restore needs a unix-socket monitor to pass the image to QEMU")
    _check_options(image_format, parallel_channels, bypass_cache)
    if image_format == ImageFormat.SPARSE:
        capabilities, parameters = _sparse_settings(features, parallel_channels, bypass_cache, False)
        return StreamPlan("fdset", image_format, capabilities, parameters, bypass_cache, features.exit_on_error)
    if image_format.compressor is not None:
        return StreamPlan("socket", image_format, exit_on_error=features.exit_on_error)
    file_ok = features.file_transport and not features.file_offset_truncates
    return StreamPlan("fdset" if file_ok else "fd", image_format, exit_on_error=features.exit_on_error)


# --- migration settings --------------------------------------------------------------

@dataclass
class MigrationSettings:
    """Apply a plan's capabilities and parameters, remembering what to put back.

    Every capability that is on and that the plan does not ask for is switched off
    (as libvirt does): a capability such as QEMU 7.2's ``compress`` changes the
    stream, and the restoring side would have to match it. ``events`` is always on.
    """

    monitor: Any
    saved_capabilities: dict[str, bool] = field(default_factory=dict)
    saved_parameters: dict[str, Any] = field(default_factory=dict)

    def apply(self, plan: StreamPlan) -> None:
        enabled = self.monitor.enabled_migration_capabilities()
        wanted = {name: False for name in enabled}
        wanted.update(plan.capabilities)
        wanted["events"] = True
        changes = {name: state for name, state in wanted.items() if state != (name in enabled)}
        if changes:
            self.saved_capabilities = {name: name in enabled for name in changes}
            self._set_capabilities(changes)
        if plan.parameters:
            current = self.monitor.migration_parameters()
            self.saved_parameters = {name: current[name] for name in plan.parameters if name in current}
            self.monitor.execute("migrate-set-parameters", dict(plan.parameters))

    def restore(self) -> None:
        """Put back what :meth:`apply` changed; best effort (QEMU may be gone)."""
        try:
            if self.saved_parameters:
                self.monitor.execute("migrate-set-parameters", self.saved_parameters)
            if self.saved_capabilities:
                self._set_capabilities(self.saved_capabilities)
        except MonitorError:
            pass

    def _set_capabilities(self, states: dict[str, bool]) -> None:
        capabilities = [{"capability": name, "state": state} for name, state in states.items()]
        self.monitor.execute("migrate-set-capabilities", {"capabilities": capabilities})


# --- helper processes (compressors) -----------------------------------------------

class HelperProcess:
    """A compressor or decompressor between a socket and the image.

    Its stderr goes to an unlinked temporary file, so a chatty or failing helper can
    never block on a full pipe, and its message ends up in ours.
    """

    def __init__(self, argv: tuple[str, ...], stdin: int, stdout: int,
                 credentials: Optional[Credentials] = None) -> None:
        self.argv = argv
        self._stderr = tempfile.TemporaryFile()
        try:
            # pylint: disable-next=ansible-bad-function  # a pipe stage runs beside QEMU; run_command waits for its command
            self.process = subprocess.Popen(list(argv), stdin=stdin, stdout=stdout,
                                            stderr=self._stderr, close_fds=True, **popen_identity(credentials))
        except (OSError, subprocess.SubprocessError) as error:
            self._stderr.close()
            reason = getattr(error, "strerror", None) or str(error)
            raise MigrationError(f"cannot run {argv[0]}: {reason}") from None

    def failure(self) -> Optional[str]:
        """A message if the helper has exited unsuccessfully, else None."""
        code = self.process.poll()
        if code is None or code == 0:
            return None
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        return f"{self.argv[0]} {how}{self._stderr_tail()}"

    def wait(self, timeout: float) -> None:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise MigrationError(f"{self.argv[0]} did not finish within {timeout:.0f} s") from None
        if code != 0:
            raise MigrationError(self.failure() or f"{self.argv[0]} failed")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def close(self) -> None:
        self.kill()
        self._stderr.close()

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read()[-2000:].decode(errors="replace").strip()
        return f": {text}" if text else ""


def _socketpair() -> tuple[socket.socket, socket.socket]:
    qemu_end, helper_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for end in (qemu_end, helper_end):
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    return qemu_end, helper_end


def exec_command(plan: StreamPlan, path: str) -> str:
    """The ``exec:`` shell command that appends the stream to ``path``."""
    producer = plan.compressor.compress_argv if plan.compressor else ("cat",)
    return f"{shlex.join(producer)} >> {shlex.quote(path)}"


def file_channel(filename: str, offset: int) -> list[dict[str, Any]]:
    return [{"channel-type": "main",
             "addr": {"transport": "file", "filename": filename, "offset": offset}}]


# --- one migration in either direction ------------------------------------------------

class Stream:
    """Connect QEMU's migration to the image file along a plan's route, then wait.

    ``fd`` is the image, open for writing (save) or reading (restore) and positioned
    at the stream offset; the caller keeps ownership of it. ``path`` is only needed
    by the ``path`` and ``exec`` routes, where QEMU opens the file itself.
    """

    def __init__(self, monitor: Any, plan: StreamPlan, fd: int, stream_offset: int,
                 path: str, outgoing: bool, helper_credentials: Optional[Credentials] = None) -> None:
        self.monitor = monitor
        # A decompressor parses the image's stream: it runs as the QEMU that loads it, never as more.
        self.helper_credentials = helper_credentials
        self.plan = plan
        self.fd = fd
        self.stream_offset = stream_offset
        self.path = path
        self.outgoing = outgoing
        self.helper: Optional[HelperProcess] = None
        self._fdset: Optional[int] = None
        self._named_fd = False
        self._extra_fds: list[int] = []
        self._events = contextlib.ExitStack()

    # -- starting -----------------------------------------------------------------------

    def start(self) -> None:
        """Hand QEMU the stream and issue ``migrate`` / ``migrate-incoming``."""
        target = getattr(self, f"_route_{self.plan.route}")()
        command = "migrate" if self.outgoing else "migrate-incoming"
        if not self.outgoing and self.plan.exit_on_error:
            # Keep QEMU alive after a bad stream so that its reason reaches us over QMP.
            target["exit-on-error"] = False
        # Listen before the command: the MIGRATION event that ends the wait may come at once.
        self._events.enter_context(self.monitor.listen("MIGRATION"))
        try:
            self.monitor.execute(command, target)
        except QMPCommandError as error:
            raise MigrationError(f"QEMU refused to start the migration: {error.description}") from error

    def _route_fdset(self) -> dict[str, Any]:
        # QEMU picks an fd from the set by its access mode: write-only to save,
        # read-only to restore (and O_DIRECT for the multifd channels).
        access = os.O_WRONLY if self.outgoing else os.O_RDONLY
        fds = [self._reopen(access)]
        if self.plan.bypass_cache:
            fds.append(self._reopen(access | os.O_DIRECT))
        self._fdset = self.monitor.add_fd(fds[0], opaque=FDSET_OPAQUE)
        for extra in fds[1:]:
            self.monitor.add_fd(extra, fdset_id=self._fdset, opaque=FDSET_OPAQUE + "-direct")
        return {"channels": file_channel(f"/dev/fdset/{self._fdset}", self.stream_offset)}

    def _route_fd(self) -> dict[str, Any]:
        os.lseek(self.fd, self.stream_offset, os.SEEK_SET)
        self.monitor.pass_named_fd(self.fd, FD_NAME)
        self._named_fd = True
        return {"uri": f"fd:{FD_NAME}"}

    def _route_socket(self) -> dict[str, Any]:
        os.lseek(self.fd, self.stream_offset, os.SEEK_SET)
        qemu_end, helper_end = _socketpair()
        with qemu_end, helper_end:
            compressor = self.plan.compressor
            if compressor is None:
                raise PreconditionError("internal error: a compressed stream was planned without a compressor")
            if self.outgoing:
                self.helper = HelperProcess(compressor.compress_argv, helper_end.fileno(), self.fd)
            else:
                self.helper = HelperProcess(compressor.decompress_argv, self.fd, helper_end.fileno(),
                                            self.helper_credentials)
            self.monitor.pass_named_fd(qemu_end.fileno(), FD_NAME)
            self._named_fd = True
        # Both ends are closed here: QEMU and the helper hold the only copies, so
        # each sees end-of-stream as soon as the other is done.
        return {"uri": f"fd:{FD_NAME}"}

    def _route_path(self) -> dict[str, Any]:
        return {"channels": file_channel(self.path, self.stream_offset)}

    def _route_exec(self) -> dict[str, Any]:
        return {"uri": "exec:" + exec_command(self.plan, self.path)}

    def _reopen(self, flags: int) -> int:
        """A new open file description of the image, with ``flags``."""
        try:
            fd = os.open(f"/proc/self/fd/{self.fd}", flags | os.O_CLOEXEC)
        except OSError as error:
            if flags & os.O_DIRECT:
                raise PreconditionError(
                    f"bypass_cache: cannot open the image with O_DIRECT ({error.strerror}); the "
                    "file system (tmpfs, for one) may not support direct I/O") from error
            raise MigrationError(f"cannot reopen the image: {error.strerror}") from error
        self._extra_fds.append(fd)
        return fd

    # -- waiting --------------------------------------------------------------------------

    def wait(self, timeout: float) -> dict[str, Any]:
        """Wait for QEMU to finish; return the final ``query-migrate``.

        Raises MigrationError when QEMU reports a failure, the helper dies or the
        timeout passes (the outgoing migration is cancelled first).
        """
        deadline = time.monotonic() + timeout
        while True:
            self._await_migration_event(min(EVENT_SLICE, max(deadline - time.monotonic(), 0.001)))
            # Asked after every event or slice: the status is the truth (an event can be
            # missed), and asking is also how we notice that QEMU itself died (the monitor
            # hangs up: MonitorClosedError, at once).
            info = self._query_migrate(deadline)
            status = "busy" if info is None else info.get("status", "none")
            if status in TERMINAL_STATUSES:
                break
            helper_failure = self.helper.failure() if self.helper else None
            if helper_failure:
                self.cancel()
                raise MigrationError(helper_failure)
            if time.monotonic() > deadline:
                self.cancel()
                state = "QEMU was too busy to answer" if status == "busy" else f"QEMU status {status}"
                raise MigrationError(f"the migration did not finish within the timeout of {timeout:g} s "
                                     f"({state}); it was cancelled")
        if status != "completed":
            raise MigrationError(self._failure_message(info or {}))
        if self.helper is not None:
            self.helper.wait(max(deadline - time.monotonic(), 10.0))
        return info or {}

    def _query_migrate(self, deadline: float) -> Optional[dict[str, Any]]:
        """``query-migrate``, waiting for the answer as long as the whole operation may last.

        QEMU loads an incoming stream in its main loop (a mapped-ram image in one go) and
        completes an outgoing one holding its big lock: over a slow disk it may not answer
        for minutes while the stream flows. That is slowness, not failure: only the overall deadline ends the
        wait. No answer by then is None, and the caller's deadline check says why.
        """
        try:
            reply: Optional[dict[str, Any]] = self.monitor.query_migrate(timeout=time_left(deadline, EVENT_SLICE))
            return reply
        except MonitorTimeoutError:
            return None

    def _await_migration_event(self, timeout: float) -> None:
        """Return when QEMU announces a terminal MIGRATION status, or after ``timeout``."""
        try:
            self.monitor.wait_event("MIGRATION", lambda event: event.get("data", {}).get("status")
                                    in TERMINAL_STATUSES, timeout=timeout)
        except MonitorTimeoutError:
            pass

    def _failure_message(self, info: dict[str, Any]) -> str:
        reason = info.get("error-desc") or self._unexplained_failure(info.get("status"))
        helper_failure = self._helper_failure_after_qemu()
        if helper_failure:
            reason = f"{reason} ({helper_failure})"
        return f"QEMU's migration {'to' if self.outgoing else 'from'} the image failed: {reason}"

    def _helper_failure_after_qemu(self) -> Optional[str]:
        """The helper's failure, giving it a moment to end: QEMU may notice its death first."""
        if self.helper is None:
            return None
        try:
            self.helper.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        return self.helper.failure()

    def _unexplained_failure(self, status: Optional[str]) -> str:
        """QEMU 7.2 fails without an ``error-desc``; say what we can see ourselves."""
        try:
            usage = os.statvfs(os.path.dirname(self.path) or ".")
        except OSError:
            usage = None
        if self.outgoing and usage is not None and usage.f_bavail * usage.f_frsize < 1024 * 1024:
            return f"No space left on device (the file system of {os.path.dirname(self.path)} is full)"
        return f"QEMU reports status {status} and gives no reason"

    def cancel(self) -> None:
        """Cancel an outgoing migration and wait until QEMU has let go of it."""
        if self.helper is not None:
            self.helper.kill()
        if not self.outgoing:
            return
        try:
            deadline = time.monotonic() + CANCEL_TIMEOUT
            self.monitor.execute("migrate_cancel", timeout=CANCEL_TIMEOUT)
            while self.monitor.query_migrate(timeout=time_left(deadline, POLL_INTERVAL)).get("status") \
                    not in TERMINAL_STATUSES + ("none",):
                if time.monotonic() > deadline:
                    break
                time.sleep(POLL_INTERVAL)
        except MonitorError:
            pass

    # -- cleaning up ----------------------------------------------------------------------

    def close(self) -> None:
        """Release everything the stream handed out, on every path; best effort."""
        self._events.close()
        if self.helper is not None:
            self.helper.close()
        for fd in self._extra_fds:
            os.close(fd)
        self._extra_fds = []
        try:
            if self._fdset is not None:
                self.monitor.remove_fdset(self._fdset)
            if self._named_fd:
                self.monitor.close_named_fd(FD_NAME)
        except MonitorError:
            pass  # QEMU has gone (quit or died): nothing is left to release
        self._fdset = None
        self._named_fd = False

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
