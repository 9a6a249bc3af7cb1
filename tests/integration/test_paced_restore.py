"""Paced restores through host_drain and host_restore, on QEMU 10.0 and 7.2 (issue 14).

Three guests come back in the order of their priorities (recorded by the drain with
``host_drain_priorities``, one of them overridden at restore time with
``host_restore_priorities``), at least ``host_restore_start_delay`` apart, at most
``host_restore_concurrency`` (2) at a time. What is checked is what happened on the
host: when each restored QEMU process started (``/proc/<pid>/stat``), not what the
role says it did.

The guest restored first has a guest agent channel nobody answers on, so its restore
waits the agent's bounded 5 s after its QEMU starts (sync_time): the second guest
starting within that time shows two restores at once, the third starting only after
it shows no more than two.

An image older than ``host_restore_max_age`` (its manifest entry's ``saved_at`` moved
two hours back) is not restored, is reported as stale with its age, and the role does
not fail; the other guest comes back. A second run for it without a limit restores it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from harness.guest import Guest, GuestSpec
from harness.paths import PROJECT_ROOT, VENV_DIR
from harness.processes import qemu_processes
from integration.common import assert_continued

pytestmark = pytest.mark.integration

DELAY_S = 1.5
AGENT_WAIT_S = 5.0  # _guest_agent.ANSWER_TIMEOUT: how long a restore waits for a silent agent
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")

PLAYBOOK = """
- name: Run a role of the collection and keep its report
  hosts: localhost
  gather_facts: false
  roles:
    - role: savestate.qemu.{role}
  post_tasks:
    - name: Keep the report
      ansible.builtin.copy:
        content: "{{{{ {report} | to_json }}}}"
        dest: "{dest}"
        mode: "0600"
