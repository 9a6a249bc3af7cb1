"""Replacing disk paths inside a QEMU command line (used when an image's disks move)."""

from __future__ import annotations

import json

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ansible_collections.savestate.qemu.plugins.module_utils._qemu_argv import (
    replace_disk_paths,
    split_option_string,
)

QEMU = "/usr/bin/qemu-system-x86_64"


@pytest.mark.parametrize("value, expected", [
    ("file=/a.img,if=virtio", "file=/b,,c.img,if=virtio"),
    ("if=none,id=d0,file=/a.img", "if=none,id=d0,file=/b,,c.img"),
    ("file.filename=/a.img,file.driver=file,format=raw", "file.filename=/b,,c.img,file.driver=file,format=raw"),
    ("file=/a.img", "file=/b,,c.img"),
])
def test_drive(value, expected):
    assert replace_disk_paths([QEMU, "-drive", value], {"/a.img": "/b,c.img"}) == [QEMU, "-drive", expected]


def test_escaped_commas_in_the_old_path_and_elsewhere_are_kept():
    argv = [QEMU, "-drive", "file=/x,,y.img,serial=a,,b,,,cache=none"]
    assert replace_disk_paths(argv, {"/x,y.img": "/z"}) == [QEMU, "-drive", "file=/z,serial=a,,b,,,cache=none"]


def test_blockdev_json_nested_and_key_value():
    nested = {"driver": "qcow2", "node-name": "fmt", "file": {"driver": "file", "filename": "/a.img"}}
    argv = [QEMU, "-blockdev", json.dumps(nested), "-blockdev", "driver=file,node-name=p,filename=/a.img",
            "-blockdev", "driver=qcow2,node-name=q,file=/a.img"]  # "file" names a node here, not a path
    result = replace_disk_paths(argv, {"/a.img": "/ü b.img"})
    assert json.loads(result[2])["file"]["filename"] == "/ü b.img"
    assert result[4] == "driver=file,node-name=p,filename=/ü b.img"
    assert result[6] == argv[6]


def test_shorthand_options_and_unrelated_options():
    argv = [QEMU, "-hda", "/a.img", "-kernel", "/a.img", "-cdrom", "/a.img", "-name", "file=/a.img"]
    assert replace_disk_paths(argv, {"/a.img": "/b.img"}) == [
        QEMU, "-hda", "/b.img", "-kernel", "/a.img", "-cdrom", "/b.img", "-name", "file=/a.img"]


def test_invalid_json_is_left_alone():
    argv = [QEMU, "-blockdev", "{not json"]
    assert replace_disk_paths(argv, {"/a": "/b"}) == argv


@given(st.lists(st.text(max_size=12), max_size=8), st.dictionaries(st.text(min_size=1, max_size=6),
                                                                   st.text(max_size=6), max_size=3))
def test_replacement_keeps_unmatched_parts_byte_for_byte(parts, mapping):
    value = ",".join(part.replace(",", ",,") for part in parts)
    assume(not value.startswith("-"))  # that would be the next option, not the value of -drive
    argv = [QEMU, "-drive", value]
    result = replace_disk_paths(argv, mapping)
    before, after = split_option_string(value), split_option_string(result[2])
    assert len(before) == len(after)
    for old, new in zip(before, after):
        key, sep, path = old.partition("=")
        if sep and (key in ("file", "filename") or key.endswith(".filename")) and path in mapping:
            assert new == f"{key}={mapping[path]}"
        else:
            assert new == old
