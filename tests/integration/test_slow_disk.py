"""Slow is not failed (issue 17, item 4): a save and a restore through a throttled disk succeed.

QEMU loads an incoming stream in its main loop and completes an outgoing one holding
its big lock, so over a slow disk its monitor may not answer for the whole stream.
Each test here saves and restores a guest through a disk slow enough that each
operation takes longer than 60 s (twice the monitor's 30 s per-command limit), and
asserts both succeed and the heartbeat goes on.

How the disk is made slow (measured on the 2-core test machine, kernel 6.18, cgroup v1):

* The image directory is an ext4 file system on a private loop device (a sparse
  file in /var/tmp), so nothing but this test is throttled.
* ``blkio.throttle.{read,write}_bps_device`` for that loop device, set in the root
  blkio cgroup: the rule then covers every task, the kernel's writeback workers
  included. (Set in a child cgroup holding QEMU, cgroup v1 would not throttle buffered
  writes: writeback runs in the root cgroup.) Reads and writeback both ran at the set
  rate (100 MiB at 10 MiB/s: 10.0 s read, 10.2 s write+sync).
* The loop device's writeback limits (``/sys/class/bdi/MAJ:MIN``: ``strict_limit`` 1,
  ``max_ratio`` 1) keep its dirty pages to a few tens of MiB, so QEMU's buffered writes
  wait for the slow writeback instead of filling the page cache at memory speed.
* Before the restore, the image's pages are dropped from the page cache
  (``POSIX_FADV_DONTNEED`` after the save's fsync): QEMU's reads hit the slow device.

Measured (2-core machine, 4 MiB/s, 256 MiB filled): every save and restore took 81-84 s.
Before the fix (main at dd80bea) the sparse restore on 10.0 failed with "QMP command
'query-migrate' got no reply ... within 30 s" (QEMU loads a mapped-ram image in its
main loop, answering nothing until done); the raw cases and the saves passed there too
(QEMU answered its monitor between reads and writes), and stay as guards.

Every setting is undone and the device detached even when a test fails. Needs root.
The file runs on its own (integration tests are distributed by file); its tests take
about 3 minutes each (a save and a restore of over 80 s each).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import page_cache
from harness.guest import GuestSpec
from integration.common import assert_continued, ok, restore, save

pytestmark = pytest.mark.integration

BLKIO = Path("/sys/fs/cgroup/blkio")
FILL_MIB = 256
# About 300 MiB of image through 4 MiB/s: 70-80 s per operation.
RATE_BYTES_S = 4 * 1024 * 1024
SLOWER_THAN_S = 60.0
BACKING_BYTES = 1536 * 1024 * 1024


class SlowDisk:
    """An ext4 file system on a private loop device whose reads and writeback can be throttled."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        fd, self.backing = tempfile.mkstemp(prefix="ssq-slow-disk-", dir="/var/tmp")
        os.close(fd)
        os.truncate(self.backing, BACKING_BYTES)
        self.device = _run("losetup", "--find", "--show", self.backing)
        self.mounted = False
        self.throttled = False
        self.majmin = _run("lsblk", "--nodeps", "--noheadings", "--output", "MAJ:MIN", self.device).strip()
        self.bdi = Path("/sys/class/bdi") / self.majmin
        _run("mkfs.ext4", "-q", self.device)
        mountpoint.mkdir()
        _run("mount", self.device, str(mountpoint))
        self.mounted = True

    def throttle(self, rate: int) -> None:
        self.throttled = True
        (self.bdi / "strict_limit").write_text("1")
        (self.bdi / "max_ratio").write_text("1")
        for direction in ("read", "write"):
            (BLKIO / f"blkio.throttle.{direction}_bps_device").write_text(f"{self.majmin} {rate}")

    def unthrottle(self) -> None:
        if not self.throttled:
            return
        for direction in ("read", "write"):
            (BLKIO / f"blkio.throttle.{direction}_bps_device").write_text(f"{self.majmin} 0")
        # The loop device outlives its file: leave it as the next user expects it.
        (self.bdi / "max_ratio").write_text("100")
        (self.bdi / "strict_limit").write_text("0")
        self.throttled = False

    def close(self) -> None:
        """Undo everything; each step runs even when an earlier one fails."""
        try:
            self.unthrottle()
        finally:
            try:
                if self.mounted and subprocess.run(["umount", str(self.mountpoint)], check=False).returncode != 0:
                    subprocess.run(["umount", "--lazy", str(self.mountpoint)], check=False)  # detaches once unused
            finally:
                subprocess.run(["losetup", "--detach", self.device], check=False)
                os.unlink(self.backing)


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def slow_disk(workdir: Path) -> Iterator[SlowDisk]:
    if os.geteuid() != 0 or not (BLKIO / "blkio.throttle.read_bps_device").exists():
        pytest.skip("needs root and cgroup v1 blkio throttling")
    disk = SlowDisk(workdir / "slow")
    try:
        yield disk
    finally:
        disk.close()


@pytest.mark.parametrize("image_format", ("raw", "sparse"))
def test_save_and_restore_through_a_slow_disk(qemu, image_format, guest_factory, slow_disk):
    if image_format == "sparse" and qemu.name == "7.2":
        pytest.skip("sparse needs mapped-ram (QEMU 9.0 or newer)")
    guest = guest_factory(GuestSpec(name=f"slow-{image_format}", qemu=qemu, fill_mib=FILL_MIB))
    guest.wait_tick_above(2)
    path = slow_disk.mountpoint / f"guest.{image_format}"

    slow_disk.throttle(RATE_BYTES_S)
    saved = ok(save(guest, path, format=image_format))
    saved_tick = guest.last_tick()
    assert saved["stats"]["duration_s"] > SLOWER_THAN_S, saved["stats"]

    page_cache.evict(path)
    restored = ok(restore(path))
    print(f"save {saved['stats']}, restore {restored['stats']}")  # the times, for -s runs
    assert restored["stats"]["duration_s"] > SLOWER_THAN_S, restored["stats"]
    slow_disk.unthrottle()
    assert_continued(guest, saved_tick)
