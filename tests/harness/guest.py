"""Start, observe and stop test guests under a real QEMU.

A guest is the project's kernel + busybox initramfs (see :mod:`harness.assets`).
Its serial console goes to ``serial.log`` in its work directory, opened in append
mode so that a guest restored with the same command line keeps writing to the
same log; the heartbeat (``tick N``) in that log is how tests prove that a
restored guest continued rather than rebooted.

The harness talks to QEMU with qemu.qmp directly, not with the collection's own
monitor client: tests check the collection's work with an independent client.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import socket
import subprocess
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, QMPClient

from harness import heartbeat
from harness.assets import ensure_guest_assets
from harness.processes import pid_gone, kill_and_wait
from harness.qemu import SYSTEM_QEMU, QemuBuild

CLOCK = re.compile(rb"^clock (\d+\.\d+)\r?$", re.MULTILINE)
ACCEL = os.environ.get("SAVESTATE_TEST_ACCEL", "tcg")
QMP_STYLES = ("unix", "tcp", "chardev", "pretty")
NO_QMP = "none"  # the guest's extra_args bring its monitor


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class GuestSpec:
    """What to boot. ``memory_mib`` defaults to room for ``fill_mib`` plus the guest itself."""

    name: str
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    qemu: QemuBuild = SYSTEM_QEMU
    memory_mib: int | None = None
    fill_mib: int = 0
    disk_mib: int = 0
    disk_format: str = "raw"
    qmp: str = "unix"
    name_option: str = "guest={name},debug-threads=on"
    machine: str = "pc"
    extra_args: tuple[str, ...] = ()
    user: str | None = None  # run QEMU as this user (its work directory is given to it)
    run_in_workdir: bool = False  # start QEMU with its work directory as its working directory
    agent_channel: bool = False  # a virtio-serial port org.qemu.guest_agent.0, its host side a unix socket
    agent: bool = False  # run the guest agent on that port (implies the channel) and print the clock

    @property
    def memory(self) -> int:
        return self.memory_mib or max(128, self.fill_mib + 128)


class Guest:
    """One QEMU process running the test guest, in its own work directory."""

    def __init__(self, spec: GuestSpec, workdir: Path) -> None:
        if spec.qmp not in QMP_STYLES + (NO_QMP,):
            raise ValueError(f"qmp must be one of {QMP_STYLES + (NO_QMP,)}")
        self.spec = spec
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.serial_log = workdir / "serial.log"
        self.qemu_log = workdir / "qemu.log"
        self.pidfile = workdir / "qemu.pid"
        self.qmp_socket = workdir / "qmp.sock"
        self.agent_socket = workdir / "qga.sock"
        self.tcp_port = free_tcp_port() if spec.qmp == "tcp" else None
        self.disk = workdir / f"disk.{spec.disk_format}" if spec.disk_mib else None
        self.process: subprocess.Popen | None = None
        self.argv = self._argv()

    # -- command line -------------------------------------------------------------

    @property
    def qmp_address(self) -> str:
        """The endpoint as the modules take it: a socket path or ``host:port``."""
        if self.tcp_port is not None:
            return f"127.0.0.1:{self.tcp_port}"
        return str(self.qmp_socket)

    def _qmp_args(self) -> list[str]:
        unix = f"unix:{self.qmp_socket},server=on,wait=off"
        if self.spec.qmp == "unix":
            return ["-qmp", unix]
        if self.spec.qmp == "pretty":
            return ["-qmp-pretty", unix]
        if self.spec.qmp == "tcp":
            return ["-qmp", f"tcp:127.0.0.1:{self.tcp_port},server=on,wait=off"]
        if self.spec.qmp == NO_QMP:
            return []
        return ["-chardev", f"socket,id=monitor0,path={self.qmp_socket},server=on,wait=off",
                "-mon", "chardev=monitor0,mode=control"]

    def _argv(self) -> list[str]:
        spec = self.spec
        assets = ensure_guest_assets()
        kernel_args = ["console=ttyS0", "quiet", "panic=-1"]
        if spec.fill_mib:
            kernel_args.append(f"fill={spec.fill_mib}")
        argv = spec.qemu.argv_prefix() + [
            "-name", spec.name_option.format(name=spec.name),
            "-uuid", spec.uuid,
            "-machine", spec.machine,
            "-accel", ACCEL,
            "-m", str(spec.memory),
            "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", str(assets.kernel),
            "-initrd", str(assets.initramfs),
            "-chardev", f"file,id=serial0,path={self.serial_log},append=on",
            "-serial", "chardev:serial0",
            "-pidfile", str(self.pidfile),
        ]
        if self.disk is not None:
            kernel_args.append("disk=1")
            argv += ["-drive", f"file={self.disk},format={spec.disk_format},if=virtio,id=disk0"]
        if spec.agent:
            kernel_args.append("agent=1")
        argv += ["-append", " ".join(kernel_args)]
        return argv + self._qmp_args() + self._agent_args() + list(spec.extra_args)

    def _agent_args(self) -> list[str]:
        if not (self.spec.agent or self.spec.agent_channel):
            return []
        return ["-device", "virtio-serial-pci,id=vser0",
                "-chardev", f"socket,id=qga0,path={self.agent_socket},server=on,wait=off",
                "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0"]

    # -- life cycle ---------------------------------------------------------------

    def start(self, ready_timeout: float = 120.0) -> Guest:
        if self.disk is not None and not self.disk.exists():
            subprocess.run(["qemu-img", "create", "-q", "-f", self.spec.disk_format,
                            str(self.disk), f"{self.spec.disk_mib}M"], check=True)
        log = self.qemu_log.open("ab")
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, **self.spec.qemu.env},
                                        cwd=self.workdir if self.spec.run_in_workdir else None, **self._identity())
        log.close()
        self.wait_ready(ready_timeout)
        return self

    def _identity(self) -> dict[str, Any]:
        """Popen's arguments to run QEMU as ``spec.user``, owning its work directory."""
        if self.spec.user is None:
            return {}
        entry = pwd.getpwnam(self.spec.user)
        for path in (self.workdir, self.workdir.parent, *self.workdir.iterdir()):
            if path == self.workdir.parent:
                os.chmod(path, 0o711)  # let the user reach its directory, nothing more
            else:
                os.chown(path, entry.pw_uid, entry.pw_gid)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [entry.pw_gid]}

    @property
    def launched_pid(self) -> int:
        """The pid of the QEMU that :meth:`start` launched, running or not; raises before it."""
        if self.process is None:
            raise RuntimeError(f"guest {self.spec.name} was never started")
        return self.process.pid

    @property
    def pid(self) -> int | None:
        if self.process is not None and self.process.poll() is None:
            return self.process.pid
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return None if pid_gone(pid) else pid

    def is_alive(self) -> bool:
        return self.pid is not None

    def _fail(self, why: str) -> None:
        log = self.qemu_log.read_text(errors="replace") if self.qemu_log.exists() else ""
        serial = self.serial_log.read_bytes()[-2000:].decode(errors="replace") if self.serial_log.exists() else ""
        raise RuntimeError(f"guest {self.spec.name}: {why}\n--- qemu log ---\n{log}\n--- serial tail ---\n{serial}")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while b"READY" not in self.serial_bytes():
            if self.process is not None and self.process.poll() is not None:
                self._fail(f"QEMU exited with status {self.process.returncode} before READY")
            if time.monotonic() > deadline:
                self._fail(f"no READY within {timeout} s")
            time.sleep(0.1)

    def stop(self) -> None:
        """End the guest however it is running (ours, or re-launched by a restore)."""
        pids = {p for p in (self.pid,) if p is not None}
        if self.process is not None:
            pids.add(self.process.pid)
        for pid in pids:
            kill_and_wait(pid)
        if self.process is not None:
            self.process.wait(timeout=10)

    # -- observation --------------------------------------------------------------

    def serial_bytes(self) -> bytes:
        try:
            return self.serial_log.read_bytes()
        except FileNotFoundError:
            return b""

    def ticks(self) -> list[int]:
        return heartbeat.ticks(self.serial_log)

    def last_tick(self) -> int:
        return heartbeat.last_tick(self.serial_log)

    def clocks(self) -> list[float]:
        """The guest's clock readings (``agent`` guests print one every half second), oldest first."""
        return [float(value) for value in CLOCK.findall(self.serial_bytes())]

    def boots(self) -> int:
        """How many times the guest reached READY in this log (1 unless it rebooted)."""
        return self.serial_bytes().count(b"READY")

    def wait_tick_above(self, value: int, timeout: float = 30.0) -> int:
        try:
            return heartbeat.wait_tick_above(self.serial_log, value, timeout, self.spec.name)
        except heartbeat.HeartbeatStuck as stuck:
            self._fail(str(stuck))  # with QEMU's log and the serial tail
            raise

    def qmp(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Run one QMP command on a fresh connection (QMP serves one client at a time)."""
        return qmp_execute(self.qmp_address, command, arguments, timeout)

    def status(self) -> str:
        return self.qmp("query-status")["status"]


def qmp_execute(address: str, command: str, arguments: dict[str, Any] | None = None,
                timeout: float = 10.0) -> Any:
    """One command on a fresh connection.

    Connection errors are retried until ``timeout``: right after another client
    (a module under test) lets go of the monitor, QEMU may still be tearing that
    session down and refuse or drop the next one for a moment.
    """
    host, port = address.rpartition(":")[::2]
    target: str | tuple[str, int] = (host, int(port)) if port.isdigit() and host else address

    async def run() -> Any:
        while True:
            client = QMPClient("harness")
            try:
                await client.connect(target)
            except (ConnectError, OSError):
                await asyncio.sleep(0.1)
                continue
            try:
                return await client.execute(command, arguments)
            finally:
                try:
                    await client.disconnect()
                except (EOFError, OSError):
                    pass  # QEMU hung up first: after ``quit`` it may close before we do

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(run(), timeout))
    finally:
        loop.close()
