"""Tables and target verdicts of ``make bench`` (see benchmarks/run.py).

Everything here reads samples and prints markdown: no guest is touched. Ratios are
ratios of medians over the run's repetitions; a target whose operands were not
measured in this run (a format left out, one size only) is shown as ``n/a``.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

MIB = 1024 * 1024
OURS = "savestate module_utils"
ANSIBLE = "savestate via ansible"
ANSIBLE_FIXED = "ansible fixed cost (ansible.builtin.ping)"
QEMU = "QEMU migrate file:"
VIRSH = "virsh"
DISK = "disk (dd, O_DIRECT)"
ANSIBLE_SLACK_S = 0.2


@dataclass
class Sample:
    size_gib: int
    contender: str
    image_format: str
    operation: str          # save, save+fsync, restore, write, read, task
    seconds: float
    image_bytes: int
    rss_kib: Optional[int] = None
    stream_s: Optional[float] = None   # the module's own stats.duration_s: QEMU streaming the image
    cpu_s: Optional[float] = None      # user+sys CPU of the process tree the run started (wait4)
    load1: Optional[float] = None      # the machine's 1-minute load average when the run started
    module_cpu_s: Optional[float] = None  # of cpu_s, the module process's own (ansible runs; the rest: controller)
    process_s: Optional[float] = None  # module_utils: the op.py process's whole life (start-up and imports too)


@dataclass
class HostSample:
    """One drain or restore of several guests at once or one after another."""

    mode: str               # "in parallel", "one after another", "dd" or role_mode(concurrency)
    operation: str          # drain, restore, write, read
    guests: int
    seconds: float          # wall time: until the last guest is saved / runs again
    total_bytes: int
    concurrency: Optional[int] = None  # through the roles: how many guests at a time


def role_mode(concurrency: int) -> str:
    """The mode column of a run through the roles."""
    return f"roles, concurrency {concurrency}"


@dataclass
class Verdict:
    name: str
    measured: Optional[float]
    limit: float
    higher_is_better: bool = False
    unit: str = "×"

    @property
    def verdict(self) -> str:
        if self.measured is None:
            return "n/a"
        ok = self.measured >= self.limit if self.higher_is_better else self.measured <= self.limit
        return "PASS" if ok else "MISS"

    def row(self) -> str:
        sign = "≥" if self.higher_is_better else "≤"
        shown = f"{self.measured:.2f}{self.unit}" if self.measured is not None else "n/a"
        return f"| {self.name} | {sign} {self.limit:g}{self.unit} | {shown} | **{self.verdict}** |"


Table = dict[tuple, dict]


def medians(samples: list[Sample]) -> Table:
    grouped: dict[tuple, list[Sample]] = defaultdict(list)
    for sample in samples:
        grouped[(sample.size_gib, sample.contender, sample.image_format, sample.operation)].append(sample)
    return {key: {"seconds": statistics.median(s.seconds for s in group),
                  "bytes": statistics.median(s.image_bytes for s in group),
                  "rss_kib": max((s.rss_kib for s in group if s.rss_kib), default=None),
                  "outside_s": _median([s.seconds - s.stream_s for s in group if s.stream_s is not None]),
                  "cpu_s": _median([s.cpu_s for s in group if s.cpu_s is not None]),
                  "process_s": _median([s.process_s for s in group if s.process_s is not None]),
                  "controller_cpu_s": _median([s.cpu_s - s.module_cpu_s for s in group
                                               if s.cpu_s is not None and s.module_cpu_s is not None]),
                  "runs": len(group)}
            for key, group in grouped.items()}


def _median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def _seconds(table: Table, size: int, contender: str, image_format: str, operation: str) -> Optional[float]:
    row = table.get((size, contender, image_format, operation))
    return row["seconds"] if row else None


def _rate(table: Table, key: tuple) -> Optional[float]:
    row = table.get(key)
    return row["bytes"] / MIB / row["seconds"] if row and row["seconds"] else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def ansible_excess(table: Table, size: int, image_format: str, operation: str) -> Optional[float]:
    """Seconds the ansible run took beyond module_utils + Ansible's fixed per-task cost.

    The module_utils side is its process's whole life where measured (Python's start-up and the imports
    of our module_utils, as a module run has them too), not only the call: both are timed from outside.
    """
    through = _seconds(table, size, ANSIBLE, image_format, operation)
    row = table.get((size, OURS, image_format, operation))
    direct = (row.get("process_s") or row["seconds"]) if row else None
    fixed = _seconds(table, size, ANSIBLE_FIXED, "-", "task")
    if through is None or direct is None or fixed is None:
        return None
    return through - direct - fixed


def ansible_cpu_excess(table: Table, size: int, image_format: str, operation: str) -> Optional[float]:
    """CPU seconds the ansible run's process tree used beyond module_utils' and the ping task's."""
    def cpu(contender: str, fmt: str, op: str) -> Optional[float]:
        row = table.get((size, contender, fmt, op))
        return row.get("cpu_s") if row else None

    through, direct, fixed = cpu(ANSIBLE, image_format, operation), cpu(OURS, image_format, operation), \
        cpu(ANSIBLE_FIXED, "-", "task")
    if through is None or direct is None or fixed is None:
        return None
    return through - direct - fixed


