"""The drain manifest between host_drain and host_restore, through ansible-playbook.

An operator drains with one version of the collection and restores with another:

- a manifest of a format version this collection does not know (a newer one wrote
  it) is refused with a message saying what to do, before anything changes: a
  drain saves no guest; a restore starts no QEMU, the images and the manifest stay
  as they are;
- a manifest whose entry points outside its directory is refused the same way;
- a manifest without a version (written before the format was versioned) is read
  as version 1, says so, and its guests come back where they stopped (their images
  checked against the checksums the drain recorded).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.guest import Guest, GuestSpec
from harness.processes import qemu_processes
from integration.common import assert_continued
from integration.test_roles import run_role

pytestmark = pytest.mark.integration

NAMES = ("ssq-manifest-a", "ssq-manifest-b")


def refused(workdir: Path, images: Path, manifest: dict, *fragments: str) -> None:
    """host_restore fails on this manifest naming the problem, and changes nothing."""
    path = images / "savestate-manifest.json"
    path.write_text(json.dumps(manifest))
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in images.iterdir()}
    run = run_role(workdir, "host_restore", {"host_restore_dir": str(images)})
    output = run.stdout + run.stderr
    assert run.returncode != 0, output
    for fragment in fragments:
        assert fragment in output, output
    assert "Traceback" not in output, output
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in images.iterdir()} == before
    assert json.loads(path.read_text()) == manifest
    assert not qemu_processes(str(workdir)), "a refused manifest started QEMU"


def test_an_unknown_version_is_refused_and_an_unversioned_manifest_restores(
        guest_factory: Callable[..., Guest], workdir: Path) -> None:
    guests = [guest_factory(GuestSpec(name=name)) for name in NAMES]
    images = workdir / "images"
    images.mkdir(mode=0o700)
    newer = images / "savestate-manifest.json"
    newer.write_text(json.dumps({"version": 2, "guests": [], "hosts": {}}))
    refused_drain = run_role(workdir, "host_drain", {"host_drain_dir": str(images), "host_drain_guests": list(NAMES)})
    assert refused_drain.returncode != 0 and "is of format version 2" in refused_drain.stdout, refused_drain.stdout
    assert all(guest.is_alive() for guest in guests) and json.loads(newer.read_text())["version"] == 2
    newer.unlink()

    drain = run_role(workdir, "host_drain", {"host_drain_dir": str(images), "host_drain_guests": list(NAMES),
                                             "host_drain_checksum": True})
    assert drain.returncode == 0, drain.stdout + drain.stderr
    ticks = {guest.spec.name: guest.last_tick() for guest in guests}
    written = json.loads((images / "savestate-manifest.json").read_text())
    assert written["version"] == 1 and [g["name"] for g in written["guests"]] == list(NAMES)
    assert all(g["fingerprint"]["checksum"].startswith("sha256:") for g in written["guests"])

    refused(workdir, images, {**written, "version": 2},
            "is of format version 2, newer than this savestate.qemu reads (versions 1 to 1)",
            "ansible-galaxy collection install --upgrade savestate.qemu", "Nothing was changed")
    hostile = {**written, "guests": [{**written["guests"][0], "path": "/etc/shadow"}, written["guests"][1]]}
    refused(workdir, images, hostile, "'path' must name a file directly inside the manifest's directory")
    assert not any(guest.is_alive() for guest in guests)

    unversioned = {"guests": written["guests"]}  # as written before the format was versioned
    (images / "savestate-manifest.json").write_text(json.dumps(unversioned, indent=2))
    restore = run_role(workdir, "host_restore", {"host_restore_dir": str(images)})
    output = restore.stdout + restore.stderr
    assert restore.returncode == 0, output
    assert "read as version 1" in output, output
    for guest in guests:
        assert_continued(guest, ticks[guest.spec.name])
    assert not list(images.glob("*.save"))
    assert json.loads((images / "savestate-manifest.json").read_text()) == unversioned  # the restore never writes it
