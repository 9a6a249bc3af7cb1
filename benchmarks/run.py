"""make bench: save and restore speed, side by side with QEMU itself and with libvirt.

For each guest size (1, 2 and 4 GiB of RAM, all but max(256 MiB, RAM/8) of it filled
with random data) one guest is booted under QEMU 10.0 and an equal one under libvirt
(embedded driver), and in one run, interleaved, repeated ``--reps`` times:

* QEMU's own ``migrate file:`` (bandwidth unlimited) and ``-incoming`` load of that
  file: the floor. Saves are shown with and without the fsync that makes them durable;
* ``virsh save`` / ``virsh restore`` of the libvirt guest: raw, zstd, sparse;
* this collection at the module_utils level (benchmarks/op.py, a process of its own
  whose peak RSS is read with wait4) and through ``ansible`` (so the start-up cost
  of a module run shows): raw, zstd, sparse;
* Ansible's fixed per-task cost: an ``ansible.builtin.ping`` task run the same way;
* the disk's own sequential write and read bandwidth (dd with O_DIRECT, a file of
  the guest's size, once per size and repetition).

Every restore, of every contender, starts cold: the page cache is dropped first
(``--warm-restores`` keeps it). Every save starts right after the page cache was
emptied too (Cache.settle says why). Then the whole host: 4 guests of 1 GiB drained
and restored in parallel and one after another by module_utils processes, then
through the roles host_drain and host_restore (ansible-playbook) at each
``--role-concurrency`` (``--host-guests 0`` skips it all).
Medians and target verdicts go to stdout and into docs/performance.md between the
bench markers; the prose around them is written by hand.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import page_cache  # noqa: E402
from harness.guest import Guest, GuestSpec, qmp_execute  # noqa: E402
from harness.libvirt import EmbeddedLibvirt  # noqa: E402
from harness.paths import CACHE_DIR, VENV_DIR  # noqa: E402
from harness.processes import Reaper, become_subreaper, kill_and_wait, pid_gone, qemu_processes  # noqa: E402
from harness.qemu import SYSTEM_QEMU  # noqa: E402
from integration.ansible_runner import ANSIBLE as ANSIBLE_BIN  # noqa: E402
from integration.ansible_runner import ansible_environment, host_result  # noqa: E402
from report import (  # noqa: E402
    ANSIBLE, ANSIBLE_FIXED, DISK, OURS, QEMU, VIRSH, HostSample, Sample, render, role_mode)

# RAM a guest keeps besides its random fill (the tmpfs): 256 MiB up to 2 GiB, an eighth above.
# With 256 MiB a 4 GiB guest's kernel ran short of memory and spun: idle, the two 4 GiB guests
# (ours and libvirt's) used 3 of this machine's 2 cores, and every 4 GiB row was measured on a
# saturated host. With 512 MiB both use 0.07-0.15 cores, as the 1 and 2 GiB guests do.
GUEST_OVERHEAD_MIB = 256
UNLIMITED = 9223372036853727232
MIB = 1024 * 1024
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def guest_overhead_mib(memory_mib: int) -> int:
    return max(GUEST_OVERHEAD_MIB, memory_mib // 8)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Cache:
    """Empties the page cache before a cold read: drop_caches, or failing that fadvise on the file.

    ``sync; echo 3 > /proc/sys/vm/drop_caches`` needs root (and a /proc/sys that is
    writable: some containers refuse it); POSIX_FADV_DONTNEED on the file about to be
    read is the fallback, which only evicts that file's clean pages (hence the fsync).
    """

    def __init__(self) -> None:
        self.method = "drop_caches" if self._drop_caches() else "fadvise(DONTNEED) on the image"

    @staticmethod
    def _drop_caches() -> bool:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as knob:
                knob.write("3\n")
        except OSError:
            return False
        return True

    def drop(self, path: Optional[Path] = None) -> None:
        if not self._drop_caches() and path is not None:
            page_cache.evict(path)

    def settle(self) -> None:
        """Before a save: the same memory for every contender, pages freed just now.

        A virtual machine whose balloon reports free pages to its host (virtio-balloon free page
        reporting, as on the machine the bench was written on) gives up the memory behind pages
        that stay free a few seconds; writing into them again costs a fault in the host, page by
        page. Measured there: 3.5 GiB written into the page cache (dd, no fsync) took 9.5–9.8 s
        into pages free for 15 s, and 0.8–1.4 s into pages freed just before. A save writes its
        image into the page cache, so without this its speed depended on what ran before it
        (whether the last restore's image was freed or stays cached, as libvirt's does). A host
        without a balloon always has the fast case; dropping the caches right before each save
        gives every contender that case.
        """
        self._drop_caches()


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
                 size_gib: int, samples: list[Sample], cache: Cache, cold_restores: bool) -> None:
        self.guest = guest
        self.cache = cache
        self.cold_restores = cold_restores
        self.libvirt = libvirt
        self.libvirt_name = libvirt_name
        self.images = images
        self.size_gib = size_gib
        self.samples = samples

    def before_restore(self, path: Path) -> None:
        """Restores are cold unless --warm-restores: a host that rebooted has nothing cached."""
        if self.cold_restores:
            self.cache.drop(path)

    def record(self, contender: str, image_format: str, operation: str, seconds: float, path: Optional[Path],
               rss_kib: Optional[int] = None, stream_s: Optional[float] = None, cpu_s: Optional[float] = None,
               load1: Optional[float] = None, module_cpu_s: Optional[float] = None,
               process_s: Optional[float] = None) -> None:
        size = path.stat().st_size if path is not None else 0
        self.samples.append(Sample(self.size_gib, contender, image_format, operation, seconds, size, rss_kib,
                                   stream_s, cpu_s, load1, module_cpu_s, process_s))

    def qemu_file(self, image_format: str = "raw") -> None:
        path = self.images / "qemu-own.bin"
        address = self.guest.qmp_address
        self.cache.settle()
        qmp_execute(address, "stop")
        qmp_execute(address, "migrate-set-parameters", {"max-bandwidth": UNLIMITED})
        started = time.monotonic()
        qmp_execute(address, "migrate", {"uri": f"file:{path}"})
        wait_migration(address)
        saved = time.monotonic() - started
        with open(path, "rb") as image:
            os.fsync(image.fileno())
        durable = time.monotonic() - started
        self.record(QEMU, image_format, "save", saved, path)
        self.record(QEMU, image_format, "save+fsync", durable, path)
        pid = self.guest.pid
        qmp_execute(address, "quit")
        while pid is not None and not pid_gone(pid):
            time.sleep(0.01)
        self.before_restore(path)
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
        self.record(QEMU, image_format, "restore", loaded, path)
        path.unlink()

    def savestate_module_utils(self, image_format: str, channels: Optional[int] = None) -> None:
        path = self.images / f"savestate.{image_format}"
        contender = OURS if channels is None else f"{OURS}, {channels} channels"
        save_args: dict[str, Any] = {"name": self.guest.spec.name, "path": str(path), "image_format": image_format}
        restore_args: dict[str, Any] = {"path": str(path)}
        if channels is not None:
            save_args["parallel_channels"] = restore_args["parallel_channels"] = channels
        for operation, arguments, prepare in (("save", save_args, self.cache.settle),
                                              ("restore", restore_args, lambda: self.before_restore(path))):
            prepare()
            load = os.getloadavg()[0]
            run = _op(operation, arguments)
            self.record(contender, image_format, operation, run.seconds, path, run.rss_kib, run.stream_s, run.cpu_s,
                        load, process_s=run.process_s)
        path.unlink()

    def savestate_ansible(self, image_format: str) -> None:
        path = self.images / f"ansible.{image_format}"
        save_args = {"name": self.guest.spec.name, "path": str(path), "format": image_format}
        for operation, arguments, prepare in (("save", save_args, self.cache.settle),
                                              ("restore", {"path": str(path)}, lambda: self.before_restore(path))):
            prepare()
            load = os.getloadavg()[0]
            started = time.monotonic()
            result, cpu, module_cpu = run_ansible(f"savestate.qemu.{operation}", arguments)
            seconds = time.monotonic() - started
            self.record(ANSIBLE, image_format, operation, seconds, path, None, _stream_seconds(result), cpu, load,
                        module_cpu)
        path.unlink()

    def ansible_fixed_cost(self) -> None:
        """Ansible's own cost of one task (start-up, module transfer, result), run exactly as ours are."""
        # ping needs an argument: '-a {}' is a free-form string it refuses, failing before any module runs.
        load = os.getloadavg()[0]
        started = time.monotonic()
        cpu, module_cpu = run_ansible("ansible.builtin.ping", {"data": "pong"})[1:]
        self.record(ANSIBLE_FIXED, "-", "task", time.monotonic() - started, None, cpu_s=cpu, load1=load,
                    module_cpu_s=module_cpu)

    def virsh(self, image_format: str) -> None:
        path = self.images / f"virsh.{image_format}"
        self.cache.settle()
        seconds = timed(lambda: self.libvirt.save(self.libvirt_name, path, image_format))
        self.record(VIRSH, image_format, "save", seconds, path)
        self.before_restore(path)
        seconds = timed(lambda: self.libvirt.restore(path))
        self.record(VIRSH, image_format, "restore", seconds, path)
        path.unlink()


