"""The save module on real guests, QEMU 10.0 and 7.2: formats, states, paths, refusals.

Restores here only prove that a save is good; the restore module's own cases are
in test_restore.py, the save's failure cases in test_save_failures.py.
"""

from __future__ import annotations

import stat

import pytest

from harness.guest import GuestSpec
from integration.common import (
    assert_continued,
    assert_frozen,
    failed,
    leftovers,
    ok,
    restore,
    save,
    stray_helpers,
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
    # What the load needed is switched off again: the operator's next migration is QEMU's default one.
    enabled = {entry["capability"] for entry in guest.qmp("query-migrate-capabilities") if entry["state"]}
    assert not enabled & {"mapped-ram", "multifd"}, enabled


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