"""


def run(workdir: Path, role: str, variables: dict[str, Any]) -> tuple[subprocess.CompletedProcess, Any]:
    """ansible-playbook with the role; its report (host_drain_report / host_restore_report) when it succeeded."""
    report = workdir / f"{role}-report.json"
    report.unlink(missing_ok=True)
    playbook = workdir / f"{role}-paced.yml"
    playbook.write_text(PLAYBOOK.format(role=role, report=f"{role}_report", dest=report))
    extra = workdir / f"{role}-paced-vars.json"
    extra.write_text(json.dumps(variables))
    done = subprocess.run([str(VENV_DIR / "bin" / "ansible-playbook"), "-i", "localhost,", "-c", "local",
                           "-e", f"ansible_python_interpreter={VENV_DIR / 'bin' / 'python'}", "-e", f"@{extra}",
                           str(playbook)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, check=False,
                          env={"PATH": f"{VENV_DIR / 'bin'}:/usr/bin:/bin", "ANSIBLE_NOCOLOR": "1",
                               "ANSIBLE_FORCE_COLOR": "0", "HOME": str(Path.home())})
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    return done, json.loads(report.read_text()) if report.exists() else None


def started_at(workdir: Path, name: str) -> float:
    """When the QEMU process of guest ``name`` started, in seconds since boot (from /proc/<pid>/stat)."""
    found = [p for p in qemu_processes(str(workdir)) if any(f"guest={name}," in arg for arg in p.argv)]
    assert len(found) == 1, f"expected one QEMU process of {name}, found {found}"
    stat = Path(f"/proc/{found[0].pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19]) * TICK_S  # field 22, starttime, in clock ticks


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in rows}


def test_three_guests_come_back_in_priority_order_paced_and_two_at_a_time(
        qemu, guest_factory: Callable[..., Guest], workdir: Path) -> None:
    low = guest_factory(GuestSpec(name="ssq-pace-a", qemu=qemu))
    middle = guest_factory(GuestSpec(name="ssq-pace-b", qemu=qemu))
    first = guest_factory(GuestSpec(name="ssq-pace-c", qemu=qemu, agent_channel=True))
    guests = (low, middle, first)
    names = [guest.spec.name for guest in guests]
    images = workdir / "images"
    priorities = {"ssq-pace-a": 3, "ssq-pace-b": 1, "ssq-pace-c": 10}
    drain, _report = run(workdir, "host_drain", {"host_drain_dir": str(images), "host_drain_guests": names,
                                                 "host_drain_priorities": priorities})
    assert drain.returncode == 0, drain.stdout + drain.stderr
    ticks = {guest.spec.name: guest.last_tick() for guest in guests}
    written = {entry["name"]: entry for entry in json.loads((images / "savestate-manifest.json").read_text())["guests"]}
    assert {name: entry.get("priority") for name, entry in written.items()} == priorities
    assert all(entry["saved_at"] for entry in written.values())

    # At restore time b goes before a: c (10), b (5, overridden), a (3).
    restore, report = run(workdir, "host_restore", {
        "host_restore_dir": str(images), "host_restore_concurrency": 2, "host_restore_start_delay": DELAY_S,
        "host_restore_priorities": {"ssq-pace-b": 5}})
    assert restore.returncode == 0, restore.stdout + restore.stderr
    assert {row["name"]: row["result"] for row in report} == dict.fromkeys(names, "restored"), report
    for guest in guests:
        assert_continued(guest, ticks[guest.spec.name])

    c, b, a = (started_at(workdir, name) for name in ("ssq-pace-c", "ssq-pace-b", "ssq-pace-a"))
    timeline = f"QEMU started at c={c:.2f} b={b:.2f} a={a:.2f} s since boot"
    assert c < b < a, f"not in priority order: {timeline}"
    assert b - c >= DELAY_S - TICK_S and a - b >= DELAY_S - TICK_S, f"starts closer than {DELAY_S} s: {timeline}"
    # c's restore lasts at least AGENT_WAIT_S after its QEMU started: b started during it (two at once) ...
    assert b - c < AGENT_WAIT_S, f"b waited for c's restore to end (concurrency 1?): {timeline}"
    # ... and a only after it (a round of at most two; a is in the next one).
    assert a - c >= AGENT_WAIT_S, f"a started while c's restore ran (more than two at once): {timeline}"
    assert not list(images.glob("*.save"))


def test_an_image_older_than_max_age_is_held_back_and_the_others_come_back(
        qemu, guest_factory: Callable[..., Guest], workdir: Path) -> None:
    old = guest_factory(GuestSpec(name="ssq-stale-old", qemu=qemu))
    fresh = guest_factory(GuestSpec(name="ssq-stale-new", qemu=qemu))
    images = workdir / "images"
    drain, _report = run(workdir, "host_drain", {"host_drain_dir": str(images),
                                                 "host_drain_guests": ["ssq-stale-old", "ssq-stale-new"]})
    assert drain.returncode == 0, drain.stdout + drain.stderr
    ticks = {guest.spec.name: guest.last_tick() for guest in (old, fresh)}
    path = images / "savestate-manifest.json"
    manifest = json.loads(path.read_text())
    two_hours_ago = (datetime.now(timezone.utc) - timedelta(hours=2)).isoformat(timespec="seconds")
    for entry in manifest["guests"]:
        if entry["name"] == "ssq-stale-old":
            entry["saved_at"] = two_hours_ago  # as if the host had been down for two hours since this save
    path.write_text(json.dumps(manifest, indent=2))
    image = images / "ssq-stale-old.save"
    kept = (image.stat().st_size, image.stat().st_mtime_ns)

    restore, report = run(workdir, "host_restore", {"host_restore_dir": str(images), "host_restore_max_age": "1h"})
    output = restore.stdout + restore.stderr
    assert restore.returncode == 0, output
    rows = by_name(report)
    assert rows["ssq-stale-new"]["result"] == "restored", report
    stale = rows["ssq-stale-old"]
    assert stale["result"] == "stale" and stale["after"] == "not running" and stale["max_age_s"] == 3600, stale
    assert 7200 <= stale["age_s"] < 7200 + 300, stale
    assert "older than host_restore_max_age (60 min): not restored, the image is kept" in stale["msg"], stale
    assert "1 restored, 1 too old, held back" in output and "ssq-stale-old: stale: saved 2.0 h ago" in output, output
    assert_continued(fresh, ticks["ssq-stale-new"])
    assert not old.is_alive() and not [p for p in qemu_processes(str(workdir))
                                       if any("guest=ssq-stale-old," in arg for arg in p.argv)]
    assert (image.stat().st_size, image.stat().st_mtime_ns) == kept
    assert json.loads(path.read_text()) == manifest  # the restore never writes the manifest

    anyway, report = run(workdir, "host_restore", {"host_restore_dir": str(images), "host_restore_max_age": None,
                                                   "host_restore_guests": ["ssq-stale-old"]})
    assert anyway.returncode == 0, anyway.stdout + anyway.stderr
    assert by_name(report)["ssq-stale-old"]["result"] == "restored", report
    assert_continued(old, ticks["ssq-stale-old"])
