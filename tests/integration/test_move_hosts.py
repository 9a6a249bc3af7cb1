"""guest_move between separate hosts of the test bed (issue 16 item 2): real SSH, become, and
an image that goes host to host.

Each test asserts the effect: the guest runs on exactly one host and its heartbeat went on
without a reboot; an impossible move (a QEMU without the machine type, a disk the destination
cannot see) fails before the save, with the guest's QEMU process untouched (same pid, no gap in
the heartbeat); a copy killed mid-transfer leaves the guest running on the source, no partial
file on the destination and no key on either host, and a second run moves it. The move's key
never outlives the move.

Run serialized: ``flock /tmp/savestate-integration.lock ../.venv/bin/pytest
integration/test_move_hosts.py -q -p no:xdist``. ``SAVESTATE_MOVE_FIGURES=1`` also runs the
1 GiB measurement (``SAVESTATE_MOVE_FIGURES_MIB``: another size): rounds
(``SAVESTATE_MOVE_FIGURES_ROUNDS``, default 1) of moves there and back with the role and by
hand (save + scp + restore), interleaved so that both see the same load
(``SAVESTATE_MOVE_FIGURES_COMPARE=1``: also the role without ``guest_move_overlap``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness import testbed as tb
from harness.systemd_host import unavailable_reason
from harness.testbed import GUESTS_DIR, QEMU72_IN_HOST, QMP_DIR, Fleet, PlaybookRun

pytestmark = [pytest.mark.integration]

REASON = unavailable_reason()
if REASON:
    pytest.skip(f"no test bed: {REASON}", allow_module_level=True)

MOVE_DIR = "/var/lib/savestate/move"
# The fleet's image key (the image_key role installs it on both hosts): the destination
# restores only images signed with a key it holds.
IMAGE_KEY = "5a" * 32
KEY_MARKER = "savestate-move:"

MOVE_PLAY = """
- name: Move a guest between test bed hosts
  hosts: "{{ move_from }}"
  gather_facts: false
  tasks:
    - name: Move it
      ansible.builtin.include_role:
        name: savestate.qemu.guest_move
      vars:
        guest_move_name: "{{ move_guest }}"
        guest_move_destination: "{{ move_to }}"
