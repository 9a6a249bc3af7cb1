"""make demo: save a real QEMU guest to a file and bring it back.

Boots the test guest under QEMU (TCG), whose serial console prints ``tick N``
every 100 ms, then runs demo/playbook.yml through ansible-playbook: save (the
QEMU process ends), save_image_info, restore, restore again (unchanged). The
heartbeat before and after shows the guest continuing its count: it resumed,
it did not reboot (a rebooted guest would start again at 1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness.guest import Guest, GuestSpec  # noqa: E402  (path set up above)
from harness.paths import PROJECT_ROOT, VENV_DIR  # noqa: E402
from harness.processes import qemu_processes, kill_and_wait  # noqa: E402


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


def run_playbook(guest: Guest, image: Path) -> None:
    env = {**os.environ, "PATH": f"{VENV_DIR / 'bin'}:{os.environ['PATH']}",
           "ANSIBLE_PYTHON_INTERPRETER": str(VENV_DIR / "bin" / "python"),
           "ANSIBLE_LOCALHOST_WARNING": "0", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0"}
    subprocess.run([str(VENV_DIR / "bin" / "ansible-playbook"), str(PROJECT_ROOT / "demo" / "playbook.yml"),
                    "-e", f"guest_name={guest.spec.name}", "-e", f"image_path={image}"],
                   env=env, cwd=PROJECT_ROOT, check=True)


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="savestate-demo-"))
    guest = Guest(GuestSpec(name="demo", fill_mib=32, disk_mib=8), workdir / "demo")
    try:
        step(f"booting the demo guest under {guest.spec.qemu} (TCG): {guest.spec.memory} MiB RAM, "
             f"{guest.spec.fill_mib} MiB of it random data")
        guest.start()
        print(f"    QMP socket: {guest.qmp_address}\n    status: {guest.status()}")
        step("its heartbeat before the save")
        show_heartbeat(guest, 2.0)
        before = guest.last_tick()

        step("ansible-playbook demo/playbook.yml: save, save_image_info, restore")
        run_playbook(guest, workdir / "demo.save")

        step("its heartbeat after the restore")
        show_heartbeat(guest, 2.0)
        after = guest.last_tick()
        rebooted = guest.boots() > 1
        print(f"\n    before the save the guest had counted to {before}; after the restore it counts on "
              f"to {after}" + (" -- it REBOOTED" if rebooted else ", without a reboot."))
        return 1 if rebooted or after <= before else 0
    finally:
        guest.stop()
        for process in qemu_processes(str(workdir)):
            kill_and_wait(process.pid)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
