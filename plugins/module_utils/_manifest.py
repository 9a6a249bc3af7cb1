# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""The drain manifest: the versioned file host_drain writes and host_restore reads.

One JSON object, documented in docs/drain-manifest.md::

    {"version": 1, "guests": [{"name": ..., "uuid": ..., "path": ..., "state": ..., ...}]}

Everything in it is data from a file: it is validated field by field before any
decision is made on it, and an image path must name a file directly inside the
manifest's own directory (the drain writes ``<dir>/<name>.save``), so that an edited
manifest cannot point a restore at a file elsewhere. A manifest without ``version``
reads as version 1 (with a note); a version this code does not know is refused with
a message that says what to do, before anything is changed.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._atomic_file import open_directory, replace_file
from ansible_collections.savestate.qemu.plugins.module_utils._errors import SaveStateError
from ansible_collections.savestate.qemu.plugins.module_utils._image import ImageFormat
from ansible_collections.savestate.qemu.plugins.module_utils._image_auth import file_trust_problem

# The version this code writes; it reads every version from 1 up to it.
FORMAT_VERSION = 1
OLDEST_VERSION = 1
STATES = ("running", "paused")
FORMATS = tuple(member.label for member in ImageFormat)
CHECKSUM_ALGORITHMS = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512")
# A guest name that is also a safe file name: the drain saves nothing else.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
CHECKSUM = re.compile(r"^([a-z0-9]+):([0-9a-f]+)$")
# A manifest lists a host's guests: a few kB. Anything much larger is not one.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
# Modification times are compared to the millisecond: file systems and JSON round differently.
MTIME_TOLERANCE = 0.001
# host_restore starts the guests of higher priority first; the bound only keeps the field sane.
MAX_PRIORITY = 1000000
UNVERSIONED_NOTE = ("the manifest has no 'version' field (written before the format was versioned): "
                    "read as version 1")


class ManifestError(SaveStateError):
    """A drain manifest cannot be read, is malformed, or is of a version this code does not read."""


class ManifestVersionError(ManifestError):
    """The manifest's version is not one this code reads (newer, or not a version at all)."""