def sample_rows(table: Table) -> list[str]:
    lines = ["| RAM | contender | format | operation | seconds | image MiB | MiB/s | vs disk | "
             "over module_utils + fixed | outside the stream | CPU s | CPU over module_utils + fixed | "
             "peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(table, key=lambda k: (k[0], k[3], k[1], k[2])):
        size, contender, image_format, operation = key
        row = table[key]
        rate = _rate(table, key)
        disk_key = (size, DISK, "-", "read" if operation == "restore" else "write")
        disk = _rate(table, disk_key) if operation in ("save", "save+fsync", "restore") else None
        versus = f"{rate / disk:.2f}" if rate and disk else ""
        excess = ansible_excess(table, size, image_format, operation) if contender == ANSIBLE else None
        over = f"{excess:+.2f} s" if excess is not None else ""
        cpu_excess = ansible_cpu_excess(table, size, image_format, operation) if contender == ANSIBLE else None
        cpu_over = f"{cpu_excess:+.2f} s" if cpu_excess is not None else ""
        cpu = f"{row['cpu_s']:.2f}" if row.get("cpu_s") is not None else ""
        if row.get("controller_cpu_s") is not None:
            cpu += f" (controller {row['controller_cpu_s']:.2f})"
        rss = f"{row['rss_kib'] / 1024:.0f}" if row["rss_kib"] else ""
        outside = f"{row['outside_s']:.2f}" if row["outside_s"] is not None else ""
        shown_rate = f"{rate:.0f}" if rate and operation != "task" else ""
        seconds = f"{row['seconds']:.2f}"
        if row.get("process_s") is not None:
            seconds += f" (process {row['process_s']:.2f})"
        lines.append(f"| {size} GiB | {contender} | {image_format} | {operation} | {seconds} | "
                     f"{row['bytes'] / MIB:.0f} | {shown_rate} | {versus} | {over} | {outside} | {cpu} | {cpu_over} | "
                     f"{rss} |")
    return lines


def host_rows(samples: list[HostSample]) -> list[str]:
    if not samples:
        return []
    grouped: dict[tuple, list[HostSample]] = defaultdict(list)
    for sample in samples:
        grouped[(sample.operation, sample.mode, sample.guests)].append(sample)
    lines = ["| operation | how | guests | wall s (until the last guest is saved / runs again) | GiB | "
             "aggregate MiB/s |", "|---|---|---|---|---|---|"]
    for (operation, mode, guests), group in sorted(grouped.items()):
        seconds = statistics.median(s.seconds for s in group)
        total = statistics.median(s.total_bytes for s in group)
        lines.append(f"| {operation} | {mode} | {guests} | {seconds:.2f} | {total / MIB / 1024:.2f} | "
                     f"{total / MIB / seconds:.0f} |")
    return lines


def _host_median(samples: list[HostSample], operation: str, mode: str) -> Optional[tuple[float, float]]:
    group = [s for s in samples if s.operation == operation and s.mode == mode]
    if not group:
        return None
    seconds = statistics.median(s.seconds for s in group)
    return seconds, statistics.median(s.total_bytes for s in group) / MIB / seconds


def verdicts(table: Table, sizes: list[int], formats: list[str], host: list[HostSample],
             cold: bool) -> list[Verdict]:
    found: list[Verdict] = []
    for size in sizes:
        def sec(contender: str, image_format: str, operation: str, size: int = size) -> Optional[float]:
            return _seconds(table, size, contender, image_format, operation)

        for image_format in formats:
            for operation in ("save", "restore"):
                found.append(Verdict(f"{size} GiB {image_format} {operation}: via ansible − module_utils − "
                                     "fixed per-task cost", ansible_excess(table, size, image_format, operation),
                                     ANSIBLE_SLACK_S, unit=" s"))
        found += [
            Verdict(f"{size} GiB sparse save / virsh sparse save",
                    _ratio(sec(OURS, "sparse", "save"), sec(VIRSH, "sparse", "save")), 1.0),
            Verdict(f"{size} GiB raw save / QEMU migrate file: + fsync",
                    _ratio(sec(OURS, "raw", "save"), sec(QEMU, "raw", "save+fsync")), 1.05),
            Verdict(f"{size} GiB raw save / virsh raw save",
                    _ratio(sec(OURS, "raw", "save"), sec(VIRSH, "raw", "save")), 0.4),
        ]
        temperature = "cold" if cold else "warm (run without --warm-restores for the target)"
        found.append(Verdict(f"{size} GiB raw restore / QEMU -incoming, {temperature}",
                             _ratio(sec(OURS, "raw", "restore"), sec(QEMU, "raw", "restore")), 1.1))
        for image_format in formats:
            found.append(Verdict(f"{size} GiB {image_format} restore / virsh restore, {temperature}",
                                 _ratio(sec(OURS, image_format, "restore"), sec(VIRSH, image_format, "restore")),
                                 0.8))
    found += _host_verdicts(host)
    rss = [table.get((size, OURS, "raw", "save"), {}).get("rss_kib") for size in sizes]
    measured = [kib for kib in rss if kib]
    flat = max(measured) / min(measured) if len(sizes) > 1 and len(measured) == len(rss) else None
    found.append(Verdict(f"module peak RSS, largest / smallest guest ({', '.join(f'{s} GiB' for s in sizes)})",
                         flat, 1.1))
    return found


def _host_verdicts(host: list[HostSample]) -> list[Verdict]:
    found = []
    for operation, disk_operation in (("drain", "write"), ("restore", "read")):
        parallel = _host_median(host, operation, "in parallel")
        serial = _host_median(host, operation, "one after another")
        disk = _host_median(host, disk_operation, "dd")
        found.append(Verdict(f"4 guests {operation} in parallel: aggregate / dd {disk_operation} bandwidth",
                             _ratio(parallel[1], disk[1]) if parallel and disk else None, 0.8, True))
        found.append(Verdict(f"4 guests {operation}: one after another / in parallel (wall)",
                             _ratio(serial[0], parallel[0]) if parallel and serial else None, 1.5, True))
        found += _role_verdicts(host, operation, disk)
    return found


def _role_verdicts(host: list[HostSample], operation: str, disk: Optional[tuple[float, float]]) -> list[Verdict]:
    """The same two targets through host_drain / host_restore, at each concurrency measured above 1."""
    role = "host_drain" if operation == "drain" else "host_restore"
    serial = _host_median(host, operation, role_mode(1))
    found = []
    for level in sorted({s.concurrency for s in host if s.concurrency and s.concurrency > 1}):
        measured = _host_median(host, operation, role_mode(level))
        found.append(Verdict(f"4 guests through {role}, concurrency {level}: aggregate / dd "
                             f"{'write' if operation == 'drain' else 'read'} bandwidth",
                             _ratio(measured[1], disk[1]) if measured and disk else None, 0.8, True))
        found.append(Verdict(f"4 guests through {role}: concurrency 1 / concurrency {level} (wall)",
                             _ratio(serial[0], measured[0]) if measured and serial else None, 1.5, True))
    return found


def load_note(samples: list[Sample]) -> str:
    """The machine's 1-minute load average over the run (2 cores shared with other work)."""
    loads = sorted(s.load1 for s in samples if s.load1 is not None)
    if not loads:
        return ""
    return f" Load average (1 min) at the runs' starts: median {statistics.median(loads):.1f}, " \
           f"{loads[0]:.1f}–{loads[-1]:.1f}."


def render(samples: list[Sample], host: list[HostSample], sizes: list[int], formats: list[str], reps: int,
           machine: str, command: str, wall_minutes: float, cold: bool, cache_note: str) -> str:
    table = medians(samples)
    cache = (f"page cache dropped before every restore ({cache_note})" if cold
             else "restores from the page cache (--warm-restores)")
    lines = [f"Run: `{command}` — {reps} repetition(s), medians; {cache}; whole run {wall_minutes:.1f} min.",
             "", machine + load_note(samples), "",
             "*vs disk*: the row's MiB/s over the disk's own O_DIRECT bandwidth measured in the same run "
             "(read for restores, write for saves). A module_utils row's seconds are the call; in brackets its "
             "process from spawn to exit (Python's start-up and our imports too). *over module_utils + fixed*: an "
             "`ansible` row's time minus the module_utils row's process time minus Ansible's fixed per-task cost "
             "(an `ansible.builtin.ping` task, same run). "
             "*outside the stream*: the row's time minus the module's own `stats.duration_s` (QEMU streaming the "
             "image), i.e. everything but the stream: start-up, checks, QMP, fsyncs, Ansible. *CPU s*: user+sys CPU "
             "time of the process tree the run started (module_utils: benchmarks/op.py and its helpers; `ansible`: "
             "the controller, its worker and the module; in brackets the controller and worker alone), not QEMU's. "
             "*CPU over module_utils + fixed*: the same difference as the seconds, in CPU time: what Ansible costs "
             "beyond its fixed per-task cost.",
             ""]
    lines += sample_rows(table)
    if host:
        lines += ["", "Whole host (4 guests of 1 GiB, RAM filled; raw format; restores " + ("cold" if cold else "warm")
                  + "; *in parallel* / *one after another*: module_utils processes; *roles*: ansible-playbook with "
                  "host_drain / host_restore, their defaults but the concurrency, start-up included):", ""]
        lines += host_rows(host)
    lines += ["", "Targets (issue 17, ratios of medians in this run):", "",
              "| target | limit | measured | verdict |", "|---|---|---|---|"]
    lines += [verdict.row() for verdict in verdicts(table, sizes, formats, host, cold)]
    return "\n".join(lines)
