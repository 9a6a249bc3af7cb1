"""Can emulator E restore this guest: parsing QEMU's answers, and the check itself (_emulator_info.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._emulator_info import (
    describe_emulator,
    parse_machines,
    parse_version,
    resolve_machine,
    restorable_formats,
    restore_problem,
)

SYSTEM_QEMU = "/usr/bin/qemu-system-x86_64"
QEMU72 = "/var/cache/savestate-qemu/qemu-7.2/usr/bin/qemu-system-x86_64"

# The head of QEMU 7.2's `-machine help`, as it prints it.
HELP_72 = """Supported machines are:
microvm              microvm (i386)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)
pc-i440fx-7.1        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-2.4        Standard PC (i440FX + PIIX, 1996) (deprecated)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)
pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)
isapc                ISA-only PC
none                 empty machine
"""


def emulator(version: str = "7.2.22", machines: tuple[str, ...] = ("pc", "pc-i440fx-7.2"),
             formats: tuple[str, ...] = ("raw", "gzip"), problem: str | None = None) -> dict:
    return {"given": "/usr/bin/qemu-system-x86_64", "path": "/usr/bin/qemu-system-x86_64", "version": version,
            "machines": list(machines), "aliases": {"pc": "pc-i440fx-7.2"}, "formats": list(formats),
            "problem": problem}


def test_machines_and_aliases_are_read_from_machine_help() -> None:
    machines, aliases = parse_machines(HELP_72)
    assert machines == ["microvm", "pc", "pc-i440fx-7.2", "pc-i440fx-7.1", "pc-i440fx-2.4", "q35", "pc-q35-7.2",
                        "isapc", "none"]
    assert aliases == {"pc": "pc-i440fx-7.2", "q35": "pc-q35-7.2"}


def test_the_version_is_read_from_version_output() -> None:
    assert parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright") == (7, 2, 22)
    assert parse_version("QEMU emulator version 10.0\n") == (10, 0, 0)
    assert parse_version("something else") is None


def test_sparse_needs_qemu_9_and_a_compressed_format_its_program() -> None:
    everything = restorable_formats((9, 0, 0), which=lambda program: f"/usr/bin/{program}")
    assert everything == ["raw", "gzip", "bzip2", "xz", "lzop", "zstd", "sparse"]
    assert "sparse" not in restorable_formats((8, 2, 0), which=lambda program: f"/usr/bin/{program}")
    assert "sparse" not in restorable_formats(None, which=lambda program: f"/usr/bin/{program}")
    assert restorable_formats((10, 0, 2), which=lambda program: None) == ["raw", "sparse"]


def test_an_alias_resolves_with_the_qemu_the_guest_runs_on_now() -> None:
    assert resolve_machine("pc", {"aliases": {"pc": "pc-i440fx-10.0"}}) == "pc-i440fx-10.0"
    assert resolve_machine("pc-q35-7.2", {"aliases": {"pc": "pc-i440fx-10.0"}}) == "pc-q35-7.2"
    assert resolve_machine("pc", None) == "pc"


def test_a_missing_machine_type_is_named_with_the_emulator() -> None:
    reason, message = restore_problem(emulator(), "pc-i440fx-10.0", "raw") or ("", "")
    assert reason == "machine"
    assert "pc-i440fx-10.0" in message and "QEMU 7.2.22 (/usr/bin/qemu-system-x86_64)" in message
    assert restore_problem(emulator(), "pc-i440fx-7.2", "raw") is None
    assert restore_problem(emulator(), "pc-i440fx-7.2", None) is None


def test_an_unsupported_format_and_an_unasked_emulator_are_problems() -> None:
    reason, message = restore_problem(emulator(), "pc-i440fx-7.2", "sparse") or ("", "")
    assert reason == "format" and "QEMU 9.0 or newer" in message
    reason, message = restore_problem(emulator(), "pc-i440fx-7.2", "zstd") or ("", "")
    assert reason == "format" and "decompressor (zstd)" in message
    reason, message = restore_problem(emulator(problem="it is owned by uid 1000"), "pc-i440fx-7.2", "raw") or ("", "")
    assert reason == "emulator" and "uid 1000" in message
    assert (restore_problem(None, "pc-i440fx-7.2", "raw") or ("",))[0] == "emulator"
    assert (restore_problem(emulator(), None, "raw") or ("",))[0] == "machine"


@pytest.mark.skipif(not os.path.exists(SYSTEM_QEMU), reason="QEMU is not installed")
def test_the_system_qemu_describes_itself() -> None:
    described = describe_emulator(SYSTEM_QEMU)
    assert described["problem"] is None and described["path"] == os.path.realpath(SYSTEM_QEMU)
    assert described["version"] and described["aliases"]["pc"] in described["machines"]
    assert "raw" in described["formats"]


@pytest.mark.skipif(not os.path.exists(QEMU72), reason="QEMU 7.2 is not unpacked")
def test_qemu_72_has_no_10_0_machine_and_no_sparse() -> None:
    described = describe_emulator(QEMU72)
    assert described["version"].startswith("7.2.") and described["aliases"]["pc"] == "pc-i440fx-7.2"
    assert "pc-i440fx-10.0" not in described["machines"] and "sparse" not in described["formats"]


@pytest.fixture
def user_dir() -> Iterator[Path]:
    """A directory an unprivileged user can write: what it holds is never trusted."""
    path = Path(tempfile.mkdtemp(prefix="ssq-emuinfo-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_an_untrusted_binary_is_not_run(user_dir: Path) -> None:
    marker = user_dir / "ran"
    binary = user_dir / "qemu-system-x86_64"
    binary.write_text(f"#!/bin/sh\ntouch {marker}\necho 'pc   fake (alias of pc-i440fx-99.0)'\n")
    binary.chmod(0o777)
    described = describe_emulator(str(binary))
    assert described["problem"] and "not a trusted QEMU emulator" in described["problem"]
    assert described["machines"] == [] and not marker.exists()


def test_only_qemu_binaries_are_run(user_dir: Path) -> None:
    described = describe_emulator("/bin/true")
    assert "not a QEMU system emulator" in described["problem"]
    assert "not installed" in describe_emulator("qemu-system-nonexistent-arch")["problem"]
