"""The roles' filters: rounds of concurrent jobs, per-guest rows, summaries and failure messages."""

from __future__ import annotations

from typing import Any

import pytest

from ansible_collections.savestate.qemu.plugins.filter.fleet import (
    FilterModule,
    drain_rows,
    failures,
    fleet_failure,
    fleet_summary,
    restore_rows,
    rounds,
    succeeded,
)

MIB = 1048576


def guest(name: str, state: str = "running", memory_mib: int = 128) -> dict[str, Any]:
    return {"name": name, "uuid": f"uuid-{name}", "state": state, "memory_mib": memory_mib}


def save_job(item: dict[str, Any], **result: Any) -> dict[str, Any]:
    """An async_status result as the wait task registers it: its item is the start task's result."""
    return {"finished": 1, "item": {"ansible_job_id": "j", "item": item}, **result}


def saved(item: dict[str, Any], size_mib: int = 64, seconds: float = 0.5) -> dict[str, Any]:
    return save_job(item, changed=True, guest={"name": item["name"], "state": "stopped"},
                    image={"path": f"/d/{item['name']}.save", "size": size_mib * MIB},
                    stats={"bytes": size_mib * MIB, "duration_s": seconds, "throughput_mib_s": size_mib / seconds})


def test_rounds_chunk_by_concurrency_and_put_the_ordered_guests_alone_first() -> None:
    items = [guest(n) for n in ("a", "b", "c", "db", "e")]
    assert [[g["name"] for g in r] for r in rounds(items, 2)] == [["a", "b"], ["c", "db"], ["e"]]
    assert [[g["name"] for g in r] for r in rounds(items, "3", ["db", "zz", "a", "db"])] == \
        [["db"], ["a"], ["b", "c", "e"]]
    assert rounds([], 2) == []


def test_rounds_refuse_a_concurrency_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        rounds([guest("a")], 0)


def test_drain_rows_describe_saved_failed_kept_and_skipped_guests() -> None:
    a, b, c = guest("a"), guest("b", "paused"), guest("c")
    timed_out = {"finished": 0, "failed": True, "item": {"item": c}}
    rows = drain_rows(
        [saved(a), saved(b), save_job(c, failed=True, msg="QMP busy"), timed_out],
        failures=[{"name": None, "uuid": "u9", "msg": "no name"}],
        kept=[{"name": "old", "uuid": "u-old", "state": "paused", "path": "/d/old.save", "size": 10}],
        skipped=[{"name": "lv", "uuid": "u-lv", "state": "running"}],
        guests_before=[a, b, c], guests_after=[{"name": "c", "state": "running"}], image_dir="/d",
        timeout=720, entries=[{"name": "a", "fingerprint": {"mtime": 1700000000.5}}])
    by_result = [(r["guest"], r["result"], r["before"], r["after"]) for r in rows]
    assert by_result == [("a", "saved", "running", "stopped"), ("b", "saved", "paused", "stopped"),
                         ("c", "failed", "running", "running"), ("c", "failed", "running", "running"),
                         ("(unnamed, uuid u9)", "failed", None, "-"),
                         ("old", "kept", "saved earlier (paused)", "stopped"), ("lv", "skipped", "running", "running")]
    assert rows[0]["size"] == 64 * MIB and rows[0]["seconds"] == 0.5 and rows[0]["finished"] == 1700000000.5
    assert rows[2]["msg"] == "QMP busy" and rows[3]["msg"] == "the job did not finish within 720 s"
    assert [f["name"] for f in failures(rows)] == ["c", "c", None]


