"""The save bandwidth record: written atomically after a save, read back for the estimate, never trusted blindly."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._bandwidth import (
    MAX_ENTRIES,
    MAX_FILE_BYTES,
    RECORD_NAME,
    lookup,
    parse_record,
    read_records,
    record_save,
)
from ansible_collections.savestate.qemu.plugins.module_utils._timestamps import parse_utc

MIB = 1048576
STATS = {"bytes": 300 * MIB, "duration_s": 1.5, "throughput_mib_s": 200.0}


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def entry(**changes: Any) -> dict[str, Any]:
    good = {"directory": "/var/lib/savestate/drain", "format": "raw", "bytes": 1000, "seconds": 0.5, "mib_s": 2.0,
            "measured_at": 1764500000.0}
    return {**good, **changes}


def record(*entries: dict[str, Any], version: Any = 1) -> bytes:
    return json.dumps({"version": version, "saves": list(entries)}).encode()


def test_a_save_is_recorded_and_found_for_its_directory_and_format(state: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    assert lookup(str(images), str(state)) == {}  # nothing recorded: no state directory yet
    assert record_save(str(images / "web1.save"), "raw", STATS, str(state)) is None
    found = lookup(str(images) + "/", str(state))
    assert set(found) == {"raw"}
    assert found["raw"]["mib_s"] == 200.0 and found["raw"]["bytes"] == 300 * MIB and found["raw"]["seconds"] == 1.5
    assert found["raw"]["directory"] == str(images.resolve())
    assert found["raw"]["measured_at"].endswith("+00:00")  # written as saved_at is
    assert abs(parse_utc(found["raw"]["measured_at"]) - time.time()) < 60
    assert lookup(str(tmp_path / "elsewhere"), str(state)) == {}
    info = (state / RECORD_NAME).stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and stat.S_IMODE(state.stat().st_mode) == 0o700
    # the last save of a directory and format replaces its entry; other formats keep theirs
    assert record_save(str(images / "web1.save"), "raw", {**STATS, "throughput_mib_s": 50.0}, str(state)) is None
    assert record_save(str(images / "web1.save"), "zstd", STATS, str(state)) is None
    found = lookup(str(images), str(state))
    assert found["raw"]["mib_s"] == 50.0 and found["zstd"]["mib_s"] == 200.0 and len(read_records(str(state))) == 2
    assert sorted(os.listdir(state)) == [RECORD_NAME]  # no temporary file left behind


def test_nothing_worth_recording_is_not_recorded(state: Path, tmp_path: Path) -> None:
    for stats in (None, {}, {"bytes": 0, "duration_s": 1.0, "throughput_mib_s": 0.0},
                  {"bytes": 10, "duration_s": 0.0, "throughput_mib_s": None}):
        assert record_save(str(tmp_path / "a.save"), "raw", stats, str(state)) is None
    assert not (state / RECORD_NAME).exists()


def test_the_record_keeps_the_newest_entries_only(state: Path, tmp_path: Path) -> None:
    for number in range(MAX_ENTRIES + 5):
        assert record_save(str(tmp_path / f"d{number}" / "a.save"), "raw", STATS, str(state)) is None
    kept = read_records(str(state))
    assert len(kept) == MAX_ENTRIES and (state / RECORD_NAME).stat().st_size < MAX_FILE_BYTES
    assert lookup(str(tmp_path / f"d{MAX_ENTRIES + 4}"), str(state)) and not lookup(str(tmp_path / "d0"), str(state))


def _record_one(state: str, directory: str) -> None:
    assert record_save(os.path.join(directory, "a.save"), "raw", STATS, state) is None


def test_saves_finishing_at_once_each_keep_their_entry(state: Path, tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_record_one, args=(str(state), str(tmp_path / f"d{n}"))) for n in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    assert len(read_records(str(state))) == 8


def test_a_failed_write_keeps_the_old_record_and_never_raises(state: Path, tmp_path: Path) -> None:
    assert record_save(str(tmp_path / "a.save"), "raw", STATS, str(state)) is None
    before = (state / RECORD_NAME).read_bytes()
    os.chmod(state / RECORD_NAME, 0o600)
    # the record's name taken by a directory: the rename over it fails, the temporary file goes
    (state / RECORD_NAME).rename(state / "saved")
    (state / RECORD_NAME).mkdir()
    problem = record_save(str(tmp_path / "b" / "a.save"), "raw", STATS, str(state))
    assert problem and "not recorded" in problem and RECORD_NAME in problem
    assert sorted(os.listdir(state)) == [RECORD_NAME, "saved"] and (state / "saved").read_bytes() == before


def test_an_unsafe_state_directory_is_neither_read_nor_written(state: Path, tmp_path: Path) -> None:
    assert record_save(str(tmp_path / "a.save"), "raw", STATS, str(state)) is None
    os.chmod(state, 0o777)
    assert read_records(str(state)) == [] and lookup(str(tmp_path), str(state)) == {}
    problem = record_save(str(tmp_path / "a.save"), "raw", STATS, str(state))
    assert problem and "not recorded" in problem
    link = tmp_path / "link"
    os.chmod(state, 0o700)
    link.symlink_to(state)
    assert read_records(str(link)) == []


def write_record(state: Path, data: bytes) -> Path:
    state.mkdir(mode=0o700, exist_ok=True)
    path = state / RECORD_NAME
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


@pytest.mark.parametrize("data", [
    b"", b"not json", b"\xff\xfe", b"[" * 50000 + b"]" * 50000, b"[]", b"null", record(entry(), version=2),
    record(entry(), version="1"), json.dumps({"version": 1, "saves": {"a": 1}}).encode(),
    b'{"version": 1, "saves": [' + b"1" * 5000 + b"]}", b" " * (MAX_FILE_BYTES + 1) + record(entry()),
])
def test_a_malformed_record_is_ignored(state: Path, data: bytes) -> None:
    write_record(state, data)
    assert read_records(str(state)) == [] and lookup("/var/lib/savestate/drain", str(state)) == {}


@pytest.mark.parametrize("bad", [
    {"directory": "relative/dir"}, {"directory": 7}, {"directory": "/" + "d" * 5000}, {"directory": "/a\0b"},
    {"format": "RAW; rm -rf /"}, {"format": ""}, {"format": ["raw"]}, {"bytes": True}, {"bytes": -1},
    {"bytes": 1.5}, {"bytes": 2 ** 80}, {"seconds": 0}, {"seconds": "1"}, {"mib_s": float("inf")},
    {"mib_s": float("nan")}, {"mib_s": 1e300}, {"mib_s": None}, {"measured_at": -5}, {"measured_at": "today"},
])
def test_an_entry_that_does_not_validate_is_dropped_the_others_are_kept(state: Path, bad: dict[str, Any]) -> None:
    good = entry(directory="/other")
    write_record(state, record(entry(**bad), good, "junk", None))
    assert [found.directory for found in read_records(str(state))] == ["/other"]
    assert lookup("/var/lib/savestate/drain", str(state)) == {}


def test_parse_record_bounds_the_number_of_entries() -> None:
    many = [entry(directory=f"/d{n}") for n in range(MAX_ENTRIES * 3)]
    assert len(parse_record(json.dumps({"version": 1, "saves": many}).encode())) <= MAX_ENTRIES


def test_a_record_that_is_not_a_plain_file_of_ours_is_ignored(state: Path, tmp_path: Path) -> None:
    target = tmp_path / "planted.json"
    target.write_bytes(record(entry(mib_s=1e6)))
    state.mkdir(mode=0o700)
    (state / RECORD_NAME).symlink_to(target)
    assert read_records(str(state)) == []
    (state / RECORD_NAME).unlink()
    os.mkfifo(state / RECORD_NAME, 0o600)
    assert read_records(str(state)) == []  # returns at once: a FIFO is never read
    (state / RECORD_NAME).unlink()
    path = write_record(state, record(entry()))
    os.chmod(path, 0o666)
    assert read_records(str(state)) == []
    os.chmod(path, 0o600)
    assert len(read_records(str(state))) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="chowns the record")
def test_a_record_of_another_user_is_ignored_and_cannot_be_planted(state: Path, tmp_path: Path) -> None:
    path = write_record(state, record(entry()))
    os.chown(path, 65534, 65534)
    assert read_records(str(state)) == []
    os.chown(path, 0, 0)
    assert len(read_records(str(state))) == 1
    # an unprivileged user cannot write the record: the state directory is root's, 0700
    attack = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "sh", "-c",
                             f"echo '{{}}' > {path}"], capture_output=True, check=False)
    assert attack.returncode != 0 and len(read_records(str(state))) == 1
