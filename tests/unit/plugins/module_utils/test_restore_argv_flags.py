"""restore_argv drops the recorded command line's value-less flags (-daemonize, -S).

A guest started with ``-daemonize`` must not daemonize again on restore: the
restore waits for its own child to open the monitor, and a daemonizing child
exits at once (status 0), leaving an orphan QEMU in ``inmigrate``.
"""

from __future__ import annotations

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import GuestRecord
from ansible_collections.savestate.qemu.plugins.module_utils._restore_launch import restore_argv

QEMU = "/usr/bin/qemu-system-x86_64"


def record(*args: str) -> GuestRecord:
    return GuestRecord(name="g", uuid="11111111-2222-3333-4444-555555555555", memory_kib=131072, vcpus=1,
                       arch="x86_64", machine="pc-i440fx-10.0", domain_type="qemu", emulator=QEMU,
                       qemu_version="10.0.2", argv=(QEMU, *args), qmp=None, disks=(),
                       saved_at="2026-11-24T00:00:00+00:00")


@pytest.mark.parametrize("args", [
    ("-m", "128", "-daemonize"),                      # last argument
    ("-daemonize", "-m", "128"),                      # followed by an option
    ("-S", "-daemonize", "-m", "128"),                # two flags in a row
    ("--daemonize", "-m", "128", "-S"),
])
def test_flags_are_dropped_wherever_they_stand(args: tuple[str, ...]) -> None:
    argv = restore_argv(record(*args), QEMU, None)
    assert "-daemonize" not in argv and "--daemonize" not in argv
    assert argv.count("-S") == 1 and argv[-3:] == ["-S", "-incoming", "defer"]
    assert argv[argv.index("-m") + 1] == "128"


def test_values_that_look_like_flags_stay() -> None:
    argv = restore_argv(record("-append", "", "-name", "guest=S", "-machine", "pc"), QEMU, None)
    assert argv[1:7] == ["-append", "", "-name", "guest=S", "-machine", "pc-i440fx-10.0"]
