"""Fixtures shared by the unit and integration tests.

Integration tests boot real guests with :func:`guest_factory`. Every QEMU process
started during a test, by the harness or by the modules under test, is killed and
reaped when the test ends; a process still alive at that point fails the test.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.guest import Guest, GuestSpec
from harness.libvirt import EmbeddedLibvirt
from harness.processes import Reaper, become_subreaper, kill_and_wait, qemu_processes
from harness.qemu import ALL_BUILDS, selected_builds


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
