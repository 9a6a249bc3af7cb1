"""Keep track of every QEMU process a test run starts, and make sure none outlives it.

The test process makes itself a *child subreaper*: QEMU processes that daemonize
(those the restore module launches, for instance) are re-parented to it instead of
to PID 1. That lets the harness find them, kill them and reap them, so that a test
run never leaves a QEMU behind, not even after a failure.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
QEMU_COMMS = ("qemu-system-", "qemu-kvm")


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    state: str
    comm: str
    argv: tuple[str, ...]


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def process_info(pid: int) -> ProcessInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw_argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parentheses: it ends at the last ')'.
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
    argv = tuple(a.decode(errors="replace") for a in raw_argv.split(b"\0") if a)
    return ProcessInfo(pid, int(ppid), state, comm, argv)


def all_processes() -> list[ProcessInfo]:
    infos = (process_info(int(entry)) for entry in os.listdir("/proc") if entry.isdigit())
    return [info for info in infos if info is not None]


def is_qemu(info: ProcessInfo) -> bool:
    return info.comm.startswith(QEMU_COMMS)


def qemu_processes(marker: str) -> list[ProcessInfo]:
    """Live QEMU processes whose command line mentions ``marker`` (a test directory)."""
    return [p for p in all_processes()
            if is_qemu(p) and p.state != "Z" and any(marker in arg for arg in p.argv)]


def descendants(pid: int) -> list[ProcessInfo]:
    """Every live process below ``pid``, whatever session or group it moved to."""
    processes = all_processes()
    children: dict[int, list[ProcessInfo]] = {}
    for info in processes:
        children.setdefault(info.ppid, []).append(info)
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child.pid)
    return [info for info in found if info.state != "Z"]


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (Ansible's workers start new sessions)."""
    victims = [info.pid for info in descendants(pid)] + [pid]
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def reap_zombie_children(skip: set[int] = frozenset()) -> None:
    """Reap exited QEMU processes that were re-parented to us (see module docstring)."""
    me = os.getpid()
    for info in all_processes():
        if info.ppid == me and info.state == "Z" and is_qemu(info) and info.pid not in skip:
            try:
                os.waitpid(info.pid, os.WNOHANG)
            except ChildProcessError:
                pass


def pid_gone(pid: int) -> bool:
    info = process_info(pid)
    return info is None or info.state == "Z"


def kill_and_wait(pid: int, timeout: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while not pid_gone(pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} survived SIGKILL for {timeout} s")
        time.sleep(0.05)
    reap_zombie_children()


class Reaper:
    """A background thread that reaps re-parented QEMU zombies every ``interval``."""

    def __init__(self, interval: float = 0.2) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._own: set[int] = set()  # children the harness reaps itself via Popen
        self._thread = threading.Thread(target=self._run, name="qemu-reaper", daemon=True)

    def own(self, pid: int) -> None:
        self._own.add(pid)

    def disown(self, pid: int) -> None:
        self._own.discard(pid)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        reap_zombie_children()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            reap_zombie_children(skip=set(self._own))
