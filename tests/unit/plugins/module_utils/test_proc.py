"""The /proc readers and parsers: hostile content never raises, bytes round-trip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._proc import (
    fs_bytes,
    json_text,
    parse_cmdline,
    parse_stat,
    parse_status,
    process_gone,
    process_start_time,
    read_cmdline,
    read_cwd,
    read_stat,
    read_status,
    socket_inode,
    socket_inodes,
)

STAT_TAIL = "S 1 100 100 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 4242 1000 10"


@pytest.mark.parametrize("comm", ["qemu-system-x86", "a) (b", "x)", ")(", "with space", "", "new\nline", "((((("])
def test_stat_comm_may_hold_anything(comm):
    stat = parse_stat(f"100 ({comm}) {STAT_TAIL}\n")
    assert stat is not None
    assert (stat.comm, stat.state, stat.ppid, stat.start_time) == (comm, "S", 1, 4242)


@pytest.mark.parametrize("text", [None, "", "100", "100 (x", "100 x) S 1", "100 (x) S", "100 (x) S notanumber",
                                  ") 100 (x", "100 (x) S 1" + " 9" * 17 + " " + "9" * 5000, "100 (x) S ¹"])
def test_stat_garbage_is_no_answer_or_partial(text):
    stat = parse_stat(text)  # never raises
    if stat is not None:
        assert stat.start_time is None


def test_status_real_ids_and_groups():
    text = "Name:\tqemu\nUid:\t107\t0\t0\t0\nGid:\t107\t0\t0\t0\nGroups:\t36 107 \nUid:\t0\t0\t0\t0\n"
    status = parse_status(text)
    assert (status.uid, status.gid, status.groups) == (107, 107, (36, 107))  # the first (real) field, first line


@pytest.mark.parametrize("text", [None, "", "Uid:\n", "Uid:\tx\nGid:\t0\n", "Uid:\t0\n", "Uid:\t0\nGid:\t0\nGroups:\t1 z\n",
                                  "Uid:\t" + "9" * 5000 + "\nGid:\t0\n"])
def test_status_garbage_is_no_answer(text):
    assert parse_status(text) is None


def test_cmdline_round_trips_bytes():
    raw = b"/usr/bin/qemu-system-x86_64\0-name\0web\xff1\0-append\0\0-x\xc3\0"
    argv = parse_cmdline(raw)
    assert len(argv) == 6 and argv[4] == ""
    assert b"\0".join(fs_bytes(arg) for arg in argv) + b"\0" == raw
    assert json_text(argv[2]) == "web\\xff1" and json_text("plain é") == "plain é"


def test_reading_a_real_process():
    me = os.getpid()
    assert read_stat(me).state in "RS"
    assert process_start_time(me) == read_stat(me).start_time
    assert read_status(me).uid == os.getuid()
    assert read_cwd(me) == os.getcwd()
    assert read_cmdline(me)[0]
    assert not process_gone(me)
    assert process_gone(2 ** 22 + 1) and read_stat(2 ** 22 + 1) is None


def test_oversized_command_line_is_no_answer(tmp_path: Path):
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "cmdline").write_bytes(b"x\0" * 100)
    assert read_cmdline(7, str(tmp_path), limit=199) is None
    assert read_cmdline(7, str(tmp_path), limit=200) == ("x",) * 100


def test_socket_inodes(tmp_path: Path):
    fd = tmp_path / "7" / "fd"
    fd.mkdir(parents=True)
    (fd / "3").symlink_to("socket:[123]")
    (fd / "4").symlink_to("/dev/null")
    (fd / "5").symlink_to("socket:[" + "9" * 40 + "]")
    assert socket_inodes(7, str(tmp_path)) == {123}
    assert socket_inode("socket:[¹]") is None and socket_inode(None) is None
    assert socket_inodes(8, str(tmp_path)) == set()
