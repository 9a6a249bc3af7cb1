"""A fleet drained and restored in one play, over SSH with become, on the multi-host test bed.

Three hypervisors (hv1..hv3, each its own PID/mount/network namespace and sshd) run the
guide's docs/examples/drain.yml and restore.yml with ``-f 10``, as the guide tells an
operator to, against the collection installed from its tarball:

- the hosts drain at the same time: the save intervals of the three hosts (from each
  image's completion time and the save's duration) overlap;
- hv1 has three guests: one running, one paused, one without a QMP monitor that cannot be
  saved. Its summary says so guest by guest, and the failure message names the two
  other guests as saved (never "the other guests" when none were);
- check mode first: every guest would be saved, none is, the summary says "would";
- after the restore the running guests tick on from where they stopped, the paused one
  is paused, the unsaveable one never stopped, and the images are gone (they hold RAM).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest

from harness.paths import PROJECT_ROOT
from harness.systemd_host import unavailable_reason
from harness.testbed import Fleet, PlaybookRun, TestbedGuest

pytestmark = pytest.mark.integration

REASON = unavailable_reason()
if REASON:
    pytest.skip(f"no test bed: {REASON}", allow_module_level=True)

DRAIN = PROJECT_ROOT / "docs" / "examples" / "drain.yml"
RESTORE = PROJECT_ROOT / "docs" / "examples" / "restore.yml"
DRAIN_DIR = "/var/lib/savestate/fleet-test"
# Guests per host; hv1 also has a paused one and one without a monitor (cannot be saved).
GUESTS = {"hv1": ["fl-a1", "fl-a2", "fl-a3"], "hv2": ["fl-b1", "fl-b2"], "hv3": ["fl-c1", "fl-c2"]}
PAUSED = {"fl-a2"}
NO_QMP = {"fl-a3"}
# Random data in RAM, saved through gzip (which cannot shrink it): each save lasts a few seconds,
# long enough that saves running at the same time on different hosts visibly overlap.
FILL_MIB = 64
MEMORY_MIB = 192


@pytest.fixture
def guests(testbed_guest: Callable[..., TestbedGuest]) -> dict[str, TestbedGuest]:
    started = {}
    for host, names in GUESTS.items():
        for name in names:
            started[name] = testbed_guest(host, name, memory_mib=MEMORY_MIB, fill_mib=FILL_MIB, qmp=name not in NO_QMP)
    for name in PAUSED:
        started[name].pause()
    return started


def extra_vars() -> dict[str, Any]:
    """Each host drains only its own test guests (per-host lists through one template)."""
    return {"fleet_test_guests": GUESTS, "host_drain_guests": "{{ fleet_test_guests[inventory_hostname] }}",
            "host_drain_dir": DRAIN_DIR, "host_restore_dir": DRAIN_DIR, "host_drain_timeout": 240,
            "host_restore_timeout": 240, "host_drain_format": "gzip"}


def facts(run: PlaybookRun, host: str, name: str) -> Any:
    """The last value the run set for a fact on a host (from the results of set_fact)."""
    values = [r["ansible_facts"][name] for r in run.host_results(host) if name in r.get("ansible_facts", {})]
    assert values, f"{host} set no {name}:\n{run.stdout[-4000:]}"
    return values[-1]


def summary(run: PlaybookRun, host: str) -> list[str]:
    lines = [r["msg"] for r in run.host_results(host) if isinstance(r.get("msg"), list) and r["msg"]
             and str(r["msg"][0]).startswith(f"{host}: ")]
    assert lines, f"{host} printed no summary:\n{run.stdout[-4000:]}"
    return lines[-1]


def job_records(run: PlaybookRun, host: str) -> set[str]:
    """The record files of the async jobs the run started on ``host`` (saves or restores)."""
    items = [item for result in run.host_results(host) for item in result.get("results") or [result]]
    return {item["results_file"] for item in items
            if isinstance(item, dict) and item.get("ansible_job_id") and item.get("results_file")}


def assert_job_records_removed(fleet: Fleet, run: PlaybookRun) -> None:
    """The roles remove each round's job records (they hold the module results) once it is over."""
    for host in GUESTS:
        records = job_records(run, host)
        assert records, f"{host}: no async job was started"
        left = sorted(path for path in records if fleet[host].path(path).exists())
        assert not left, f"{host}: job records left behind: {left}"