def test_drain_rows_in_check_mode_say_what_would_happen() -> None:
    a = guest("a", memory_mib=256)
    check = save_job(a, changed=True, guest={"name": "a", "state": "running"}, msg="would save")
    rows = drain_rows([check], [], [], [], [a], [a], "/d", check_mode=True, listed_only=[guest("b")])
    assert [(r["guest"], r["result"], r["after"], r["size"]) for r in rows] == [
        ("a", "would_save", "stopped (would be)", 256 * MIB), ("b", "would_save", "stopped (would be)", 128 * MIB)]
    summary = fleet_summary(rows, "hv1", "drain", check_mode=True, seconds=1.23)
    assert summary[0] == "hv1: drain of 2 guest(s) (check mode: nothing was changed): 2 would save in 1.2 s"
    assert "saved" not in " ".join(summary).replace("would save", "")


def test_the_summary_is_a_table_with_one_row_per_guest_and_one_line_per_problem() -> None:
    rows = drain_rows([saved(guest("web1"), 128, 2.0), save_job(guest("db1"), failed=True, msg="busy")],
                      [], [], [], [], [{"name": "db1", "state": "running"}], "/d")
    lines = fleet_summary(rows, "hv1", "drain", seconds=3.0)
    assert lines[0] == "hv1: drain of 2 guest(s): 1 saved, 1 failed; 128.0 MiB in 3.0 s"
    assert lines[1].split() == ["guest", "before", "image", "size", "seconds", "MiB/s", "after"]
    assert lines[2].split() == ["web1", "running", "/d/web1.save", "128.0", "MiB", "2.00", "64.0", "stopped"]
    assert lines[3].split() == ["db1", "running", "-", "-", "-", "-", "running"]
    assert lines[2].index("/d/web1.save") == lines[1].index("image")  # columns line up
    assert lines[4] == "db1: failed: busy"


def test_failure_messages_never_claim_what_did_not_happen() -> None:
    failed = drain_rows([save_job(guest("b"), failed=True, msg="busy")], [], [], [], [], [], "/d")
    assert fleet_failure(failed, "drain", manifest="/d/m.json") == \
        "1 guest(s) could not be drained: b: busy. No other guest was saved in this run."
    mixed = drain_rows([saved(guest("a")), save_job(guest("b"), failed=True, msg="busy")], [], [], [], [], [], "/d")
    assert fleet_failure(mixed, "drain", manifest="/d/m.json") == \
        "1 guest(s) could not be drained: b: busy. 1 other guest(s) were saved and listed in /d/m.json: a."
    check = drain_rows([save_job(guest("b"), failed=True, msg="busy")], [], [], [], [], [], "/d", check_mode=True)
    message = fleet_failure(check, "drain", check_mode=True)
    assert message == "1 guest(s) would not be drained: b: busy. Nothing was changed (check mode)."
    assert fleet_failure(drain_rows([saved(guest("a"))], [], [], [], [], [], "/d"), "drain") == ""


def entry(name: str, state: str = "running") -> dict[str, Any]:
    return {"name": name, "uuid": f"uuid-{name}", "path": f"/d/{name}.save", "state": state, "size": 64 * MIB}


def test_restore_rows_and_summary() -> None:
    back = save_job(entry("a"), changed=True, guest={"name": "a", "state": "running"},
                    stats={"bytes": 64 * MIB, "duration_s": 0.25, "throughput_mib_s": 256.0})
    failed = save_job(entry("b", "paused"), failed=True, msg="QEMU refused the stream")
    rows = restore_rows([back, failed], {"c": "the image /d/c.save is gone"}, [entry("d")], ["zz"],
                        [{"name": "d", "state": "running"}], remove_images=True, entries=[entry("c", "paused")])
    assert [(r["guest"], r["result"], r["before"], r["image"], r["after"]) for r in rows] == [
        ("a", "restored", "saved (running)", "/d/a.save (removed)", "running"),
        ("b", "failed", "saved (paused)", "/d/b.save", "not running"),
        ("c", "failed", "saved (paused)", "/d/c.save", "not running"),
        ("d", "already_active", "running", "/d/d.save", "running"),
        ("zz", "failed", "-", None, "-")]
    assert rows[1]["msg"] == "QEMU refused the stream; the image is kept"
    lines = fleet_summary(rows, "hv2", "restore")
    assert lines[0] == "hv2: restore of 5 guest(s): 1 restored, 1 already active, 3 failed; 64.0 MiB"
    message = fleet_failure(rows, "restore")
    assert message.startswith("3 guest(s) could not be restored: b: QEMU refused the stream; the image is kept; c: ")
    assert message.endswith(" 1 other guest(s) were restored: a.")