"""


def _prepare(fleet: Fleet, *hosts: str) -> None:
    """The runtime directories a restored guest's command line names (an operator's hosts have them)."""
    for name in hosts:
        fleet[name].sh(f"mkdir -p {GUESTS_DIR} {QMP_DIR}")


def _move(fleet: Fleet, guest: str, source: str, destination: str, **extra: Any) -> PlaybookRun:
    return fleet.run_playbook(MOVE_PLAY, {"move_guest": guest, "move_from": source, "move_to": destination,
                                          "savestate_qemu_image_key": IMAGE_KEY, **extra}, timeout=900)


def _no_key_left(fleet: Fleet, *hosts: str) -> None:
    """No move key authorized anywhere, no key pair left in a temporary directory."""
    for name in hosts:
        keys = fleet[name].ssh("cat /root/.ssh/authorized_keys 2>/dev/null").stdout
        assert KEY_MARKER not in keys, f"a move key is still authorized on {name}: {keys}"
        left = fleet[name].ssh("ls -d /tmp/savestate-move.* 2>/dev/null").stdout.strip()
        assert not left, f"the move's key directory is still on {name}: {left}"
        follower = fleet[name].ssh("ls /run/savestate-move-*.py 2>/dev/null").stdout.strip()
        assert not follower, f"the move's follower is still on {name}: {follower}"


def _images(fleet: Fleet, host: str) -> list[str]:
    return fleet[host].ssh(f"ls -A {MOVE_DIR} 2>/dev/null").stdout.split()


def _continued_on(moved: tb.TestbedGuest, source: tb.TestbedGuest) -> None:
    """The guest went on, on the destination, from the last tick it wrote on the source: the
    destination's log (which may hold ticks of an earlier stay there) goes on from that tick + 1,
    one tick after the other, without a new boot."""
    saved = source.last_tick()
    moved.wait_tick_above(saved + 2)
    ticks = moved.ticks()
    assert saved + 1 in ticks, f"{moved.name} on {moved.host.name} did not go on from tick {saved}: {ticks[-20:]}"
    tail = ticks[ticks.index(saved + 1):]
    assert all(b == a + 1 for a, b in zip(tail, tail[1:])), f"{moved.name}: the heartbeat skipped after tick {saved}"


def _failure(run: PlaybookRun) -> str:
    assert run.returncode != 0, f"the move succeeded:\n{run.stdout[-3000:]}"
    return run.stdout + run.stderr


def test_move_there_and_back_over_ssh(testbed: Fleet, testbed_guest: Callable[..., tb.TestbedGuest]) -> None:
    guest = testbed_guest("hv1", "ssq-mvh1", memory_mib=256)
    _prepare(testbed, "hv2")
    guest.wait_tick_above(2)

    _move(testbed, guest.name, "hv1", "hv2").check()
    moved = guest.on(testbed["hv2"])
    assert guest.pids() == [] and len(moved.pids()) == 1
    _continued_on(moved, guest)
    _no_key_left(testbed, "hv1", "hv2")
    assert _images(testbed, "hv1") == [] and _images(testbed, "hv2") == []
    assert (testbed["hv1"].path(MOVE_DIR).stat().st_mode & 0o777) == 0o700  # created, root only

    again = _move(testbed, guest.name, "hv1", "hv2").check()  # idempotent: already moved
    assert "already moved" in again.stdout

    moved.wait_tick_above(moved.last_tick())
    # Back without the overlap: the destination pulls the finished image.
    _move(testbed, guest.name, "hv2", "hv1", guest_move_overlap=False).check()
    assert moved.pids() == [] and len(guest.pids()) == 1
    _continued_on(guest, moved)
    _no_key_left(testbed, "hv1", "hv2")


def test_move_refused_before_the_save_without_the_machine_type(
        testbed: Fleet, testbed_guest: Callable[..., tb.TestbedGuest]) -> None:
    guest = testbed_guest("hv1", "ssq-mvh2", memory_mib=256)
    _prepare(testbed, "hv2")
    pids = guest.pids()
    before = guest.wait_tick_above(1)

    output = _failure(_move(testbed, guest.name, "hv1", "hv2",
                            guest_move_emulator=f"{QEMU72_IN_HOST}/usr/bin/qemu-system-x86_64"))
    assert re.search(r"cannot run the machine type pc-i440fx-10\.0", output)
    assert "The guest was not touched" in output
    assert guest.pids() == pids  # the same QEMU, never saved
    guest.assert_continued(before)
    assert guest.on(testbed["hv2"]).pids() == []


def test_move_refused_before_the_save_when_the_destination_lacks_the_disk(
        testbed: Fleet, testbed_guest: Callable[..., tb.TestbedGuest]) -> None:
    # The disk is in hv1's private /var/lib/qemu-guests: hv2 does not see it.
    guest = testbed_guest("hv1", "ssq-mvh3", memory_mib=256, disk_mib=8)
    _prepare(testbed, "hv2")
    testbed["hv2"].sh(f"rm -f {GUESTS_DIR}/ssq-mvh3.raw")
    pids = guest.pids()
    before = guest.wait_tick_above(1)

    output = _failure(_move(testbed, guest.name, "hv1", "hv2"))
    assert f"does not see the disk {GUESTS_DIR}/ssq-mvh3.raw" in output
    assert "The guest was not touched" in output
    assert guest.pids() == pids
    guest.assert_continued(before)
    _no_key_left(testbed, "hv1", "hv2")


OVERLAP_PLAY = MOVE_PLAY + """
    - name: Say what the follower reported
      ansible.builtin.debug:
        msg: >-
          OVERLAP bytes={{ guest_move_result.bytes }} during_save={{ guest_move_result.overlap.bytes_during_save }}
          lead_s={{ guest_move_result.overlap.lead_s }}
