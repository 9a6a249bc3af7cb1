"""Fixtures for every unit test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._image import journal_path


@pytest.fixture(autouse=True)
def no_journal_left_behind(tmp_path: Path) -> Iterator[None]:
    """Remove the edit journals a test left for its images (they live in the host's state directory).

    A journal outlives its test's files otherwise, and a later image that gets the
    same inode would meet it. Only this test's files are looked at: tests run in
    parallel under ansible-test.
    """
    yield
    for image in tmp_path.rglob("*"):
        if image.is_file() and not image.is_symlink():
            try:
                os.unlink(journal_path(str(image)))
            except OSError:
                pass
