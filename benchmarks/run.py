"""make bench: save and restore speed, side by side with QEMU itself and with libvirt.

For each guest size (1, 2 and 4 GiB of RAM, all but 256 MiB of it filled with
random data) one guest is booted under QEMU 10.0 and an equal one under libvirt
(embedded driver), and in one run, interleaved, repeated ``--reps`` times:

* QEMU's own ``migrate file:`` (bandwidth unlimited) and ``-incoming`` load of that
  file: the floor. Saves are shown with and without the fsync that makes them durable;
* ``virsh save`` / ``virsh restore`` of the libvirt guest: raw, zstd, sparse;
* this collection at the module_utils level (benchmarks/op.py, a process of its own
  whose peak RSS is read with wait4) and through ``ansible`` (so the start-up cost
  of a module run shows): raw, zstd, sparse;
* the disk's own sequential write and read bandwidth (dd with O_DIRECT).

Restores read the image from the page cache (it was just written), so that they
time the software rather than the shared virtual disk; ``--cold-restores`` drops
the cache before each one. Medians go to stdout and into docs/performance.md
between the bench markers; the prose around them is written by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid as uuidlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness.guest import Guest, GuestSpec, qmp_execute  # noqa: E402
from harness.libvirt import EmbeddedLibvirt  # noqa: E402
from harness.paths import CACHE_DIR, VENV_DIR  # noqa: E402
from harness.processes import Reaper, become_subreaper, kill_and_wait, pid_gone, qemu_processes  # noqa: E402
from harness.qemu import SYSTEM_QEMU  # noqa: E402
from integration.ansible_runner import run_module  # noqa: E402

GUEST_OVERHEAD_MIB = 256
UNLIMITED = 9223372036853727232
MIB = 1024 * 1024
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


@dataclass
class Sample:
    size_gib: int
    contender: str
    image_format: str
    operation: str          # save, save+fsync, restore, write, read
    seconds: float
    image_bytes: int
    rss_kib: Optional[int] = None


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as knob:
            knob.write("3\n")
    except OSError:
        pass  # not root, or not allowed in this container: loads may then hit the page cache


def timed(action: Callable[[], Any]) -> float:
    """Seconds ``action`` took; it raises on failure."""
    started = time.monotonic()
    action()
    return time.monotonic() - started


def wait_migration(address: str, timeout: float = 1800) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = qmp_execute(address, "query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            if info["status"] != "completed":
                raise RuntimeError(f"migration {info['status']}: {info.get('error-desc')}")
            return info
        if time.monotonic() > deadline:
            raise TimeoutError("migration did not finish")
        time.sleep(0.02)


class Contenders:
    """Each method takes the running guest through one save and one restore."""

    def __init__(self, guest: Guest, libvirt: EmbeddedLibvirt, libvirt_name: str, images: Path,
                 size_gib: int, samples: list[Sample], cold_restores: bool) -> None:
        self.guest = guest
        self.cold_restores = cold_restores
        self.libvirt = libvirt
        self.libvirt_name = libvirt_name
        self.images = images
        self.size_gib = size_gib
        self.samples = samples

    def before_restore(self) -> None:
        """Cold restores read the disk; by default the image is still in the page cache.

        The build machine's virtual disk is shared: a cold read of one 1.9 GiB image took
        anywhere from 1 to 4.4 s in consecutive runs, which drowns the differences between
        the contenders. Warm, every contender does the same work and the timing is theirs.
        """
        if self.cold_restores:
            drop_caches()

    def record(self, contender: str, image_format: str, operation: str, seconds: float, path: Path,
               rss_kib: Optional[int] = None) -> None:
        self.samples.append(Sample(self.size_gib, contender, image_format, operation, seconds,
                                   path.stat().st_size, rss_kib))

    def qemu_file(self, image_format: str = "raw") -> None:
        path = self.images / "qemu-own.bin"
        address = self.guest.qmp_address
        qmp_execute(address, "stop")
        qmp_execute(address, "migrate-set-parameters", {"max-bandwidth": UNLIMITED})
        started = time.monotonic()
        qmp_execute(address, "migrate", {"uri": f"file:{path}"})
        wait_migration(address)
        saved = time.monotonic() - started
        with open(path, "rb") as image:
            os.fsync(image.fileno())
        durable = time.monotonic() - started
        self.record("QEMU migrate file:", image_format, "save", saved, path)
        self.record("QEMU migrate file:", image_format, "save+fsync", durable, path)
        pid = self.guest.pid
        qmp_execute(address, "quit")
        while pid is not None and not pid_gone(pid):
            time.sleep(0.01)
        self.before_restore()
        started = time.monotonic()
        process = subprocess.Popen(self.guest.argv + ["-S", "-incoming", "defer"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        while not Path(address).exists() or not _connectable(address):
            if process.poll() is not None:
                raise RuntimeError("QEMU's own -incoming run exited")
            time.sleep(0.005)
        qmp_execute(address, "migrate-incoming", {"uri": f"file:{path}"})
        wait_migration(address)
        loaded = time.monotonic() - started
        qmp_execute(address, "cont")
        self.record("QEMU migrate file:", image_format, "restore", loaded, path)
        path.unlink()

    def savestate_module_utils(self, image_format: str) -> None:
        path = self.images / f"savestate.{image_format}"
        save_args = {"name": self.guest.spec.name, "path": str(path), "image_format": image_format}
        seconds, rss = _op("save", save_args)
        self.record("savestate module_utils", image_format, "save", seconds, path, rss)
        self.before_restore()
        seconds, rss = _op("restore", {"path": str(path)})
        self.record("savestate module_utils", image_format, "restore", seconds, path, rss)
        path.unlink()

    def savestate_ansible(self, image_format: str) -> None:
        path = self.images / f"ansible.{image_format}"
        save_args = {"name": self.guest.spec.name, "path": str(path), "format": image_format}
        seconds = timed(lambda: _check(run_module("save", save_args)))
        self.record("savestate via ansible", image_format, "save", seconds, path)
        self.before_restore()
        seconds = timed(lambda: _check(run_module("restore", {"path": str(path)})))
        self.record("savestate via ansible", image_format, "restore", seconds, path)
        path.unlink()

    def virsh(self, image_format: str) -> None:
        path = self.images / f"virsh.{image_format}"
        seconds = timed(lambda: self.libvirt.save(self.libvirt_name, path, image_format))
        self.record("virsh", image_format, "save", seconds, path)
        self.before_restore()
        seconds = timed(lambda: self.libvirt.restore(path))
        self.record("virsh", image_format, "restore", seconds, path)
        path.unlink()


def _connectable(address: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(address)
        except OSError:
            return False
    return True


def _check(result: dict) -> dict:
    if result.get("failed"):
        raise RuntimeError(f"module failed: {result.get('msg')}")
    return result


def _op(operation: str, arguments: dict) -> tuple[float, int]:
    """Run benchmarks/op.py; return its duration and its peak RSS in KiB."""
    process = subprocess.Popen([str(VENV_DIR / "bin" / "python"), str(ROOT / "benchmarks" / "op.py"),
                                operation, json.dumps(arguments)], stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    status, usage = os.wait4(process.pid, 0)[1:]
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"benchmarks/op.py {operation} failed")
    return json.loads(output)["seconds"], usage.ru_maxrss


def disk_bandwidth(directory: Path, size_gib: int, samples: list[Sample]) -> None:
    target = directory / "dd.bin"
    count = size_gib * 256
    for operation, argv in (
            ("write", ["dd", "if=/dev/zero", f"of={target}", "bs=4M", f"count={count}", "oflag=direct",
                       "conv=fsync"]),
            ("read", ["dd", f"if={target}", "of=/dev/null", "bs=4M", "iflag=direct"])):
        drop_caches()
        seconds = timed(lambda: subprocess.run(argv, check=True, capture_output=True))
        samples.append(Sample(size_gib, "disk (dd, O_DIRECT)", "-", operation, seconds, target.stat().st_size))
    target.unlink()


def boot_pair(size_gib: int, workdir: Path, reaper: Reaper) -> tuple[Guest, EmbeddedLibvirt, str]:
    memory = size_gib * 1024
    fill = memory - GUEST_OVERHEAD_MIB
    guest = Guest(GuestSpec(name=f"bench{size_gib}", qemu=SYSTEM_QEMU, memory_mib=memory, fill_mib=fill),
                  workdir / f"guest{size_gib}")
    libvirt = EmbeddedLibvirt(workdir / f"libvirt{size_gib}")
    libvirt_name = f"lvbench{size_gib}"
    libvirt.define_guest(libvirt_name, str(uuidlib.uuid4()), memory_mib=memory, fill_mib=fill)
    log(f"booting two {size_gib} GiB guests (QEMU and libvirt), filling {fill} MiB with random data")
    libvirt.virsh("start", libvirt_name)
    guest.start(ready_timeout=900)
    reaper.own(guest.process.pid)
    libvirt.wait_ready(libvirt_name, timeout=900)
    return guest, libvirt, libvirt_name


# --- reporting ----------------------------------------------------------------------------

def medians(samples: list[Sample]) -> dict[tuple, dict[str, float]]:
    grouped: dict[tuple, list[Sample]] = defaultdict(list)
    for sample in samples:
        grouped[(sample.size_gib, sample.contender, sample.image_format, sample.operation)].append(sample)
    table = {}
    for key, group in grouped.items():
        table[key] = {
            "seconds": statistics.median(s.seconds for s in group),
            "bytes": statistics.median(s.image_bytes for s in group),
            "rss_kib": max((s.rss_kib for s in group if s.rss_kib), default=None),
            "runs": len(group),
        }
    return table


def render(samples: list[Sample], sizes: list[int], reps: int, machine: str, command: str,
           wall_minutes: float, cold_restores: bool) -> str:
    table = medians(samples)
    cache = "page cache dropped before every restore" if cold_restores else "restores from the page cache"
    lines = [f"Run: `{command}` — {reps} repetition(s), medians; {cache}; whole run {wall_minutes:.1f} min.",
             "",
             machine, "",
             "| RAM | contender | format | operation | seconds | image MiB | MiB/s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(table, key=lambda k: (k[0], k[3], k[1], k[2])):
        size, contender, image_format, operation = key
        row = table[key]
        rate = row["bytes"] / MIB / row["seconds"] if row["seconds"] else 0
        rss = f"{row['rss_kib'] / 1024:.0f}" if row["rss_kib"] else ""
        lines.append(f"| {size} GiB | {contender} | {image_format} | {operation} | {row['seconds']:.2f} | "
                     f"{row['bytes'] / MIB:.0f} | {rate:.0f} | {rss} |")
    lines += ["", "Targets (ratios of medians in this run; lower is better):", "",
              "| RAM | target | measured | verdict |", "|---|---|---|---|"]
    for size in sizes:
        for name, value, limit in target_ratios(table, size):
            verdict = "met" if value is not None and value <= limit else "missed" if value is not None else "n/a"
            shown = f"{value:.2f}" if value is not None else "n/a"
            lines.append(f"| {size} GiB | {name} (≤ {limit}) | {shown} | {verdict} |")
    rss = [table.get((size, "savestate module_utils", "raw", "save"), {}).get("rss_kib") for size in sizes]
    if all(rss):
        lines += ["", "Peak RSS of a raw save at module_utils level: "
                  + ", ".join(f"{size} GiB: {value / 1024:.0f} MiB" for size, value in zip(sizes, rss))
                  + " (the stream never enters Python, so it does not grow with the guest)."]
    return "\n".join(lines)


def target_ratios(table: dict, size: int) -> list[tuple[str, Optional[float], float]]:
    def seconds(contender: str, image_format: str, operation: str) -> Optional[float]:
        row = table.get((size, contender, image_format, operation))
        return row["seconds"] if row else None

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if a is not None and b else None

    ours = "savestate module_utils"
    return [
        ("save raw / QEMU migrate file: + fsync",
         ratio(seconds(ours, "raw", "save"), seconds("QEMU migrate file:", "raw", "save+fsync")), 1.10),
        ("save raw / virsh save raw", ratio(seconds(ours, "raw", "save"), seconds("virsh", "raw", "save")), 0.4),
        ("save zstd / virsh save zstd", ratio(seconds(ours, "zstd", "save"),
                                              seconds("virsh", "zstd", "save")), 0.5),
        ("restore raw / virsh restore raw", ratio(seconds(ours, "raw", "restore"),
                                                  seconds("virsh", "raw", "restore")), 0.5),
        ("restore raw / QEMU -incoming file:", ratio(seconds(ours, "raw", "restore"),
                                                     seconds("QEMU migrate file:", "raw", "restore")), 1.2),
    ]


def machine_facts() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) // 1024 // 1024

    def output(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    qemu = output(str(SYSTEM_QEMU.binary), "--version").split("\n")[0]
    libvirt = output("virsh", "--version").strip()
    disk = output("df", "--output=source,fstype", str(CACHE_DIR)).splitlines()[-1]
    return (f"Machine: {os.cpu_count()} × {cpu}, {memory} GiB RAM, kernel {platform.release()}, images on "
            f"{' '.join(disk.split())}; {qemu}; libvirt {libvirt}; guests under TCG.")


def write_report(report: str, output: Path) -> None:
    text = output.read_text() if output.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1] if END in rest else ""
    output.write_text(f"{head}{BEGIN}\n{report}\n{END}{tail}")


# --- main -----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    become_subreaper()
    reaper = Reaper()
    reaper.start()
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    images = workdir / "images"
    images.mkdir()
    samples: list[Sample] = []
    started = time.monotonic()
    try:
        disk_bandwidth(images, max(args.sizes), samples)
        for size in args.sizes:
            guest, libvirt, libvirt_name = boot_pair(size, workdir, reaper)
            contenders = Contenders(guest, libvirt, libvirt_name, images, size, samples, args.cold_restores)
            try:
                for rep in range(args.reps):
                    log(f"{size} GiB, repetition {rep + 1}/{args.reps}")
                    contenders.qemu_file()
                    for image_format in args.formats:
                        contenders.savestate_module_utils(image_format)
                        contenders.virsh(image_format)
                        contenders.savestate_ansible(image_format)
            finally:
                guest.stop()
                libvirt.close()
                for process in qemu_processes(str(workdir)):
                    kill_and_wait(process.pid)
    finally:
        reaper.stop()
    wall = (time.monotonic() - started) / 60
    command = "make bench" if args.command is None else args.command
    report = render(samples, args.sizes, args.reps, machine_facts(), command, wall, args.cold_restores)
    print("\n" + report)
    if args.output:
        write_report(report, Path(args.output))
        log(f"wrote {args.output}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 4],
                        help="guest RAM sizes in GiB (default 1,2,4)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--formats", type=lambda v: v.split(","), default=["raw", "zstd", "sparse"])
    parser.add_argument("--cold-restores", action="store_true",
                        help="drop the page cache before every restore, so restores read the disk")
    parser.add_argument("--workdir", default=str(CACHE_DIR / "bench"))
    parser.add_argument("--output", default=str(ROOT / "docs" / "performance.md"),
                        help="markdown file to update between the bench markers ('' to skip)")
    parser.add_argument("--command", help=argparse.SUPPRESS)
    return run(parser.parse_args())


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    sys.exit(main())