@dataclass(frozen=True)
class Manifest:
    """A validated manifest, converted to the current version.

    ``version`` is the version as read (1 for an unversioned manifest); ``guests``
    the entries as plain dicts in the current version's shape, sorted by name;
    ``notes`` what the reader had to assume.
    """

    version: int
    guests: tuple[dict[str, Any], ...]
    notes: tuple[str, ...] = field(default=())
    # Guests an operator discarded on purpose (savestate.qemu.discard): never restored, reported as such.
    discarded: tuple[dict[str, Any], ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        """The manifest in the current version, as written (``discarded`` only when there is one)."""
        result: dict[str, Any] = {"version": FORMAT_VERSION, "guests": [dict(entry) for entry in self.guests]}
        if self.discarded:
            result["discarded"] = [dict(record) for record in self.discarded]
        return result


# --- validation ----------------------------------------------------------------------

def _where(index: int, entry: Any) -> str:
    name = entry.get("name") if isinstance(entry, Mapping) else None
    return f"guests[{index}]" + (f" ({name!r})" if isinstance(name, str) and len(name) <= 100 else "")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _check_name(value: Any) -> Optional[str]:
    if not isinstance(value, str) or not SAFE_NAME.match(value) or len(value) > 255:
        return "must be a guest name of letters, digits, '.', '_', '+' and '-' (as the drain saves)"
    return None


def _check_uuid(value: Any) -> Optional[str]:
    if value is not None and (not isinstance(value, str) or not UUID.match(value)):
        return "must be a UUID (8-4-4-4-12 hexadecimal digits) or null"
    return None


def _check_choice(choices: tuple[str, ...]) -> Callable[[Any], Optional[str]]:
    def check(value: Any) -> Optional[str]:
        return None if value in choices else f"must be one of {', '.join(choices)}"
    return check


def _check_count(value: Any) -> Optional[str]:
    return None if value is None or (_is_int(value) and value >= 0) else "must be a whole number >= 0 or null"


def _check_priority(value: Any) -> Optional[str]:
    return None if value is None or (_is_int(value) and abs(value) <= MAX_PRIORITY) else (
        f"must be a whole number from -{MAX_PRIORITY} to {MAX_PRIORITY} or null")


def _check_text(value: Any) -> Optional[str]:
    return None if value is None or (isinstance(value, str) and len(value) <= 4096) else "must be a string or null"


def _check_fingerprint(value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        return "must be an object with size, mtime and optionally checksum"
    if "size" in value and not (_is_int(value["size"]) and value["size"] >= 0):
        return "size must be a whole number >= 0"
    if "mtime" in value and not _is_number(value["mtime"]):
        return "mtime must be a number (seconds since the epoch)"
    if "checksum" in value:
        match = CHECKSUM.match(value["checksum"]) if isinstance(value["checksum"], str) else None
        if not match or match.group(1) not in CHECKSUM_ALGORITHMS:
            return f"checksum must be ALGORITHM:HEX with ALGORITHM one of {', '.join(CHECKSUM_ALGORITHMS)}"
    return None


# Version 1's fields: (checker, required). Unknown fields are kept and ignored (see the version policy).
FIELDS_V1: dict[str, tuple[Callable[[Any], Optional[str]], bool]] = {
    "name": (_check_name, True),
    "path": (lambda value: None if isinstance(value, str) else "must be a string", True),
    "state": (_check_choice(STATES), True),
    "uuid": (_check_uuid, False),
    "format": (_check_choice(FORMATS), False),
    "size": (_check_count, False),
    "memory_mib": (_check_count, False),
    "machine": (_check_text, False),
    "saved_at": (_check_text, False),
    "fingerprint": (_check_fingerprint, False),
    # Optional since the start of version 1's use by host_restore's pacing: older manifests have none (priority 0).
    "priority": (_check_priority, False),
}


# A discard record's fields (optional in version 1: a manifest without ``discarded`` has none).
DISCARD_FIELDS: dict[str, tuple[Callable[[Any], Optional[str]], bool]] = {
    "name": (_check_name, True),
    "uuid": (_check_uuid, False),
    "path": (_check_text, False),
    "saved_at": (_check_text, False),
    "discarded_at": (_check_text, False),
    "discarded_by": (_check_text, False),
    "reason": (_check_text, False),
}


def validate_discard(record: Any, index: int) -> dict[str, Any]:
    """A ``discarded`` record, checked; raises ManifestError naming the record and the field."""
    where = f"discarded[{index}]"
    if not isinstance(record, Mapping):
        raise ManifestError(f"{where} must be an object, not {type(record).__name__}")
    for name, (check, required) in DISCARD_FIELDS.items():
        if name not in record:
            if required:
                raise ManifestError(f"{where} has no '{name}'")
            continue
        problem = check(record[name])
        if problem:
            raise ManifestError(f"{where}: '{name}' {problem}")
    return dict(record)


def _discards(data: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    records = data.get("discarded", [])
    if not isinstance(records, list):
        raise ManifestError("its 'discarded' must be a list")
    checked = [validate_discard(record, index) for index, record in enumerate(records)]
    names = [record["name"] for record in checked]
    duplicate = next((name for index, name in enumerate(names) if name in names[:index]), None)
    if duplicate is not None:
        raise ManifestError(f"'discarded' lists {duplicate!r} twice")
    return tuple(sorted(checked, key=lambda record: record["name"]))


def image_path_problem(path: str, directory: str) -> Optional[str]:
    """Why ``path`` is not a file directly inside ``directory``.

    The comparison is on the text, as the drain wrote it: no ``..`` (which a symbolic
    link could turn into any directory), and the normalised parent must be the
    normalised directory.
    """
    if not os.path.isabs(path) or "\x00" in path:
        return "must be an absolute path"
    if ".." in path.split("/") or path.endswith("/"):
        return "must not contain '..' nor end with '/'"
    if os.path.dirname(os.path.normpath(path)) != os.path.normpath(directory):
        return (f"must name a file directly inside the manifest's directory {os.path.normpath(directory)} "
                "(the drain writes the images next to the manifest; move them together)")
    return None


def validate_entry(entry: Any, index: int, directory: str) -> dict[str, Any]:
    """A version 1 entry, checked; raises ManifestError naming the entry and the field."""
    where = _where(index, entry)
    if not isinstance(entry, Mapping):
        raise ManifestError(f"{where} must be an object, not {type(entry).__name__}")
    for name, (check, required) in FIELDS_V1.items():
        if name not in entry:
            if required:
                raise ManifestError(f"{where} has no '{name}'")
            continue
        problem = check(entry[name])
        if problem:
            raise ManifestError(f"{where}: '{name}' {problem}")
    problem = image_path_problem(entry["path"], directory)
    if problem:
        raise ManifestError(f"{where}: 'path' {problem}")
    return {**entry, "path": os.path.normpath(entry["path"])}


def _version(data: Mapping[str, Any]) -> tuple[int, tuple[str, ...]]:
    if "version" not in data:
        return 1, (UNVERSIONED_NOTE,)
    version = data["version"]
    if not _is_int(version) or version < OLDEST_VERSION:
        raise ManifestVersionError(
            f"its 'version' is {json.dumps(version)[:40]}, which no savestate.qemu writes: it is not a drain manifest "
            "or was edited by hand. Drain the host again to write a new one")
    if version > FORMAT_VERSION:
        raise ManifestVersionError(
            f"it is of format version {version}, newer than this savestate.qemu reads (versions {OLDEST_VERSION} to "
            f"{FORMAT_VERSION}): a newer savestate.qemu wrote it. Run the roles with that version or a newer one "
            "(ansible-galaxy collection install --upgrade savestate.qemu on the controller); see docs/drain-manifest.md")
    return version, ()


def parse_manifest(data: Any, directory: str) -> Manifest:
    """Validate a decoded manifest whose file is in ``directory``; raises ManifestError."""
    if not isinstance(data, Mapping):
        raise ManifestError(f"it must be a JSON object with 'version' and 'guests', not {type(data).__name__}")
    version, notes = _version(data)
    guests = data.get("guests")
    if not isinstance(guests, list):
        raise ManifestError("its 'guests' must be a list")
    entries = [validate_entry(entry, index, directory) for index, entry in enumerate(guests)]
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        if entry["name"] in seen:
            raise ManifestError(f"guests[{seen[entry['name']]}] and guests[{index}] are both named {entry['name']!r}")
        seen[entry["name"]] = index
        if any(other["path"] == entry["path"] for other in entries[:index]):
            raise ManifestError(f"{_where(index, entry)}: another guest has the same image {entry['path']}")
    return Manifest(version, tuple(sorted(entries, key=lambda entry: entry["name"])), notes, _discards(data))


def parse_text(text: str, directory: str) -> Manifest:
    try:
        data = json.loads(text)
    except ValueError as error:
        raise ManifestError(f"it is not valid JSON ({error})") from None
    return parse_manifest(data, directory)


def dump_manifest(entries: Iterable[Mapping[str, Any]], directory: str,
                  discarded: Iterable[Mapping[str, Any]] = ()) -> str:
    """The manifest file's text for ``entries`` (and discard records), validated first (the writer checks
    what readers check)."""
    data: dict[str, Any] = {"version": FORMAT_VERSION, "guests": [dict(entry) for entry in entries]}
    discarded = [dict(record) for record in discarded]
    if discarded:
        data["discarded"] = discarded
    manifest = parse_manifest(data, directory)
    return json.dumps(manifest.as_dict(), indent=2, sort_keys=True) + "\n"


# --- the file on the host ---------------------------------------------------------

def read_manifest(path: str) -> Optional[Manifest]:
    """The manifest at ``path``, or None when there is none; raises ManifestError, prefixed with the path."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as error:
        hint = " (a symbolic link is refused: give the real path)" if error.errno == errno.ELOOP else ""
        raise ManifestError(f"cannot open the drain manifest {path}: {error.strerror or error}{hint}") from None
    try:
        problem = file_trust_problem(os.fstat(fd))
        if problem:
            raise ManifestError(f"refusing the drain manifest {path}: {problem}. It decides which images are "
                                "restored, so only root and its owner may be able to change it (chmod go-w)")
        with os.fdopen(os.dup(fd), "rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"the drain manifest {path} is larger than {MAX_MANIFEST_BYTES} bytes: not a manifest")
    try:
        return parse_text(raw.decode("utf-8"), os.path.dirname(path))
    except UnicodeDecodeError:
        raise ManifestError(f"the drain manifest {path} is not UTF-8 text") from None
    except ManifestError as error:
        raise type(error)(f"the drain manifest {path} cannot be used: {error}. Nothing was changed") from None


def current_text(path: str) -> Optional[str]:
    """The manifest file's text as it is (for changed and diff), or None when absent or unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(MAX_MANIFEST_BYTES)
    except OSError:
        return None


def write_manifest(path: str, text: str) -> None:
    """Replace the manifest atomically and durably (a reader sees the old one or the new one), mode 0600."""
    try:
        dir_fd = open_directory(os.path.dirname(path) or ".")
        try:
            replace_file(dir_fd, os.path.basename(path), text.encode("utf-8"))
        finally:
            os.close(dir_fd)
    except OSError as error:
        raise ManifestError(f"cannot write the drain manifest {path}: {error.strerror or error}") from None


# --- entries and images --------------------------------------------------------------

Digest = Callable[[str, str], Optional[str]]


def _lstat(path: str) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except OSError:
        return None


def fingerprint(path: str, algorithm: Optional[str], digest: Digest) -> dict[str, Any]:
    """What the restore compares the image with: size, modification time, and a checksum if asked for."""
    info = _lstat(path)
    if info is None or not stat.S_ISREG(info.st_mode):
        raise ManifestError(f"the image {path} to list in the manifest is gone or not a regular file")
    result: dict[str, Any] = {"size": info.st_size, "mtime": info.st_mtime}
    if algorithm:
        result["checksum"] = f"{algorithm}:{digest(path, algorithm)}"
    return result


def entry_from_image(image: Mapping[str, Any], algorithm: Optional[str], digest: Digest) -> dict[str, Any]:
    """A manifest entry for an image the save module wrote (its result's ``image``).

    A ``priority`` in ``image`` (host_drain_priorities, added by the role) is recorded in the entry.
    """
    if not isinstance(image, Mapping) or not isinstance(image.get("path"), str):
        raise ManifestError(f"a saved image must be the save module's 'image' result, with a path, not {image!r:.200}")
    path = image["path"]
    taken = fingerprint(path, algorithm, digest)
    memory_kib = image.get("memory_kib")
    metadata = image.get("metadata")
    metadata = metadata if isinstance(metadata, Mapping) else {}
    entry = {"name": image.get("name"), "uuid": image.get("uuid"), "path": path,
             "state": "running" if image.get("was_running") else "paused", "format": image.get("format"),
             "size": taken["size"], "memory_mib": memory_kib // 1024 if isinstance(memory_kib, int) else None,
             "machine": image.get("machine"), "saved_at": metadata.get("saved_at"), "fingerprint": taken}
    if image.get("priority") is not None:
        entry["priority"] = image["priority"]
    return entry


def image_problem(entry: Mapping[str, Any], verify: bool, digest: Digest) -> tuple[bool, Optional[str]]:
    """Whether the entry's image exists, and (with ``verify``) why it may not be restored, or None."""
    path = entry["path"]
    info = _lstat(path)
    if info is None:
        return False, f"the image {path} is gone"
    if not stat.S_ISREG(info.st_mode):
        return False, f"the image {path} is not a regular file"
    if not verify:
        return True, None
    expected = entry.get("fingerprint") or {}
    if not expected:
        return True, ("the manifest has no fingerprint of the image to compare it with "
                      "(host_restore_verify_image: false restores it anyway)")
    if "size" in expected and info.st_size != expected["size"]:
        return True, f"the image changed size since the drain ({expected['size']} -> {info.st_size} bytes)"
    if "checksum" in expected:
        algorithm, wanted = expected["checksum"].split(":", 1)
        if digest(path, algorithm) != wanted:
            return True, "the image's checksum differs from the manifest's"
    elif "mtime" in expected and abs(info.st_mtime - expected["mtime"]) > MTIME_TOLERANCE:
        return True, "the image was modified after the drain"
    return True, None


# --- discards ---------------------------------------------------------------------------

def discard_record(name: str, entry: Optional[Mapping[str, Any]], discarded_at: str, discarded_by: Optional[str],
                   reason: Optional[str], uuid: Optional[str] = None) -> dict[str, Any]:
    """What the manifest keeps of a guest discarded on purpose (its entry, if it had one, and who and when)."""
    entry = entry or {}
    return {"name": name, "uuid": entry.get("uuid", uuid), "path": entry.get("path"), "saved_at": entry.get("saved_at"),
            "discarded_at": discarded_at, "discarded_by": discarded_by, "reason": reason}


def dump_discard(manifest: Optional[Manifest], record: Mapping[str, Any], directory: str) -> str:
    """The manifest's text once the guest of ``record`` is discarded: its entry gone, the record added
    (replacing an earlier record of that name); every other entry and record as it was."""
    name = record["name"]
    guests = [entry for entry in manifest.guests if entry["name"] != name] if manifest else []
    earlier = [other for other in manifest.discarded if other["name"] != name] if manifest else []
    return dump_manifest(guests, directory, earlier + [dict(record)])


def discard_for(manifest: Optional[Manifest], name: str) -> Optional[dict[str, Any]]:
    """The manifest's discard record of ``name``, or None."""
    return next((dict(record) for record in (manifest.discarded if manifest else ()) if record["name"] == name), None)


def kept_discards(path: str, entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The discard records of the manifest at ``path`` that a rewrite with ``entries`` keeps.

    A drain rewrites the manifest: it keeps the records of guests it does not list again
    (so a later restore still reports them as discarded), and drops those of guests it
    saved anew. An unreadable manifest has no records to keep (the reader refuses it).
    """
    names = {entry.get("name") for entry in entries}
    try:
        manifest = read_manifest(path)
    except ManifestError:
        return []
    return [dict(record) for record in (manifest.discarded if manifest else ()) if record["name"] not in names]
