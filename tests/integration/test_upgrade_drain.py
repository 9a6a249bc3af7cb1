"""A drain that knows the guests can come back (issue 14), through ansible-playbook.

The maintenance window is: drain, upgrade QEMU, reboot, restore. QEMU loads a saved guest
only on the machine type it was saved with, so a QEMU that lacks it strands the guest.
The upgrade is simulated the other way round, which the test machine can do: QEMU 7.2 is
the emulator "after the upgrade", and a guest running on QEMU 10.0's ``pc`` (resolved to
pc-i440fx-10.0) is one it cannot load, while a guest on 7.2's ``pc`` (pc-i440fx-7.2) it can.

- host_drain with host_drain_restore_emulator=7.2 leaves the 10.0 guest running (never
  paused) and reports it, naming its machine type and the emulator; the 7.2 guest drains;
- host_restore with host_restore_emulator=7.2 starts no QEMU for the 10.0 image, reports
  it and keeps its image, and brings the 7.2 guest back where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.guest import Guest, GuestSpec
from harness.processes import qemu_processes
from harness.qemu import QEMU72
from integration.common import assert_continued
from integration.test_roles import run_role

pytestmark = pytest.mark.integration

NEW, OLD = "ssq-upg-new", "ssq-upg-old"
AFTER = str(QEMU72.binary)


def _output(run: object) -> str:
    return run.stdout + run.stderr  # type: ignore[attr-defined]


def test_a_drain_for_an_older_qemu_leaves_the_guest_it_would_strand_running(
        guest_factory: Callable[..., Guest], workdir: Path) -> None:
    if not QEMU72.binary.exists():
        pytest.skip("QEMU 7.2 is not unpacked (make setup)")
    new = guest_factory(GuestSpec(name=NEW))
    old = guest_factory(GuestSpec(name=OLD, qemu=QEMU72))
    images = workdir / "images"
    drain = {"host_drain_dir": str(images), "host_drain_guests": [NEW, OLD], "host_drain_restore_emulator": AFTER}

    dry = run_role(workdir, "host_drain", drain, check=True)
    assert dry.returncode == 0, _output(dry)
    assert f"{NEW}: stranded: its machine type pc-i440fx-10.0 is not one QEMU 7.2" in dry.stdout, dry.stdout

    refused = run_role(workdir, "host_drain", {**drain, "host_drain_stranded": "fail"})
    assert refused.returncode != 0 and "No guest was saved (host_drain_stranded=fail)" in refused.stdout
    assert new.is_alive() and old.is_alive() and not list(images.glob("*.save"))

    before = new.last_tick()
    run = run_role(workdir, "host_drain", drain)
    output = _output(run)
    assert run.returncode == 0, output
    assert "1 saved, 1 left running (the restoring QEMU cannot load it)" in output, output
    assert "pc-i440fx-10.0 is not one QEMU 7.2" in output and AFTER in output, output
    assert "Traceback" not in output
    assert_continued(new, before)
    assert new.qmp("query-status")["status"] == "running"
    assert not old.is_alive()
    manifest = json.loads((images / "savestate-manifest.json").read_text())
    assert [entry["name"] for entry in manifest["guests"]] == [OLD]
    assert manifest["guests"][0]["machine"] == "pc-i440fx-7.2"

    # Drained for its own QEMU, the 10.0 guest joins the manifest; a restore on 7.2 must refuse it.
    ticks = {OLD: old.last_tick(), NEW: new.last_tick()}
    plain = run_role(workdir, "host_drain", {"host_drain_dir": str(images), "host_drain_guests": [NEW]})
    assert plain.returncode == 0, _output(plain)
    assert not new.is_alive()

    restore = run_role(workdir, "host_restore", {"host_restore_dir": str(images), "host_restore_emulator": AFTER})
    output = _output(restore)
    assert restore.returncode != 0, output
    assert f"{NEW}: its machine type pc-i440fx-10.0 is not one QEMU 7.2" in output, output
    assert "not restored" in output and "Traceback" not in output
    assert_continued(old, ticks[OLD])
    assert not [p for p in qemu_processes(str(workdir)) if NEW in " ".join(p.argv)], "a QEMU was started for it"
    assert (images / f"{NEW}.save").exists()

    back = run_role(workdir, "host_restore", {"host_restore_dir": str(images), "host_restore_guests": [NEW]})
    assert back.returncode == 0, _output(back)
    assert_continued(new, ticks[NEW])
