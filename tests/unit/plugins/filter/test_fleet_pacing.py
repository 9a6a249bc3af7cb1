"""Paced restores: priorities, max age and their rows (plugins/filter/fleet.py, issue 14)."""

from __future__ import annotations

from typing import Any, Optional

import pytest

from ansible_collections.savestate.qemu.plugins.filter.fleet import (
    duration_seconds,
    fleet_failure,
    fleet_summary,
    restore_plan,
    restore_rows,
    rounds,
    saved_time,
    with_priorities,
)

DIR = "/var/lib/savestate/drain"
NOW = 1764000000.0  # 2025-11-24T16:00:00Z
ISO = "2025-11-24T15:00:00+00:00"  # an hour before NOW


def entry(name: str, priority: Optional[int] = None, saved_at: Optional[str] = ISO, **fields: Any) -> dict[str, Any]:
    made = {"name": name, "uuid": f"UUID-{name}", "path": f"{DIR}/{name}.save", "state": "running", "size": 4096,
            "saved_at": saved_at, **fields}
    if priority is not None:
        made["priority"] = priority
    return made


def read(*entries: dict[str, Any], problems: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """A drain_manifest read result."""
    return {"manifest": {"version": 1, "guests": list(entries)},
            "images": [{"name": e["name"], "exists": True, "problem": (problems or {}).get(e["name"])} for e in entries]}


def names(items: list[dict[str, Any]]) -> list[Any]:
    return [item["name"] for item in items]


# --- order ---------------------------------------------------------------------------

def test_without_priorities_the_order_is_host_restore_order_then_names() -> None:
    plan = restore_plan(read(entry("c"), entry("a"), entry("db"), entry("b")), [], [], ["db"])
    assert names(plan["pending"]) == ["db", "a", "b", "c"]
    assert [e["priority"] for e in plan["pending"]] == [0, 0, 0, 0]


def test_recorded_priorities_go_highest_first_then_by_name() -> None:
    manifest = read(entry("a", 1), entry("b", 10), entry("c"), entry("d", -5), entry("e", 10))
    plan = restore_plan(manifest, [])
    assert names(plan["pending"]) == ["b", "e", "a", "c", "d"]
    assert [e["priority"] for e in plan["pending"]] == [10, 10, 1, 0, -5]


def test_host_restore_order_comes_before_any_priority() -> None:
    plan = restore_plan(read(entry("a", 100), entry("db", -1), entry("b", 5)), [], [], ["db"])
    assert names(plan["pending"]) == ["db", "a", "b"]


def test_restore_time_priorities_override_the_recorded_ones() -> None:
    manifest = read(entry("a", 100), entry("b", 5), entry("c"))
    plan = restore_plan(manifest, [], priorities={"a": 0, "c": "50", "zz": 9})
    assert names(plan["pending"]) == ["c", "b", "a"]
    assert names(plan["entries"]) == ["c", "b", "a"]


def test_a_priority_that_is_not_a_number_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="priority of a must be a whole number"):
        restore_plan(read(entry("a")), [], priorities={"a": "high"})
    with pytest.raises(ValueError, match="priority of a must be a whole number"):
        restore_plan(read(entry("a")), [], priorities={"a": True})


def test_rounds_keep_the_priority_order_and_host_restore_order_goes_alone() -> None:
    plan = restore_plan(read(entry("a", 1), entry("b", 3), entry("c", 2), entry("db")), [], [], ["db"])
    assert [names(r) for r in rounds(plan["pending"], 2, ["db"])] == [["db"], ["b", "c"], ["a"]]


# --- max age ---------------------------------------------------------------------------

@pytest.mark.parametrize("value, seconds", [(None, None), ("", None), (0, 0.0), (900, 900.0), (2.5, 2.5),
                                            ("90", 90.0), ("15m", 900.0), ("1h30m", 5400.0), ("1h 30m", 5400.0),
                                            ("2D", 172800.0), ("1w", 604800.0), ("1.5h", 5400.0), ("10s", 10.0)])
def test_durations(value: Any, seconds: Optional[float]) -> None:
    assert duration_seconds(value) == seconds


@pytest.mark.parametrize("value", ["x", "-5", -5, True, "15 minutes", "m", "1h-5m", [1]])
def test_a_duration_that_is_none_is_refused_with_what_to_give(value: Any) -> None:
    with pytest.raises(ValueError, match="is not a duration: give seconds"):
        duration_seconds(value)


def test_the_age_comes_from_saved_at_else_the_fingerprint() -> None:
    assert saved_time(entry("a")) == NOW - 3600
    assert saved_time(entry("a", saved_at="2025-11-24T15:00:00Z")) == NOW - 3600
    assert saved_time(entry("a", saved_at="2025-11-24T15:00:00")) == NOW - 3600  # no zone: UTC, as the drain writes
    assert saved_time(entry("a", saved_at=None, fingerprint={"mtime": NOW - 10})) == NOW - 10
    assert saved_time(entry("a", saved_at="yesterday", fingerprint={"mtime": NOW - 10})) == NOW - 10
    assert saved_time(entry("a", saved_at=None)) is None


