"""The scenario's guests on the test bed: started by prepare, checked by verify.

Run from tests/ (the harness package) as root: ``python3 guests.py start|check``.
A guest's heartbeat (``tick N`` on its serial line, read through its host's overlay)
must go on from where it was saved; a paused guest must stay paused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from harness.testbed import GuestOptions, TestbedGuest, attach

# host, name, options: a running and a paused guest on hv1 (two QEMU versions), one on each other host.
GUESTS = [
    ("hv1", "mf-web1", {"qemu": "7.2"}),
    ("hv1", "mf-web2", {"qemu": "10.0", "paused": True}),
    ("hv2", "mf-db1", {"qemu": "7.2"}),
    ("hv3", "mf-app1", {"qemu": "10.0"}),
]
STATE = Path("/var/tmp/savestate-testbed/molecule-guests.json")


def _started(options: dict[str, object]) -> dict[str, object]:
    """How the guest is started: a paused one boots first and is paused over QMP (a guest QEMU
    holds at -S has never run: it is 'prelaunch', and there is nothing to save)."""
    return {key: value for key, value in options.items() if key != "paused"}


def start() -> None:
    fleet = attach()
    ticks = {}
    for host, name, options in GUESTS:
        guest = fleet[host].start_guest(name, **_started(options))
        guest.wait_tick_above(3)
        if options.get("paused"):
            guest.pause()
        ticks[name] = guest.last_tick()
    STATE.write_text(json.dumps(ticks))


def check() -> None:
    fleet = attach()
    before = json.loads(STATE.read_text())
    for host, name, options in GUESTS:
        guest = TestbedGuest(fleet[host], name, GuestOptions(**_started(options)))  # by its serial log
        if options.get("paused"):
            assert guest.last_tick() == before[name], f"{name} was paused but ticked on"
        else:
            guest.assert_continued(before[name])
        print(f"{name} on {host}: ok (tick {guest.last_tick()})")


if __name__ == "__main__":
    {"start": start, "check": check}[sys.argv[1]]()