"""


@dataclass
class FirstSeen:
    """When (monotonic) the test first saw the destination's copy hold data, and the source's
    save renamed into place: polled every 2 ms from outside both hosts."""

    copy: Path
    image: Path
    times: dict[str, float] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set() and len(self.times) < 2:
            now = time.monotonic()
            with contextlib.suppress(OSError):
                if "copy" not in self.times and self.copy.stat().st_size > 0:
                    self.times["copy"] = now
            if "saved" not in self.times and self.image.exists():
                self.times["saved"] = now
            time.sleep(0.002)


def test_the_destination_pulls_while_the_save_writes(testbed: Fleet, testbed_guest: Callable[..., tb.TestbedGuest]) -> None:
    """guest_move_overlap (the default for raw images): the copy starts before the save is over, and
    what arrives is the image (the guest goes on where it stopped)."""
    name = "ssq-mvh5"
    guest = testbed_guest("hv1", name, fill_mib=384)
    _prepare(testbed, "hv2")
    guest.wait_tick_above(1)
    seen = FirstSeen(testbed["hv2"].path(f"{MOVE_DIR}/.{name}.save.partial"), testbed["hv1"].path(f"{MOVE_DIR}/{name}.save"))
    watcher = threading.Thread(target=seen.run, daemon=True)
    watcher.start()
    try:
        extra = {"move_guest": name, "move_from": "hv1", "move_to": "hv2", "savestate_qemu_image_key": IMAGE_KEY}
        run = testbed.run_playbook(OVERLAP_PLAY, extra, timeout=900).check()
    finally:
        seen.stop.set()
        watcher.join()
    moved = guest.on(testbed["hv2"])
    assert guest.pids() == [] and len(moved.pids()) == 1
    _continued_on(moved, guest)
    report = dict(re.findall(r"(bytes|during_save|lead_s)=([-0-9.]+)", run.stdout))
    print(f"MOVE OVERLAP {report} copy started {seen.times['saved'] - seen.times['copy']:.3f} s before the save's rename")
    assert int(report["bytes"]) > 384 << 20, run.stdout[-2000:]
    # The follower sent bytes while the save was still writing, and its first byte went out before the
    # save was over; seen from outside, the copy on hv2 held data before the image on hv1 was in place.
    assert int(report["during_save"]) > 0 and float(report["lead_s"]) > 0, report
    assert seen.times["copy"] < seen.times["saved"], seen.times
    _no_key_left(testbed, "hv1", "hv2")
    assert _images(testbed, "hv1") == [] and _images(testbed, "hv2") == []


def _touch_when_the_save_starts(source_dir: Path, prefix: str, disk: Path, stop: threading.Event) -> None:
    """Once the save writes its temporary file on the source (the pre-checks are over), move the
    destination's copy of the disk one second into the future: it no longer is the disk the guest left."""
    while not stop.is_set():
        if any(source_dir.glob(f"{prefix}*.partial")):
            stamp = disk.stat().st_mtime + 1
            os.utime(disk, (stamp, stamp))
            return
        time.sleep(0.002)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_a_disk_copy_on_the_destination_is_checked_as_the_save_left_it(
        testbed: Fleet, testbed_guest: Callable[..., tb.TestbedGuest], overlap: bool) -> None:
    """The destination holds a faithful copy of the guest's disk (same size and modification time),
    so the move goes ahead; when that copy changes during the save, the check after the save
    (with the overlap: in the copy's finishing command) refuses it and the guest runs on the source
    again. A second run, with the copy faithful again, moves the guest."""
    name = f"ssq-mvh6{'o' if overlap else 'n'}"
    disk = f"{GUESTS_DIR}/{name}.raw"
    _prepare(testbed, "hv1", "hv2")
    testbed["hv1"].sh(f"truncate -s 8M {disk}")
    # A disk the guest does not write (the heartbeat's disk=1 writes every tick): it stays as it
    # was, so that a copy with its data and modification time is faithful.
    guest = testbed_guest("hv1", name, memory_mib=256,
                          extra_args=("-drive", f"file={disk},format=raw,if=virtio,id=disk0"))
    source_disk, copy = testbed["hv1"].path(disk), testbed["hv2"].path(disk)
    shutil.copy2(source_disk, copy)  # data and modification time
    before = guest.wait_tick_above(1)

    stop = threading.Event()
    toucher = threading.Thread(target=_touch_when_the_save_starts,
                               args=(testbed["hv1"].path(MOVE_DIR), f".{name}.save.", copy, stop), daemon=True)
    toucher.start()
    try:
        output = _failure(_move(testbed, name, "hv1", "hv2", guest_move_overlap=overlap))
    finally:
        stop.set()
        toucher.join()
    assert f"does not see the disk {disk} as the guest left it" in output, output[-3000:]
    assert "restored on hv1 and runs there again" in output, output[-3000:]
    assert len(guest.pids()) == 1 and guest.on(testbed["hv2"]).pids() == []  # on exactly one host
    guest.assert_continued(before, timeout=120)
    assert _images(testbed, "hv2") == [] and _images(testbed, "hv1") == []
    _no_key_left(testbed, "hv1", "hv2")

    shutil.copy2(source_disk, copy)
    guest.wait_tick_above(guest.last_tick())
    _move(testbed, name, "hv1", "hv2", guest_move_overlap=overlap).check()
    moved = guest.on(testbed["hv2"])
    assert guest.pids() == [] and len(moved.pids()) == 1
    _continued_on(moved, guest)


