"""Where the time goes between a module_utils call and the same operation through ``ansible``.

One guest (``--mib`` of RAM, all but 256 MiB filled with random data) is saved and
restored, interleaved, ``--reps`` times: at the module_utils level (benchmarks/op.py)
and through ``ansible localhost -m savestate.qemu.save/restore``, with an
``ansible.builtin.ping`` task in every repetition (Ansible's fixed per-task cost).
Each run records, besides its wall time and the module's own stream time
(``stats.duration_s``):

* the CPU time (user+sys) of the process tree it started (wait4 of ansible or op.py,
  which counts every reaped descendant: controller, workers, module, helpers);
* the module process's own CPU time under ``ansible`` (the module is started through
  a wrapper interpreter that reports it), so controller = tree - module;
* QEMU's CPU time during the run (the saved QEMU's before/after; the restored QEMU's
  whole life, which began in the run);
* the whole machine's busy CPU time (/proc/stat) during the run: what other
  processes of the machine used is busy - ours - QEMU's;
* the 1-minute load average at the start.

``--ansible-env K=V`` runs the ``ansible`` rows with extra settings (e.g.
``ANSIBLE_INTERNAL_POLL_INTERVAL=0.05``), ``--variants`` alternates plain and
tuned runs to compare them in one run. Prints one JSON line per run and a table of
medians. Hold /tmp/savestate-integration.lock around it (it boots a guest).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness.guest import Guest, GuestSpec  # noqa: E402
from harness.paths import CACHE_DIR, VENV_DIR  # noqa: E402
from harness.processes import Reaper, become_subreaper, kill_and_wait, qemu_processes  # noqa: E402
from harness.qemu import SYSTEM_QEMU  # noqa: E402
from integration.ansible_runner import ANSIBLE, ansible_environment  # noqa: E402
from run import INTERPRETER_WRAPPER, bash_children_seconds  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def qemu_cpu(pid: Optional[int]) -> float:
    """utime+stime of a process (all its threads), in seconds; 0 if it is gone."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


