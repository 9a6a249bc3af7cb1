"""A guest discarded on purpose between host_drain and host_restore, QEMU 10.0 and 7.2 (issue 14).

Through ansible-playbook, as an operator runs it:

- savestate.qemu.discard refuses, as root, a symbolic link and a file that is not a
  save image where the guest's image would be: the files and the manifest stay as they are;
- it removes a drained guest's image and manifest entry and records the discard;
  a second run changes nothing;
- host_restore_discard in check mode reports what it would discard and removes nothing;
- host_restore then brings the other guests back, never starts the discarded one,
  reports it as "discarded" (also when asked for by name: not "unknown"), and its
  rows and headline say whether each restored guest's clock was synced.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.guest import Guest, GuestSpec
from harness.paths import PROJECT_ROOT, VENV_DIR
from harness.processes import qemu_processes
from integration.common import assert_continued
from integration.test_clock_sync import agent_answers
from integration.test_roles import run_role

pytestmark = pytest.mark.integration

DISCARD_PLAYBOOK = """
- name: Discard a drained guest
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Discard it
      savestate.qemu.discard:
        manifest: "{{ manifest }}"
        name: "{{ guest }}"
        reason: "{{ reason | default(omit) }}"
      register: discarded
      ignore_errors: true
    - name: Keep the result for the test
      ansible.builtin.copy:
        content: "{{ discarded | to_json }}"
        dest: "{{ result_file }}"
        mode: "0600"
"""


def run_discard(workdir: Path, manifest: Path, guest: str, **variables: str) -> tuple[subprocess.CompletedProcess, dict]:
    """ansible-playbook with one discard task (its failure ignored); the module's result."""
    playbook = workdir / "discard.yml"
    playbook.write_text(DISCARD_PLAYBOOK)
    extra = workdir / "discard-vars.json"
    result_file = workdir / "discard-result.json"
    result_file.unlink(missing_ok=True)
    extra.write_text(json.dumps({"manifest": str(manifest), "guest": guest, "result_file": str(result_file),
                                 **variables}))
    run = subprocess.run([str(VENV_DIR / "bin" / "ansible-playbook"), "-i", "localhost,", "-c", "local",
                          "-e", f"ansible_python_interpreter={VENV_DIR / 'bin' / 'python'}", "-e", f"@{extra}",
                          str(playbook)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, check=False,
                         env={"PATH": f"{VENV_DIR / 'bin'}:/usr/bin:/bin", "ANSIBLE_NOCOLOR": "1",
                              "ANSIBLE_FORCE_COLOR": "0", "HOME": str(Path.home())})
    assert run.returncode == 0, run.stdout + run.stderr
    return run, json.loads(result_file.read_text())


def snapshot(directory: Path) -> dict[str, tuple]:
    """Every entry of ``directory`` as lstat sees it, with a regular file's bytes."""
    return {p.name: (p.lstat().st_ino, p.lstat().st_mode, p.lstat().st_size,
                     p.read_bytes() if p.is_file() and not p.is_symlink() else None) for p in directory.iterdir()}


def refused(workdir: Path, images: Path, name: str, fragment: str) -> None:
    before = snapshot(images)
    run, result = run_discard(workdir, images / "savestate-manifest.json", name)
    assert result["failed"] and fragment in result["msg"] and "nothing was changed" in result["msg"], result
    assert "Traceback" not in run.stdout + run.stderr
    assert snapshot(images) == before


def test_a_discarded_guest_is_not_restored_and_is_reported(qemu, guest_factory: Callable[..., Guest],
                                                           workdir: Path) -> None:
    synced = guest_factory(GuestSpec(name="ssq-discard-agent", qemu=qemu, agent=True))
    plain = guest_factory(GuestSpec(name="ssq-discard-plain", qemu=qemu))
    dropped = guest_factory(GuestSpec(name="ssq-discard-drop", qemu=qemu))
    agent_answers(synced.agent_socket)
    images = workdir / "images"
    names = ["ssq-discard-agent", "ssq-discard-plain", "ssq-discard-drop"]
    drain = run_role(workdir, "host_drain", {"host_drain_dir": str(images), "host_drain_guests": names})
    assert drain.returncode == 0, drain.stdout + drain.stderr
    ticks = {guest.spec.name: guest.last_tick() for guest in (synced, plain)}
    manifest = images / "savestate-manifest.json"

    # Where an image would be, root deletes neither a symbolic link (nor its target) nor a file that is no image.
    target = workdir / "precious"
    target.write_bytes((images / "ssq-discard-drop.save").read_bytes()[:4096])
    (images / "ssq-discard-link.save").symlink_to(target)
    refused(workdir, images, "ssq-discard-link", "symbolic link")
    (images / "ssq-discard-text.save").write_text("not a save image\n")
    refused(workdir, images, "ssq-discard-text", "not a save image")
    assert target.read_bytes() == (images / "ssq-discard-drop.save").read_bytes()[:4096]

    run, result = run_discard(workdir, manifest, "ssq-discard-drop", reason="rebuilt fresh")
    assert not result.get("failed") and result["changed"], result
    assert not (images / "ssq-discard-drop.save").exists()
    written = json.loads(manifest.read_text())
    assert [g["name"] for g in written["guests"]] == ["ssq-discard-agent", "ssq-discard-plain"]
    assert [(r["name"], r["uuid"], r["reason"]) for r in written["discarded"]] == \
        [("ssq-discard-drop", dropped.spec.uuid, "rebuilt fresh")]
    rerun, result = run_discard(workdir, manifest, "ssq-discard-drop")
    assert not result.get("failed") and result["changed"] is False, rerun.stdout
    assert json.loads(manifest.read_text()) == written

    # host_restore_discard in check mode: reported as discarded, nothing removed.
    plain_image = (images / "ssq-discard-plain.save").read_bytes()
    dry = run_role(workdir, "host_restore", {"host_restore_dir": str(images),
                                             "host_restore_discard": ["ssq-discard-plain"]}, check=True)
    output = dry.stdout + dry.stderr
    assert dry.returncode == 0 and "1 would restore, 2 discarded" in output, output
    assert (images / "ssq-discard-plain.save").read_bytes() == plain_image
    assert json.loads(manifest.read_text()) == written

    restore = run_role(workdir, "host_restore", {"host_restore_dir": str(images)})
    output = restore.stdout + restore.stderr
    assert restore.returncode == 0, output
    for guest in (synced, plain):
        assert_continued(guest, ticks[guest.spec.name])
    assert not [p for p in qemu_processes(str(workdir)) if any("ssq-discard-drop" in arg for arg in p.argv)]
    assert "2 restored, 1 discarded" in output and "guest clocks: 1 synced, 1 no agent" in output, output
    assert "ssq-discard-drop: discarded: discarded on " in output and "rebuilt fresh; not restored" in output, output

    asked = run_role(workdir, "host_restore", {"host_restore_dir": str(images),
                                               "host_restore_guests": ["ssq-discard-drop"]})
    output = asked.stdout + asked.stderr
    assert asked.returncode == 0 and "1 discarded" in output and "lists no guest" not in output, output
    assert not [p for p in qemu_processes(str(workdir)) if any("ssq-discard-drop" in arg for arg in p.argv)]