def rows(report: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["guest"]: row for row in report}


def test_a_fleet_drains_in_parallel_and_comes_back(testbed: Fleet,
                                                   guests: dict[str, TestbedGuest]) -> None:
    fleet = testbed
    # Check mode: says what would be saved, saves nothing.
    dry = fleet.run_playbook(DRAIN, extra_vars(), forks=10, check=True, timeout=600)
    for host, names in GUESTS.items():
        lines = summary(dry, host)
        assert "(check mode: nothing was changed)" in lines[0], lines
        assert f"{len(names)} would save" in lines[0], lines
        assert all(" were saved" not in line for line in lines), lines
        assert not list(fleet[host].path(DRAIN_DIR).glob("*.save"))
    for guest in guests.values():
        assert guest.pids(), f"{guest.name} stopped in check mode"

    ticks = {name: guest.last_tick() for name, guest in guests.items()}
    drain = fleet.run_playbook(DRAIN, extra_vars(), forks=10, timeout=900)
    assert drain.returncode != 0, drain.stdout[-4000:]  # hv1's guest without a monitor

    # hv1: two saved, one failed; the message names the saved ones.
    report = facts(drain, "hv1", "host_drain_report")
    by_guest = rows(report["guests"])
    assert (by_guest["fl-a1"]["result"], by_guest["fl-a1"]["before"], by_guest["fl-a1"]["after"]) == \
        ("saved", "running", "stopped")
    assert (by_guest["fl-a2"]["result"], by_guest["fl-a2"]["before"], by_guest["fl-a2"]["after"]) == \
        ("saved", "paused", "stopped")
    assert by_guest["fl-a3"]["result"] == "failed" and by_guest["fl-a3"]["after"] != "gone"
    assert by_guest["fl-a1"]["size"] > FILL_MIB * 1048576 and by_guest["fl-a1"]["seconds"] > 0
    assert "1 guest(s) could not be drained: fl-a3: " in drain.stdout
    assert "2 other guest(s) were saved and listed in" in drain.stdout and "fl-a1, fl-a2" in drain.stdout
    lines = summary(drain, "hv1")
    assert lines[0].startswith("hv1: drain of 3 guest(s): 2 saved, 1 failed;"), lines
    assert guests["fl-a3"].pids() and guests["fl-a3"].wait_tick_above(ticks["fl-a3"])

    # hv2 and hv3 drained completely, at the same time as hv1.
    intervals = {}
    for host in GUESTS:
        saved = [row for row in facts(drain, host, "host_drain_report")["guests"] if row["result"] == "saved"]
        assert len(saved) == (2 if host == "hv1" else len(GUESTS[host])), saved
        intervals[host] = (min(row["finished"] - row["seconds"] for row in saved), max(row["finished"] for row in saved))
    print("drain: save intervals per host (epoch s):", json.dumps(intervals),
          "role wall time per host (s):", {host: facts(drain, host, "host_drain_report")["seconds"] for host in GUESTS})
    for (one, first), (other, second) in itertools.combinations(intervals.items(), 2):
        assert first[0] < second[1] and second[0] < first[1], \
            f"{one} saved during {first} and {other} during {second}: one after the other, not in parallel"

    assert_job_records_removed(fleet, drain)

    saved_ticks = {name: guests[name].last_tick() for name in guests if name not in NO_QMP}

    restore = fleet.run_playbook(RESTORE, extra_vars(), forks=10, timeout=900).check()
    assert_job_records_removed(fleet, restore)
    for host in GUESTS:
        report = rows(facts(restore, host, "host_restore_report"))
        assert {row["result"] for row in report.values()} == {"restored"}, report
        assert all(row["image"].endswith(" (removed)") for row in report.values()), report
        assert not list(fleet[host].path(DRAIN_DIR).glob("*.save")), "images left after the restore"
    assert rows(facts(restore, "hv1", "host_restore_report"))["fl-a2"]["after"] == "paused"
    for name, tick in saved_ticks.items():
        if name in PAUSED:
            assert guests[name].last_tick() == tick
        else:
            guests[name].assert_continued(tick)