def test_restore_rows_in_check_mode() -> None:
    would = save_job(entry("a", "paused"), changed=True, guest={"name": "a", "state": None}, msg="would restore")
    rows = restore_rows([would], {}, [], [], [], check_mode=True, remove_images=True)
    assert [(r["result"], r["image"], r["after"]) for r in rows] == [
        ("would_restore", "/d/a.save (would be removed)", "paused (would be)")]
    forced = restore_rows([would], {}, [], [], [], check_mode=True, target_state="running")
    assert [(r["image"], r["after"]) for r in forced] == [("/d/a.save", "running (would be)")]
    assert fleet_summary(rows, "hv1", "restore", check_mode=True)[0] == \
        "hv1: restore of 1 guest(s) (check mode: nothing was changed): 1 would restore"
    assert fleet_failure(restore_rows([save_job(entry("b"), failed=True, msg="no")], {}, [], [], [], True),
                         "restore", check_mode=True) == \
        "1 guest(s) would not be restored: b: no; the image is kept. Nothing was changed (check mode)."


def test_succeeded_keeps_the_finished_jobs_that_did_not_fail() -> None:
    ok = saved(guest("a"))
    assert succeeded([ok, save_job(guest("b"), failed=True, msg="x"), {"finished": 0, "item": {}}]) == [ok]


def test_the_plugin_exposes_every_filter() -> None:
    names = {"rounds", "drain_rows", "restore_rows", "succeeded", "failures", "fleet_summary", "fleet_failure",
             "drain_plan", "drain_space", "restore_plan", "with_priorities", "job_lines", "fleet_totals",
             "drain_estimate", "estimate_lines"}
    assert set(FilterModule().filters()) == names


def test_restore_rows_report_discarded_guests_and_the_clocks() -> None:
    def back(name: str, clock: Any) -> dict[str, Any]:
        return save_job(entry(name), changed=True, guest={"name": name, "state": "running", "clock_synced": clock},
                        stats={"bytes": 64 * MIB, "duration_s": 0.25, "throughput_mib_s": 256.0})
    record = {"name": "old", "uuid": "uuid-old", "discarded_at": "2026-11-24T15:00:00+00:00", "discarded_by": "alice",
              "reason": "rebuilt"}
    rows = restore_rows([back("a", True), back("b", "no agent"), back("c", True), back("d", False)], {}, [], [],
                        [{"name": "old", "state": "running"}], discarded=[record])
    assert [(r["guest"], r["result"], r.get("clock_synced")) for r in rows] == [
        ("a", "restored", True), ("b", "restored", "no agent"), ("c", "restored", True), ("d", "restored", False),
        ("old", "discarded", None)]
    assert (rows[-1]["before"], rows[-1]["image"], rows[-1]["after"]) == ("discarded", None, "running")
    assert rows[-1]["msg"] == "discarded on 2026-11-24T15:00:00+00:00 by alice: rebuilt; not restored"
    lines = fleet_summary(rows, "hv1", "restore")
    assert lines[0] == ("hv1: restore of 5 guest(s): 4 restored, 1 discarded; 256.0 MiB; "
                        "guest clocks: 2 synced, 1 no agent, 1 not synced")
    assert lines[-1] == f"old: discarded: {rows[-1]['msg']}"
    assert fleet_failure(rows, "restore") == ""


def test_a_restore_headline_without_clock_reports_says_nothing_of_clocks() -> None:
    would = save_job(entry("a"), changed=True, guest={"name": "a", "state": None}, msg="would restore")
    assert "clock" not in fleet_summary(restore_rows([would], {}, [], [], [], check_mode=True), "hv1", "restore")[0]
