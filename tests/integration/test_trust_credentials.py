"""Credentials and impostors, on real guests (QEMU 10.0 and 7.2), with the attacker as ``nobody``.

A restored QEMU runs with the saved QEMU's uid, gid and groups, never more; the
restore talks only to the QEMU it started; a guest of another user that holds
the image's name and UUID is a conflict, not "already active".
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.guest import GuestSpec
from harness.processes import kill_and_wait
from integration.ansible_runner import run_module
from integration.common import assert_continued, failed, ok, restore, save

pytestmark = pytest.mark.integration

NOBODY = pwd.getpwnam("nobody")
IMPOSTOR = Path(__file__).resolve().parent.parent / "harness" / "impostor.py"
AS_NOBODY = ["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups"]


def real_ids(pid: int) -> tuple[int, int, tuple[int, ...]]:
    """The real uid, gid and supplementary groups of a live process."""
    fields = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as status:
        for line in status:
            key, value = line.split(":", 1)
            fields[key] = value.split()
    return int(fields["Uid"][0]), int(fields["Gid"][0]), tuple(sorted(int(g) for g in fields["Groups"]))


def shared_directory(workdir: Path) -> Path:
    """A directory ``nobody`` can write to, as a user's own QEMU directory would be."""
    directory = workdir / "shared"
    directory.mkdir()
    os.chmod(workdir, 0o711)
    os.chown(directory, NOBODY.pw_uid, NOBODY.pw_gid)
    return directory


def test_a_guest_of_an_unprivileged_user_comes_back_as_that_user(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="cred-user", qemu=qemu, user="nobody"))
    assert real_ids(guest.pid)[:2] == (NOBODY.pw_uid, NOBODY.pw_gid)
    path = workdir / "cred-user.save"
    tick = guest.wait_tick_above(3)
    result = ok(save(guest, path))
    credentials = result["image"]["metadata"]["credentials"]
    assert (credentials["uid"], credentials["gid"], credentials["user"]) == (NOBODY.pw_uid, NOBODY.pw_gid, "nobody")

    restored = ok(restore(path))
    pid = restored["guest"]["pid"]
    assert real_ids(pid) == (NOBODY.pw_uid, NOBODY.pw_gid, (NOBODY.pw_gid,)), "not restored as the saved user"
    assert_continued(guest, tick)
    # It is still that user's guest: a second save and restore keep it so.
    ok(save(guest, path))
    assert real_ids(ok(restore(path))["guest"]["pid"])[0] == NOBODY.pw_uid


def test_a_guest_that_drops_privileges_itself_is_restored_the_same_way(qemu, guest_factory, workdir):
    drop = ("-runas", "nobody") if qemu.name == "7.2" else ("-run-with", "user=nobody")
    guest = guest_factory(GuestSpec(name="cred-runas", qemu=qemu, extra_args=drop))
    os.chown(guest.serial_log, NOBODY.pw_uid, NOBODY.pw_gid)
    assert real_ids(guest.pid)[0] == NOBODY.pw_uid
    path = workdir / "cred-runas.save"
    tick = guest.wait_tick_above(3)
    ok(save(guest, path))
    pid = ok(restore(path))["guest"]["pid"]
    assert real_ids(pid)[0] == NOBODY.pw_uid
    assert_continued(guest, tick)


def test_another_users_qemu_holding_the_name_and_uuid_is_a_conflict(qemu, guest_factory, workdir):
    """nobody runs a real QEMU with root's guest's name and UUID: restore must not call it "active"."""
    guest = guest_factory(GuestSpec(name="cred-held", qemu=qemu))
    path = workdir / "cred-held.save"
    ok(save(guest, path))
    shared = shared_directory(workdir)
    impostor = subprocess.Popen(
        AS_NOBODY + qemu.argv_prefix() + ["-name", guest.spec.name, "-uuid", guest.spec.uuid, "-S",
                                          "-nodefaults", "-display", "none", "-machine", "none",
                                          "-qmp", f"unix:{shared}/q.sock,server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (shared / "q.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        before = path.read_bytes()
        message = failed(restore(path, state="running"))
        assert str(impostor.pid) in message and "uid" in message, message
        assert path.read_bytes() == before
    finally:
        kill_and_wait(impostor.pid)
        impostor.wait()


def test_restore_talks_only_to_the_qemu_it_started(qemu, guest_factory, workdir):
    """The recorded monitor path is in a directory nobody can write; nobody binds it first."""
    shared = shared_directory(workdir)
    socket_path = shared / "qmp.sock"
    guest = guest_factory(GuestSpec(name="cred-mon", qemu=qemu, qmp="none",
                                    extra_args=("-qmp", f"unix:{socket_path},server=on,wait=off")))
    path = workdir / "cred-mon.save"
    tick = guest.wait_tick_above(3)
    ok(save(guest, path, socket=str(socket_path)))
    log = shared / "impostor.log"
    impostor = subprocess.Popen(AS_NOBODY + [sys.executable, str(IMPOSTOR), str(socket_path), str(log)],
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and "listening" in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        result = ok(restore(path))
        assert result["guest"]["state"] == "running"
        assert_continued(guest, tick)
        assert log.read_text().splitlines() == ["listening"], "the restore talked to the impostor"
    finally:
        kill_and_wait(impostor.pid)
        impostor.wait()


def test_guest_info_reports_who_a_guest_runs_as(qemu, guest_factory):
    guest = guest_factory(GuestSpec(name="cred-info", qemu=qemu, user="nobody"))
    found = ok(run_module("guest_info", {"name": guest.spec.name}))["guests"]
    assert [(g["pid"], g["uid"]) for g in found] == [(guest.pid, NOBODY.pw_uid)]