def _connectable(address: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(address)
        except OSError:
            return False
    return True


# The module's interpreter in the bench's ansible runs: the venv's python, then bash's ``times`` (its
# children's user and sys time: the module and its helpers) into a file. Not in a pipe: a subshell has no children.
INTERPRETER_WRAPPER = """#!/bin/bash
"{python}" "$@"
status=$?
times > "{times}"
exit $status
"""


def bash_children_seconds(times_output: str) -> Optional[float]:
    """user+sys seconds of the children from bash's ``times`` output (its last line: ``0m1.234s 0m0.100s``)."""
    lines = times_output.strip().splitlines()
    if not lines:
        return None
    total = 0.0
    for part in lines[-1].split():
        minutes, seconds = part.rstrip("s").split("m")
        total += int(minutes) * 60 + float(seconds)
    return total


def run_ansible(module: str, arguments: dict, extra_env: Optional[dict[str, str]] = None
                ) -> tuple[dict, float, Optional[float]]:
    """``ansible localhost -m module`` as tests/integration/ansible_runner.py runs it: its result, the CPU
    time (user+sys) of its process tree (the controller, its worker and the module, all reaped below it)
    and the module process's own CPU time (with its helpers), None if it did not run.

    wait4 on the ansible process, not getrusage(RUSAGE_CHILDREN): this process is the subreaper of the
    QEMUs that restores start, and the Reaper thread may reap one (with all its CPU) meanwhile. The module
    runs through INTERPRETER_WRAPPER, given as the inventory variable: an implicit localhost ignores
    ANSIBLE_PYTHON_INTERPRETER and runs modules with the controller's own interpreter.
    """
    with tempfile.TemporaryDirectory(prefix="ssq-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        result_file, times_file, wrapper = scratch / "results.jsonl", scratch / "module-times", scratch / "python"
        wrapper.write_text(INTERPRETER_WRAPPER.format(python=VENV_DIR / "bin" / "python", times=times_file))
        wrapper.chmod(0o700)
        argv = [str(ANSIBLE_BIN), "localhost", "-m", module, "-a", json.dumps(arguments),
                "-e", f"ansible_python_interpreter={wrapper}"]
        with open(scratch / "output", "wb") as output:
            process = subprocess.Popen(argv, cwd=ROOT, env=ansible_environment(result_file, extra_env),
                                       stdout=output, stderr=subprocess.STDOUT)
            status, usage = os.wait4(process.pid, 0)[1:]
        process.returncode = os.waitstatus_to_exitcode(status)
        output_text = (scratch / "output").read_text(errors="replace")
        result = host_result(subprocess.CompletedProcess(argv, process.returncode, output_text, ""), result_file)
        module_cpu = bash_children_seconds(times_file.read_text()) if times_file.exists() else None
    return _check(result), usage.ru_utime + usage.ru_stime, module_cpu


def _check(result: dict) -> dict:
    if result.get("failed"):
        raise RuntimeError(f"module failed: {result.get('msg')}")
    return result


def _stream_seconds(result: dict) -> Optional[float]:
    """The module's own measure of QEMU streaming the image (save or restore ``stats.duration_s``)."""
    return (result.get("stats") or {}).get("duration_s")


class OpRun(NamedTuple):
    """One benchmarks/op.py run."""

    seconds: float              # the save_guest()/restore_guest() call, timed inside the process
    rss_kib: int                # peak RSS of the process and its helpers
    stream_s: Optional[float]   # the operation's own stats.duration_s
    cpu_s: float                # user+sys CPU of the process and its helpers
    process_s: float            # from spawning the process to its exit: start-up and imports included


def _spawn_op(operation: str, arguments: dict) -> tuple[subprocess.Popen, float]:
    started = time.monotonic()
    return subprocess.Popen([str(VENV_DIR / "bin" / "python"), str(ROOT / "benchmarks" / "op.py"),
                             operation, json.dumps(arguments)], stdout=subprocess.PIPE, text=True), started


def _finish_op(spawned: tuple[subprocess.Popen, float], operation: str) -> OpRun:
    """Wait for one benchmarks/op.py and say what it took."""
    process, started = spawned
    assert process.stdout is not None  # stdout=PIPE
    output = process.stdout.read()
    status, usage = os.wait4(process.pid, 0)[1:]
    ended = time.monotonic()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"benchmarks/op.py {operation} failed")
    result = json.loads(output)
    return OpRun(result["seconds"], usage.ru_maxrss, _stream_seconds(result), usage.ru_utime + usage.ru_stime,
                 ended - started)


def _op(operation: str, arguments: dict) -> OpRun:
    return _finish_op(_spawn_op(operation, arguments), operation)


def dd(directory: Path, mib: int, cache: Cache) -> tuple[float, float, int]:
    """Seconds for an O_DIRECT sequential write, then read, of ``mib`` MiB in ``directory``."""
    target = directory / "dd.bin"
    count = mib // 4
    times = []
    for argv in (["dd", "if=/dev/zero", f"of={target}", "bs=4M", f"count={count}", "oflag=direct", "conv=fsync"],
                 ["dd", f"if={target}", "of=/dev/null", "bs=4M", "iflag=direct"]):
        cache.drop(target if target.exists() else None)
        times.append(timed(functools.partial(subprocess.run, argv, check=True, capture_output=True)))
    size = target.stat().st_size
    target.unlink()
    return times[0], times[1], size


def disk_bandwidth(directory: Path, size_gib: int, samples: list[Sample], cache: Cache) -> None:
    write, read, size = dd(directory, size_gib * 1024, cache)
    samples.append(Sample(size_gib, DISK, "-", "write", write, size))
    samples.append(Sample(size_gib, DISK, "-", "read", read, size))


def boot_pair(size_gib: int, workdir: Path, reaper: Reaper) -> tuple[Guest, EmbeddedLibvirt, str]:
    memory = size_gib * 1024
    fill = memory - guest_overhead_mib(memory)
    guest = Guest(GuestSpec(name=f"bench{size_gib}", qemu=SYSTEM_QEMU, memory_mib=memory, fill_mib=fill),
                  workdir / f"guest{size_gib}")
    libvirt = EmbeddedLibvirt(workdir / f"libvirt{size_gib}")
    libvirt_name = f"lvbench{size_gib}"
    libvirt.define_guest(libvirt_name, str(uuidlib.uuid4()), memory_mib=memory, fill_mib=fill)
    log(f"booting two {size_gib} GiB guests (QEMU and libvirt), filling {fill} MiB with random data")
    libvirt.virsh("start", libvirt_name)
    guest.start(ready_timeout=900)
    reaper.own(guest.launched_pid)
    libvirt.wait_ready(libvirt_name, timeout=900)
    return guest, libvirt, libvirt_name


def rotated(contenders: Contenders, image_format: str, rep: int) -> list[Callable[[], None]]:
    """module_utils, virsh and ansible in an order that turns with the repetition.

    In a fixed order the `ansible` rows always ran right after virsh's restore (a freshly
    started libvirt guest, its image just read into the page cache) and the module_utils
    rows never did: an order effect, not an Ansible cost, could land on one contender.
    """
    order = [lambda: contenders.savestate_module_utils(image_format), lambda: contenders.virsh(image_format),
             lambda: contenders.savestate_ansible(image_format)]
    shift = rep % len(order)
    return order[shift:] + order[:shift]


def bench_size(args: argparse.Namespace, size: int, workdir: Path, images: Path, reaper: Reaper,
               samples: list[Sample], cache: Cache) -> None:
    guest, libvirt, libvirt_name = boot_pair(size, workdir, reaper)
    contenders = Contenders(guest, libvirt, libvirt_name, images, size, samples, cache, not args.warm_restores)
    try:
        for rep in range(args.reps):
            log(f"{size} GiB, repetition {rep + 1}/{args.reps}")
            disk_bandwidth(images, size, samples, cache)
            contenders.ansible_fixed_cost()
            contenders.qemu_file()
            for image_format in args.formats:
                for run_contender in rotated(contenders, image_format, rep):
                    run_contender()
                if image_format == "sparse":
                    for channels in args.sparse_channels:
                        contenders.savestate_module_utils("sparse", channels)
    finally:
        guest.stop()
        libvirt.close()
        for process in qemu_processes(str(workdir)):
            kill_and_wait(process.pid)


# --- the whole host -------------------------------------------------------------------------

def host_round(guests: list[Guest], images: Path, cache: Cache, cold_restores: bool, parallel: bool,
               host: list[HostSample]) -> None:
    """Drain every guest, then restore every one, all at once or one after another."""
    mode = "in parallel" if parallel else "one after another"
    paths = [images / f"host-{guest.spec.name}.raw" for guest in guests]
    saves = [("save", {"name": guest.spec.name, "path": str(path), "image_format": "raw"})
             for guest, path in zip(guests, paths)]
    restores = [("restore", {"path": str(path)}) for path in paths]
    for operation, batch in (("drain", saves), ("restore", restores)):
        if operation == "drain":
            cache.settle()
        elif cold_restores:
            cache.drop(None)
            for path in paths:
                cache.drop(path)
        started = time.monotonic()
        if parallel:
            running = [(_spawn_op(op, arguments), op) for op, arguments in batch]
            for spawned, op in running:
                _finish_op(spawned, op)
        else:
            for op, arguments in batch:
                _op(op, arguments)
        wall = time.monotonic() - started
        total = sum(path.stat().st_size for path in paths)
        host.append(HostSample(mode, operation, len(guests), wall, total))
        log(f"{len(guests)} guests {operation} {mode}: {wall:.2f} s")
    for path in paths:
        path.unlink()


ROLE_PLAYBOOK = """
- name: Drain or restore this host with a role of the collection (make bench)
  hosts: localhost
  gather_facts: false
  roles:
    - role: savestate.qemu.{role}
"""


def role_round(guests: list[Guest], directory: Path, cache: Cache, cold_restores: bool, concurrency: int,
               host: list[HostSample]) -> None:
    """host_drain, then host_restore, of every guest through ansible-playbook, ``concurrency`` at a time.

    The wall time is the playbook's, start-up included: what an operator waits for, until the last
    guest is saved (drain) or runs again (restore). The restore removes the images (its default).
    """
    shutil.rmtree(directory, ignore_errors=True)
    cache.settle()
    drain = _playbook(directory.parent / "host_drain.yml", "host_drain", {
        "host_drain_dir": str(directory), "host_drain_guests": [guest.spec.name for guest in guests],
        "host_drain_concurrency": concurrency})
    total = sum(path.stat().st_size for path in directory.glob("*.save"))
    if cold_restores:
        cache.drop(None)
    restore = _playbook(directory.parent / "host_restore.yml", "host_restore", {
        "host_restore_dir": str(directory), "host_restore_concurrency": concurrency})
    for operation, seconds in (("drain", drain), ("restore", restore)):
        host.append(HostSample(role_mode(concurrency), operation, len(guests), seconds, total, concurrency))
        log(f"{len(guests)} guests {operation} through the role, concurrency {concurrency}: {seconds:.2f} s")
    shutil.rmtree(directory, ignore_errors=True)


def _playbook(playbook: Path, role: str, variables: dict[str, Any]) -> float:
    """Seconds one ansible-playbook run of ``role`` took; it raises with the output if the run failed."""
    playbook.write_text(ROLE_PLAYBOOK.format(role=role))
    extra = playbook.with_suffix(".json")
    extra.write_text(json.dumps(variables))
    argv = [str(ANSIBLE_BIN) + "-playbook", "-i", "localhost,", "-c", "local",
            "-e", f"ansible_python_interpreter={VENV_DIR / 'bin' / 'python'}", "-e", f"@{extra}", str(playbook)]
    started = time.monotonic()
    done = subprocess.run(argv, cwd=ROOT, env=ansible_environment(playbook.with_suffix(".results"), None),
                          capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{role} failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    return seconds


def bench_host(args: argparse.Namespace, workdir: Path, images: Path, reaper: Reaper, cache: Cache,
               host: list[HostSample]) -> None:
    count = args.host_guests
    guests = [Guest(GuestSpec(name=f"host{index}", qemu=SYSTEM_QEMU, memory_mib=1024,
                              fill_mib=1024 - GUEST_OVERHEAD_MIB), workdir / f"host{index}")
              for index in range(count)]
    log(f"booting {count} guests of 1 GiB for the whole-host figures")
    try:
        with ThreadPoolExecutor(max_workers=count) as pool:  # boot (and fill) side by side
            list(pool.map(lambda guest: guest.start(ready_timeout=900), guests))
        for guest in guests:
            reaper.own(guest.launched_pid)
        for rep in range(args.reps):
            log(f"whole host, repetition {rep + 1}/{args.reps}")
            write, read, size = dd(images, count * 1024, cache)
            host.append(HostSample("dd", "write", count, write, size))
            host.append(HostSample("dd", "read", count, read, size))
            cold = not args.warm_restores
            host_round(guests, images, cache, cold, False, host)
            host_round(guests, images, cache, cold, True, host)
            for concurrency in args.role_concurrency:
                role_round(guests, images / "drain", cache, cold, concurrency, host)
    finally:
        for guest in guests:
            guest.stop()
        for process in qemu_processes(str(workdir)):
            kill_and_wait(process.pid)


# --- reporting ----------------------------------------------------------------------------

def machine_facts() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024 ** 3

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
    host: list[HostSample] = []
    cache = Cache()
    log(f"cold reads by {cache.method}")
    started = time.monotonic()
    try:
        for size in args.sizes:
            bench_size(args, size, workdir, images, reaper, samples, cache)
        if args.host_guests:
            bench_host(args, workdir, images, reaper, cache, host)
    finally:
        reaper.stop()
    wall = (time.monotonic() - started) / 60
    command = "make bench" if args.command is None else args.command
    report = render(samples, host, args.sizes, args.formats, args.reps, machine_facts(), command, wall,
                    not args.warm_restores, cache.method)
    print("\n" + report)
    if args.output:
        write_report(report, Path(args.output))
        log(f"wrote {args.output}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _ints(value: str) -> list[int]:
    return [int(x) for x in value.split(",") if x]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=_ints, default=[1, 2, 4], help="guest RAM sizes in GiB (default 1,2,4)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--formats", type=lambda v: v.split(","), default=["raw", "zstd", "sparse"])
    parser.add_argument("--warm-restores", action="store_true",
                        help="restore from the page cache (the image was just written) instead of cold")
    parser.add_argument("--sparse-channels", type=_ints, default=[],
                        help="also run our sparse save/restore with these parallel_channels (e.g. 1,2)")
    parser.add_argument("--host-guests", type=int, default=4,
                        help="guests of 1 GiB for the whole-host drain/restore figures (0 skips them)")
    parser.add_argument("--role-concurrency", type=_ints, default=[1, 4],
                        help="host_drain/host_restore of the whole host with these concurrencies (default 1,4: one "
                             "at a time and the roles' default; '' skips the roles)")
    parser.add_argument("--workdir", default=str(CACHE_DIR / "bench"))
    parser.add_argument("--output", default=str(ROOT / "docs" / "performance.md"),
                        help="markdown file to update between the bench markers ('' to skip)")
    parser.add_argument("--command", help=argparse.SUPPRESS)
    return run(parser.parse_args())


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    sys.exit(main())
