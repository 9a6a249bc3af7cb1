"""Recorded times: written as ISO 8601 UTC to the second, read back whatever zone spelling they carry."""

from __future__ import annotations

import time

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._timestamps import parse_utc, utc_text


def test_a_written_time_reads_back_to_the_second() -> None:
    assert utc_text(1764000016.7) == "2025-11-24T16:00:16+00:00"
    assert parse_utc(utc_text(1764000016)) == 1764000016
    assert abs(parse_utc(utc_text()) - time.time()) < 2


@pytest.mark.parametrize("text", ["2025-11-24T16:00:16Z", "2025-11-24T16:00:16z", "2025-11-24T16:00:16",
                                  " 2025-11-24T17:00:16+01:00 "])
def test_z_no_zone_and_other_zones_are_read_as_the_same_moment(text: str) -> None:
    assert parse_utc(text) == 1764000016


@pytest.mark.parametrize("text", [None, "", "  ", "yesterday", 1764000016, "2025-13-01T00:00:00"])
def test_what_is_not_a_time_reads_as_none(text: object) -> None:
    assert parse_utc(text) is None
