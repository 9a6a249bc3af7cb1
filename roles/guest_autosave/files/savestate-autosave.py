# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Save every QEMU guest of this host at shutdown, restore them at boot (savestate.qemu).

Installed by the ``savestate.qemu.guest_autosave`` role and run by
``savestate-autosave.service``: ``ExecStop=`` runs ``save``, ``ExecStart=`` runs
``restore``. It uses the collection's own code on the host (no controller):
the same save and restore the modules do, guests restored into their systemd
units. Everything it does goes to stdout, i.e. the journal
(``journalctl -u savestate-autosave``).

save:    every active guest libvirt does not manage, ``--parallel`` at a time, each
         within ``--timeout`` s, all within ``--total-timeout`` s; a manifest
         (``manifest.json``) lists the images. A guest whose save fails keeps
         running; systemd then stops it the way its unit says (logged).
restore: the manifest's guests whose image is younger than ``--max-age`` s, one
         after the other ``--pace`` s apart; an image is removed once its guest runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any

from ansible_collections.savestate.qemu.plugins.module_utils._errors import SaveStateError
from ansible_collections.savestate.qemu.plugins.module_utils._host import scan_guests
from ansible_collections.savestate.qemu.plugins.module_utils._restore import RestoreRequest, restore_guest
from ansible_collections.savestate.qemu.plugins.module_utils._save import SaveRequest, save_guest

MANIFEST = "manifest.json"


def log(message: str) -> None:
    print(message, flush=True)


def _image_path(directory: str, name: str) -> str:
    return os.path.join(directory, name.replace("/", "_") + ".sav")


def save_one(directory: str, name: str, timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    path = _image_path(directory, name)
    try:
        outcome = save_guest(SaveRequest(path=path, name=name, after_save="stop", timeout=timeout))
    except SaveStateError as error:
        log(f"{name}: NOT saved, it keeps running and its unit stops it as usual: {error}")
        return {"name": name, "saved": False, "error": str(error)}
    unit = (outcome.image or {}).get("guest", {}).get("unit") if outcome.image else None
    log(f"{name}: saved to {path} in {time.monotonic() - started:.1f} s ({outcome.msg})")
    return {"name": name, "saved": True, "path": path, "unit": unit,
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def save_all(args: argparse.Namespace) -> int:
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    guests = [g for g in scan_guests() if g.name and g.managed_by is None]
    skipped = [g.name or str(g.pid) for g in scan_guests() if g.managed_by is not None or not g.name]
    if skipped:
        log(f"left alone (libvirt's, or without a name): {', '.join(skipped)}")
    log(f"saving {len(guests)} guest(s) to {args.dir}, {args.parallel} at a time: "
        + ", ".join(str(g.name) for g in guests))
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + args.total_timeout
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        futures = {pool.submit(save_one, args.dir, str(g.name), args.timeout): g for g in guests}
        try:
            for future in concurrent.futures.as_completed(futures, timeout=max(1.0, deadline - time.monotonic())):
                results.append(future.result())
        except concurrent.futures.TimeoutError:
            late = [str(g.name) for f, g in futures.items() if not f.done()]
            log(f"total time of {args.total_timeout:g} s is up; still saving: {', '.join(late)}; "
                "their units stop them as usual")
    entries = [r for r in results if r["saved"]]
    _write_manifest(args.dir, entries)
    failed = [r["name"] for r in results if not r["saved"]]
    log(f"saved {len(entries)} guest(s); failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


def _write_manifest(directory: str, entries: list[dict[str, Any]]) -> None:
    temporary = os.path.join(directory, MANIFEST + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({"guests": entries}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, os.path.join(directory, MANIFEST))


def restore_all(args: argparse.Namespace) -> int:
    try:
        with open(os.path.join(args.dir, MANIFEST), encoding="utf-8") as handle:
            entries = json.load(handle).get("guests", [])
    except FileNotFoundError:
        log(f"nothing to restore: no {MANIFEST} in {args.dir}")
        return 0
    except (OSError, ValueError) as error:
        log(f"cannot read the manifest in {args.dir}: {error}")
        return 1
    failures = 0
    for index, entry in enumerate(entries):
        if index:
            time.sleep(args.pace)
        failures += not restore_one(entry, args.max_age)
    _write_manifest(args.dir, [])
    return 1 if failures else 0


def restore_one(entry: dict[str, Any], max_age: float) -> bool:
    name, path = entry["name"], entry["path"]
    try:
        age = time.time() - os.stat(path).st_mtime
    except OSError:
        log(f"{name}: image {path} is gone; not restored")
        return False
    if max_age and age > max_age:
        log(f"{name}: image {path} is {age:.0f} s old, older than the {max_age:g} s allowed; not restored "
            "(restore it by hand with savestate.qemu.restore if it is still the state to keep)")
        return False
    started = time.monotonic()
    try:
        outcome = restore_guest(RestoreRequest(path=path, name=name, remove_image=True))
    except SaveStateError as error:
        log(f"{name}: NOT restored: {error}")
        return False
    unit = (outcome.guest.get("unit") or {}).get("name", "no unit")
    log(f"{name}: restored in {time.monotonic() - started:.1f} s into {unit} ({outcome.msg})")
    return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="savestate-autosave", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("--dir", default="/var/lib/savestate/autosave")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one save may take")
    parser.add_argument("--total-timeout", type=float, default=600.0, help="seconds all saves may take")
    parser.add_argument("--max-age", type=float, default=86400.0, help="older images are not restored (0: any)")
    parser.add_argument("--pace", type=float, default=1.0, help="seconds between two restores")
    args = parser.parse_args(argv)
    return save_all(args) if args.action == "save" else restore_all(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
