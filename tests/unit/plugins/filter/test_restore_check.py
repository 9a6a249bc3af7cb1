"""The restore_check filter: which guests the emulator that will restore them can load."""

from __future__ import annotations

from typing import Any

from ansible_collections.savestate.qemu.plugins.filter.restore_check import FilterModule, restore_check

NEW = "/usr/bin/qemu-system-x86_64"
OLD = "/opt/qemu-7.2/bin/qemu-system-x86_64"
EMULATORS = {
    NEW: {"given": NEW, "path": NEW, "version": "10.0.2", "machines": ["pc", "pc-i440fx-10.0", "pc-i440fx-7.2"],
          "aliases": {"pc": "pc-i440fx-10.0"}, "formats": ["raw", "zstd", "sparse"], "problem": None},
    OLD: {"given": OLD, "path": OLD, "version": "7.2.22", "machines": ["pc", "pc-i440fx-7.2"],
          "aliases": {"pc": "pc-i440fx-7.2"}, "formats": ["raw", "zstd"], "problem": None},
}


def guest(name: str, machine: str, exe: str = NEW) -> dict[str, Any]:
    """An active guest as guest_info lists it."""
    return {"name": name, "uuid": f"uuid-{name}", "state": "running", "machine": machine, "exe": exe,
            "argv": [exe, "-machine", "pc"]}


def names(items: list[dict[str, Any]]) -> list[Any]:
    return [item["name"] for item in items]


def test_a_drain_for_an_older_qemu_strands_the_newer_machine_type() -> None:
    checked = restore_check([guest("new", "pc-i440fx-10.0"), guest("old", "pc-i440fx-7.2")], EMULATORS, OLD, "raw")
    assert names(checked["ok"]) == ["old"]
    [stranded] = checked["stranded"]
    assert (stranded["name"], stranded["machine"], stranded["emulator"], stranded["reason"]) == (
        "new", "pc-i440fx-10.0", OLD, "machine")
    assert "pc-i440fx-10.0" in stranded["msg"] and "QEMU 7.2.22" in stranded["msg"]
    [row] = checked["rows"]
    assert row["result"] == "stranded" and row["before"] == row["after"] == "running"
    assert row["msg"].endswith("not saved, so it keeps running")


def test_an_alias_is_resolved_by_the_qemu_the_guest_runs_now() -> None:
    # guest_info falls back to the command line's `-machine pc` when the monitor did not answer.
    checked = restore_check([guest("aliased", "pc")], EMULATORS, OLD, "raw")
    assert checked["stranded"][0]["machine"] == "pc-i440fx-10.0"
    assert names(restore_check([guest("aliased", "pc", exe=OLD)], EMULATORS, OLD, "raw")["ok"]) == ["aliased"]


def test_without_an_override_each_guest_is_checked_against_its_own_emulator() -> None:
    checked = restore_check([guest("new", "pc-i440fx-10.0"), guest("old", "pc-i440fx-7.2", exe=OLD)], EMULATORS)
    assert names(checked["ok"]) == ["new", "old"] and checked["stranded"] == []


def test_the_format_counts() -> None:
    checked = restore_check([guest("new", "pc-i440fx-7.2")], EMULATORS, OLD, "sparse")
    assert checked["stranded"][0]["reason"] == "format"
    assert restore_check([guest("new", "pc-i440fx-7.2")], EMULATORS, NEW, "sparse")["stranded"] == []


def test_manifest_entries_use_their_images_record() -> None:
    entries = [{"name": "a", "uuid": "ua", "path": "/d/a.save", "state": "running", "machine": "pc-i440fx-10.0",
                "format": "raw"},
               {"name": "b", "uuid": "ub", "path": "/d/b.save", "state": "paused", "format": "sparse"},
               {"name": "c", "uuid": "uc", "path": "/d/c.save", "state": "running"}]
    images = {"/d/a.save": {"emulator": OLD, "machine": "pc-i440fx-10.0", "format": "raw", "problem": None},
              "/d/b.save": {"emulator": NEW, "machine": "pc-i440fx-7.2", "format": "sparse", "problem": None},
              "/d/c.save": {"emulator": None, "machine": None, "format": None, "problem": "/d/c.save: not an image"}}
    checked = restore_check(entries, EMULATORS, None, None, images)
    assert names(checked["ok"]) == ["b"]
    assert [(s["name"], s["reason"]) for s in checked["stranded"]] == [("a", "machine"), ("c", "image")]
    overridden = restore_check(entries[:2], EMULATORS, OLD, None, images)
    assert [(s["name"], s["reason"]) for s in overridden["stranded"]] == [("a", "machine"), ("b", "format")]


def test_an_emulator_that_was_not_asked_strands_the_guest() -> None:
    checked = restore_check([guest("new", "pc-i440fx-10.0")], {}, "/nowhere/qemu-system-x86_64", "raw")
    assert checked["stranded"][0]["reason"] == "emulator"
    broken = {OLD: {**EMULATORS[OLD], "problem": "it is owned by uid 1000, not root"}}
    assert "uid 1000" in restore_check([guest("x", "pc-i440fx-7.2")], broken, OLD, "raw")["stranded"][0]["msg"]


def test_the_filter_is_registered() -> None:
    assert FilterModule().filters() == {"restore_check": restore_check}


def test_the_drain_summary_counts_and_explains_a_stranded_guest() -> None:
    from ansible_collections.savestate.qemu.plugins.filter.fleet import fleet_failure, fleet_summary

    rows = restore_check([guest("new", "pc-i440fx-10.0")], EMULATORS, OLD, "raw")["rows"]
    lines = fleet_summary(rows, "hv1", "drain")
    assert lines[0] == "hv1: drain of 1 guest(s): 1 left running (the restoring QEMU cannot load it)"
    assert lines[-1].startswith("new: stranded: its machine type pc-i440fx-10.0 is not one QEMU 7.2.22")
    assert fleet_failure(rows, "drain") == ""  # left running on purpose: not a failure of the drain
