"""The README is the collection's page on Galaxy: every link must work there.

Galaxy shows the README of the tarball without the repository around it, so a
relative link (``docs/user-guide.md``) leads nowhere. Links point into the
repository by absolute address, and what they point at must exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = "https://github.com/savestate/savestate.qemu/"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _links() -> list[str]:
    return LINK.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def test_every_link_is_absolute() -> None:
    relative = [link for link in _links() if not link.startswith(("https://", "#"))]
    assert not relative, f"relative links break on Galaxy: {relative}"


@pytest.mark.parametrize("link", [link for link in _links() if link.startswith(REPOSITORY)])
def test_links_into_the_repository_name_files_that_exist(link: str) -> None:
    match = re.match(re.escape(REPOSITORY) + r"(?:blob|tree)/main/([^#]+)", link)
    if match is None:  # the repository itself
        assert link.rstrip("/") + "/" == REPOSITORY
        return
    assert (ROOT / match.group(1)).exists(), f"{link} names a path that is not in the repository"
