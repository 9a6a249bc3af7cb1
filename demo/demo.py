"""make demo: boot a real guest under QEMU and show its heartbeat.

The guest prints ``tick N`` every 100 ms on its serial console. The demo will
grow, issue by issue, into: boot -> save -> save_image_info -> restore, with the
heartbeat shown before and after to prove the guest continued where it stopped.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness.guest import Guest, GuestSpec  # noqa: E402  (path set up above)


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show_heartbeat(guest: Guest, seconds: float) -> None:
    end = time.monotonic() + seconds
    seen = guest.last_tick()
    while time.monotonic() < end:
        tick = guest.last_tick()
        if tick != seen:
            print(f"    guest says: tick {tick}", flush=True)
            seen = tick
        time.sleep(0.25)


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="savestate-demo-"))
    guest = Guest(GuestSpec(name="demo", fill_mib=32, disk_mib=8), workdir / "demo")
    try:
        step(f"booting the demo guest under {guest.spec.qemu} (TCG): {guest.spec.memory} MiB RAM")
        guest.start()
        print(f"    QMP socket: {guest.qmp_address}\n    status: {guest.status()}")
        step("its heartbeat")
        show_heartbeat(guest, 2.0)
        return 0
    finally:
        guest.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
