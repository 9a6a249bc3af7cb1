"""The drain manifest: versions, validation, hostile content, files on disk, fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._manifest import (
    FORMAT_VERSION,
    UNVERSIONED_NOTE,
    ManifestError,
    ManifestVersionError,
    dump_manifest,
    entry_from_image,
    fingerprint,
    image_path_problem,
    image_problem,
    parse_manifest,
    parse_text,
    read_manifest,
    write_manifest,
)

DIR = "/var/lib/savestate/drain"
UUID = "5a5a0001-0000-4000-8000-00000000000a"


def digest(path: str, algorithm: str) -> Optional[str]:
    return hashlib.new(algorithm, Path(path).read_bytes()).hexdigest()


def entry(name: str = "web1", directory: str = DIR, **fields: Any) -> dict[str, Any]:
    """An entry as host_drain wrote it before this module (collection 0.x main)."""
    return {"name": name, "uuid": UUID, "path": f"{directory}/{name}.save", "state": "running", "format": "raw",
            "size": 4096, "memory_mib": 128, "machine": "pc-q35-10.0", "saved_at": "2026-11-24T13:40:16Z",
            "fingerprint": {"size": 4096, "mtime": 1764000016.25}, **fields}


def manifest(*entries: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"version": FORMAT_VERSION, "guests": list(entries), **top}


# --- versions ------------------------------------------------------------------------

def test_a_current_manifest_reads_as_written_sorted_by_name() -> None:
    read = parse_manifest(manifest(entry("web2"), entry("db1")), DIR)
    assert read.version == 1 and read.notes == ()
    assert [e["name"] for e in read.guests] == ["db1", "web2"]
    assert read.as_dict() == {"version": 1, "guests": [entry("db1"), entry("web2")]}


def test_a_manifest_without_version_reads_as_version_1_and_says_so() -> None:
    read = parse_manifest({"guests": [entry()]}, DIR)
    assert read.version == 1 and read.notes == (UNVERSIONED_NOTE,)
    assert read.as_dict()["version"] == FORMAT_VERSION


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 99])
def test_a_newer_version_is_refused_with_what_to_do(version: int) -> None:
    with pytest.raises(ManifestVersionError) as raised:
        parse_manifest(manifest(entry(), version=version), DIR)
    message = str(raised.value)
    assert f"format version {version}" in message and "newer savestate.qemu wrote it" in message
    assert "ansible-galaxy collection install --upgrade savestate.qemu" in message


@pytest.mark.parametrize("version", [0, -1, "1", 1.0, True, None, [1]])
def test_a_version_that_is_no_version_is_refused(version: Any) -> None:
    with pytest.raises(ManifestVersionError, match="which no savestate.qemu writes"):
        parse_manifest(manifest(entry(), version=version), DIR)


# --- structure and fields ----------------------------------------------------------

@pytest.mark.parametrize("data, fragment", [
    ([], "must be a JSON object"),
    ({"version": 1}, "'guests' must be a list"),
    ({"version": 1, "guests": {"web1": {}}}, "'guests' must be a list"),
    (manifest("web1"), "guests[0] must be an object, not str"),
])
def test_the_structure_is_checked(data: Any, fragment: str) -> None:
    with pytest.raises(ManifestError) as raised:
        parse_manifest(data, DIR)
    assert fragment in str(raised.value)


@pytest.mark.parametrize("field", ["name", "path", "state"])
def test_a_required_field_missing_is_named(field: str) -> None:
    broken = entry()
    del broken[field]
    with pytest.raises(ManifestError, match=f"guests\\[0\\].* has no '{field}'"):
        parse_manifest(manifest(broken), DIR)


@pytest.mark.parametrize("field, value, fragment", [
    ("name", "../etc", "'name' must be a guest name"),
    ("name", "", "'name' must be a guest name"),
    ("name", 7, "'name' must be a guest name"),
    ("state", "shutoff", "'state' must be one of running, paused"),
    ("uuid", "not-a-uuid", "'uuid' must be a UUID"),
    ("format", "tar", "'format' must be one of raw, gzip"),
    ("size", -1, "'size' must be a whole number"),
    ("size", "4096", "'size' must be a whole number"),
    ("size", True, "'size' must be a whole number"),
    ("memory_mib", 1.5, "'memory_mib' must be a whole number"),
    ("machine", ["pc"], "'machine' must be a string"),
    ("fingerprint", "abc", "'fingerprint' must be an object"),
    ("fingerprint", {"size": "1"}, "size must be a whole number"),
    ("fingerprint", {"mtime": float("nan")}, "mtime must be a number"),
    ("fingerprint", {"checksum": "sha256"}, "checksum must be ALGORITHM:HEX"),
    ("fingerprint", {"checksum": "crc32:abcd"}, "checksum must be ALGORITHM:HEX"),
    ("path", 5, "'path' must be a string"),
])
def test_a_field_of_the_wrong_type_is_named(field: str, value: Any, fragment: str) -> None:
    with pytest.raises(ManifestError) as raised:
        parse_manifest(manifest(entry(**{field: value})), DIR)
    assert "guests[0]" in str(raised.value) and fragment in str(raised.value)


def test_optional_fields_may_be_null_or_absent_and_unknown_fields_are_kept() -> None:
    sparse = {"name": "web1", "path": f"{DIR}/web1.save", "state": "paused", "uuid": None, "machine": None,
              "added_by_a_later_minor": {"x": 1}}
    assert parse_manifest(manifest(sparse), DIR).guests == (sparse,)


def test_two_entries_of_one_name_or_one_image_are_refused() -> None:
    with pytest.raises(ManifestError, match="both named 'web1'"):
        parse_manifest(manifest(entry(), entry()), DIR)
    with pytest.raises(ManifestError, match="same image"):
        parse_manifest(manifest(entry(), entry("web2", path=f"{DIR}/web1.save")), DIR)


# --- hostile paths -----------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/etc/shadow",
    "web1.save",
    f"{DIR}/../../../etc/shadow",
    f"{DIR}/sub/web1.save",
    f"{DIR}/..",
    f"{DIR}/web1.save/",
    f"{DIR}2/web1.save",
    "/var/lib/savestate/web1.save",
    f"{DIR}/\x00x",
])
def test_an_image_outside_the_manifests_directory_is_refused(path: str) -> None:
    with pytest.raises(ManifestError, match="guests\\[0\\] \\('web1'\\): 'path' must"):
        parse_manifest(manifest(entry(path=path)), DIR)


def test_paths_are_compared_normalised() -> None:
    assert image_path_problem(f"{DIR}//web1.save", DIR + "/") is None
    assert parse_manifest(manifest(entry(path=f"{DIR}/./web1.save")), DIR + "/").guests[0]["path"] == f"{DIR}/web1.save"


def test_the_text_must_be_json() -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_text("version: 1\nguests: []\n", DIR)


def test_the_writer_checks_what_readers_check() -> None:
    text = dump_manifest([entry("web2"), entry("db1")], DIR)
    assert json.loads(text) == {"version": 1, "guests": [entry("db1"), entry("web2")]}
    assert text.endswith("}\n")
    with pytest.raises(ManifestError, match="'path' must name a file directly inside"):
        dump_manifest([entry(path="/tmp/web1.save")], DIR)


# --- the file ------------------------------------------------------------------------

def test_read_and_write_a_manifest_file(tmp_path: Path) -> None:
    path = tmp_path / "savestate-manifest.json"
    assert read_manifest(str(path)) is None
    write_manifest(str(path), dump_manifest([entry(directory=str(tmp_path))], str(tmp_path)))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    read = read_manifest(str(path))
    assert read is not None and read.guests[0]["name"] == "web1"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_a_bad_manifest_file_is_named_and_nothing_is_changed(tmp_path: Path) -> None:
    path = tmp_path / "savestate-manifest.json"
    path.write_text(json.dumps(manifest(entry(directory=str(tmp_path)), version=2)))
    with pytest.raises(ManifestVersionError) as raised:
        read_manifest(str(path))
    assert str(raised.value).startswith(f"the drain manifest {path} cannot be used: it is of format version 2")
    assert str(raised.value).endswith("Nothing was changed")


def test_a_manifest_others_may_write_or_a_symlink_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "savestate-manifest.json"
    path.write_text(json.dumps(manifest()))
    path.chmod(0o666)
    with pytest.raises(ManifestError, match="writable by group or others"):
        read_manifest(str(path))
    path.chmod(0o600)
    link = tmp_path / "link.json"
    link.symlink_to(path)
    with pytest.raises(ManifestError, match="symbolic link"):
        read_manifest(str(link))


def test_a_manifest_that_is_not_text_or_too_large_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ManifestError, match="not UTF-8"):
        read_manifest(str(path))
    with path.open("wb") as handle:
        handle.truncate(16 * 1024 * 1024 + 1)
    with pytest.raises(ManifestError, match="larger than"):
        read_manifest(str(path))


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    target.mkdir()  # rename over a directory fails
    (target / "x").write_text("")
    with pytest.raises(ManifestError, match="cannot write the drain manifest"):
        write_manifest(str(target), "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    with pytest.raises(ManifestError, match="cannot write the drain manifest .*: No such file or directory"):
        write_manifest(str(tmp_path / "none" / "manifest.json"), "{}\n")


# --- entries and fingerprints ------------------------------------------------------

def saved_image(tmp_path: Path, name: str = "web1", **fields: Any) -> dict[str, Any]:
    """The save module's ``image`` result for an image it wrote."""
    path = tmp_path / f"{name}.save"
    path.write_bytes(b"QEVM" * 256)
    return {"path": str(path), "name": name, "uuid": UUID, "was_running": False, "format": "zstd",
            "memory_kib": 262144, "machine": "pc-q35-10.0", "metadata": {"saved_at": "2026-11-24T13:40:16Z"},
            **fields}


