"""Helpers the save and restore integration tests share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.guest import Guest
from harness.processes import all_processes, descendants, kill_tree, qemu_processes
from integration.ansible_runner import ANSIBLE, ansible_environment, run_module

COMPRESSORS = ("gzip", "bzip2", "xz", "lzop", "zstd")
RUNTIME_DIR = Path("/run/savestate-qemu")


def save(guest: Guest | None = None, path: Path | str = "", check: bool = False, diff: bool = False,
         env: dict[str, str] | None = None, **options: Any) -> dict[str, Any]:
    """Run savestate.qemu.save through Ansible; ``guest`` adds ``name: <its name>``."""
    args = {"path": str(path), **options}
    if guest is not None and not {"name", "uuid", "socket"} & options.keys():
        args["name"] = guest.spec.name
    return run_module("save", args, check=check, diff=diff, env=env)


def restore(path: Path | str, check: bool = False, diff: bool = False, **options: Any) -> dict[str, Any]:
    return run_module("restore", {"path": str(path), **options}, check=check, diff=diff)


def ok(result: dict[str, Any]) -> dict[str, Any]:
    """The result, after asserting the module did not fail (with its message if it did)."""
    assert not result["failed"], f"{result.get('msg')}\n{result['_stdout'][-3000:]}"
    return result


def failed(result: dict[str, Any], *fragments: str) -> str:
    """Assert the module failed with a message containing every fragment; return it."""
    assert result["failed"], f"expected a failure, got {result}"
    message = result.get("msg", "")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def assert_continued(guest: Guest, saved_tick: int, timeout: float = 30.0) -> None:
    """The guest's heartbeat went on from where it was saved; it did not reboot."""
    guest.wait_tick_above(saved_tick + 2, timeout)
    assert guest.boots() == 1, "the guest booted again instead of resuming"
    ticks = guest.ticks()
    assert all(b == a + 1 for a, b in zip(ticks, ticks[1:])), "the heartbeat skipped or restarted"


def assert_frozen(guest: Guest, seconds: float = 1.0) -> None:
    before = guest.last_tick()
    time.sleep(seconds)
    assert guest.last_tick() == before, "a paused guest's heartbeat moved"


def leftovers(directory: Path) -> list[str]:
    """Temporary files a save left behind in ``directory``."""
    return sorted(name for name in os.listdir(directory) if name.endswith(".partial"))


def helpers_on(program: str, directory: Path) -> list[int]:
    """Live ``program`` processes whose stdin or stdout is a file under ``directory``.

    That is how a test finds *its* compressor (it writes the image) or decompressor
    (it reads it), even with other tests running compressors at the same time.
    """
    found = []
    for process in all_processes():
        if process.comm != program or process.state == "Z":
            continue
        for fd in (0, 1):
            try:
                target = os.readlink(f"/proc/{process.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(f"{directory}/"):
                found.append(process.pid)
                break
    return found


def kill_helper_once_running(program: str, directory: Path, delay: float = 0.3,
                             timeout: float = 60.0) -> threading.Thread:
    """A started thread that SIGKILLs this test's ``program`` a moment after it appears."""
    def kill() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            victims = helpers_on(program, directory)
            if victims:
                time.sleep(delay)
                for pid in victims:
                    os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def stray_helpers() -> list[str]:
    """Live compressor processes that are our descendants (re-parented to the test)."""
    me = os.getpid()
    return [f"{p.comm} (pid {p.pid})" for p in all_processes()
            if p.comm in COMPRESSORS and p.state != "Z" and p.ppid == me]


def wait_for_file(directory: Path, suffix: str, timeout: float = 30.0, interval: float = 0.001) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in os.listdir(directory):
            if name.endswith(suffix):
                return directory / name
        time.sleep(interval)
    raise TimeoutError(f"no *{suffix} file appeared in {directory} within {timeout} s")


@contextmanager
def background_module(module: str, args: dict[str, Any]) -> Iterator[subprocess.Popen]:
    """Run a module through ``ansible`` in the background, in its own process group."""
    with tempfile.TemporaryDirectory(prefix="ssq-bg-") as scratch:
        env = ansible_environment(Path(scratch) / "results.jsonl", None)
        process = subprocess.Popen([str(ANSIBLE), "localhost", "-m", f"savestate.qemu.{module}",
                                    "-a", json.dumps(args)], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            yield process
        finally:
            if process.poll() is None:
                kill_tree(process.pid)
            process.wait()


def kill_module_process(run: subprocess.Popen, module: str) -> int:
    """SIGKILL the module process of a background ``ansible`` run (its worker runs it in another session)."""
    marker = f"AnsiballZ_{module}.py"
    victims = [p.pid for p in descendants(run.pid) if len(p.argv) > 1 and p.argv[1].endswith(marker)]
    assert len(victims) == 1, f"expected one {marker} process, found {victims}"
    os.kill(victims[0], signal.SIGKILL)
    return victims[0]


class SpaceEater(threading.Thread):
    """Fills a tmpfs the moment a save's temporary file appears in it.

    It shrinks the tmpfs to what is in use plus ``keep_free``: one remount, so the file system is
    full within milliseconds, long before even a fast save (a raw image into memory streams at
    more than 1 GiB/s) can finish. Filling it with a file instead raced the save and lost.
    """

    def __init__(self, directory: Path, keep_free: int = 1024 * 1024) -> None:
        super().__init__(daemon=True)
        self.directory = directory
        self.keep_free = keep_free
        self.filled = threading.Event()

    def run(self) -> None:
        wait_for_file(self.directory, ".partial", timeout=60)
        stat = os.statvfs(self.directory)
        used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
        size_kib = (used + self.keep_free) // 1024
        subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(self.directory)], check=True)
        self.filled.set()


@contextmanager
def tmpfs(mountpoint: Path, size_mib: int) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(mountpoint)],
                   check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


# --- damaged images -------------------------------------------------------------------------

def damaged_copy(source: Path, target: Path, edit: Callable[[bytearray], None]) -> Path:
    """A copy of ``source`` (mode 0600) with ``edit`` applied to its bytes."""
    data = bytearray(source.read_bytes())
    edit(data)
    target.write_bytes(bytes(data))
    target.chmod(0o600)
    return target


def flip(position: int) -> Callable[[bytearray], None]:
    def edit(data: bytearray) -> None:
        data[position] ^= 0xFF
    return edit


def cut(position: int) -> Callable[[bytearray], None]:
    def edit(data: bytearray) -> None:
        del data[position:]
    return edit


def nothing_started(workdir: Path) -> None:
    assert qemu_processes(str(workdir)) == [], "a QEMU process was left running"
    assert stray_helpers() == [], "a decompressor was left running"


def restore_fails_cleanly(path: Path, uuid: str, workdir: Path, *fragments: str, **options: Any) -> str:
    """A restore of ``path`` fails with ``fragments``, starts nothing, keeps the image as it was."""
    before = path.read_bytes()
    message = failed(restore(path, **options), *fragments)
    assert path.read_bytes() == before, "the image changed"
    nothing_started(workdir)
    assert not list(RUNTIME_DIR.glob(f"{uuid}.*log")), "the failed QEMU's log was left behind"
    return message
