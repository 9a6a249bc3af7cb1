"""host_drain and host_restore when a guest cannot be saved, through ansible-playbook.

The molecule scenarios cover the roles' normal runs; this covers the failure path the
issue asks for: a guest whose QMP monitor another client holds cannot be saved, so it
keeps running and is reported, the other guest still drains, and the role fails at
the end naming it. A second run then drains it too, and host_restore brings both back
where they stopped. Check mode saves nothing and writes nothing.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.guest import Guest, GuestSpec
from harness.paths import PROJECT_ROOT, VENV_DIR
from integration.common import assert_continued

pytestmark = pytest.mark.integration

PLAYBOOK = """
- name: Run a role of the collection
  hosts: localhost
  gather_facts: false
  roles:
    - role: savestate.qemu.{role}
"""


def run_role(workdir: Path, role: str, variables: dict, check: bool = False) -> subprocess.CompletedProcess:
    playbook = workdir / f"{role}.yml"
    playbook.write_text(PLAYBOOK.format(role=role))
    extra = workdir / f"{role}-vars.json"
    extra.write_text(json.dumps(variables))
    return subprocess.run([str(VENV_DIR / "bin" / "ansible-playbook"), "-i", "localhost,", "-c", "local",
                           "-e", f"ansible_python_interpreter={VENV_DIR / 'bin' / 'python'}",
                           "-e", f"@{extra}", str(playbook), *(["--check"] if check else [])],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, check=False,
                          env={"PATH": f"{VENV_DIR / 'bin'}:/usr/bin:/bin", "ANSIBLE_NOCOLOR": "1",
                               "ANSIBLE_FORCE_COLOR": "0", "HOME": str(Path.home())})


def hold_monitor(guest: Guest) -> socket.socket:
    """Connect to the guest's QMP monitor and keep it: QEMU serves no other client meanwhile."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(guest.qmp_socket))
    client.settimeout(10)
    assert b"QMP" in client.recv(4096)
    return client


def test_a_guest_that_cannot_be_saved_keeps_running_and_the_others_drain(
        guest_factory: Callable[..., Guest], workdir: Path) -> None:
    running = guest_factory(GuestSpec(name="ssq-role-a"))
    busy = guest_factory(GuestSpec(name="ssq-role-b"))
    images = workdir / "images"
    drain = {"host_drain_dir": str(images), "host_drain_guests": ["ssq-role-a", "ssq-role-b"],
             "host_drain_timeout": 20}

    dry = run_role(workdir, "host_drain", drain, check=True)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert re.search(r"changed=[1-9]", dry.stdout)  # the directory and saves it would make
    assert running.is_alive() and busy.is_alive() and not list(images.glob("*"))

    holder = hold_monitor(busy)
    try:
        first = run_role(workdir, "host_drain", drain)
    finally:
        holder.close()
    output = first.stdout + first.stderr
    assert first.returncode != 0, output
    assert "1 guest(s) could not be drained: ssq-role-b:" in output, output
    assert not running.is_alive()
    saved_tick = running.last_tick()
    assert busy.is_alive() and busy.status() == "running"
    busy.wait_tick_above(busy.last_tick() + 2)
    manifest = json.loads((images / "savestate-manifest.json").read_text())
    assert [(g["name"], g["state"]) for g in manifest["guests"]] == [("ssq-role-a", "running")]

    dry = run_role(workdir, "host_drain", drain, check=True)  # the directory exists now: the save's own checks run
    assert dry.returncode == 0 and re.search(r"changed=[1-9]", dry.stdout), dry.stdout + dry.stderr
    assert busy.is_alive()

    second = run_role(workdir, "host_drain", drain)
    assert second.returncode == 0, second.stdout + second.stderr
    manifest = json.loads((images / "savestate-manifest.json").read_text())
    assert [g["name"] for g in manifest["guests"]] == ["ssq-role-a", "ssq-role-b"]
    assert not busy.is_alive()
    busy_tick = busy.last_tick()

    restore = run_role(workdir, "host_restore", {"host_restore_dir": str(images), "host_restore_remove_image": True})
    assert restore.returncode == 0, restore.stdout + restore.stderr
    assert_continued(running, saved_tick)
    assert_continued(busy, busy_tick)
    assert not list(images.glob("*.save"))
