"""replace_file: the old content or the new one, never a mix, and nothing planted followed or left over."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._atomic_file import open_directory, replace_file


@pytest.fixture
def directory(tmp_path: Path):
    fd = open_directory(str(tmp_path))
    yield fd
    os.close(fd)


def test_the_file_gets_the_new_content_and_mode_whatever_the_umask(tmp_path: Path, directory: int) -> None:
    target = tmp_path / "record.json"
    target.write_text("old")
    old_umask = os.umask(0o077)
    try:
        replace_file(directory, "record.json", b"new" * 100000, mode=0o640)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new" * 100000
    assert target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_failed_rename_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path, directory: int) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(OSError):
        replace_file(directory, "busy", b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    assert (tmp_path / "busy" / "x").exists()


def test_a_link_planted_at_the_temporary_name_is_neither_followed_nor_removed(
        tmp_path: Path, directory: int) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "record.tmp").symlink_to(victim)
    (tmp_path / "record").write_text("old")
    with pytest.raises(FileExistsError):
        replace_file(directory, "record", b"new", temporary="record.tmp")
    assert victim.read_text() == "precious" and (tmp_path / "record").read_text() == "old"
    assert (tmp_path / "record.tmp").is_symlink()
