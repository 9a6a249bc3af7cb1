"""The roles' decisions: drain_plan, drain_space and restore_plan (plugins/filter/fleet.py)."""

from __future__ import annotations

from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.filter.fleet import FilterModule, drain_plan, drain_space, restore_plan

MIB = 1048576
DIR = "/var/lib/savestate/drain"


def active(name: Optional[str], pid: int = 100, managed_by: str = "none", memory_mib: int = 128,
           uuid: Optional[str] = None) -> dict[str, Any]:
    """A guest as guest_info lists it."""
    return {"name": name, "pid": pid, "uuid": uuid or f"uuid-{name}", "state": "running", "managed_by": managed_by,
            "memory_mib": memory_mib}


def entry(name: str, uuid: Optional[str] = None) -> dict[str, Any]:
    return {"name": name, "uuid": uuid or f"UUID-{name}", "path": f"{DIR}/{name}.save", "state": "running"}


def read(*entries: dict[str, Any], exists: tuple[str, ...] = (), problems: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """A drain_manifest read result."""
    problems = problems or {}
    return {"manifest": {"version": 1, "guests": list(entries)},
            "images": [{"name": e["name"], "path": e["path"], "exists": e["name"] in exists or e["name"] in problems,
                        "problem": problems.get(e["name"])} for e in entries]}


def names(items: list[dict[str, Any]]) -> list[Any]:
    return [item["name"] for item in items]


# --- drain_plan ----------------------------------------------------------------------

def test_every_saveable_guest_is_saved_and_libvirts_are_skipped() -> None:
    plan = drain_plan([active("web1"), active("db1"), active("lv1", managed_by="libvirt")])
    assert names(plan["to_save"]) == ["web1", "db1"] and names(plan["skipped"]) == ["lv1"]
    assert plan["kept"] == [] and plan["failures"] == []


def test_guests_asked_for_and_excluded() -> None:
    guests = [active("web1"), active("web2"), active("db1")]
    assert names(drain_plan(guests, None, ["web1", "db1"], ["db1"])["to_save"]) == ["web1"]
    assert names(drain_plan(guests, None, [], ["web2"])["to_save"]) == ["web1", "db1"]


def test_guests_that_cannot_be_saved_are_refused_and_say_why() -> None:
    guests = [active(None, pid=7, uuid="u7"), active("bad name"), active("twin", pid=1), active("twin", pid=2),
              active("ok")]
    plan = drain_plan(guests)
    assert names(plan["to_save"]) == ["ok"]
    assert [(f["name"], f["uuid"]) for f in plan["failures"]] == [
        (None, "u7"), ("bad name", "uuid-bad name"), ("twin", "uuid-twin"), ("twin", "uuid-twin")]
    messages = [f["msg"] for f in plan["failures"]]
    assert "pid 7 has no name" in messages[0] and "cannot be used as the image's file name" in messages[1]
    assert "another active guest has the same name" in messages[2]


def test_a_name_shared_with_a_guest_out_of_scope_still_counts() -> None:
    # Both images would be <name>.save: the second drain would overwrite the first one's.
    plan = drain_plan([active("twin", pid=1), active("twin", pid=2, managed_by="libvirt")], None, ["twin"])
    assert plan["to_save"] == [] and names(plan["failures"]) == ["twin"]


def test_earlier_images_are_kept_while_they_exist_and_their_guest_is_not_back() -> None:
    earlier = read(entry("gone"), entry("back"), entry("deleted"), exists=("gone", "back"))
    plan = drain_plan([active("back"), active("new")], earlier)
    assert names(plan["kept"]) == ["gone"] and names(plan["to_save"]) == ["back", "new"]


def test_a_name_asked_for_that_is_neither_active_nor_kept_is_refused() -> None:
    plan = drain_plan([active("web1")], read(entry("old"), exists=("old",)), ["web1", "old", "nowhere"])
    assert names(plan["to_save"]) == ["web1"] and names(plan["kept"]) == ["old"]
    assert plan["failures"] == [{"name": "nowhere", "uuid": None,
                                 "msg": "no active guest has this name, and the manifest lists no image of it"}]


def test_no_earlier_manifest() -> None:
    empty = {"exists": False, "manifest": {"version": 1, "guests": []}, "images": []}
    assert drain_plan([active("a")], empty)["kept"] == []


# --- drain_space ---------------------------------------------------------------------

def test_the_ram_fits_or_the_message_says_by_how_much() -> None:
    guests = [active("a", memory_mib=1024), active("b", memory_mib=1024)]
    assert drain_space(guests, "1048576 4096", 256, DIR) == ""  # 4096 MiB free, 2304 needed
    message = drain_space(guests, "524288 4096", 256, DIR)
    assert message.startswith(f"Not enough free space in {DIR} to drain this host: 2048 MiB free, 2304 MiB needed")
    assert "(2 guests with 2048 MiB of RAM in all, plus host_drain_space_margin_mib=256)" in message
    assert "No guest was saved." in message


def test_a_guest_without_known_memory_counts_zero_and_odd_statfs_is_said() -> None:
    assert drain_space([{"name": "a", "memory_mib": None}], "1 1048576", "1", DIR) == ""
    assert "cannot tell the free space" in drain_space([], "garbage", 0, DIR)


# --- restore_plan --------------------------------------------------------------------

def test_order_first_then_by_name() -> None:
    plan = restore_plan(read(entry("c"), entry("a"), entry("db"), entry("b")), [], [], ["db", "x", "db"])
    assert names(plan["pending"]) == ["db", "a", "b", "c"] and names(plan["entries"]) == ["db", "a", "b", "c"]
    assert plan["active"] == [] and plan["rejected"] == {} and plan["unknown"] == []


def test_guests_active_with_the_images_name_and_uuid_are_left_alone() -> None:
    manifest = read(entry("a", "UUID-1"), entry("b", "UUID-2"), entry("c", None))
    guests = [{"name": "a", "uuid": "uuid-1"}, {"name": "b", "uuid": "uuid-other"}]
    plan = restore_plan(manifest, guests)
    assert names(plan["active"]) == ["a"] and names(plan["pending"]) == ["b", "c"]


def test_changed_images_are_held_back_unless_their_guest_runs() -> None:
    problems = {"a": "the image was modified after the drain", "b": "the image /x is gone"}
    plan = restore_plan(read(entry("a"), entry("b"), entry("c"), problems=problems),
                        [{"name": "b", "uuid": "UUID-b"}])
    assert plan["rejected"] == {"a": "the image was modified after the drain"}
    assert names(plan["pending"]) == ["c"] and names(plan["active"]) == ["b"]


def test_guests_asked_for() -> None:
    plan = restore_plan(read(entry("a"), entry("b")), [], ["b", "zz"])
    assert names(plan["pending"]) == ["b"] and plan["unknown"] == ["zz"]


def test_the_filters_are_registered() -> None:
    registered = FilterModule().filters()
    assert registered["drain_plan"] is drain_plan and registered["restore_plan"] is restore_plan
    assert registered["drain_space"] is drain_space


# --- discarded guests (savestate.qemu.discard) ------------------------------------------

def discarded(name: str, at: str = "2026-11-24T15:00:00+00:00", uuid: Optional[str] = None) -> dict[str, Any]:
    return {"name": name, "uuid": uuid or f"UUID-{name}", "discarded_at": at, "discarded_by": "alice"}


def with_discards(manifest: dict[str, Any], *records: dict[str, Any]) -> dict[str, Any]:
    manifest["manifest"]["discarded"] = list(records)
    return manifest


def test_a_discarded_guest_is_never_restored_and_never_unknown() -> None:
    # An entry left beside its record (an edited manifest) is held back all the same.
    stale = dict(entry("a"), saved_at="2026-11-24T13:40:16Z")
    plan = restore_plan(with_discards(read(stale, entry("b")), discarded("a"), discarded("gone")), [], ["a", "gone", "zz"])
    assert names(plan["pending"]) == [] and plan["unknown"] == ["zz"]
    assert names(plan["discarded"]) == ["a", "gone"] and names(plan["entries"]) == []
    everything = restore_plan(with_discards(read(stale, entry("b")), discarded("a")), [])
    assert names(everything["pending"]) == ["b"] and names(everything["discarded"]) == ["a"]


def test_a_guest_saved_again_after_its_discard_is_restored() -> None:
    again = dict(entry("a"), saved_at="2026-11-25T08:00:00+00:00")
    other = dict(entry("b", "UUID-new"), saved_at="2026-11-20T08:00:00Z")
    undated = dict(entry("c"), saved_at=None)
    manifest = with_discards(read(again, other, undated), discarded("a"), discarded("b", uuid="UUID-old"), discarded("c"))
    assert names(restore_plan(manifest, [])["pending"]) == ["a", "b"]  # c: no time to tell, so never restored
