"""Splitting a QEMU command line the way QEMU does: a value that looks like an option stays a value.

QEMU takes the argument after an option with a value as that value, whatever it
looks like; the table of such options is QEMU's own (_qemu_options). Options the
table does not know fall back to a guess: the next argument is their value unless
it looks like an option.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import GuestRecord
from ansible_collections.savestate.qemu.plugins.module_utils._qemu_argv import (
    Argument,
    has_flag,
    iter_options,
    option_values,
    parse_argv,
    takes_value,
)
from ansible_collections.savestate.qemu.plugins.module_utils._qemu_options import OPTIONS
from ansible_collections.savestate.qemu.plugins.module_utils._restore_launch import restore_argv

QEMU = "/usr/bin/qemu-system-x86_64"
MACHINE = "pc-i440fx-10.0"
VALUED = sorted(name for name, (takes, _versions) in OPTIONS.items() if takes)
FLAGS = sorted(name for name, (takes, _versions) in OPTIONS.items() if not takes)


def record(*args: str, machine: str | None = MACHINE) -> GuestRecord:
    return GuestRecord(name="g", uuid="11111111-2222-3333-4444-555555555555", memory_kib=131072,
                       machine=machine, emulator=QEMU, argv=(QEMU, *args))


# --- parsing ------------------------------------------------------------------------------

def test_values_starting_with_a_dash_are_values() -> None:
    argv = [QEMU, "-name", "-incoming", "x", "-append", "-v", "--uuid", "-S"]
    assert option_values(argv, "name") == ["-incoming"]
    assert option_values(argv, "append") == ["-v"]
    assert option_values(argv, "uuid") == ["-S"]
    assert option_values(argv, "incoming") == [] and not has_flag(argv, "incoming") and not has_flag(argv, "S")
    assert parse_argv(argv)[1] == Argument(3, None, "x")  # QEMU takes a bare argument as a disk image


def test_options_without_a_value_never_take_the_next_argument() -> None:
    argv = [QEMU, "-S", "disk.img", "-nographic", "-snapshot", "-m", "128"]
    assert parse_argv(argv) == [Argument(1, "S", None), Argument(2, None, "disk.img"),
                                Argument(3, "nographic", None), Argument(4, "snapshot", None),
                                Argument(5, "m", "128")]
    assert list(iter_options(argv)) == [(1, "S", ""), (3, "nographic", ""), (4, "snapshot", ""), (6, "m", "128")]


def test_an_empty_value_is_a_value() -> None:
    assert parse_argv([QEMU, "-append", "", "-S"]) == [Argument(1, "append", ""), Argument(3, "S", None)]


def test_a_missing_value_at_the_end_leaves_the_option_alone() -> None:
    assert parse_argv([QEMU, "-m", "128", "-name"]) == [Argument(1, "m", "128"), Argument(3, "name", None)]


@pytest.mark.parametrize("argv, expected", [
    # unknown options: the next argument is a value unless it looks like an option
    ([QEMU, "-future-option", "x", "-S"], [Argument(1, "future-option", "x"), Argument(3, "S", None)]),
    ([QEMU, "-future-flag", "-S"], [Argument(1, "future-flag", None), Argument(2, "S", None)]),
    ([QEMU, "--future-flag"], [Argument(1, "future-flag", None)]),
])
def test_unknown_options_are_guessed(argv, expected) -> None:
    assert takes_value("future-option") is None
    assert parse_argv(argv) == expected


def test_double_dash_options_are_the_same_options() -> None:
    expected = [Argument(1, "name", "-x"), Argument(3, "daemonize", None)]
    assert parse_argv([QEMU, "--name", "-x", "--daemonize"]) == expected


words = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
items = st.one_of(st.tuples(st.sampled_from(VALUED), words), st.tuples(st.sampled_from(FLAGS), st.none()),
                  words.filter(lambda w: not w.startswith("-")).map(lambda w: (None, w)))


@given(st.lists(items, max_size=12))
def test_any_command_line_of_known_options_splits_back_into_what_built_it(parts) -> None:
    argv = [QEMU]
    for name, value in parts:
        argv += ([f"-{name}"] if name is not None else []) + ([value] if value is not None else [])
    assert [(argument.name, argument.value) for argument in parse_argv(argv)] == list(parts)


# --- restore_argv ----------------------------------------------------------------------------

def test_restore_keeps_values_that_look_like_dropped_options() -> None:
    args = ("-name", "-incoming", "-append", "-v", "-uuid", "11111111-2222-3333-4444-555555555555",
            "-append", "-S", "-L", "-daemonize", "-k", "-loadvm")
    argv = restore_argv(record(*args), QEMU, None)
    assert argv[1:len(args) + 1] == list(args)
    assert argv[len(args) + 1:] == ["-machine", MACHINE, "-S", "-incoming", "defer"]


@pytest.mark.parametrize("args, kept", [
    (("-incoming", "-S", "-m", "128"), ["-m", "128"]),            # -incoming's value, even shaped as -S
    (("-loadvm", "-snap", "-m", "128"), ["-m", "128"]),
    (("-S", "disk.img", "-daemonize"), ["disk.img"]),              # a flag does not take the disk image
    (("-m", "128", "-incoming"), ["-m", "128"]),                   # a dangling -incoming is still dropped
    (("--incoming", "defer", "--S", "--loadvm", "s"), []),
])
def test_restore_drops_the_options_and_exactly_their_values(args, kept) -> None:
    assert restore_argv(record(*args), QEMU, None) == [QEMU, *kept, "-machine", MACHINE, "-S", "-incoming", "defer"]


def test_restore_pins_the_machine_only_where_it_is_an_option() -> None:
    argv = restore_argv(record("-name", "-machine", "-M", "pc"), QEMU, None)
    assert argv[1:5] == ["-name", "-machine", "-M", MACHINE]
    argv = restore_argv(record("-append", "-machine"), QEMU, None)
    assert argv[1:5] == ["-append", "-machine", "-machine", MACHINE]
