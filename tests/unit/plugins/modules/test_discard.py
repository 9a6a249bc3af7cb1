"""discard, run as Ansible runs it, on manifests and save images made here (as root: what root deletes)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._manifest import dump_manifest, read_manifest
from ansible_collections.savestate.qemu.tests.unit.image_helpers import make_savestate_image, savestate_record
from ansible_collections.savestate.qemu.tests.unit.module_runner import run_module

UUID = "4c7a1a3e-30b6-4e55-9a55-3d7d2a1b0c11"  # savestate_record()'s
OTHER_UUID = "5a5a0001-0000-4000-8000-00000000000a"


def entry(directory: Path, name: str, uuid: str = UUID, **fields: Any) -> dict[str, Any]:
    return {"name": name, "uuid": uuid, "path": str(directory / f"{name}.save"), "state": "running",
            "saved_at": "2026-11-24T13:40:16+00:00", "pacing_field": 3, **fields}


def drained(directory: Path, *names: str) -> Path:
    """A drain directory: an image per name (guest ``name``) and a manifest listing them."""
    for name in names:
        make_savestate_image(directory / f"{name}.save", savestate_record(name=name))
    manifest = directory / "savestate-manifest.json"
    manifest.write_text(dump_manifest([entry(directory, name) for name in names], str(directory)))
    manifest.chmod(0o600)
    return manifest


def discard(manifest: Path, name: str, check: bool = False, diff: bool = False, **args: Any) -> dict[str, Any]:
    return run_module("discard", {"manifest": str(manifest), "name": name, **args}, check=check, diff=diff)


def on_disk(manifest: Path) -> dict[str, Any]:
    return json.loads(manifest.read_text())


def test_discard_removes_the_image_and_the_entry_and_records_it(tmp_path: Path) -> None:
    manifest = drained(tmp_path, "web1", "db1")
    result = discard(manifest, "web1", reason="rebuilt", discarded_by="alice")
    assert not result["failed"] and result["changed"], result["_stdout"]
    assert not (tmp_path / "web1.save").exists() and (tmp_path / "db1.save").exists()
    written = on_disk(manifest)
    assert written["guests"] == [entry(tmp_path, "db1")]  # the rest intact, unknown fields included
    record = written["discarded"][0]
    assert record["name"] == "web1" and record["uuid"] == UUID and record["discarded_by"] == "alice"
    assert record["reason"] == "rebuilt" and record["saved_at"] == "2026-11-24T13:40:16+00:00"
    assert record["discarded_at"].startswith(time.strftime("%Y-", time.gmtime()))
    assert result["discarded"] == record and result["entry"]["name"] == "web1"
    assert result["image"] == {"path": str(tmp_path / "web1.save"), "existed": True, "removed": True,
                               "size": result["image"]["size"]} and result["image"]["size"] > 0
    assert "removed its image" in result["msg"] and "manifest entry" in result["msg"]
    assert read_manifest(str(manifest)).discarded[0]["name"] == "web1"
    assert oct(manifest.stat().st_mode & 0o777) == "0o600"


def test_a_second_discard_changes_nothing_and_keeps_the_first_record(tmp_path: Path) -> None:
    manifest = drained(tmp_path, "web1")
    first = discard(manifest, "web1", discarded_by="alice")
    text = manifest.read_text()
    again = discard(manifest, "web1", discarded_by="bob")
    assert not again["failed"] and not again["changed"], again["_stdout"]
    assert "nothing to discard" in again["msg"] and "by alice" in again["msg"]
    assert manifest.read_text() == text and again["discarded"] == first["discarded"]


def test_check_mode_changes_nothing_and_diff_shows_both(tmp_path: Path) -> None:
    manifest = drained(tmp_path, "web1")
    text = manifest.read_text()
    result = discard(manifest, "web1", check=True, diff=True)
    assert not result["failed"] and result["changed"], result["_stdout"]
    assert (tmp_path / "web1.save").exists() and manifest.read_text() == text
    manifest_diff, image_diff = result["diff"]
    assert manifest_diff["before"] == text and "discarded" in json.loads(manifest_diff["after"])
    assert json.loads(manifest_diff["after"])["guests"] == []
    assert image_diff["before"] and image_diff["after"] == ""
    assert "would remove" in result["msg"]


def test_an_interrupted_discard_is_finished_by_running_it_again(tmp_path: Path) -> None:
    manifest = drained(tmp_path, "web1")
    image = tmp_path / "web1.save"
    saved = image.read_bytes()
    discard(manifest, "web1", discarded_by="alice")
    image.write_bytes(saved)  # as if the run stopped after writing the manifest
    image.chmod(0o600)
    text = manifest.read_text()
    result = discard(manifest, "web1", discarded_by="bob")
    assert not result["failed"] and result["changed"], result["_stdout"]
    assert not image.exists() and manifest.read_text() == text  # the first record stays
    assert result["discarded"]["discarded_by"] == "alice"


def test_an_entry_whose_image_is_gone_is_discarded(tmp_path: Path) -> None:
    manifest = drained(tmp_path, "web1")
    (tmp_path / "web1.save").unlink()
    result = discard(manifest, "web1")
    assert not result["failed"] and result["changed"], result["_stdout"]
    assert on_disk(manifest)["guests"] == [] and result["image"]["existed"] is False


@pytest.mark.parametrize("make, expected", [
    (lambda d: (d / "web1.save").symlink_to(d / "elsewhere"), "symbolic link"),
    (lambda d: (d / "web1.save").write_text("not an image\n"), "not a save image"),
    (lambda d: os.link(d / "elsewhere", d / "web1.save"), "hard links"),
    (lambda d: os.mkfifo(d / "web1.save", 0o600), "not a regular file"),
])
def test_refuses_what_is_not_the_guests_save_image_and_changes_nothing(tmp_path: Path, make: Any, expected: str) -> None:
    manifest = drained(tmp_path, "db1")
    manifest.write_text(dump_manifest([entry(tmp_path, "db1"), entry(tmp_path, "web1")], str(tmp_path)))
    target = tmp_path / "elsewhere"
    make_savestate_image(target, savestate_record(name="web1"))
    target_bytes = target.read_bytes()
    make(tmp_path)
    text = manifest.read_text()
    before = os.lstat(tmp_path / "web1.save")
    result = discard(manifest, "web1")
    assert result["failed"] and expected in result["msg"], result["_stdout"]
    assert "nothing was changed" in result["msg"].lower()
    after = os.lstat(tmp_path / "web1.save")
    assert (after.st_ino, after.st_mode, after.st_size) == (before.st_ino, before.st_mode, before.st_size)
    assert target.read_bytes() == target_bytes and manifest.read_text() == text


def test_refuses_the_image_of_another_guest(tmp_path: Path) -> None:
    manifest = drained(tmp_path, "web1")
    make_savestate_image(tmp_path / "web1.save", savestate_record(name="db1"))
    result = discard(manifest, "web1")
    assert result["failed"] and "save image of guest 'db1'" in result["msg"], result["_stdout"]
    assert (tmp_path / "web1.save").exists() and on_disk(manifest)["guests"]


def test_refuses_another_uuid(tmp_path: Path) -> None:
    manifest = drained(tmp_path, "web1")
    result = discard(manifest, "web1", uuid=OTHER_UUID)
    assert result["failed"] and f"not {OTHER_UUID}" in result["msg"], result["_stdout"]
    assert (tmp_path / "web1.save").exists()


def test_refuses_an_image_another_process_has_open(tmp_path: Path) -> None:
    manifest = drained(tmp_path, "web1")
    image = tmp_path / "web1.save"
    holder = subprocess.Popen(["sleep", "60"], stdin=open(image, "rb"))  # as a restore loading it would
    try:
        result = discard(manifest, "web1")
    finally:
        holder.kill()
        holder.wait()
    assert result["failed"] and f"sleep (pid {holder.pid})" in result["msg"], result["_stdout"]
    assert image.exists() and on_disk(manifest)["guests"]


def test_refuses_a_bad_name_and_a_relative_manifest(tmp_path: Path) -> None:
    manifest = drained(tmp_path, "web1")
    assert "guest name" in discard(manifest, "../web1")["msg"]
    assert "absolute" in run_module("discard", {"manifest": "drain/savestate-manifest.json", "name": "web1"})["msg"]
    assert (tmp_path / "web1.save").exists()


def test_without_a_manifest_the_image_is_removed_and_nothing_recorded(tmp_path: Path) -> None:
    make_savestate_image(tmp_path / "web1.save", savestate_record(name="web1"))
    result = discard(tmp_path / "savestate-manifest.json", "web1")
    assert not result["failed"] and result["changed"] and result["discarded"] is None, result["_stdout"]
    assert not (tmp_path / "web1.save").exists() and not (tmp_path / "savestate-manifest.json").exists()
    assert "no manifest" in result["msg"]
    again = discard(tmp_path / "savestate-manifest.json", "web1")
    assert not again["failed"] and not again["changed"], again["_stdout"]


def test_a_drain_keeps_the_records_of_guests_it_does_not_save_again(tmp_path: Path) -> None:
    manifest = drained(tmp_path, "web1", "db1")
    discard(manifest, "web1")
    discard(manifest, "db1")
    make_savestate_image(tmp_path / "db1.save", savestate_record(name="db1"))
    image = {"path": str(tmp_path / "db1.save"), "name": "db1", "uuid": UUID, "was_running": True, "format": "raw"}
    written = run_module("drain_manifest", {"path": str(manifest), "state": "present", "saved": [image]})
    assert not written["failed"], written["_stdout"]
    assert [record["name"] for record in on_disk(manifest)["discarded"]] == ["web1"]
    assert [guest["name"] for guest in on_disk(manifest)["guests"]] == ["db1"]
