"""The generated option table agrees with what the installed QEMU builds say of themselves.

Two independent witnesses: ``-help`` (the option column of QEMU's help text) and the
generator run again on the same binaries (``--check``). A build that is not
installed is skipped, not failed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._qemu_options import OPTIONS, VERSIONS

ROOT = Path(__file__).resolve().parents[4]
BUILDS = {
    "7.2": Path("/var/cache/savestate-qemu/qemu-7.2/usr/bin/qemu-system-x86_64"),
    "10.0": Path("/usr/bin/qemu-system-x86_64"),
}
HELP_COLUMN = 16  # QEMU's help text starts its descriptions in this column
# Options -help does not show on x86_64: other targets' (-g, -prom-env, -semihosting*),
# internal (-qtest*, -old-param) or aliases (-M, -help).
NOT_IN_X86_HELP = {"M", "g", "help", "old-param", "prom-env", "qtest", "qtest-log", "semihosting",
                   "semihosting-config"}


def help_options(text: str) -> dict[str, set[bool]]:
    """Option -> whether its help lines show an argument after it.

    ``-mem-path FILE  provide...`` has one, ``-S              freeze...`` has none:
    an argument starts before the description column, or past it when it reads as
    syntax (``-watchdog-action reset|shutdown|...``) rather than prose.
    """
    found: dict[str, set[bool]] = {}
    for line in text.splitlines():
        match = re.match(r"^--?([\w.-]+)((?:/-[\w.-]+)*)( +|$)(\S*)", line)
        if not match:
            continue
        names = [match.group(1)] + [name for name in match.group(2).split("/-") if name]
        token, column = match.group(4), match.end(3)
        if not token or token == "or":  # "-h or -help     display this help"
            has_argument = False
        elif column < HELP_COLUMN:
            has_argument = True
        else:
            has_argument = bool(re.search(r"[\[<|=,:%]", token)) or token.isupper()
        for name in names:
            found.setdefault(name, set()).add(has_argument)
    return found


def qemu_help(version: str) -> str:
    binary = BUILDS[version]
    if not binary.exists():
        pytest.skip(f"QEMU {version} is not installed at {binary}")
    result = subprocess.run([str(binary), "-help"], capture_output=True, text=True, check=False, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"{binary} -help failed: {result.stderr.strip()}")
    return result.stdout


@pytest.mark.parametrize("version", VERSIONS)
def test_every_option_in_help_is_in_the_table_with_the_same_arity(version: str) -> None:
    shown = help_options(qemu_help(version))
    assert len(shown) > 80
    for name, has_argument in shown.items():
        assert name in OPTIONS, f"-{name} (QEMU {version}) is missing from the table"
        takes_value, versions = OPTIONS[name]
        assert version in versions, f"the table says QEMU {version} has no -{name}"
        assert has_argument == {takes_value}, f"-{name}: help shows {has_argument}, table says {takes_value}"


@pytest.mark.parametrize("version", VERSIONS)
def test_the_options_the_table_gives_a_version_are_those_its_help_shows(version: str) -> None:
    shown = help_options(qemu_help(version))
    in_table = {name for name, (_takes_value, versions) in OPTIONS.items() if version in versions}
    assert in_table - set(shown) == NOT_IN_X86_HELP


def test_the_table_is_what_the_generator_makes_of_the_installed_builds() -> None:
    for version, binary in BUILDS.items():
        if not binary.exists():
            pytest.skip(f"QEMU {version} is not installed at {binary}")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate-qemu-options"), "--check"],
                            capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr


def test_options_of_one_version_only_are_marked() -> None:
    assert OPTIONS["runas"] == (True, ("7.2",))
    assert OPTIONS["run-with"] == (True, ("10.0",))
    assert OPTIONS["incoming"] == (True, VERSIONS)
    assert OPTIONS["S"] == (False, VERSIONS)
