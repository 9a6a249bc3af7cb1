"""drain_manifest, run as Ansible runs it, on manifests and images made here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ansible_collections.savestate.qemu.tests.unit.module_runner import run_module

UUID = "5a5a0001-0000-4000-8000-00000000000a"


def saved_image(directory: Path, name: str, was_running: bool = True) -> dict[str, Any]:
    """The save module's ``image`` result for an image it just wrote."""
    path = directory / f"{name}.save"
    path.write_bytes(b"QEVM" * 1024)
    return {"path": str(path), "name": name, "uuid": UUID, "was_running": was_running, "format": "raw",
            "memory_kib": 131072, "machine": "pc-i440fx-10.0", "metadata": {"saved_at": "2026-11-24T13:40:16Z"},
            "size": 4096}


def write(directory: Path, check: bool = False, diff: bool = False, **args: Any) -> dict[str, Any]:
    return run_module("drain_manifest", {"path": str(directory / "savestate-manifest.json"), "state": "present",
                                         **args}, check=check, diff=diff)


def read(directory: Path, **args: Any) -> dict[str, Any]:
    return run_module("drain_manifest", {"path": str(directory / "savestate-manifest.json"), **args}, check=True)


def test_write_then_read(tmp_path: Path) -> None:
    images = [saved_image(tmp_path, "web1"), saved_image(tmp_path, "db1", was_running=False)]
    written = write(tmp_path, saved=images, checksum_algorithm="sha256")
    assert not written["failed"] and written["changed"], written["_stdout"]
    assert [e["name"] for e in written["added"]] == ["db1", "web1"]
    on_disk = json.loads((tmp_path / "savestate-manifest.json").read_text())
    assert on_disk == written["manifest"] and on_disk["version"] == 1
    assert [(e["name"], e["state"], e["memory_mib"]) for e in on_disk["guests"]] == \
        [("db1", "paused", 128), ("web1", "running", 128)]
    assert all(e["fingerprint"]["checksum"].startswith("sha256:") for e in on_disk["guests"])

    result = read(tmp_path, check_images="fingerprint")
    assert not result["failed"] and not result["changed"] and result["exists"], result["_stdout"]
    assert result["version"] == 1 and result["manifest"] == on_disk
    assert result["images"] == [{"name": "db1", "path": str(tmp_path / "db1.save"), "exists": True, "problem": None},
                                {"name": "web1", "path": str(tmp_path / "web1.save"), "exists": True, "problem": None}]


def test_writing_the_same_manifest_again_changes_nothing(tmp_path: Path) -> None:
    first = write(tmp_path, saved=[saved_image(tmp_path, "web1")])
    again = write(tmp_path, guests=first["manifest"]["guests"])
    assert not again["failed"] and not again["changed"], again["_stdout"]
    assert again["added"] == []


def test_kept_entries_keep_their_fingerprint_and_a_new_save_replaces_its_entry(tmp_path: Path) -> None:
    first = write(tmp_path, saved=[saved_image(tmp_path, "web1"), saved_image(tmp_path, "db1")])
    kept = first["manifest"]["guests"]
    (tmp_path / "db1.save").write_bytes(b"changed")  # changed since its save: the entry must not bless it
    second = write(tmp_path, guests=kept, saved=[saved_image(tmp_path, "web1")])
    assert not second["failed"], second["_stdout"]
    by_name = {e["name"]: e for e in second["manifest"]["guests"]}
    assert by_name["db1"] == next(e for e in kept if e["name"] == "db1")
    problems = {i["name"]: i["problem"] for i in read(tmp_path, check_images="fingerprint")["images"]}
    assert problems == {"db1": "the image changed size since the drain (4096 -> 7 bytes)", "web1": None}


def test_check_mode_writes_nothing_and_diff_shows_the_manifest(tmp_path: Path) -> None:
    result = write(tmp_path, check=True, diff=True, saved=[saved_image(tmp_path, "web1")])
    assert not result["failed"] and result["changed"], result["_stdout"]
    assert not (tmp_path / "savestate-manifest.json").exists()
    assert result["diff"]["before"] == "" and json.loads(result["diff"]["after"])["guests"][0]["name"] == "web1"


def test_no_manifest_fails_unless_missing_ok(tmp_path: Path) -> None:
    result = read(tmp_path)
    assert result["failed"] and "there is no drain manifest at" in result["msg"]
    result = read(tmp_path, missing_ok=True)
    assert not result["failed"] and not result["exists"], result["_stdout"]
    assert result["manifest"] == {"version": 1, "guests": []} and result["images"] == [] and result["version"] is None


def test_an_unversioned_manifest_reads_as_version_1_with_a_warning(tmp_path: Path) -> None:
    write(tmp_path, saved=[saved_image(tmp_path, "web1")])
    path = tmp_path / "savestate-manifest.json"
    old = json.loads(path.read_text())
    del old["version"]
    path.write_text(json.dumps(old))
    result = read(tmp_path)
    assert not result["failed"], result["_stdout"]
    assert result["version"] == 1 and result["manifest"]["version"] == 1
    assert len(result["notes"]) == 1 and "has no 'version' field" in result["notes"][0], result
    assert "read as version 1" in json.dumps(result["warnings"])  # a plain string or an event, by ansible-core


def test_a_newer_version_fails_clearly_and_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "savestate-manifest.json"
    text = json.dumps({"version": 2, "guests": [], "hosts": {}})
    path.write_text(text)
    path.chmod(0o600)
    result = read(tmp_path)
    assert result["failed"] and "it is of format version 2, newer than this savestate.qemu reads" in result["msg"]
    assert "Traceback" not in result["_stdout"] + result["_stderr"]
    result = write(tmp_path, saved=[saved_image(tmp_path, "web1")])
    assert not result["failed"]  # a drain reads before it writes (the role); the writer itself replaces
    path.write_text(text)
    assert path.read_text() == text


def test_the_writer_refuses_an_entry_pointing_elsewhere(tmp_path: Path) -> None:
    entry = {"name": "web1", "path": "/etc/shadow", "state": "running"}
    result = write(tmp_path, guests=[entry])
    assert result["failed"] and "refusing to write the drain manifest" in result["msg"]
    assert "'path' must name a file directly inside the manifest's directory" in result["msg"]
    assert not (tmp_path / "savestate-manifest.json").exists()


def test_a_relative_path_is_refused(tmp_path: Path) -> None:
    result = run_module("drain_manifest", {"path": "savestate-manifest.json"}, check=True)
    assert result["failed"] and "path must be absolute" in result["msg"]


def test_a_read_returns_the_save_bandwidth_recorded_for_its_directory(tmp_path: Path) -> None:
    # No save was ever made into this fresh directory: nothing recorded (the estimate then says so).
    result = read(tmp_path, missing_ok=True)
    assert not result["failed"] and result["bandwidth"] == {}, result["_stdout"]