def _pids_matching(pattern: bytes) -> list[int]:
    """Processes anywhere on this machine (the test bed's hosts are nested PID namespaces)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if pattern in handle.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def _kill_copy_when_started(partial: Path, pattern: bytes, killed: list[int], stop: threading.Event) -> None:
    """Kill the transfer's ssh client once the partial file holds some data."""
    while not stop.is_set():
        try:
            started = partial.stat().st_size > (8 << 20)
        except FileNotFoundError:
            started = False
        if started:
            for pid in _pids_matching(pattern):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            if killed:
                return
        time.sleep(0.01)


@pytest.mark.parametrize("transfer", ["ssh", "controller"])
def test_killed_copy_leaves_the_guest_on_the_source_and_a_rerun_works(
        testbed: Fleet, testbed_guest: Callable[..., tb.TestbedGuest], transfer: str) -> None:
    # Random data in RAM so that the image is large enough to be caught mid-transfer.
    name = f"ssq-mvh4{transfer[0]}"
    guest = testbed_guest("hv1", name, fill_mib=384)
    _prepare(testbed, "hv2")
    before = guest.wait_tick_above(1)
    partial = testbed["hv2"].path(f"{MOVE_DIR}/.{name}.save.partial")
    # The ssh client of the copy: the destination's pull, or the controller's pipe to the source.
    pattern = b"HostKeyAlias=savestate-move-source" if transfer == "ssh" else f"{name}.save".encode()
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_copy_when_started, args=(partial, pattern, killed, stop), daemon=True)
    killer.start()
    try:
        run = _move(testbed, name, "hv1", "hv2", guest_move_transfer=transfer)
    finally:
        stop.set()
        killer.join()
    if not killed:
        pytest.fail(f"the copy finished before it could be killed:\n{run.stdout[-2000:]}")
    output = _failure(run)
    assert "restored on hv1 and runs there again" in output, output[-3000:]
    assert len(guest.pids()) == 1 and guest.on(testbed["hv2"]).pids() == []  # on exactly one host
    guest.assert_continued(before, timeout=120)
    assert not partial.exists()
    assert _images(testbed, "hv2") == [] and _images(testbed, "hv1") == []
    _no_key_left(testbed, "hv1", "hv2")

    guest.wait_tick_above(guest.last_tick())
    _move(testbed, name, "hv1", "hv2", guest_move_transfer=transfer).check()
    assert guest.pids() == [] and len(guest.on(testbed["hv2"]).pids()) == 1
    _continued_on(guest.on(testbed["hv2"]), guest)