def test_images_older_than_max_age_are_held_back_with_their_age() -> None:
    manifest = read(entry("old"), entry("new", saved_at="2025-11-24T15:59:00Z"), entry("undated", saved_at=None))
    plan = restore_plan(manifest, [], max_age="30m", now=NOW)
    assert names(plan["pending"]) == ["new"]
    assert [(e["name"], e["age_s"], e["max_age_s"]) for e in plan["stale"]] == [
        ("old", 3600.0, 1800.0), ("undated", None, 1800.0)]
    assert plan["rejected"] == {} and names(plan["entries"]) == ["new", "old", "undated"]


def test_no_max_age_restores_any_age_and_a_larger_one_restores_this_one() -> None:
    manifest = read(entry("old"))
    assert names(restore_plan(manifest, [], now=NOW)["pending"]) == ["old"]
    assert names(restore_plan(manifest, [], max_age=3601, now=NOW)["pending"]) == ["old"]
    assert restore_plan(manifest, [], max_age=3601, now=NOW)["stale"] == []
    assert names(restore_plan(manifest, [], max_age=3599, now=NOW)["stale"]) == ["old"]


def test_a_changed_image_is_refused_whatever_its_age_and_an_active_guest_is_left_alone() -> None:
    manifest = read(entry("changed"), entry("up"), entry("old"), problems={"changed": "the image changed size"})
    plan = restore_plan(manifest, [{"name": "up", "uuid": "uuid-up"}], max_age=60, now=NOW)
    assert plan["rejected"] == {"changed": "the image changed size"}
    assert names(plan["stale"]) == ["old"] and names(plan["active"]) == ["up"] and plan["pending"] == []


def test_max_age_defaults_to_the_current_time() -> None:
    plan = restore_plan(read(entry("old")), [], max_age="1d")
    assert names(plan["stale"]) == ["old"] and plan["stale"][0]["age_s"] > 86400 * 300  # saved in 2025


# --- rows and summary ----------------------------------------------------------------

def test_a_stale_image_is_a_row_of_its_own_and_not_a_failure() -> None:
    plan = restore_plan(read(entry("old"), entry("undated", saved_at=None)), [], max_age="30m", now=NOW)
    rows = restore_rows([], {}, [], [], [], stale=plan["stale"])
    assert [(r["name"], r["result"], r["after"], r["age_s"], r["max_age_s"]) for r in rows] == [
        ("old", "stale", "not running", 3600.0, 1800.0), ("undated", "stale", "not running", None, 1800.0)]
    assert rows[0]["msg"].startswith(f"saved 60 min ago ({ISO}), older than host_restore_max_age (30 min): "
                                     "not restored, the image is kept")
    assert "its age is unknown" in rows[1]["msg"] and rows[0]["image"] == f"{DIR}/old.save"
    assert fleet_failure(rows, "restore") == ""
    summary = fleet_summary(rows, "hv1", "restore")
    assert summary[0] == "hv1: restore of 2 guest(s): 2 too old, held back"
    assert any(line.startswith("old: stale: saved 60 min ago") for line in summary)


def test_ages_read_as_an_operator_reads_them() -> None:
    stale = [entry("a", age_s=age, max_age_s=limit) for age, limit in ((45, 30), (7200, 3600), (3 * 86400, 86400))]
    messages = [row["msg"] for row in restore_rows([], {}, [], [], [], stale=stale)]
    assert messages[0].startswith("saved 45 s ago") and "(30 s)" in messages[0]
    assert messages[1].startswith("saved 2.0 h ago") and "(60 min)" in messages[1]
    assert messages[2].startswith("saved 3.0 days ago") and "(24.0 h)" in messages[2]


# --- the drain's side ---------------------------------------------------------------------

def test_with_priorities_sets_the_listed_names_only_and_copies() -> None:
    items = [{"name": "a", "priority": 3}, {"name": "b"}, {"name": "c"}]
    assert with_priorities(items, {"b": 7, "c": "-2", "zz": 1}) == [
        {"name": "a", "priority": 3}, {"name": "b", "priority": 7}, {"name": "c", "priority": -2}]
    assert items[1] == {"name": "b"}
    assert with_priorities(items, None) == items


@pytest.mark.parametrize("value", ["high", 1.5, True, None, "1e3"])
def test_with_priorities_refuses_what_is_not_a_whole_number(value: Any) -> None:
    with pytest.raises(ValueError, match="priority of a must be a whole number"):
        with_priorities([{"name": "a"}], {"a": value})
