"""Fixtures shared by the unit and integration tests.

Integration tests boot real guests with :func:`guest_factory`. Every QEMU process
started during a test, by the harness or by the modules under test, is killed and
reaped when the test ends; a process still alive at that point fails the test.

``testbed`` boots the multi-host test bed (tests/harness/testbed.py, docs/testbed.md),
hv1..hv3, once per session (``SAVESTATE_TESTBED_HOSTS`` changes the count; each xdist
worker gets a fleet of its own, see ``TestbedConfig.for_worker``) and tears it down at
its end, failing the session's teardown if anything is left behind; ``testbed_guest``
starts test guests in a host and stops them when the test ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.guest import Guest, GuestSpec
from harness.libvirt import EmbeddedLibvirt
from harness.processes import Reaper, become_subreaper, kill_and_wait, qemu_processes
from harness.qemu import ALL_BUILDS, selected_builds
from harness.systemd_host import unavailable_reason
from harness.testbed import Fleet, TestbedConfig, TestbedGuest, TestbedHost, leftovers, up


@pytest.fixture(scope="session", autouse=True)
def process_reaper() -> Iterator[Reaper]:
    become_subreaper()
    reaper = Reaper()
    reaper.start()
    yield reaper
    reaper.stop()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short, private directory (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ssq-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def no_leaked_qemu(workdir: Path) -> Iterator[None]:
    """Fail the test if a QEMU started under ``workdir`` is still running at its end."""
    yield
    leaked = qemu_processes(str(workdir))
    for process in leaked:
        kill_and_wait(process.pid)
    if leaked:
        pytest.fail(f"test leaked QEMU processes: {[p.pid for p in leaked]}")


@pytest.fixture
def guest_factory(workdir: Path, process_reaper: Reaper, no_leaked_qemu: None
                  ) -> Iterator[Callable[..., Guest]]:
    """Boot guests: ``guest_factory(GuestSpec(...))`` returns a READY guest."""
    guests: list[Guest] = []

    def start(spec: GuestSpec, subdir: str | None = None) -> Guest:
        guest = Guest(spec, workdir / (subdir or spec.name))
        guests.append(guest)
        guest.start()
        if guest.process is not None:
            process_reaper.own(guest.process.pid)
        return guest

    yield start
    for guest in guests:
        guest.stop()
        if guest.process is not None:
            process_reaper.disown(guest.process.pid)


@pytest.fixture
def libvirt_host(workdir: Path, no_leaked_qemu: None) -> Iterator[EmbeddedLibvirt]:
    """libvirt's embedded QEMU driver rooted in the test's work directory."""
    host = EmbeddedLibvirt(workdir / "libvirt")
    yield host
    host.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that takes ``qemu`` once per selected QEMU build."""
    if "qemu" in metafunc.fixturenames:
        builds = selected_builds()
        metafunc.parametrize("qemu", builds, ids=[b.name for b in builds])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: boots real guests under QEMU")
    for build in ALL_BUILDS:
        if not build.binary.exists():
            config.issue_config_time_warning(
                pytest.PytestConfigWarning(f"{build} not found at {build.binary}; run make setup"), 2)


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
        fleet.down()
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
