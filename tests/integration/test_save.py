"""The save module on real guests, QEMU 10.0 and 7.2: formats, states, paths, failures.

Every failure case ends with the guest in its prior state, no temporary file left
and any earlier image intact. Restores here only prove that a save is good; the
restore module's own cases are in test_restore.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import threading
import time

import pytest

from harness.guest import GuestSpec
from harness.paths import VENV_DIR
from harness.processes import all_processes
from integration.common import (
    SpaceEater,
    assert_continued,
    assert_frozen,
    background_module,
    failed,
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

FORMATS = ("raw", "gzip", "bzip2", "xz", "lzop", "zstd", "sparse")
ODD_DIRECTORY = "dir with 'single' and \"double\" quotes,\nnew line, naïve ü"
ODD_FILE = "it's \"saved\"\n ü.save"


def _header(path) -> bytes:
    with open(path, "rb") as image:
        return image.read(92)


@pytest.mark.parametrize("image_format", FORMATS)
def test_every_format_saves_and_comes_back(qemu, image_format, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name=f"fmt-{image_format}", qemu=qemu, fill_mib=16))
    guest.wait_tick_above(2)
    path = workdir / f"guest.{image_format}"

    result = save(guest, path, format=image_format)
    if image_format == "sparse" and qemu.name == "7.2":
        failed(result, "sparse is not supported by this QEMU binary", "mapped-ram")
        assert guest.status() == "running" and not path.exists()
        return
    ok(result)
    assert result["changed"] and result["guest"]["state"] == "stopped"
    assert not guest.is_alive()
    image = result["image"]
    assert (image["format"], image["complete"], image["was_running"]) == (image_format, True, True)
    assert image["name"] == guest.spec.name and image["uuid"] == guest.spec.uuid
    assert image["machine"].startswith("pc-i440fx-") and image["machine"] != "pc"
    assert result["stats"]["bytes"] == path.stat().st_size > 1024 * 1024
    assert _header(path)[:16] == b"LibvirtQemudSave"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert leftovers(workdir) == [] and stray_helpers() == []
    saved_tick = guest.last_tick()

    ok(restore(path))
    assert_continued(guest, saved_tick)


def test_check_mode_idempotency_and_diff(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="idem", qemu=qemu))
    path = workdir / "idem.save"

    predicted = ok(save(guest, path, check=True, diff=True))
    assert predicted["changed"] and guest.status() == "running" and not path.exists()
    assert predicted["diff"]["before"]["guest"]["state"] == "running"
    assert predicted["diff"]["after"]["guest"]["state"] == "stopped"

    first = ok(save(guest, path, diff=True))
    assert first["changed"] and not guest.is_alive()
    assert first["diff"]["before"]["image"] == {"exists": False}
    mtime = path.stat().st_mtime_ns

    again_check = ok(save(guest, path, check=True))
    again = ok(save(guest, path, diff=True))
    assert not again_check["changed"] and not again["changed"]
    assert again["image"]["name"] == "idem"
    assert path.stat().st_mtime_ns == mtime


def test_not_active_and_no_image_fails_clearly(workdir):
    message = failed(save(None, workdir / "none.save", name="no-such-guest"), "no active QEMU guest")
    assert "no-such-guest" in message


def test_after_save_running_keeps_it_running(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="keep-running", qemu=qemu, disk_mib=4))
    path = workdir / "running.save"

    result = ok(save(guest, path, after_save="running"))
    assert result["guest"]["state"] == "running" and result["image"]["complete"]
    assert guest.status() == "running"
    guest.wait_tick_above(guest.last_tick() + 2)
    # Running on: a second save is a new save (documented as not idempotent).
    assert ok(save(guest, path, after_save="running"))["changed"]
    assert guest.qmp("query-migrate-parameters")["max-bandwidth"] < 2 ** 40, \
        "the save left QEMU's bandwidth limit lifted"


def test_after_save_paused_then_stop(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="keep-paused", qemu=qemu))
    path = workdir / "paused.save"

    result = ok(save(guest, path, after_save="paused"))
    assert result["changed"] and result["guest"]["state"] == "paused"
    assert guest.status() == "postmigrate"
    assert_frozen(guest)
    assert not ok(save(guest, path, after_save="paused"))["changed"]

    ended = ok(save(guest, path))
    assert ended["changed"] and not guest.is_alive()
    assert not ok(save(guest, path))["changed"]


def test_paused_guest_and_restore_state_override(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="overrides", qemu=qemu))
    guest.qmp("stop")
    paused_image, running_image = workdir / "as-paused.save", workdir / "to-run.save"

    result = ok(save(guest, paused_image, after_save="running"))
    assert result["image"]["was_running"] is False, "a paused guest is saved as paused"
    assert guest.status() == "running", "after_save=running resumes even a paused guest"
    result = ok(save(guest, running_image, restore_state="paused"))
    assert result["image"]["was_running"] is False
    saved_tick = guest.last_tick()

    restored = ok(restore(running_image))
    assert restored["guest"]["state"] == "paused" and guest.status() == "paused"
    assert_frozen(guest)
    resumed = ok(restore(running_image, state="running"))
    assert resumed["changed"] and guest.status() == "running"
    assert_continued(guest, saved_tick)


@pytest.mark.parametrize("monitor", ["unix", "tcp"])
def test_odd_paths_and_tcp_monitors(qemu, monitor, guest_factory, workdir):
    """Spaces, quotes, a newline, a comma and non-ASCII; over TCP the exec: route quotes them."""
    guest = guest_factory(GuestSpec(name="odd", qemu=qemu, qmp=monitor))
    directory = workdir / ODD_DIRECTORY
    directory.mkdir()
    for image_format in ("raw", "zstd"):
        path = directory / f"{image_format} {ODD_FILE}"
        result = ok(save(guest, path, format=image_format))
        assert result["image"]["path"] == str(path) and result["guest"]["qmp"] == guest.qmp_address
        saved_tick = guest.last_tick()
        ok(restore(path))
        assert_continued(guest, saved_tick)
    assert leftovers(directory) == []


def test_identifiers_must_agree(qemu, guest_factory, workdir):
    first = guest_factory(GuestSpec(name="first", qemu=qemu))
    second = guest_factory(GuestSpec(name="second", qemu=qemu))
    failed(save(None, workdir / "x.save", name="first", socket=second.qmp_address), "do not agree")
    failed(save(None, workdir / "x.save", name="first", uuid=second.spec.uuid), "no active QEMU guest")
    assert first.status() == second.status() == "running"


def test_image_of_another_guest_is_not_overwritten(qemu, guest_factory, workdir):
    first = guest_factory(GuestSpec(name="owner", qemu=qemu))
    second = guest_factory(GuestSpec(name="intruder", qemu=qemu))
    path = workdir / "shared.save"
    ok(save(first, path))
    original = path.read_bytes()

    failed(save(second, path), "another guest", "force")
    assert second.status() == "running" and path.read_bytes() == original
    not_an_image = workdir / "notes.txt"
    not_an_image.write_text("precious")
    failed(save(second, not_an_image), "not a save image")
    assert not_an_image.read_text() == "precious"

    ok(save(second, path, force=True))
    assert ok(restore(path))["guest"]["name"] == "intruder"


def test_libvirt_guest_is_refused(libvirt_host, workdir):
    libvirt_host.define_guest("lv-refused", "6b1f39a8-0f0e-4c5e-9a55-1d2d8a1f0c11")
    libvirt_host.start("lv-refused")
    message = failed(save(None, workdir / "lv.save", name="lv-refused"), "managed by libvirt")
    assert "virsh save lv-refused" in message
    assert libvirt_host.domain_state("lv-refused") == "running"


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

    failed(save(guest, path, format="xz", timeout=1), "did not finish within 1 s", "cancelled")
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
        (directory / "filler").unlink(missing_ok=True)
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


def _kill_helper_once_streaming(workdir, program: str) -> threading.Thread:
    def kill() -> None:
        wait_for_file(workdir, ".partial")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            victims = [p.pid for p in all_processes() if p.comm == program and p.state != "Z"]
            if victims:
                time.sleep(0.3)
                for pid in victims:
                    os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=kill)
    thread.start()
    return thread


def test_compressor_killed_mid_save(qemu, guest_factory, workdir):
    guest = guest_factory(GuestSpec(name="no-gzip", qemu=qemu, fill_mib=64))
    path = workdir / "gz.save"
    earlier = _earlier_image(guest, path)
    killer = _kill_helper_once_streaming(workdir, "gzip")
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
