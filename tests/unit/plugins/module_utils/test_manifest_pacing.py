"""The manifest fields paced restores use: ``priority`` (new, optional) and ``saved_at`` (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._manifest import (
    MAX_PRIORITY,
    ManifestError,
    dump_manifest,
    entry_from_image,
    parse_manifest,
)

DIR = "/var/lib/savestate/drain"


def entry(name: str = "web1", **fields: Any) -> dict[str, Any]:
    return {"name": name, "path": f"{DIR}/{name}.save", "state": "running", "saved_at": "2026-11-24T13:40:16Z",
            **fields}


def digest(path: str, algorithm: str) -> Optional[str]:
    return None


@pytest.mark.parametrize("value", [None, 0, 7, -3, MAX_PRIORITY, -MAX_PRIORITY])
def test_a_priority_is_a_whole_number_or_null(value: Any) -> None:
    read = parse_manifest({"version": 1, "guests": [entry(priority=value)]}, DIR)
    assert read.guests[0]["priority"] == value and read.version == 1


@pytest.mark.parametrize("value", ["7", 1.5, True, MAX_PRIORITY + 1, [1]])
def test_a_priority_of_another_kind_is_refused_by_name(value: Any) -> None:
    with pytest.raises(ManifestError, match=r"guests\[0\] \('web1'\): 'priority' must be a whole number"):
        parse_manifest({"version": 1, "guests": [entry(priority=value)]}, DIR)


def test_a_manifest_without_priorities_still_reads_and_writes_none() -> None:
    read = parse_manifest({"version": 1, "guests": [entry()]}, DIR)
    assert "priority" not in read.guests[0]
    assert "priority" not in json.loads(dump_manifest([entry()], DIR))["guests"][0]


def test_the_drain_records_the_priority_given_with_the_image(tmp_path: Path) -> None:
    (tmp_path / "web1.save").write_bytes(b"QEVM")
    image = {"path": str(tmp_path / "web1.save"), "name": "web1", "was_running": True, "format": "raw",
             "metadata": {"saved_at": "2026-11-24T13:40:16+00:00"}}
    made = entry_from_image({**image, "priority": 5}, None, digest)
    assert made["priority"] == 5 and made["saved_at"] == "2026-11-24T13:40:16+00:00"
    assert "priority" not in entry_from_image(image, None, digest)
    assert json.loads(dump_manifest([made], str(tmp_path)))["guests"][0]["priority"] == 5