# -- figures (SAVESTATE_MOVE_FIGURES=1) ---------------------------------------------------------


def _descends_from_us(pid: str) -> bool:
    """Whether the process is a child, grandchild ... of this test (the controller's ansible-playbook, ssh)."""
    me, seen = os.getpid(), 0
    while pid not in ("0", "1") and seen < 64:
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            pid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            return False
        if int(pid) == me:
            return True
        seen += 1
    return False


@dataclass
class Sampler:
    """Peak RSS per host (the largest process, QEMU left out) and on the controller (the largest
    process this test started: ansible-playbook, its workers, ssh)."""

    cgroups: dict[str, str]                       # host name -> cgroup name fragment
    peaks: dict[str, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    self._sample(entry)
            time.sleep(0.1)

    def _sample(self, pid: str) -> None:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cgroup = Path(f"/proc/{pid}/cgroup").read_text()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        if not found or comm.startswith("qemu-system"):
            return
        rss = int(found.group(1)) * 1024
        where = next((host for host, fragment in self.cgroups.items() if fragment in cgroup), None)
        if where is None:
            if not _descends_from_us(pid):  # other users' ansible on this shared machine
                return
            where = "controller"
        self.peaks[where] = max(self.peaks.get(where, 0), rss)

    @classmethod
    @contextlib.contextmanager
    def around(cls, fleet: Fleet, hosts: list[str]) -> Iterator[Sampler]:
        sampler = cls({name: f"/{fleet.config.machine(name)}-" for name in hosts})
        thread = threading.Thread(target=sampler.run, daemon=True)
        thread.start()
        try:
            yield sampler
        finally:
            sampler.stop.set()
            thread.join()


def _downtime(before: tb.TestbedGuest, after: tb.TestbedGuest, action: Callable[[], None]) -> tuple[float, float]:
    """Wall time of ``action`` and the guest's downtime: from the last tick seen on the source to
    the first new tick seen on the destination (serial logs polled every 20 ms; ticks every 100 ms)."""
    seen: dict[str, float] = {}
    stop = threading.Event()

    def watch() -> None:
        source_tick, destination_tick = before.last_tick(), after.last_tick()
        while not stop.is_set():
            now = time.monotonic()
            if before.last_tick() != source_tick:
                source_tick, seen["source_last"] = before.last_tick(), now
            if after.last_tick() != destination_tick:
                seen["destination_first"] = now
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    started = time.monotonic()
    seen["source_last"] = started
    thread.start()
    try:
        action()
        wall = time.monotonic() - started
        thread.join(30)
    finally:
        stop.set()
        thread.join()
    return wall, seen.get("destination_first", float("nan")) - seen["source_last"]


def _figure(wall: float, down: float, sampler: Sampler | None = None) -> dict[str, Any]:
    figure: dict[str, Any] = {"wall_s": round(wall, 1), "downtime_s": round(down, 1),
                              "load": [round(x, 2) for x in os.getloadavg()]}
    if sampler is not None:
        figure["peak_rss_mib"] = {k: round(v / 2**20) for k, v in sampler.peaks.items()}
    print("MOVE FIGURE " + json.dumps(figure), flush=True)
    return figure


@pytest.mark.skipif(not os.environ.get("SAVESTATE_MOVE_FIGURES"),
                    reason="SAVESTATE_MOVE_FIGURES=1 measures moves of a 1 GiB guest (SAVESTATE_MOVE_FIGURES_MIB: another size)")
def test_figures(testbed: Fleet, testbed_guest: Callable[..., tb.TestbedGuest]) -> None:
    """Rounds (SAVESTATE_MOVE_FIGURES_ROUNDS, default 1) that interleave the hand-made sequence and
    the role, so that both see the same load on this shared machine: the role hv1 -> hv2, by hand
    hv2 -> hv1 and hv1 -> hv2, the role hv2 -> hv1; then once the role with the controller's pipe."""
    memory_mib = int(os.environ.get("SAVESTATE_MOVE_FIGURES_MIB", "1024"))
    rounds = int(os.environ.get("SAVESTATE_MOVE_FIGURES_ROUNDS", "1"))
    # three quarters random data (at least 256 MiB left for the guest's kernel)
    guest = testbed_guest("hv1", "ssq-mvbig", fill_mib=min(memory_mib * 3 // 4, memory_mib - 256), memory_mib=memory_mib)
    _prepare(testbed, "hv1", "hv2")
    on = {"hv1": guest, "hv2": guest.on(testbed["hv2"])}
    figures: list[dict[str, Any]] = []

    def by_role(source: str, destination: str, transfer: str = "ssh", overlap: bool = True) -> None:
        on[source].wait_tick_above(on[source].last_tick())
        with Sampler.around(testbed, ["hv1", "hv2"]) as sampler:
            wall, down = _downtime(on[source], on[destination],
                                   lambda: _move(testbed, guest.name, source, destination, guest_move_transfer=transfer,
                                                 guest_move_overlap=overlap).check())
        label = transfer if overlap or transfer != "ssh" else "ssh-no-overlap"
        figures.append({"move": f"{label} {source}->{destination}", **_figure(wall, down, sampler)})

    def by_hand(source: str, destination: str) -> None:
        figures.append({"move": f"manual {source}->{destination}", **_manual(testbed, on, source, destination)})

    # SAVESTATE_MOVE_FIGURES_COMPARE=1: each round also moves there and back without guest_move_overlap.
    compare = bool(os.environ.get("SAVESTATE_MOVE_FIGURES_COMPARE"))
    for _round in range(rounds):  # the role first: it installs the fleet's image key on both hosts
        by_role("hv1", "hv2")
        by_hand("hv2", "hv1")
        by_hand("hv1", "hv2")
        by_role("hv2", "hv1")
        if compare:
            by_role("hv1", "hv2", overlap=False)
            by_role("hv2", "hv1", overlap=False)
    by_role("hv1", "hv2", "controller")
    print("MOVE FIGURES " + json.dumps(figures))


def _manual(fleet: Fleet, on: dict[str, tb.TestbedGuest], source: str, destination: str) -> dict[str, Any]:
    """What an operator does by hand: save on the source, scp as root to the destination, restore there."""
    src, dst = fleet[source], fleet[destination]
    key = src.path("/root/.ssh/id_manual")
    key.parent.mkdir(mode=0o700, exist_ok=True)
    key.write_bytes(fleet.config.key.read_bytes())
    key.chmod(0o600)
    image = f"{MOVE_DIR}/manual.save"
    src.sh(f"mkdir -p {MOVE_DIR}")
    dst.sh(f"mkdir -p {MOVE_DIR}")

    def steps() -> None:
        saved = fleet.run_module(source, "save", {"name": on[source].name, "path": image})
        assert not saved.get("failed"), saved
        src.sh(f"scp -q -i /root/.ssh/id_manual -o BatchMode=yes {image} root@{destination}:{image} && rm -f {image}",
               timeout=900)
        restored = fleet.run_module(destination, "restore", {"path": image, "name": on[source].name, "remove_image": True})
        assert not restored.get("failed"), restored

    on[source].wait_tick_above(on[source].last_tick())
    try:
        wall, down = _downtime(on[source], on[destination], steps)
    finally:
        key.unlink()
    return _figure(wall, down)


KEY_PLAY = """
- name: Authorize a move's key on hv1 for hv2, as guest_move does before the save
  hosts: hv1
  gather_facts: false
  tasks:
    - name: Set up the key
      ansible.builtin.include_role:
        name: savestate.qemu.guest_move
        tasks_from: ssh_setup
      vars:
        guest_move_name: "{{ image | default('ssq-key') }}"
        guest_move_destination: hv2
        guest_move_ssh_user: "{{ key_user | default('root') }}"
        guest_move__source_image: "{{ image_dir | default('/var/lib/savestate/move') }}/{{ image | default('ssq-key') }}.save"
        guest_move__source_address: "{{ ansible_host }}"
    - name: Tell the test where the key is
      ansible.builtin.debug:
        msg: >-
          KEYDIR={{ guest_move__ssh_tmp.path }} MARKER={{ guest_move__key_marker }}
          CREATED={{ guest_move__key_created.stdout }} HELPER={{ guest_move__helper }}
"""

CLEANUP_PLAY = """
- name: Remove the key, as guest_move does after the transfer
  hosts: hv1
  gather_facts: false
  tasks:
    - name: Clean up
      ansible.builtin.include_role:
        name: savestate.qemu.guest_move
        tasks_from: ssh_cleanup
      vars:
        guest_move_name: ssq-key
        guest_move_destination: hv2
        guest_move__ssh_tmp: {path: "{{ keydir }}"}
        guest_move__authorized_keys: /root/.ssh/authorized_keys
        guest_move__key_marker: "{{ marker }}"
        guest_move__helper: "{{ helper }}"
"""


def _key_ssh(keydir: str, user: str = "root") -> str:
    """The destination's ssh command with a move's key (as guest_move runs it, less its hardening)."""
    return (f"ssh -F /dev/null -T -i {keydir}/id -o BatchMode=yes -o IdentitiesOnly=yes "
            f"-o UserKnownHostsFile={keydir}/known_hosts -o GlobalKnownHostsFile=/dev/null "
            f"-o StrictHostKeyChecking=yes -o HostKeyAlias=savestate-move-source -l {user} hv1")


def test_the_move_key_can_only_read_the_image_from_the_destination(testbed: Fleet) -> None:
    hv1, hv2, hv3 = testbed["hv1"], testbed["hv2"], testbed["hv3"]
    hv1.sh(f"mkdir -p {MOVE_DIR} && echo LibvirtQemudSave-the-image > {MOVE_DIR}/ssq-key.save "
           "&& echo secret > /root/secret")
    run = testbed.run_playbook(KEY_PLAY).check()
    keydir = re.search(r"KEYDIR=(/tmp/savestate-move\.\w+)", run.stdout).group(1)
    helper = re.search(r"HELPER=(/run/savestate-move-\w+\.py)", run.stdout).group(1)
    line = next(x for x in hv1.sh("cat /root/.ssh/authorized_keys").splitlines() if KEY_MARKER in x)
    assert line.startswith(f'restrict,from="{hv2.address}",expiry-time="') and 'command="' in line
    ssh = _key_ssh(keydir)
    try:
        # Whatever hv2 asks for, it gets the image and nothing else.
        assert hv2.ssh(f"{ssh} stream").stdout == "LibvirtQemudSave-the-image\n"
        assert hv2.ssh(f"{ssh} cat /root/secret").stdout == "LibvirtQemudSave-the-image\n"
        assert "secret" not in hv2.ssh(f"{ssh} -tt bash -c 'cat /root/secret'").stdout
        forward = hv2.ssh(f"timeout 5 {ssh} -N -L 127.0.0.1:2300:127.0.0.1:22 & sleep 2; "
                          "timeout 3 bash -c 'exec 3<>/dev/tcp/127.0.0.1/2300; head -c 20 <&3'; wait")
        assert "SSH-2.0" not in forward.stdout  # no port forwarding
        # From another host (the key copied there), sshd refuses it: from= holds.
        # (/tmp is each host's own tmpfs: copy through SSH.)
        for name in ("id", "known_hosts"):
            data = hv2.sh(f"base64 -w0 {keydir}/{name}").strip()
            hv3.sh(f"mkdir -p {keydir} && echo {data} | base64 -d > {keydir}/{name} && chmod 600 {keydir}/{name}")
        stolen = hv3.ssh(f"{ssh} stream")
        assert stolen.returncode == 255 and "Permission denied" in stolen.stderr
        # A host pretending to be hv1 (another host key) is refused by the pinned known_hosts.
        spoof = hv2.ssh(f"{ssh.replace('-l root hv1', '-l root hv3')} stream")
        assert spoof.returncode == 255 and "IDENTIFICATION HAS CHANGED" in spoof.stderr
    finally:
        marker = line.split()[-1]
        testbed.run_playbook(CLEANUP_PLAY, {"keydir": keydir, "marker": marker, "helper": helper}).check()
        hv3.sh(f"rm -rf {keydir}")
        hv1.sh(f"rm -f {MOVE_DIR}/ssq-key.save /root/secret")
    _no_key_left(testbed, "hv1", "hv2")
    assert hv2.ssh(f"{ssh} stream").returncode == 255  # the key is gone


SHARED_CLEANUP_PLAY = CLEANUP_PLAY.replace(
    "guest_move__authorized_keys: /root/.ssh/authorized_keys",
    "guest_move__authorized_keys: /home/mover/.ssh/authorized_keys\n"
    "        guest_move__key_created: {stdout: \"{{ created }}\"}")


def test_moves_from_one_source_share_its_authorized_keys(testbed: Fleet) -> None:
    """Two moves from the same source at once each get their key (the file is edited under a
    lock); what the setup created for them (~/.ssh, authorized_keys) is gone once both are done.
    The user's login shell is dash: the forced command is POSIX sh."""
    hv1, hv2 = testbed["hv1"], testbed["hv2"]
    hv1.sh("id mover >/dev/null 2>&1 || useradd -m -s /bin/sh mover; rm -rf /home/mover/.ssh; "
           "mkdir -p /srv/ssq-shared && for i in 1 2; do { printf LibvirtQemudSave; head -c 3000000 /dev/urandom; } "
           "> /srv/ssq-shared/ssq-sk$i.save; done; chmod -R a+rX /srv/ssq-shared")
    runs: dict[str, PlaybookRun] = {}
    key_vars = {"key_user": "mover", "image_dir": "/srv/ssq-shared"}
    threads = [threading.Thread(target=lambda i=i: runs.__setitem__(i, testbed.run_playbook(KEY_PLAY, {"image": i, **key_vars})))
               for i in ("ssq-sk1", "ssq-sk2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    found = {i: dict(re.findall(r"(KEYDIR|MARKER|CREATED|HELPER)=([^\s\"]+)", run.check().stdout)) for i, run in runs.items()}
    try:
        keys = hv1.sh("cat /home/mover/.ssh/authorized_keys")
        for i, seen in found.items():
            assert seen["MARKER"] in keys, f"the key of {i} was lost: {keys}"
            ssh = _key_ssh(seen["KEYDIR"], "mover")
            # The image on stdout, its digest on stderr, from one read.
            sent = hv2.ssh(f"{ssh} stream 2>/tmp/{i}.err | sha256sum; cat /tmp/{i}.err").stdout.split()
            assert sent[0] == hv1.sh(f"sha256sum /srv/ssq-shared/{i}.save").split()[0] == sent[2], sent
        assert sorted(seen["CREATED"] for seen in found.values()) in (["directory", "file"], ["directory", "none"])
    finally:
        # The run that created the directory cleans up last.
        for seen in sorted(found.values(), key=lambda seen: seen["CREATED"] == "directory"):
            testbed.run_playbook(SHARED_CLEANUP_PLAY, {"keydir": seen["KEYDIR"], "marker": seen["MARKER"],
                                                       "created": seen["CREATED"], "helper": seen["HELPER"]}).check()
        hv1.sh("rm -rf /srv/ssq-shared")
    assert not hv1.path("/home/mover/.ssh").exists(), hv1.sh("ls -la /home/mover/.ssh")
