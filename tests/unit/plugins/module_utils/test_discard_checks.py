"""The discard's pieces: manifest records (validation, old manifests) and what happens to the removed file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._discard import (
    DiscardError,
    DiscardRequest,
    _remove,
    discard_guest,
    holders,
    judge_image,
)
from ansible_collections.savestate.qemu.plugins.module_utils._manifest import (
    ManifestError,
    discard_for,
    discard_record,
    dump_discard,
    parse_manifest,
    parse_text,
)
from ansible_collections.savestate.qemu.tests.unit.image_helpers import make_savestate_image, savestate_record

DIR = "/var/lib/savestate/drain"
UUID = "5a5a0001-0000-4000-8000-00000000000a"


def entry(name: str) -> dict[str, Any]:
    return {"name": name, "uuid": UUID, "path": f"{DIR}/{name}.save", "state": "running", "saved_at": "2026-11-24T13:40:16Z"}


def test_a_manifest_without_discarded_reads_and_writes_as_before() -> None:
    read = parse_manifest({"version": 1, "guests": [entry("web1")]}, DIR)
    assert read.discarded == () and read.as_dict() == {"version": 1, "guests": [entry("web1")]}


def test_a_discard_record_replaces_the_entry_and_keeps_the_rest() -> None:
    manifest = parse_manifest({"version": 1, "guests": [entry("web1"), entry("db1")]}, DIR)
    record = discard_record("web1", entry("web1"), "2026-11-24T15:00:00+00:00", "alice", None)
    written = parse_text(dump_discard(manifest, record, DIR), DIR)
    assert written.guests == (entry("db1"),) and written.discarded == (record,)
    assert record["path"] == f"{DIR}/web1.save" and record["saved_at"] == "2026-11-24T13:40:16Z"
    assert discard_for(written, "web1") == record and discard_for(written, "db1") is None
    again = parse_text(dump_discard(written, {**record, "discarded_by": "bob"}, DIR), DIR)
    assert [r["discarded_by"] for r in again.discarded] == ["bob"]  # one record per name


@pytest.mark.parametrize("discarded, message", [
    ({"name": "web1"}, "'discarded' must be a list"),
    ([{"uuid": UUID}], "discarded[0] has no 'name'"),
    ([{"name": "../etc"}], "discarded[0]: 'name' must be a guest name"),
    ([{"name": "web1", "uuid": "no"}], "'uuid' must be a UUID"),
    ([{"name": "web1", "reason": 3}], "'reason' must be a string"),
    ([{"name": "web1"}, {"name": "web1"}], "lists 'web1' twice"),
])
def test_malformed_discard_records_are_refused(discarded: Any, message: str) -> None:
    with pytest.raises(ManifestError, match=None) as caught:
        parse_manifest({"version": 1, "guests": [], "discarded": discarded}, DIR)
    assert message in str(caught.value)


def test_unknown_fields_of_a_record_are_kept() -> None:
    read = parse_manifest({"version": 1, "guests": [], "discarded": [{"name": "web1", "ticket": "OPS-1"}]}, DIR)
    assert read.as_dict()["discarded"] == [{"name": "web1", "ticket": "OPS-1"}]


def test_holders_names_the_processes_with_the_file_open(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    with open(path, "rb"):
        assert holders(os.stat(path)) == []  # this process is not counted
    with open(path, "rb") as held:
        holder = subprocess.Popen(["sleep", "60"], stdin=held)
    try:
        assert holders(os.stat(path)) == [f"sleep (pid {holder.pid})"]
    finally:
        holder.kill()
        holder.wait()


def test_the_removed_file_is_emptied_for_whoever_opened_it_before(tmp_path: Path) -> None:
    path = make_savestate_image(tmp_path / "web01.save")
    late = os.open(path, os.O_RDONLY)  # a restore that opened it between the check and the removal
    try:
        image = judge_image(str(path), "web01", None)
        assert image is not None and image.record is not None and image.record.name == "web01"
        _remove(image)
        image.close()
        assert not path.exists() and os.fstat(late).st_size == 0 and os.pread(late, 16, 0) == b""
    finally:
        os.close(late)


def test_a_partial_image_is_a_save_image_too(tmp_path: Path) -> None:
    path = make_savestate_image(tmp_path / "web01.save", finalize=False)
    image = judge_image(str(path), "web01", None)
    assert image is not None
    image.close()


def test_a_damaged_image_with_the_magic_is_discarded_by_name(tmp_path: Path) -> None:
    path = make_savestate_image(tmp_path / "web01.save", savestate_record(name="web01"))
    os.truncate(path, 200)  # the header survives, the data area does not
    outcome = discard_guest(DiscardRequest(name="web01", manifest=str(tmp_path / "savestate-manifest.json")))
    assert outcome.changed and not path.exists()


def test_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "web01.save").mkdir()
    with pytest.raises(DiscardError):
        judge_image(str(tmp_path / "web01.save"), "web01", None)
    assert (tmp_path / "web01.save").is_dir()
