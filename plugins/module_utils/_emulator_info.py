# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Can emulator E restore this guest: the one check host_drain, host_restore and guest_move share.

QEMU loads a saved guest only on the machine type it was saved with (``pc-i440fx-7.2``;
``-machine pc`` is an alias that resolves to a versioned type when QEMU starts, and the
image records the resolved one). A QEMU upgrade that drops that type strands the guest:
its image can no longer be loaded. A sparse image needs the mapped-ram capability (QEMU
9.0 or newer), a compressed one its decompressor on the host.

:func:`describe_emulator` asks a trusted emulator (root-owned, in directories only root can
write: never any other binary) for its version and machine types; :func:`restore_problem`
matches a guest against that description. The description is a plain dict so that the
roles' filter (on the controller) and the modules apply the very same check.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Mapping
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._commands import output_of, run_bounded
from ansible_collections.savestate.qemu.plugins.module_utils._emulator import check_trusted_emulator, is_emulator_name
from ansible_collections.savestate.qemu.plugins.module_utils._errors import PreconditionError, SaveStateError
from ansible_collections.savestate.qemu.plugins.module_utils._image import COMPRESSORS, ImageFormat

# QEMU answers `-machine help` and `-version` without starting a guest; a few seconds is plenty.
PROBE_TIMEOUT = 20.0
# mapped-ram, which a sparse image's stream is, came with QEMU 9.0.
SPARSE_SINCE = (9, 0, 0)
_VERSION = re.compile(r"version (\d+)\.(\d+)(?:\.(\d+))?")
_MACHINE_LINE = re.compile(r"^(\S+)\s+(.*)$")
_ALIAS = re.compile(r"\(alias of (\S+)\)")


def parse_version(text: str) -> Optional[tuple[int, int, int]]:
    """``QEMU emulator version 7.2.22 (Debian ...)`` -> ``(7, 2, 22)``; None when it says no version."""
    match = _VERSION.search(text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def parse_machines(text: str) -> tuple[list[str], dict[str, str]]:
    """The machine types of ``-machine help``, and its aliases (``pc`` -> ``pc-i440fx-7.2``).

    Each machine is a line ``NAME  DESCRIPTION``; an alias says ``(alias of TYPE)``
    in its description. The heading (``Supported machines are:``) is not a machine.
    """
    machines: list[str] = []
    aliases: dict[str, str] = {}
    for line in text.splitlines():
        match = _MACHINE_LINE.match(line)
        if match is None or line.rstrip().endswith(":"):
            continue
        name, description = match.groups()
        machines.append(name)
        alias = _ALIAS.search(description)
        if alias is not None:
            aliases[name] = alias.group(1)
    return machines, aliases


def restorable_formats(version: Optional[tuple[int, int, int]],
                       which: Callable[[str], Optional[str]] = shutil.which) -> list[str]:
    """The image formats a QEMU of ``version`` can load on this host."""
    formats = []
    for image_format in ImageFormat:
        compressor = COMPRESSORS.get(image_format)
        if image_format is ImageFormat.SPARSE and (version is None or version < SPARSE_SINCE):
            continue
        if compressor is not None and which(compressor.program) is None:
            continue
        formats.append(image_format.label)
    return formats


def trusted_emulator(path: str) -> str:
    """The real path of the trusted emulator ``path`` names (a bare name is looked up in PATH, as restore does)."""
    found = shutil.which(path) if path and os.sep not in path else path
    if not found:
        raise PreconditionError(f"the emulator {path} is not installed on this host (not found in PATH)")
    if not is_emulator_name(os.path.realpath(found)):
        raise PreconditionError(f"refusing to run {path!r}: it is not a QEMU system emulator (qemu-system-* or qemu-kvm)")
    return check_trusted_emulator(found)


def describe_emulator(path: str, timeout: float = PROBE_TIMEOUT) -> dict[str, Any]:
    """What the emulator at ``path`` can restore, or the ``problem`` why it cannot be asked.

    The binary is judged first (a QEMU system emulator, root-owned, in directories only
    root can write): nothing else is ever run, and what runs is the resolved real path.
    """
    result: dict[str, Any] = {"given": path, "path": None, "version": None, "machines": [], "aliases": {},
                              "formats": [], "problem": None}
    try:
        real = trusted_emulator(path)
        result["path"] = real
        machines = run_bounded([real, "-machine", "help"], timeout)
        if machines.returncode != 0:
            raise SaveStateError(f"'{real} -machine help' exited with status {machines.returncode}: "
                                 f"{output_of(machines) or 'no output'}")
        version = run_bounded([real, "-version"], timeout)
    except SaveStateError as error:
        result["problem"] = str(error)
        return result
    numbers = parse_version(version.stdout)
    result["machines"], result["aliases"] = parse_machines(machines.stdout)
    result["version"] = ".".join(map(str, numbers)) if numbers else None
    result["formats"] = restorable_formats(numbers)
    return result


def resolve_machine(machine: Optional[str], current: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The versioned type ``machine`` stands for: an alias resolved by the QEMU the guest runs on now."""
    if not machine or not current:
        return machine
    resolved = (current.get("aliases") or {}).get(machine)
    return resolved if isinstance(resolved, str) else machine


def _label(emulator: Mapping[str, Any]) -> str:
    version = emulator.get("version")
    where = emulator.get("path") or emulator.get("given")
    return f"QEMU {version} ({where})" if version else f"QEMU {where}"


def restore_problem(emulator: Optional[Mapping[str, Any]], machine: Optional[str],
                    image_format: Optional[str]) -> Optional[tuple[str, str]]:
    """``(reason, message)`` when ``emulator`` cannot restore a guest of ``machine`` in ``image_format``.

    ``reason`` is ``emulator`` (it could not be asked), ``machine`` or ``format``; the
    message names the machine type or format and the emulator. None when it can.
    """
    if not emulator:
        return "emulator", "no emulator was examined for it"
    if emulator.get("problem"):
        return "emulator", f"the emulator {emulator.get('given')} cannot be asked what it runs: {emulator['problem']}"
    if not machine:
        return "machine", "its machine type is not known, so no emulator can be shown to load it"
    machines = emulator.get("machines") or []
    if machine not in machines:
        return "machine", (f"its machine type {machine} is not one {_label(emulator)} has (not in its `-machine help`); "
                           "QEMU loads a saved guest only on the machine type it was saved on")
    if image_format and image_format not in (emulator.get("formats") or []):
        why = ("a sparse image needs QEMU 9.0 or newer (mapped-ram)" if image_format == "sparse"
               else f"its decompressor ({image_format}) is not installed on the host")
        return "format", f"{_label(emulator)} cannot load a {image_format} image here: {why}"
    return None
