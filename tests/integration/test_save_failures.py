"""The save module's failure cases on real guests, QEMU 10.0 and 7.2.

Each ends with the guest in its prior state (a running guest runs again), no
temporary file left, no compressor left and any earlier image at the path intact.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

from harness.guest import GuestSpec
from harness.paths import VENV_DIR
from integration.common import (
    SpaceEater,
    assert_continued,
    background_module,
    failed,
    kill_helper_once_running,
    kill_module_process,
    leftovers,
    ok,
    restore,
    save,
    stray_helpers,
    tmpfs,
    wait_for_file,
)

pytestmark = pytest.mark.integration


# --- failures: the guest stays as it was, nothing half-written stays behind -----------

def _earlier_image(guest, path) -> bytes:
    """An earlier complete image at ``path`` (the guest keeps running)."""
    ok(save(guest, path, after_save="running"))
    return path.read_bytes()


def test_migration_blocker_is_refused_before_pausing(qemu, guest_factory, workdir):
    shm = f"/dev/shm/ssq-ivshmem-{os.getpid()}-{qemu.name}"
    guest = guest_factory(GuestSpec(name="blocked", qemu=qemu, extra_args=(
        "-object", f"memory-backend-file,id=shm0,mem-path={shm},size=1M,share=on",
        "-device", "ivshmem-plain,memdev=shm0")))
    try:
        tick = guest.last_tick()
        failed(save(guest, workdir / "blocked.save"), "cannot migrate domain", "ivshmem")
        assert guest.status() == "running"
        guest.wait_tick_above(tick)
        assert not (workdir / "blocked.save").exists() and leftovers(workdir) == []
    finally:
        os.unlink(shm)


def _path_without(program: str, directory) -> str:
    """A PATH with every program of /usr/bin and /bin but ``program``."""
    directory.mkdir()
    for source in ("/usr/bin", "/bin"):
        for name in os.listdir(source):
            if name != program and not (directory / name).exists():
                (directory / name).symlink_to(os.path.join(source, name))
    return f"{VENV_DIR / 'bin'}:{directory}"


def test_missing_compressor(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="no-lzop", qemu=qemu))
    env = {"PATH": _path_without("lzop", workdir / "bin")}
    failed(save(guest, workdir / "x.save", format="lzop", env=env), "lzop", "isn't available")
    assert guest.status() == "running" and leftovers(workdir) == []


def test_timeout_cancels_and_resumes(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="slow", qemu=qemu, fill_mib=96))
    path = workdir / "slow.save"
    earlier = _earlier_image(guest, path)

    failed(save(guest, path, format="xz", timeout=1), "did not finish within the timeout of 1 s", "cancelled")
    assert guest.status() == "running" and path.read_bytes() == earlier
    assert leftovers(workdir) == [] and stray_helpers() == []


def test_not_enough_space_is_refused_up_front(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="tight", qemu=qemu))
    with tmpfs(workdir / "small", 32) as small:
        failed(save(guest, small / "x.save"), "not enough free space")
    assert guest.status() == "running"


def test_disk_full_mid_stream(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="enospc", qemu=qemu, fill_mib=192))
    with tmpfs(workdir / "full", 800) as directory:  # the earlier image + the guest's RAM
        path = directory / "enospc.save"
        earlier = _earlier_image(guest, path)
        eater = SpaceEater(directory)
        eater.start()
        result = save(guest, path)
        eater.join(10)
        assert eater.filled.is_set(), result.get("msg")
        failed(result, "No space left on device")
        assert guest.status() == "running"
        assert path.read_bytes() == earlier and leftovers(directory) == []


def test_qemu_killed_mid_save(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="killed", qemu=qemu, fill_mib=64))
    path = workdir / "killed.save"
    earlier = _earlier_image(guest, path)
    pid = guest.pid

    def kill_qemu_once_streaming() -> None:
        wait_for_file(workdir, ".partial")
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_qemu_once_streaming)
    killer.start()
    message = failed(save(guest, path, format="gzip"))  # gzip: slow enough to kill QEMU mid-way
    killer.join()
    assert "QEMU" in message
    assert path.read_bytes() == earlier and leftovers(workdir) == [] and stray_helpers() == []


def test_concurrent_saves_queue_on_the_lock(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="twice", qemu=qemu, fill_mib=32))
    path = workdir / "twice.save"
    with background_module("save", {"name": "twice", "path": str(path), "format": "zstd"}) as first:
        wait_for_file(workdir, ".partial")
        second = ok(save(guest, path, format="zstd"))
        assert first.wait(60) == 0, first.stdout.read()
    assert not second["changed"], "the second save should find the first one's result"
    saved_tick = guest.last_tick()
    ok(restore(path))
    assert_continued(guest, saved_tick)


def test_module_killed_mid_save_is_finished_by_a_rerun(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="interrupted", qemu=qemu, fill_mib=64))
    path = workdir / "interrupted.save"
    with background_module("save", {"name": "interrupted", "path": str(path), "format": "gzip"}) as run:
        wait_for_file(workdir, ".partial")
        time.sleep(0.3)
        kill_module_process(run, "save")
        assert run.wait(60) != 0
    assert guest.status() in ("paused", "finish-migrate", "postmigrate"), "the guest must stay paused"
    assert not path.exists()

    result = ok(save(guest, path, format="gzip"))
    assert result["changed"] and result["image"]["was_running"] is True, \
        "the re-run must remember that the guest was running before the first attempt"
    assert leftovers(workdir) == [] and not guest.is_alive()
    saved_tick = guest.last_tick()
    assert ok(restore(path))["guest"]["state"] == "running"
    assert_continued(guest, saved_tick)


def test_compressor_killed_mid_save(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="no-gzip", qemu=qemu, fill_mib=64))
    path = workdir / "gz.save"
    earlier = _earlier_image(guest, path)
    killer = kill_helper_once_running("gzip", workdir)
    failed(save(guest, path, format="gzip"), "gzip was killed by signal 9")
    killer.join()
    assert guest.status() == "running"
    assert path.read_bytes() == earlier and leftovers(workdir) == [] and stray_helpers() == []


def test_target_directory_removed_mid_save(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="dir-gone", qemu=qemu, fill_mib=64))
    directory = workdir / "vanishing"
    directory.mkdir()

    def remove_directory() -> None:
        wait_for_file(directory, ".partial")
        time.sleep(0.3)
        shutil.rmtree(directory)

    remover = threading.Thread(target=remove_directory)
    remover.start()
    failed(save(guest, directory / "x.save", format="gzip"), "failed")
    remover.join()
    assert guest.status() == "running" and not directory.exists() and stray_helpers() == []


def test_target_directory_made_read_only_mid_save(qemu, guest_factory, workdir):
    """chattr +i: even root can no longer create, rename or remove entries in it."""
    guest = guest_factory(GuestSpec(name="dir-ro", qemu=qemu, fill_mib=64))
    directory = workdir / "frozen"
    directory.mkdir()
    path = directory / "x.save"
    earlier = _earlier_image(guest, path)

    def freeze() -> None:
        wait_for_file(directory, ".partial")
        time.sleep(0.3)
        subprocess.run(["chattr", "+i", str(directory)], check=True)

    freezer = threading.Thread(target=freeze)
    freezer.start()
    try:
        message = failed(save(guest, path, format="gzip"), "Operation not permitted")
        freezer.join()
        assert guest.status() == "running" and path.read_bytes() == earlier
        assert "could not be removed" in message, "the message must say a temporary file is left"
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)
    assert stray_helpers() == []
