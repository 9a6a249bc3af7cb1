"""Fixtures of the integration tests that need the multi-host test bed (tests/harness/testbed.py).

``testbed`` boots hv1..hv3 once per session (``SAVESTATE_TESTBED_HOSTS`` changes the count;
each xdist worker gets a fleet of its own, see ``TestbedConfig.for_worker``)
and tears them down at its end, failing the session's teardown if anything is left behind;
``testbed_guest`` starts test guests in a host and stops them when the test ends.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from harness.systemd_host import unavailable_reason
from harness.testbed import Fleet, TestbedConfig, TestbedGuest, TestbedHost, down, leftovers, up


@pytest.fixture(scope="session")
def testbed() -> Iterator[Fleet]:
    """The fleet: ``testbed["hv1"]``, ``testbed.inventory``, ``testbed.run_playbook(path, extra_vars)``."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no test bed: {reason}")
    started = time.monotonic()
    # One fleet per xdist worker: `make test` runs test files on several workers at once.
    fleet = up(int(os.environ.get("SAVESTATE_TESTBED_HOSTS", "3")), config=TestbedConfig.for_worker())
    print(f"test bed: {len(fleet.hosts)} hosts up in {time.monotonic() - started:.1f} s")
    try:
        yield fleet
    finally:
        down(fleet.config)
        left = leftovers(fleet.config)
        assert not left, f"the test bed's teardown left: {left}"


@pytest.fixture
def testbed_guest(testbed: Fleet) -> Iterator[Callable[..., TestbedGuest]]:
    """``testbed_guest(host, name, **GuestOptions)``: a running (or paused) guest, stopped at the end."""
    guests: list[TestbedGuest] = []

    def start(host: TestbedHost | str, name: str, **options: Any) -> TestbedGuest:
        machine = testbed[host] if isinstance(host, str) else host
        guest = machine.start_guest(name, **options)
        guests.append(guest)
        return guest

    yield start
    for guest in guests:
        for host in testbed:  # it may have moved
            if host.leader is not None:
                guest.on(host).stop()
