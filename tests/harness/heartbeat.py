"""The test guest's heartbeat: the ``tick N`` lines it prints on its serial console.

The guest's init (tests/harness/init.sh) prints ``tick 1``, ``tick 2``... every 100 ms. A
restored guest goes on counting where it was saved; a rebooted one starts again at 1.
Every harness that runs the test guest (:mod:`harness.guest`, :mod:`harness.libvirt`,
:mod:`harness.testbed`, the systemd host's tests) reads its serial log with these helpers.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

TICK = re.compile(rb"^tick (\d+)\r?$", re.MULTILINE)
POLL_S = 0.1  # the heartbeat's own period: polling faster finds nothing new


class HeartbeatStuck(AssertionError):
    """The heartbeat did not pass the expected tick in time: the guest is paused, gone or rebooting."""


def ticks(serial_log: Path) -> list[int]:
    """Every tick in the log, in order ([] while the log does not exist yet)."""
    try:
        return [int(tick) for tick in TICK.findall(serial_log.read_bytes())]
    except FileNotFoundError:
        return []


def last_tick(serial_log: Path) -> int:
    """The latest tick in the log, 0 before the first."""
    found = ticks(serial_log)
    return found[-1] if found else 0


def wait_tick_above(serial_log: Path, value: int, timeout: float, guest: str) -> int:
    """Wait until the latest tick is above ``value`` and return it; :class:`HeartbeatStuck` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while (tick := last_tick(serial_log)) <= value:
        if time.monotonic() > deadline:
            raise HeartbeatStuck(f"{guest}: heartbeat stuck at {tick} (wanted above {value} within {timeout:g} s)")
        time.sleep(POLL_S)
    return tick