def test_an_entry_from_a_saved_image(tmp_path: Path) -> None:
    made = entry_from_image(saved_image(tmp_path), "sha256", digest)
    mtime = (tmp_path / "web1.save").stat().st_mtime
    assert made == {"name": "web1", "uuid": UUID, "path": str(tmp_path / "web1.save"), "state": "paused",
                    "format": "zstd", "size": 1024, "memory_mib": 256, "machine": "pc-q35-10.0",
                    "saved_at": "2026-11-24T13:40:16Z",
                    "fingerprint": {"size": 1024, "mtime": mtime,
                                    "checksum": "sha256:" + hashlib.sha256(b"QEVM" * 256).hexdigest()}}
    assert "checksum" not in entry_from_image(saved_image(tmp_path), None, digest)["fingerprint"]


def test_an_entry_needs_its_image(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="is gone or not a regular file"):
        fingerprint(str(tmp_path / "none.save"), None, digest)
    with pytest.raises(ManifestError, match="save module's 'image' result"):
        entry_from_image({"name": "web1"}, None, digest)


def test_image_problems(tmp_path: Path) -> None:
    made = entry_from_image(saved_image(tmp_path), None, digest)
    path = Path(made["path"])
    assert image_problem(made, True, digest) == (True, None)
    os.utime(path, (1, made["fingerprint"]["mtime"] + 5))
    assert image_problem(made, True, digest) == (True, "the image was modified after the drain")
    assert image_problem(made, False, digest) == (True, None)
    path.write_bytes(b"QEVM")
    assert image_problem(made, True, digest) == (True, "the image changed size since the drain (1024 -> 4 bytes)")
    path.unlink()
    assert image_problem(made, True, digest) == (False, f"the image {path} is gone")
    path.symlink_to("/etc/hostname")
    assert image_problem(made, False, digest) == (False, f"the image {path} is not a regular file")


def test_a_checksum_wins_over_the_modification_time(tmp_path: Path) -> None:
    made = entry_from_image(saved_image(tmp_path), "sha1", digest)
    path = Path(made["path"])
    os.utime(path, (1, 1))  # touched, same bytes: the checksum says it is the same image
    assert image_problem(made, True, digest) == (True, None)
    path.write_bytes(b"QEVX" * 256)
    assert image_problem(made, True, digest) == (True, "the image's checksum differs from the manifest's")


def test_an_image_without_fingerprint_is_not_restored_blind(tmp_path: Path) -> None:
    made = entry_from_image(saved_image(tmp_path), None, digest)
    del made["fingerprint"]
    exists, problem = image_problem(made, True, digest)
    assert exists and problem and "no fingerprint" in problem and "host_restore_verify_image: false" in problem
