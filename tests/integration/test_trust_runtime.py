"""Runtime files against a hostile local user, and their cleanup, with real modules and real QEMU.

Issue 12, attack class 1: a process of an unprivileged user that looks like QEMU
(the real QEMU binary, run as nobody and held before main) names the guest's
UUID ``/tmp/<dir>/k``; lock and journal names used to be built from it, so a root
save opened ``/tmp/<dir>/k.lock`` through the user's symlink and truncated and
wrote the root-owned file it points to. Runtime file names now come only from
validated UUIDs or hashes, inside root's private runtime directory.

And that directory no longer grows with every save and restore: locks go with
their release, logs and sockets of QEMUs that are gone with the next restore.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness.guest import GuestSpec
from harness.processes import kill_and_wait
from harness.qemu import SYSTEM_QEMU
from integration.common import RUNTIME_DIR, ok, restore, save

pytestmark = pytest.mark.integration

NOBODY = pwd.getpwnam("nobody").pw_uid
NOGROUP = grp.getgrnam("nogroup").gr_gid
PTRACE_TRACEME = 0
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def _stop_at_exec() -> None:
    """In the child: be traced by the test, so the kernel stops it right after exec, before QEMU's main."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(PTRACE_TRACEME, 0, None, None) != 0:
        os._exit(127)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


@contextmanager
def held_qemu_as_nobody(binary: Path, args: list[str], reaper) -> Iterator[int]:
    """The real QEMU binary run as nobody with ``args`` (argv[0] ``qemu-system-x86_64``), held before main."""
    process = subprocess.Popen(["qemu-system-x86_64", *args], executable=str(binary), user=NOBODY,
                               group=NOGROUP, extra_groups=[], preexec_fn=_stop_at_exec, cwd="/",
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reaper.own(process.pid)
    try:
        deadline = time.monotonic() + 10
        while not (os.readlink(f"/proc/{process.pid}/exe") == str(binary) and _state(process.pid) == "t"):
            assert time.monotonic() < deadline, "the impostor did not stop at its exec"
            time.sleep(0.01)
        yield process.pid
    finally:
        process.kill()
        process.wait()
        reaper.disown(process.pid)


def _snapshot(path: Path) -> tuple:
    info = os.lstat(path)
    return info.st_ino, info.st_mode, info.st_uid, info.st_size, info.st_mtime_ns, path.read_bytes()


def _listing(directory: Path) -> dict[str, str]:
    return {name: os.readlink(directory / name) if (directory / name).is_symlink() else "file"
            for name in os.listdir(directory)}


def test_a_hostile_uuid_makes_root_write_nothing_outside_the_runtime_dir(workdir, process_reaper):
    """Attack class 1: ``-uuid /tmp/<dir>/k`` and a symlink at ``/tmp/<dir>/k.lock``."""
    precious = workdir / "precious"  # root's, in root's 0700 directory
    precious.write_text("root's data\n")
    precious.chmod(0o600)
    before = _snapshot(precious)
    attack = Path(tempfile.mkdtemp(prefix="ssq-attack-", dir="/tmp"))
    try:
        os.chown(attack, NOBODY, NOGROUP)
        planted = {"k.lock": precious, "k.save-journal.json": workdir / "created-by-root",
                   "k.log": workdir / "log-by-root", "k.qmp": workdir / "socket-by-root"}
        for name, target in planted.items():  # the user plants them, as nobody
            subprocess.run([*AS_NOBODY, "ln", "-s", str(target), str(attack / name)], check=True)
        planted_listing = _listing(attack)
        name = f"tr-victim-{attack.name[-8:]}"
        args = ["-name", f"guest={name}", "-uuid", f"{attack}/k", "-S", "-nodefaults", "-display", "none",
                "-qmp", f"unix:{attack}/qmp.sock,server=on,wait=off"]
        with held_qemu_as_nobody(SYSTEM_QEMU.binary, args, process_reaper):
            result = save(path=workdir / "victim.save", name=name)
        assert "Traceback" not in result.get("module_stderr", "") + result.get("msg", ""), result
        assert _snapshot(precious) == before, "root's file behind the user's symlink was changed"
        assert _listing(attack) == planted_listing, "root created or replaced files in the user's directory"
        assert sorted(os.listdir(workdir)) == ["precious"], "root followed a dangling symlink and created its target"
    finally:
        subprocess.run(["rm", "-rf", str(attack)], check=False)


def _runtime_files() -> set[str]:
    return set(os.listdir(RUNTIME_DIR)) if RUNTIME_DIR.exists() else set()


# A file that belongs to a guest: its key (a UUID, a hashed name or a pid; see guest_key) and a dot.
GUEST_FILE = re.compile(r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|name-[0-9a-f]{32}|pid-[0-9]+)\.")


def _new_files(before: set[str], key: str) -> set[str]:
    """Files added since ``before`` that are not other guests' (pytest-xdist runs other tests alongside)."""
    new = _runtime_files() - before
    return {name for name in new if name.startswith(f"{key}.") or not GUEST_FILE.match(name)}


def _assert_only_the_live_qemu_keeps_files(before: set[str], key: str, pid: int) -> None:
    new = _new_files(before, key)
    needed = {f"{key}.qemu-{pid}.log", f"{key}.qmp"}  # its output, and its private monitor
    extra = {name for name in new - needed if not name.startswith("schema-facts-")}
    assert not extra, f"the runtime directory kept {sorted(extra)}"
    assert f"{key}.qemu-{pid}.log" in new, "the live QEMU's log is gone"


def test_save_and_restore_leave_nothing_behind_in_the_runtime_dir(qemu, guest_factory, workdir):
    """Save + restore: only what the restored QEMU needs is left; a later restore removes it once it is gone."""
    guest = guest_factory(GuestSpec(name="tr-cleanup", qemu=qemu, qmp="tcp"))  # a private monitor on restore
    key = guest.spec.uuid
    path = workdir / "cleanup.save"
    before = _runtime_files()

    ok(save(guest, path))
    assert all(name.startswith("schema-facts-") for name in _new_files(before, key))
    first = ok(restore(path))["guest"]["pid"]
    _assert_only_the_live_qemu_keeps_files(before, key, first)

    # The restored QEMU is killed (no clean exit: its socket file stays); the next restore cleans up after it.
    kill_and_wait(first)
    second = ok(restore(path))["guest"]["pid"]
    try:
        _assert_only_the_live_qemu_keeps_files(before, key, second)
        assert f"{key}.qemu-{first}.log" not in _runtime_files()
    finally:
        kill_and_wait(second)