class CpuSampler:
    """Follows a process's CPU time from a thread, so that a QEMU that exits (a save) still has a figure."""

    def __init__(self, pid: Optional[int]) -> None:
        self.pid = pid
        self.first = self.last = qemu_cpu(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            value = qemu_cpu(self.pid)
            if value:
                self.last = value

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        value = qemu_cpu(self.pid)
        return (value or self.last) - self.first


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy since boot (all but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICK


def drop_caches() -> None:
    """A cold restore, as after a reboot (needs root, as make bench)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Runner:
    def __init__(self, guest: Guest, images: Path, scratch: Path) -> None:
        self.guest = guest
        self.images = images
        self.times_file = scratch / "module-times"
        self.wrapper = scratch / "python"
        self.wrapper.write_text(INTERPRETER_WRAPPER.format(python=VENV_DIR / "bin" / "python", times=self.times_file))
        self.wrapper.chmod(0o755)
        self.result_file = scratch / "results.jsonl"
        self.cold = False

    def _measure(self, argv: list[str], env: Optional[dict[str, str]]) -> dict[str, Any]:
        pid_before = self.guest.pid
        sampler = CpuSampler(pid_before)
        busy_before = machine_busy()
        load = os.getloadavg()[0]
        started = time.monotonic()
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            process = subprocess.Popen(argv, stdout=out, stderr=err, text=True, env=env, cwd=ROOT)
            # wait4 on this child: its rusage counts it and every descendant it reaped (not QEMUs
            # that a restore daemonized, which the Reaper thread of this process reaps).
            status, usage = os.wait4(process.pid, 0)[1:]
            process.returncode = os.waitstatus_to_exitcode(status)
            wall = time.monotonic() - started
            busy = machine_busy() - busy_before
            out.seek(0)
            err.seek(0)
            output, errors = out.read(), err.read()
        tree = usage.ru_utime + usage.ru_stime
        pid_after = self.guest.pid
        qemu = sampler.stop()
        if pid_after not in (pid_before, None):  # a restore: the QEMU it started lived only during the run
            qemu += qemu_cpu(pid_after)
        if process.returncode != 0:
            raise RuntimeError(f"{argv[:4]} failed ({process.returncode}): {output[-2000:]}{errors[-2000:]}")
        return {"wall": wall, "tree_cpu": tree, "qemu_cpu": qemu, "busy": busy, "load1": load,
                "output": output}

    def op(self, operation: str, arguments: dict[str, Any]) -> dict[str, Any]:
        row = self._measure([str(VENV_DIR / "bin" / "python"), str(ROOT / "benchmarks" / "op.py"), operation,
                             json.dumps(arguments)], None)
        result = json.loads(row.pop("output"))
        row.update(stream=(result.get("stats") or {}).get("duration_s"), module_cpu=row["tree_cpu"],
                   controller_cpu=0.0)
        return row

    def ansible(self, module: str, arguments: dict[str, Any], extra: dict[str, str]) -> dict[str, Any]:
        env = ansible_environment(self.result_file, extra)
        self.times_file.write_text("")
        # Implicit localhost runs modules with the controller's own interpreter whatever the environment
        # says: only the inventory variable picks the wrapper.
        row = self._measure([str(ANSIBLE), "localhost", "-m", module, "-a", json.dumps(arguments),
                             "-e", f"ansible_python_interpreter={self.wrapper}"], env)
        row.pop("output")
        result = json.loads(self.result_file.read_text().splitlines()[-1])
        if result.get("_status") != "ok":
            raise RuntimeError(f"{module}: {result.get('msg')}")
        module_cpu = bash_children_seconds(self.times_file.read_text()) or 0.0
        row.update(stream=(result.get("stats") or {}).get("duration_s"), module_cpu=module_cpu,
                   controller_cpu=row["tree_cpu"] - module_cpu)
        return row


def cycle(runner: Runner, how: str, image_format: str, extra: dict[str, str], rep: int) -> list[dict[str, Any]]:
    path = runner.images / f"{how}.{image_format}"
    rows = []
    for operation in ("save", "restore"):
        if operation == "save":
            module_args = {"name": runner.guest.spec.name, "path": str(path), "format": image_format}
            op_args = {"name": runner.guest.spec.name, "path": str(path), "image_format": image_format}
        else:
            module_args = op_args = {"path": str(path)}
            if runner.cold:
                drop_caches()
        if how == "module_utils":
            row = runner.op(operation, op_args)
        else:
            row = runner.ansible(f"savestate.qemu.{operation}", module_args, extra)
        row.update(how=how, format=image_format, operation=operation, rep=rep)
        rows.append(row)
    path.unlink()
    return rows


def summarize(rows: list[dict[str, Any]]) -> None:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["format"], row["operation"], row["how"])].append(row)
    keys = ("wall", "stream", "tree_cpu", "module_cpu", "controller_cpu", "qemu_cpu", "busy", "load1")
    print("| format | operation | how | runs | " + " | ".join(keys) + " | other processes' CPU |")
    print("|---|---|---|---|" + "---|" * (len(keys) + 1))
    for (image_format, operation, how), group in sorted(groups.items()):
        med = {k: statistics.median((r[k] or 0.0) for r in group) for k in keys}
        other = statistics.median(r["busy"] - r["tree_cpu"] - r["qemu_cpu"] for r in group)
        print(f"| {image_format} | {operation} | {how} | {len(group)} | "
              + " | ".join(f"{med[k]:.2f}" for k in keys) + f" | {other:.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--formats", type=lambda v: v.split(","), default=["raw", "sparse"])
    parser.add_argument("--variants", type=lambda v: v.split(","), default=["ansible"],
                        help="ways to run, interleaved: module_utils, ansible, tuned (ansible with --ansible-env)")
    parser.add_argument("--ansible-env", action="append", default=[], help="K=V for the 'tuned' variant")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every restore")
    parser.add_argument("--json", default="", help="append every run as a JSON line to this file")
    args = parser.parse_args()
    tuned = dict(item.split("=", 1) for item in args.ansible_env)
    become_subreaper()
    reaper = Reaper()
    reaper.start()
    workdir = CACHE_DIR / "overhead"
    subprocess.run(["rm", "-rf", str(workdir)], check=True)
    images = workdir / "images"
    images.mkdir(parents=True)
    guest = Guest(GuestSpec(name="ovh", qemu=SYSTEM_QEMU, memory_mib=args.mib, fill_mib=args.mib - 256),
                  workdir / "guest")
    rows: list[dict[str, Any]] = []
    try:
        guest.start(ready_timeout=900)
        reaper.own(guest.launched_pid)
        with tempfile.TemporaryDirectory(prefix="ssq-overhead-") as scratch:
            runner = Runner(guest, images, Path(scratch))
            runner.cold = args.cold
            for rep in range(args.reps):
                ping = runner.ansible("ansible.builtin.ping", {"data": "pong"}, {})
                ping.update(how="ansible", format="-", operation="ping", rep=rep)
                new = [ping]
                for image_format in args.formats:
                    for how in args.variants:
                        new += cycle(runner, how, image_format, tuned if how == "tuned" else {}, rep)
                for row in new:
                    print(json.dumps(row), flush=True)
                    if args.json:
                        with open(args.json, "a", encoding="utf-8") as out:
                            out.write(json.dumps(row) + "\n")
                rows += new
    finally:
        guest.stop()
        for process in qemu_processes(str(workdir)):
            kill_and_wait(process.pid)
        reaper.stop()
    summarize(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
