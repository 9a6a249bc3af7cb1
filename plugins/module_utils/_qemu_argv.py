# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Reading and editing QEMU command lines, without ever going through a shell.

QEMU options take either a JSON object (``-blockdev {"driver": ...}``) or a
"key=value,key=value" string in which a literal comma is written twice
(``file=/a,,b`` is the path ``/a,b``). Some options have an implied key for a
leading bare value (``-name foo`` means ``guest=foo``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._qemu_options import OPTIONS

OptionPairs = list[tuple[str, str]]


def option_name(arg: str) -> str | None:
    """``-name`` and ``--name`` both name the option ``name``; anything else is a value."""
    if arg.startswith("--") and len(arg) > 2:
        return arg[2:]
    if arg.startswith("-") and len(arg) > 1:
        return arg[1:]
    return None


def takes_value(option: str) -> Optional[bool]:
    """Whether QEMU consumes the argument after ``-option`` as its value, whatever it looks like.

    From QEMU's own option tables (see _qemu_options); ``None`` for an option the
    supported versions do not have (a newer QEMU's, or a typo QEMU would refuse).
    """
    known = OPTIONS.get(option)
    return None if known is None else known[0]


@dataclass(frozen=True)
class Argument:
    """One option with its value, or one bare argument, of a QEMU command line."""

    index: int              # of the option (or the bare argument) in argv
    name: Optional[str]     # the option without its dashes; None for a bare argument (a disk image)
    value: Optional[str]    # the option's value; None when it takes none

    @property
    def value_index(self) -> Optional[int]:
        return None if self.name is None or self.value is None else self.index + 1

    @property
    def span(self) -> int:
        """How many argv elements it covers."""
        return 2 if self.value_index is not None else 1


def _option_has_value(argv: Sequence[str], index: int, option: str) -> bool:
    if index + 1 >= len(argv):
        return False  # QEMU would refuse a missing value; keep the option as written
    known = takes_value(option)
    if known is not None:
        return known
    # An option QEMU 7.2 and 10.0 do not know: guess that anything not shaped like an option is its value.
    return option_name(argv[index + 1]) is None


def parse_argv(argv: Sequence[str]) -> list[Argument]:
    """Split a command line (``argv[0]`` is the binary) the way QEMU does."""
    result: list[Argument] = []
    index = 1
    while index < len(argv):
        name = option_name(argv[index])
        if name is None:
            result.append(Argument(index, None, argv[index]))
        elif _option_has_value(argv, index, name):
            result.append(Argument(index, name, argv[index + 1]))
        else:
            result.append(Argument(index, name, None))
        index += result[-1].span
    return result


def iter_options(argv: Sequence[str]) -> Iterator[tuple[int, str, str]]:
    """Yield ``(index of the value, option, value)`` for every option.

    An option that takes no value (``-S``, ``-daemonize``) is yielded with its own
    index and value ``""``; :func:`parse_argv` tells the two apart.
    """
    for argument in parse_argv(argv):
        if argument.name is None:
            continue
        if argument.value_index is not None and argument.value is not None:
            yield argument.value_index, argument.name, argument.value
        else:
            yield argument.index, argument.name, ""


def option_values(argv: Sequence[str], option: str) -> list[str]:
    """Values of every occurrence of ``-option`` (or ``--option``), in order."""
    return [value for _index, name, value in iter_options(argv) if name == option]


def has_flag(argv: Sequence[str], option: str) -> bool:
    """Whether ``-option`` is on the command line as an option (not as another option's value)."""
    return any(argument.name == option for argument in parse_argv(argv))


def split_option_string(value: str) -> list[str]:
    """Split at single commas; ``,,`` is an escaped literal comma."""
    parts, current, index = [], [], 0
    while index < len(value):
        char = value[index]
        if char == ",":
            if value.startswith(",,", index):
                current.append(",")
                index += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    parts.append("".join(current))
    return parts


def parse_option_string(value: str, implied_key: str | None = None) -> OptionPairs:
    """Parse ``key=value,...`` into ordered pairs; a JSON object is parsed as JSON.

    A bare first element gets ``implied_key`` (``-name foo`` -> ``[("guest", "foo")]``);
    other bare elements are boolean flags, kept as ``(element, "")``.
    """
    if value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return [(str(k), v if isinstance(v, str) else json.dumps(v)) for k, v in parsed.items()]
    pairs: OptionPairs = []
    for position, part in enumerate(split_option_string(value)):
        key, sep, val = part.partition("=")
        if sep:
            pairs.append((key, val))
        elif position == 0 and implied_key is not None:
            pairs.append((implied_key, part))
        elif part:
            pairs.append((part, ""))
    return pairs


def option_dict(value: str, implied_key: str | None = None) -> dict[str, str]:
    """Like :func:`parse_option_string`; the last occurrence of a key wins, as in QEMU."""
    return dict(parse_option_string(value, implied_key))


def escape_option_value(value: str) -> str:
    return value.replace(",", ",,")


def format_option_string(pairs: OptionPairs) -> str:
    """The inverse of :func:`parse_option_string` for non-JSON values (flags have ``""``)."""
    return ",".join(f"{key}={escape_option_value(val)}" if val != "" else escape_option_value(key)
                    for key, val in pairs)


# --- disk paths inside a command line ----------------------------------------------

# Options whose whole value is a disk image path.
PATH_VALUED_OPTIONS = frozenset(("hda", "hdb", "hdc", "hdd", "cdrom", "fda", "fdb", "sd", "mtdblock", "pflash"))


def _is_drive_path_key(key: str) -> bool:
    return key in ("file", "filename") or key.endswith(".filename")


def _is_blockdev_path_key(key: str) -> bool:
    # In -blockdev, "file" names a child node, not a path.
    return key == "filename" or key.endswith(".filename")


def _raw_option_parts(value: str) -> list[str]:
    """Split at single commas but keep each part escaped (``,,`` stays ``,,``)."""
    parts, start, index = [], 0, 0
    while index < len(value):
        if value[index] == ",":
            if value.startswith(",,", index):
                index += 2
                continue
            parts.append(value[start:index])
            start = index + 1
        index += 1
    parts.append(value[start:])
    return parts


def _replace_in_key_values(value: str, mapping: dict[str, str], is_path_key: Callable[[str], bool]) -> str:
    """Replace path values in ``key=value,...``, leaving every other part byte for byte."""
    parts = _raw_option_parts(value)
    changed = False
    for position, raw in enumerate(parts):
        key, sep, path = raw.replace(",,", ",").partition("=")
        if sep and is_path_key(key) and path in mapping:
            parts[position] = f"{key}={escape_option_value(mapping[path])}"
            changed = True
    return ",".join(parts) if changed else value


def _replace_in_json(node: Any, mapping: dict[str, str]) -> bool:
    changed = False
    if isinstance(node, dict):
        for key, item in node.items():
            if key == "filename" and isinstance(item, str) and item in mapping:
                node[key] = mapping[item]
                changed = True
            else:
                changed = _replace_in_json(item, mapping) or changed
    elif isinstance(node, list):
        for item in node:
            changed = _replace_in_json(item, mapping) or changed
    return changed


def _replace_in_blockdev(value: str, mapping: dict[str, str]) -> str:
    if value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        if _replace_in_json(parsed, mapping):
            return json.dumps(parsed, separators=(",", ":"), ensure_ascii=False)
        return value
    return _replace_in_key_values(value, mapping, _is_blockdev_path_key)


def replace_disk_paths(argv: Sequence[str], mapping: dict[str, str]) -> list[str]:
    """``argv`` with disk image paths replaced (old -> new), wherever QEMU takes them.

    Covers ``-drive file=`` (and ``file.filename=``), ``-blockdev`` as JSON or as
    ``key=value`` (``filename``), and the shorthand options (``-hda PATH``).
    Everything else is left exactly as it was; without a match the result equals ``argv``.
    """
    result = list(argv)
    for index, option, value in iter_options(argv):
        if not value:
            continue
        if option == "drive":
            result[index] = _replace_in_key_values(value, mapping, _is_drive_path_key)
        elif option == "blockdev":
            result[index] = _replace_in_blockdev(value, mapping)
        elif option in PATH_VALUED_OPTIONS and value in mapping:
            result[index] = mapping[value]
    return result
