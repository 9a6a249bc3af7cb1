# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Filters of the host_drain and host_restore roles: rounds of concurrent jobs, per-guest rows, summaries.

The roles' decisions that would otherwise be long Jinja expressions live here, where
they are plain Python with unit tests (tests/unit/plugins/filter/test_fleet.py):

- ``drain_plan``: which guests a drain saves, keeps from an earlier drain, skips or
  refuses (and why);
- ``drain_space``: whether the guests' RAM fits in the image directory;
- ``restore_plan``: which guests of the manifest a restore brings back, in which
  order, which it leaves alone and which it refuses (and why);
- ``rounds``: split a host's guests into rounds of at most N concurrent jobs;
- ``with_priorities``: set the restore priority host_drain records in manifest entries;
- ``drain_rows`` / ``restore_rows``: one row per guest (state before, image, size,
  seconds, MiB/s, state after, result, message) from what the role collected;
- ``fleet_summary``: the rows as a table an operator reads at a glance, with a
  headline that says what happened, or what would happen in check mode;
- ``fleet_failure``: the role's failure message, which never claims that other
  guests were saved or restored when none were;
- ``job_lines``: one line per guest of a round as its job finished (bytes, seconds,
  MiB/s from the module's ``stats``), and ``fleet_totals``: the closing line (bytes,
  wall time, aggregate MiB/s, guests ok and failed);
- ``drain_estimate`` / ``estimate_lines``: what a drain would write and how long it
  would take, for check mode, from the bandwidth the save module recorded on the host
  (drain_manifest's ``bandwidth``) or a conservative default, labelled as such.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._manifest import SAFE_NAME
from ansible_collections.savestate.qemu.plugins.module_utils._timestamps import parse_utc

MIB = 1048576
COLUMNS = ("guest", "before", "image", "size", "seconds", "MiB/s", "after")

# What each result means in a summary headline, for a real run and for check mode.
DRAIN_WORDS = {"saved": "saved", "would_save": "would save", "kept": "already saved earlier",
               "skipped": "skipped (libvirt's)", "stranded": "left running (the restoring QEMU cannot load it)",
               "failed": "failed"}
RESTORE_WORDS = {"restored": "restored", "would_restore": "would restore", "already_active": "already active",
                 "discarded": "discarded", "stale": "too old, held back", "failed": "failed"}
# What a restored guest's ``clock_synced`` says, in a restore's headline.
CLOCK_WORDS = {True: "synced", False: "not synced", "no agent": "no agent"}


def _names(guests: Iterable[Mapping[str, Any]]) -> list[str]:
    return [guest["name"] for guest in guests if isinstance(guest.get("name"), str)]


def _refusal(name: Optional[str], uuid: Any, msg: str) -> dict[str, Any]:
    return {"name": name, "uuid": uuid, "msg": msg}


def drain_plan(guests: Iterable[Mapping[str, Any]], earlier: Optional[Mapping[str, Any]] = None,
               wanted: Iterable[str] = (), exclude: Iterable[str] = ()) -> dict[str, list[Any]]:
    """What a drain does with each guest: ``to_save``, ``kept``, ``skipped`` (libvirt's) and ``failures``.

    ``guests`` are guest_info's active guests; ``earlier`` the drain_manifest read result
    (``manifest.guests`` and ``images[].exists``) of the manifest already there;
    ``wanted`` the names asked for (empty: every guest); ``exclude`` names left out.
    An earlier entry is kept while its image exists and its guest is not active again.
    A guest is refused (a failure, left running) when it has no name, a name that
    cannot be a file name, or the name of another active guest; a name asked for
    that is neither active nor kept is refused too.
    """
    guests = list(guests)
    wanted, exclude = list(wanted), set(exclude)
    active = _names(guests)
    scope = [guest for guest in guests if (not wanted or guest.get("name") in wanted) and guest.get("name") not in exclude]
    own = [guest for guest in scope if guest.get("managed_by") == "none"]
    failures = [_refusal(None, guest.get("uuid"), f"the QEMU guest with pid {guest.get('pid')} has no name (-name), "
                         "which a save image must record; it was left running")
                for guest in own if not isinstance(guest.get("name"), str)]
    named = [guest for guest in own if isinstance(guest.get("name"), str)]
    failures += [_refusal(guest["name"], guest.get("uuid"), "the name cannot be used as the image's file name (letters, "
                          "digits, '.', '_', '+' and '-' only); it was left running")
                 for guest in named if not SAFE_NAME.match(guest["name"])]
    safe = [guest for guest in named if SAFE_NAME.match(guest["name"])]
    failures += [_refusal(guest["name"], guest.get("uuid"), "another active guest has the same name, and both images "
                          "would get the same file name; it was left running")
                 for guest in safe if active.count(guest["name"]) > 1]
    existing = {image.get("name") for image in (earlier or {}).get("images", []) if image.get("exists")}
    entries = ((earlier or {}).get("manifest") or {}).get("guests", [])
    kept = [entry for entry in entries if entry.get("name") in existing and entry.get("name") not in active]
    failures += [_refusal(name, None, "no active guest has this name, and the manifest lists no image of it")
                 for name in wanted if name not in active and name not in _names(kept)]
    return {"to_save": [guest for guest in safe if active.count(guest["name"]) == 1], "kept": kept,
            "skipped": [guest for guest in scope if guest.get("managed_by") == "libvirt"], "failures": failures}


def drain_space(guests: Iterable[Mapping[str, Any]], statfs: str, margin_mib: Any, directory: str) -> str:
    """Why the guests' RAM does not fit in ``directory``, or "" when it does.

    ``statfs`` is the output of ``stat -f -c '%a %S' DIRECTORY`` (free blocks, block size);
    a raw image is about as large as the guest's RAM, so that plus ``margin_mib`` must fit.
    """
    guests = list(guests)
    try:
        blocks, block_size = (int(word) for word in statfs.split())
    except ValueError:
        return f"cannot tell the free space in {directory} from {statfs!r}"
    free_mib = blocks * block_size // MIB
    ram_mib = sum(int(guest.get("memory_mib") or 0) for guest in guests)
    needed_mib = ram_mib + int(margin_mib)
    if free_mib >= needed_mib:
        return ""
    return (f"Not enough free space in {directory} to drain this host: {free_mib} MiB free, {needed_mib} MiB needed "
            f"({len(guests)} guests with {ram_mib} MiB of RAM in all, plus host_drain_space_margin_mib={int(margin_mib)}). "
            "No guest was saved. Free some space, point host_drain_dir at a larger file system, or choose a "
            "compressed host_drain_format.")


def _key(name: Any, uuid: Any) -> tuple[str, str]:
    return str(name), str(uuid).lower()


# A duration: numbers, each with an optional unit (s, m, h, d, w), e.g. 900, "15m", "1h30m", "1.5d".
DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhdw]?)+")
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration_seconds(value: Any) -> Optional[float]:
    """``value`` (seconds, or a string like "90", "15m", "1h30m", "2d") in seconds; None and "" are no limit."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    text = "".join(str(value).split()).lower()
    if isinstance(value, bool) or not DURATION.fullmatch(text):
        raise ValueError(f"{value!r} is not a duration: give seconds (900) or numbers with a unit, s, m, h, d or w "
                         "(15m, 1h30m, 2d), or null for no limit")
    return sum(float(number) * DURATION_UNITS[unit] for number, unit in DURATION_PART.findall(text))


def saved_time(entry: Mapping[str, Any]) -> Optional[float]:
    """When the entry's image was written: its ``saved_at``, else its fingerprint's modification time, else None."""
    saved = parse_utc(entry.get("saved_at"))
    if saved is not None:
        return saved
    mtime = (entry.get("fingerprint") or {}).get("mtime")
    return float(mtime) if isinstance(mtime, (int, float)) and not isinstance(mtime, bool) else None


def _whole(name: Any, value: Any) -> int:
    """A priority given for ``name``: a whole number (or its digits as a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("+-").isdigit():
        raise ValueError(f"the priority of {name} must be a whole number, not {value!r}")
    return int(value)


def _priority(entry: Mapping[str, Any], overrides: Mapping[str, Any]) -> int:
    """The entry's priority: the restore-time override, else the one the drain recorded, else 0."""
    value = overrides.get(entry["name"], entry.get("priority"))
    return 0 if value is None else _whole(entry["name"], value)


def _staleness(entries: Iterable[Mapping[str, Any]], max_age: Any, now: Any) -> list[dict[str, Any]]:
    """The entries older than ``max_age`` seconds at ``now``, each with ``age_s`` (None: its age is unknown)."""
    limit = duration_seconds(max_age)
    if limit is None:
        return []
    moment = float(now) if now not in (None, "") else time.time()
    stale = []
    for entry in entries:
        saved = saved_time(entry)
        age = None if saved is None else round(max(0.0, moment - saved), 1)
        if age is None or age > limit:
            stale.append({**entry, "age_s": age, "max_age_s": limit})
    return stale


def restore_plan(manifest: Mapping[str, Any], guests: Iterable[Mapping[str, Any]], wanted: Iterable[str] = (),
                 order: Iterable[str] = (), priorities: Optional[Mapping[str, Any]] = None, max_age: Any = None,
                 now: Any = None) -> dict[str, Any]:
    """What a restore does with each entry of the manifest.

    ``manifest`` is the drain_manifest read result (``manifest.guests``, and
    ``images[].problem`` when the images were compared with their fingerprints);
    ``guests`` guest_info's active guests; ``wanted`` the names to restore (empty:
    all); ``order`` the names to restore first, in that order. The others follow by
    priority, highest first (``priorities``, name -> number, overrides the entry's
    ``priority``; 0 when neither gives one), then by name. ``max_age`` (seconds or a
    duration such as "15m"; None: no limit) holds back the images saved longer ago
    than that at ``now`` (seconds since the epoch; default: the current time), or
    whose age cannot be told. Returns ``pending`` (to restore, in order, each with its
    ``priority``), ``active`` (already running with the image's name and UUID: left
    alone), ``rejected`` (name -> why the image is not restored), ``stale`` (entries
    too old, with ``age_s`` and ``max_age_s``), ``unknown`` (names asked for that the
    manifest does not list), ``entries`` (every selected entry, in order) and
    ``discarded`` (the manifest's discard records of the guests in scope: never restored).
    """
    wanted, order, overrides = list(wanted), list(order), dict(priorities or {})
    records = [record for record in (manifest.get("manifest") or {}).get("discarded", [])
               if not wanted or record.get("name") in wanted]
    # An entry of a discarded guest is not restored, unless it was saved again after the discard.
    entries = [entry for entry in (manifest.get("manifest") or {}).get("guests", [])
               if not any(_discards(record, entry) for record in records)]
    problems = {image.get("name"): image.get("problem") for image in manifest.get("images", []) if image.get("problem")}
    selected = {entry["name"]: {**entry, "priority": _priority(entry, overrides)}
                for entry in entries if not wanted or entry["name"] in wanted}
    first = [selected[name] for name in dict.fromkeys(order) if name in selected]
    ordered = first + sorted((entry for entry in selected.values() if entry["name"] not in order),
                             key=lambda entry: (-entry["priority"], entry["name"]))
    running = {_key(guest.get("name"), guest.get("uuid")) for guest in guests}
    active = [entry for entry in ordered if _key(entry["name"], entry.get("uuid")) in running]
    pending = [entry for entry in ordered if _key(entry["name"], entry.get("uuid")) not in running]
    rejected = {entry["name"]: problems[entry["name"]] for entry in pending if entry["name"] in problems}
    # An image that failed its check is reported as such, whatever its age.
    stale = _staleness((entry for entry in pending if entry["name"] not in rejected), max_age, now)
    held = set(rejected) | {entry["name"] for entry in stale}
    return {"pending": [entry for entry in pending if entry["name"] not in held], "active": active,
            "rejected": rejected, "stale": stale,
            "unknown": [name for name in wanted if name not in _names(entries) + _names(records)],
            "entries": ordered, "discarded": records}


def _discards(record: Mapping[str, Any], entry: Mapping[str, Any]) -> bool:
    """Whether the discard ``record`` covers ``entry``: same guest, not saved again since (unknown times: covered)."""
    if record.get("name") != entry.get("name"):
        return False
    if record.get("uuid") and entry.get("uuid") and str(record["uuid"]).lower() != str(entry["uuid"]).lower():
        return False
    saved, discarded = parse_utc(entry.get("saved_at")), parse_utc(record.get("discarded_at"))
    return saved is None or discarded is None or saved <= discarded


def rounds(items: Iterable[Any], size: Any, first: Iterable[str] = ()) -> list[list[Any]]:
    """Split ``items`` into rounds of at most ``size``; the items named in ``first`` go alone, in that order.

    A round's jobs run at the same time; the next round starts when the round ends.
    Items named in ``first`` (by their ``name``) each get a round of their own before
    the others, so that a guest listed there is back before the next one starts.
    """
    size = int(size)
    if size < 1:
        raise ValueError(f"the concurrency must be at least 1, not {size}")
    items = list(items)
    by_name = {item.get("name"): item for item in items if isinstance(item, Mapping)}
    leading = [by_name[name] for name in dict.fromkeys(first) if name in by_name]
    rest = [item for item in items if not any(item is lead for lead in leading)]
    return [[item] for item in leading] + [rest[start:start + size] for start in range(0, len(rest), size)]


def _job(result: Mapping[str, Any]) -> Mapping[str, Any]:
    """The guest or manifest entry a job was started for (async_status result -> start result -> item)."""
    started = result.get("item", {})
    return started.get("item", {}) if isinstance(started, Mapping) else {}


def _job_message(result: Mapping[str, Any], timeout: Any) -> str:
    if result.get("msg"):
        return str(result["msg"])
    if not result.get("finished", True):
        return f"the job did not finish within {timeout} s"
    return "the job failed without a message"


def _job_succeeded(result: Mapping[str, Any]) -> bool:
    return bool(result.get("finished")) and not result.get("failed") and isinstance(result.get("guest"), Mapping)


def _stats(result: Mapping[str, Any]) -> dict[str, Any]:
    stats = result.get("stats") or {}
    image = result.get("image") or {}
    return {"size": stats.get("bytes", image.get("size")), "seconds": stats.get("duration_s"),
            "mib_s": stats.get("throughput_mib_s")}


def _row(guest: Any, before: Any, image: Any = None, after: Any = None, result: str = "", msg: str = "",
         **extra: Any) -> dict[str, Any]:
    """A summary row; ``guest`` is what the table shows, ``name`` and ``uuid`` identify the guest."""
    row = {"guest": guest, "name": guest, "uuid": None, "before": before, "image": image, "size": None,
           "seconds": None, "mib_s": None, "after": after, "result": result, "msg": msg}
    row.update(extra)
    return row


def succeeded(results: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The async_status results of jobs that finished without failing (their module's result)."""
    return [result for result in results if _job_succeeded(result)]


def failures(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The failed rows as the roles report them: ``name``, ``uuid``, ``msg``."""
    return [{"name": row.get("name"), "uuid": row.get("uuid"), "msg": row.get("msg")}
            for row in rows if row.get("result") == "failed"]


def _state_after(name: Any, guests_after: Iterable[Mapping[str, Any]], default: str = "gone") -> str:
    for guest in guests_after:
        if guest.get("name") == name:
            return str(guest.get("state") or "unknown")
    return default


def drain_rows(saves: Iterable[Mapping[str, Any]], failures: Iterable[Mapping[str, Any]],
               kept: Iterable[Mapping[str, Any]], skipped: Iterable[Mapping[str, Any]],
               guests_before: Iterable[Mapping[str, Any]], guests_after: Iterable[Mapping[str, Any]],
               image_dir: str, check_mode: bool = False, timeout: Any = None,
               listed_only: Iterable[Mapping[str, Any]] = (),
               entries: Iterable[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """One row per guest the drain looked at.

    ``saves`` are the async_status results of the save jobs; ``failures`` the guests
    refused before any save (``name``, ``uuid``, ``msg``); ``kept`` the manifest entries
    of guests saved by an earlier run; ``skipped`` libvirt's guests; ``listed_only`` the
    guests a check-mode run could only list (no image directory yet, so no save check);
    ``entries`` the manifest entries written, whose fingerprint dates each image
    (``finished``, seconds since the epoch: when its save ended).
    """
    before = {guest.get("name"): guest.get("state") for guest in guests_before}
    finished = {entry.get("name"): (entry.get("fingerprint") or {}).get("mtime") for entry in entries}
    guests_after = list(guests_after)
    rows = []
    for result in saves:
        guest = _job(result)
        name = guest.get("name")
        path = f"{image_dir}/{name}.save"
        uuid = guest.get("uuid")
        if not _job_succeeded(result):
            rows.append(_row(name, guest.get("state"), None, _state_after(name, guests_after), "failed",
                             _job_message(result, timeout), uuid=uuid))
        elif check_mode:
            rows.append(_row(name, guest.get("state"), path, "stopped (would be)", "would_save",
                             str(result.get("msg") or ""), size=_ram_bytes(guest), uuid=uuid))
        else:
            row = _row(name, guest.get("state"), (result.get("image") or {}).get("path", path),
                       result["guest"].get("state"), "saved", str(result.get("msg") or ""), uuid=uuid)
            row.update(_stats(result), finished=finished.get(name))
            rows.append(row)
    for guest in listed_only:
        rows.append(_row(guest.get("name"), guest.get("state"), f"{image_dir}/{guest.get('name')}.save",
                         "stopped (would be)", "would_save", "not checked: the image directory does not exist yet",
                         size=_ram_bytes(guest), uuid=guest.get("uuid")))
    for refused in failures:
        name = refused.get("name")
        rows.append(_row(name if name else f"(unnamed, uuid {refused.get('uuid') or '-'})", before.get(name), None,
                         _state_after(name, guests_after) if name in before else "-", "failed",
                         str(refused.get("msg") or ""), name=name, uuid=refused.get("uuid")))
    for entry in kept:
        rows.append(_row(entry.get("name"), f"saved earlier ({entry.get('state')})", entry.get("path"), "stopped",
                         "kept", "", size=entry.get("size"), uuid=entry.get("uuid")))
    for guest in skipped:
        rows.append(_row(guest.get("name"), guest.get("state"), None, guest.get("state"), "skipped",
                         "managed by libvirt: save it with virsh managedsave", uuid=guest.get("uuid")))
    return rows


def _ram_bytes(guest: Mapping[str, Any]) -> Any:
    """An upper bound on a raw image's size: the guest's RAM (check mode writes nothing to measure)."""
    memory_mib = guest.get("memory_mib")
    return int(memory_mib) * MIB if memory_mib else None


def restore_rows(restores: Iterable[Mapping[str, Any]], rejected: Mapping[str, str],
                 active: Iterable[Mapping[str, Any]], unknown: Iterable[str],
                 guests_before: Iterable[Mapping[str, Any]], check_mode: bool = False, remove_images: bool = False,
                 timeout: Any = None, entries: Iterable[Mapping[str, Any]] = (),
                 target_state: str = "as_saved", discarded: Iterable[Mapping[str, Any]] = (),
                 stale: Iterable[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """One row per guest the restore looked at.

    ``restores`` are the async_status results of the restore jobs (their item is the
    manifest entry); ``rejected`` maps names to why their image was not restored;
    ``active`` the manifest entries whose guest was already active; ``unknown`` names
    asked for that the manifest does not list; ``entries`` the manifest's entries (for
    the image of a rejected guest); ``target_state`` the role's ``host_restore_state``;
    ``discarded`` the manifest's discard records (restore_plan's ``discarded``); ``stale``
    restore_plan's entries too old to restore (a ``stale`` row each, not a failure). A
    restored guest's row has ``clock_synced`` (the restore's ``guest.clock_synced``).
    """
    states = {guest.get("name"): guest.get("state") for guest in guests_before}
    images = {entry.get("name"): entry for entry in entries}
    rows = []
    for result in restores:
        entry = _job(result)
        saved = f"saved ({entry.get('state')})"
        if not _job_succeeded(result):
            rows.append(_row(entry.get("name"), saved, entry.get("path"), "not running", "failed",
                             _job_message(result, timeout) + "; the image is kept", size=entry.get("size"),
                             uuid=entry.get("uuid")))
        elif check_mode:
            image = entry.get("path")
            state = entry.get("state") if target_state == "as_saved" else target_state
            rows.append(_row(entry.get("name"), saved, f"{image} (would be removed)" if remove_images else image,
                             f"{state} (would be)", "would_restore", str(result.get("msg") or ""),
                             size=entry.get("size"), uuid=entry.get("uuid")))
        else:
            image = entry.get("path")
            row = _row(entry.get("name"), saved, f"{image} (removed)" if remove_images else image,
                       result["guest"].get("state"), "restored", str(result.get("msg") or ""),
                       image_removed=bool(remove_images), uuid=entry.get("uuid"),
                       clock_synced=result["guest"].get("clock_synced"))
            row.update(_stats(result))
            rows.append(row)
    for name, why in rejected.items():
        entry = images.get(name, {})
        rows.append(_row(name, f"saved ({entry.get('state')})" if entry else "saved", entry.get("path"), "not running",
                         "failed", f"{why}; not restored", uuid=entry.get("uuid")))
    rows += [_stale_row(entry) for entry in stale]
    for entry in active:
        rows.append(_row(entry.get("name"), states.get(entry.get("name"), "active"), entry.get("path"),
                         states.get(entry.get("name"), "active"), "already_active", "", uuid=entry.get("uuid")))
    for name in unknown:
        rows.append(_row(name, "-", None, "-", "failed", "the manifest lists no guest of this name"))
    for record in discarded:
        rows.append(_discarded_row(record, states))
    return rows


def _discarded_row(record: Mapping[str, Any], states: Mapping[Any, Any]) -> dict[str, Any]:
    """A guest discarded on purpose (savestate.qemu.discard): not restored, and not a failure."""
    name = record.get("name")
    why = f": {record['reason']}" if record.get("reason") else ""
    return _row(name, "discarded", None, states.get(name) or "not running", "discarded",
                f"discarded on {record.get('discarded_at') or '(unknown time)'} by "
                f"{record.get('discarded_by') or '(unknown)'}{why}; not restored", uuid=record.get("uuid"))


def _clocks(rows: Iterable[Mapping[str, Any]]) -> str:
    """How many restored guests' clocks were synced, e.g. "guest clocks: 2 synced, 1 no agent"; "" if none."""
    counts: dict[str, int] = {}
    for row in rows:
        if row.get("result") == "restored" and row.get("clock_synced") is not None:
            word = CLOCK_WORDS.get(row["clock_synced"], str(row["clock_synced"]))
            counts[word] = counts.get(word, 0) + 1
    return "guest clocks: " + ", ".join(f"{count} {word}" for word, count in counts.items()) if counts else ""


def _age(seconds: float) -> str:
    """A duration as an operator reads it: 45 s, 12 min, 3.5 h, 2.0 days."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}" if unit != "min" else f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _stale_row(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The row of an image too old to restore automatically: kept, and said how old it is."""
    age, limit = entry.get("age_s"), float(entry.get("max_age_s") or 0)
    why = (f"saved {_age(float(age))} ago ({entry.get('saved_at') or 'image modification time'})" if age is not None
           else "its age is unknown (the manifest records no saved_at nor fingerprint time)")
    return _row(entry.get("name"), f"saved ({entry.get('state')})", entry.get("path"), "not running", "stale",
                f"{why}, older than host_restore_max_age ({_age(limit)}): not restored, the image is kept; restore it "
                "with a larger host_restore_max_age (or null), or discard it", size=entry.get("size"),
                uuid=entry.get("uuid"), age_s=age, max_age_s=limit)


def with_priorities(items: Iterable[Mapping[str, Any]], priorities: Optional[Mapping[str, Any]] = None) -> list[dict[str, Any]]:
    """``items`` (manifest entries, or save results' images) with ``priority`` set for the names in ``priorities``.

    host_drain records each guest's restore priority (host_drain_priorities) in its manifest entry this way.
    """
    priorities = dict(priorities or {})
    result = []
    for item in items:
        item = dict(item)
        if item.get("name") in priorities:
            item["priority"] = _whole(item["name"], priorities[item["name"]])
        result.append(item)
    return result


def _size(value: Any) -> str:
    return "-" if value in (None, "") else f"{int(value) / MIB:.1f} MiB"


def _number(value: Any, digits: int = 1) -> str:
    return "-" if value in (None, "") else f"{float(value):.{digits}f}"


def _cells(row: Mapping[str, Any]) -> tuple[str, ...]:
    return (str(row.get("guest")), str(row.get("before") or "-"), str(row.get("image") or "-"), _size(row.get("size")),
            _number(row.get("seconds"), 2), _number(row.get("mib_s")), str(row.get("after") or "-"))


def _table(rows: list[Mapping[str, Any]]) -> list[str]:
    lines = [COLUMNS] + [_cells(row) for row in rows]
    widths = [max(len(line[column]) for line in lines) for column in range(len(COLUMNS))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]


def _counts(rows: Iterable[Mapping[str, Any]], words: Mapping[str, str]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["result"]] = counts.get(row["result"], 0) + 1
    return ", ".join(f"{counts[result]} {word}" for result, word in words.items() if counts.get(result))


def fleet_summary(rows: list[Mapping[str, Any]], host: str, role: str, check_mode: bool = False,
                  seconds: Any = None) -> list[str]:
    """The per-host headline, the per-guest table, and one line per problem, for ``debug: msg``."""
    words = DRAIN_WORDS if role == "drain" else RESTORE_WORDS
    done = [row for row in rows if row["result"] in ("saved", "restored")]
    moved = sum(int(row.get("size") or 0) for row in done)
    mode = " (check mode: nothing was changed)" if check_mode else ""
    headline = f"{host}: {role} of {len(rows)} guest(s){mode}: {_counts(rows, words) or 'nothing to do'}"
    if done:
        headline += f"; {moved / MIB:.1f} MiB"
    if seconds not in (None, ""):
        headline += f" in {float(seconds):.1f} s"
    clocks = _clocks(rows) if role == "restore" else ""
    if clocks:
        headline += f"; {clocks}"
    problems = [f"{row['guest']}: {row['result']}: {row['msg']}" for row in rows
                if row["result"] in ("failed", "skipped", "stranded", "discarded", "stale") and row.get("msg")]
    return [headline] + (_table(rows) if rows else []) + problems


def fleet_failure(rows: list[Mapping[str, Any]], role: str, check_mode: bool = False, manifest: str = "") -> str:
    """Why the role fails, and what happened to the other guests, exactly."""
    failed = [row for row in rows if row["result"] == "failed"]
    if not failed:
        return ""
    verb, past, outcome = (("drained", "saved", "would_save") if role == "drain"
                           else ("restored", "restored", "would_restore"))
    done = [row["guest"] for row in rows if row["result"] == (outcome if check_mode else past)]
    reasons = "; ".join(f"{row['guest']}: {row['msg']}" for row in failed)
    if check_mode:
        message = f"{len(failed)} guest(s) would not be {verb}: {reasons}. Nothing was changed (check mode)"
        others = f"; a real run would {'save' if role == 'drain' else 'restore'} {', '.join(done)}." if done else "."
        return message + others
    message = f"{len(failed)} guest(s) could not be {verb}: {reasons}."
    if not done:
        return message + f" No other guest was {past} in this run."
    where = f" and listed in {manifest}" if manifest and role == "drain" else ""
    return message + f" {len(done)} other guest(s) were {past}{where}: {', '.join(done)}."


# --- progress and estimates (issue 14) -------------------------------------------------

# The bandwidth a drain estimate assumes when none was measured on the host: a slow disk's.
DEFAULT_MIB_S = 100.0
# A failure message in a progress line is cut here: the summary at the end has it whole.
_LINE_MSG_MAX = 160
_VERBS = {"drain": ("saved", "save"), "restore": ("restored", "restore")}


def _short(text: Any) -> str:
    line = " ".join(str(text or "").split())
    return line if len(line) <= _LINE_MSG_MAX else line[:_LINE_MSG_MAX - 3] + "..."


def _amount(size: Any) -> str:
    return f"{int(size)} bytes ({int(size) / MIB:.1f} MiB)"


def job_lines(results: Iterable[Mapping[str, Any]], host: str, role: str) -> list[str]:
    """One line per finished job of a round: ``HOST: GUEST saved: N bytes (M MiB) in S s, R MiB/s``.

    With ``host`` empty the lines start with the guest (the roles' wait loops label each
    job's line with it the moment the job is seen finished).

    ``results`` are the round's async_status results; the figures are the module's
    ``stats`` (a job without them, an idempotent one, says so). A failed job's line
    carries the start of its message; the summary at the end has all of it.
    """
    done, verb = _VERBS[role]
    lines = []
    for result in results:
        name = (f"{host}: " if host else "") + (_job(result).get("name") or "(unnamed)")
        stats: Mapping[str, Any] = result["stats"] if isinstance(result.get("stats"), Mapping) else {}
        if not _job_succeeded(result):
            why = _job_message(result, None) if result.get("msg") or result.get("finished", True) \
                else "the job did not finish within its timeout"
            lines.append(f"{name} failed: {_short(why)}")
        elif stats.get("bytes") is not None and stats.get("duration_s") is not None:
            lines.append(f"{name} {done}: {_amount(stats['bytes'])} in {float(stats['duration_s']):.3f} s, "
                         f"{_number(stats.get('throughput_mib_s'))} MiB/s")
        else:
            lines.append(f"{name}: {_short(result.get('msg')) or f'nothing to {verb}'}")
    return lines


def fleet_totals(rows: Iterable[Mapping[str, Any]], host: str, role: str, seconds: Any = None) -> str:
    """The closing line: ``HOST: drain total: 3 ok, 1 failed; N bytes (M MiB) in S s wall, R MiB/s aggregate``.

    ``rows`` are drain_rows or restore_rows; ok counts the guests saved or restored in
    this run, the bytes are their images, the rate is those bytes over the role's wall time.
    """
    rows = list(rows)
    done = [row for row in rows if row.get("result") in ("saved", "restored")]
    failed = sum(1 for row in rows if row.get("result") == "failed")
    moved = sum(int(row.get("size") or 0) for row in done)
    line = f"{host}: {role} total: {len(done)} ok, {failed} failed; {_amount(moved)}"
    wall = float(seconds) if seconds not in (None, "") else None
    if wall is not None:
        line += f" in {wall:.1f} s wall"
        if wall > 0 and moved:
            line += f", {moved / MIB / wall:.1f} MiB/s aggregate"
    return line


def _free_bytes(statfs: Any) -> Optional[int]:
    try:
        blocks, block_size = (int(word) for word in str(statfs or "").split())
    except ValueError:
        return None
    return blocks * block_size


def _basis(bandwidth: Any, image_format: str, directory: str, default_mib_s: float) -> tuple[float, str, bool]:
    """The rate to assume, what it rests on, and whether it was measured."""
    measured = bandwidth.get(image_format) if isinstance(bandwidth, Mapping) else None
    if not isinstance(measured, Mapping):
        measured = {}
    rate = measured.get("mib_s")
    if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
        return (float(rate), f"measured on {measured.get('measured_at')} by the last {image_format} save into "
                f"{directory} on this host", True)
    return (float(default_mib_s), f"default assumption: no {image_format} save into {directory} was measured "
            "on this host yet", False)


def drain_estimate(guests: Iterable[Mapping[str, Any]], statfs: Any, bandwidth: Any, image_format: str,
                   concurrency: Any, directory: str, margin_mib: Any = 0,
                   default_mib_s: Any = DEFAULT_MIB_S) -> dict[str, Any]:
    """What a drain of ``guests`` would write into ``directory`` and how long it would take.

    Each image is at most its guest's RAM (``memory_mib``; a raw image holds the RAM in
    use, a compressed one less), so sizes and durations are upper bounds at the rate
    assumed. The rate is drain_manifest's ``bandwidth[image_format].mib_s`` (the last
    save into this directory, measured on the host), else ``default_mib_s``. Guests run
    in rounds of ``concurrency``; a round lasts as long as its largest guest. ``statfs``
    is ``stat -f -c '%a %S'`` of the directory (or its nearest existing parent), or "".
    """
    guests = list(guests)
    rate, basis, measured = _basis(bandwidth, image_format, directory, float(default_mib_s))
    rows = [{"name": guest.get("name"), "image_bytes_max": _ram_bytes(guest),
             "seconds": round(int(guest.get("memory_mib") or 0) / rate, 1)} for guest in guests]
    total = sum(int(row["image_bytes_max"] or 0) for row in rows)
    seconds = sum(max(row["seconds"] for row in batch) for batch in rounds(rows, concurrency))
    free = _free_bytes(statfs)
    needed = total + int(margin_mib or 0) * MIB
    return {"directory": directory, "format": image_format, "guests": rows, "image_bytes_max": total,
            "free_bytes": free, "fits": None if free is None else free >= needed, "mib_s": rate,
            "measured": measured, "basis": basis, "seconds": round(seconds, 1), "concurrency": int(concurrency)}


def estimate_lines(estimate: Mapping[str, Any], host: str) -> list[str]:
    """``drain_estimate``'s result as lines: the totals, the rate and its basis, then one line per guest."""
    free = estimate.get("free_bytes")
    space = (f"{free / MIB:.1f} MiB free in {estimate['directory']}" if free is not None
             else f"free space in {estimate['directory']} unknown")
    if estimate.get("fits") is False:
        space += " (NOT ENOUGH: a real run would refuse to save any guest)"
    lines = [f"{host}: drain estimate: {len(estimate['guests'])} guest(s), {estimate['format']} images of at most "
             f"{estimate['image_bytes_max'] / MIB:.1f} MiB in all (the guests' RAM: an upper bound), {space}",
             f"{host}: drain estimate: about {float(estimate['seconds']):.1f} s at most, "
             f"{estimate['concurrency']} at a time, at {float(estimate['mib_s']):.1f} MiB/s ({estimate['basis']})"]
    for row in estimate["guests"]:
        size = "unknown" if row["image_bytes_max"] is None else f"{row['image_bytes_max'] / MIB:.1f} MiB"
        lines.append(f"{host}: {row['name']}: image up to {size}, about {float(row['seconds']):.1f} s")
    return lines


class FilterModule:
    """The roles' filters (savestate.qemu.rounds, ...)."""

    def filters(self) -> dict[str, Any]:
        return {"drain_plan": drain_plan, "drain_space": drain_space, "restore_plan": restore_plan,
                "rounds": rounds, "drain_rows": drain_rows, "restore_rows": restore_rows, "succeeded": succeeded,
                "failures": failures, "fleet_summary": fleet_summary, "fleet_failure": fleet_failure,
                "with_priorities": with_priorities,
                "job_lines": job_lines, "fleet_totals": fleet_totals, "drain_estimate": drain_estimate,
                "estimate_lines": estimate_lines}
