# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""The QEMU guests active on this host, read from /proc without talking to them.

A guest is a live process whose executable (/proc/PID/exe) is a trusted emulator
(see _emulator: a root-owned ``qemu-system-*``/``qemu-kvm`` in directories only root
can write). What a process calls itself (argv[0], comm) proves nothing: any user can
``exec -a qemu-system-x86_64``. Its command line tells us its name, UUID, pidfile and
where its QMP monitors listen; /proc/PID/status its real uid, gid and groups; a few
libvirt-specific traces whether libvirt manages it. Nothing here needs QMP, so a
guest whose monitor is busy is still found.

Command lines are written by whoever started the process, so every field is parsed
defensively and bounded (ports, sizes, UUIDs, names). A process that looks like QEMU
but fails a check is not a guest: it is reported as ignored, with the reason, and
never makes discovery fail for the others.

/proc changes under our feet: a process can exit between two reads, and some
entries are unreadable to unprivileged users. Every such case means "skip this
detail" (or the whole process), never an exception. The /proc root is a parameter
so that tests can build a fake tree.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ansible_collections.savestate.qemu.plugins.module_utils._emulator import process_emulator
from ansible_collections.savestate.qemu.plugins.module_utils._errors import MonitorError, PreconditionError
from ansible_collections.savestate.qemu.plugins.module_utils._monitor import (
    HAS_QEMU_QMP,
    QEMU_QMP_REQUIREMENT,
    Endpoint,
    Monitor,
    parse_endpoint,
    tcp_endpoint,
    unix_endpoint,
)
from ansible_collections.savestate.qemu.plugins.module_utils._peer import (
    describe_process,
    holders,
    tcp_listener_inodes,
    unix_listener_inodes,
)
from ansible_collections.savestate.qemu.plugins.module_utils._proc import (
    GONE_STATES,
    fs_bytes,
    is_plain_text,
    json_safe,
    pids,
    process_comm,
    read_cgroup,
    read_cmdline,
    read_cwd,
    read_link,
    read_stat,
    read_status,
)
from ansible_collections.savestate.qemu.plugins.module_utils._qemu_argv import (
    PATH_VALUED_OPTIONS,
    iter_options,
    option_dict,
    option_values,
    split_option_string,
)
from ansible_collections.savestate.qemu.plugins.module_utils._systemd import guest_unit
from ansible_collections.savestate.qemu.plugins.module_utils._sockets import (
    LIBVIRT_COMMS,
    unix_path_of_fd,
)

T = TypeVar("T")
MIB = 1 << 20
QEMU_PROGRAM_PREFIXES = ("qemu-system-", "qemu-kvm")
MAX_NAME = 1024          # characters of -name we accept (QEMU sets none; file names and logs need one)
MAX_MEMORY_MIB = 1 << 40  # 1 EiB: anything larger in -m is not a size QEMU could have started with
_PROGRAM_CHARS = 256     # of argv[0] quoted in an ignored-process report
_UUID_FORM = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_TRUE = frozenset(("", "on", "yes", "true", "y"))
_WILDCARD_HOSTS = frozenset(("", "0.0.0.0", "::", "127.0.0.1", "::1", "localhost"))
_SIZE_SUFFIXES = {"b": 1 / (1 << 20), "k": 1 / 1024, "m": 1, "g": 1 << 10, "t": 1 << 20}
MAX_DISKS = 256           # disk paths reported per guest; more come only from a hostile command line
MAX_DISK_PATH = 4096      # PATH_MAX: a longer "path" is no file QEMU could have opened
_JSON_DEPTH = 16          # nesting followed in a -blockdev/-drive JSON object
_PROTOCOL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")  # nbd:, iscsi:, json:, ... (not a local file)
_READ_ONLY_KEYS = frozenset(("readonly", "read-only"))
_READ_ONLY_SHORTHANDS = frozenset(("cdrom",))


@dataclass(frozen=True)
class ActiveGuest:
    """One running QEMU process, as its command line and /proc describe it."""

    pid: int
    argv: tuple[str, ...]
    exe: str | None                      # the trusted emulator's real path (what a restore runs)
    name: str | None
    uuid: str | None
    qmp: tuple[Endpoint, ...]            # control monitors we could connect to
    pidfile: str | None
    managed_by: str | None               # 'libvirt' or None
    libvirt_evidence: tuple[str, ...]    # why we think libvirt manages it
    uid: int                             # real uid, gid and supplementary groups of the QEMU process
    gid: int
    groups: tuple[int, ...]
    unresolved_monitors: tuple[str, ...] = ()  # control monitors whose address we could not work out
    start_time: int | None = None        # clock ticks after boot (/proc/PID/stat): tells a reused pid apart
    cwd: str | None = None               # QEMU's working directory (relative paths resolve from it)
    exe_note: str | None = None          # e.g. the binary was replaced since QEMU started

    @property
    def endpoint(self) -> Endpoint | None:
        """The monitor to talk to: the first reachable one on the command line."""
        return self.qmp[0] if self.qmp else None

    @property
    def libvirt_managed(self) -> bool:
        return self.managed_by == "libvirt"

    @property
    def machine_option(self) -> str | None:
        """``-machine``'s type as given (possibly an alias such as ``pc``)."""
        values = option_values(self.argv, "machine") + option_values(self.argv, "M")
        return option_dict(values[-1], implied_key="type").get("type") if values else None

    @property
    def memory_mib(self) -> int | None:
        """``-m`` in MiB (QEMU's default unit), or None when not given."""
        values = option_values(self.argv, "m")
        if not values:
            return None
        return parse_memory_mib(option_dict(values[-1], implied_key="size").get("size", ""))

    def describe(self) -> str:
        label = f"{self.name!r}" if self.name else "an unnamed guest"
        return f"{label} (pid {self.pid}{', uuid ' + self.uuid if self.uuid else ''})"


@dataclass(frozen=True)
class IgnoredProcess:
    """A process that looks like QEMU but is not treated as a guest, and why."""

    pid: int
    program: str   # argv[0] (or comm when the command line is unreadable)
    reason: str

    def report(self) -> dict[str, Any]:
        return {"pid": self.pid, "program": self.program, "reason": self.reason}


@dataclass(frozen=True)
class HostScan:
    """What a scan of /proc found: the guests, and the QEMU look-alikes it left out."""

    guests: list[ActiveGuest]
    ignored: list[IgnoredProcess]


class _NotAGuest(Exception):
    """Internal: this QEMU-looking process fails a check (the message is the reason)."""


@dataclass(frozen=True)
class IdentityCheck:
    """Which active guests hold a name and a UUID: what restore checks before starting QEMU."""

    name: str | None
    uuid: str | None
    both: ActiveGuest | None        # holds this name and this UUID: the guest itself is active
    name_only: ActiveGuest | None   # holds the name under another UUID
    uuid_only: ActiveGuest | None   # holds the UUID under another name

    @property
    def conflict(self) -> bool:
        return self.name_only is not None or self.uuid_only is not None

    def describe_conflict(self) -> str:
        parts = []
        if self.name_only is not None:
            parts.append(f"the name {self.name!r} is held by {self.name_only.describe()}")
        if self.uuid_only is not None:
            parts.append(f"the UUID {self.uuid} is held by {self.uuid_only.describe()}")
        return "; ".join(parts)


# --- scanning --------------------------------------------------------------------------

def scan_host(proc_root: str = "/proc") -> HostScan:
    """Every live guest on the host by pid, and every QEMU look-alike that is not one (with why)."""
    guests: list[ActiveGuest] = []
    ignored: list[IgnoredProcess] = []
    for pid in pids(proc_root):
        found = examine_process(pid, proc_root)
        if isinstance(found, ActiveGuest):
            guests.append(found)
        elif found is not None:
            ignored.append(found)
    return HostScan(guests=guests, ignored=ignored)


# What lists the host's active guests: /proc (``scan_guests``), or in unit tests the guests they serve.
GuestScan = Callable[[], Sequence[ActiveGuest]]


def scan_guests(proc_root: str = "/proc") -> list[ActiveGuest]:
    """Every live guest on the host, by pid."""
    return scan_host(proc_root).guests


def read_guest(pid: int, proc_root: str = "/proc") -> ActiveGuest | None:
    """The guest behind ``pid``, or None if it is not a live, trusted QEMU (or vanished while we read)."""
    found = examine_process(pid, proc_root)
    return found if isinstance(found, ActiveGuest) else None


def examine_process(pid: int, proc_root: str = "/proc") -> ActiveGuest | IgnoredProcess | None:
    """A guest, an ignored QEMU look-alike (with the reason), or None (not QEMU-like, or gone).

    Whatever a process put in /proc, the answer is one of these three: an unexpected
    error while reading one process skips that process, never the scan.
    """
    stat = read_stat(pid, proc_root)
    if stat is None or stat.state in GONE_STATES:
        return None  # gone, or exited but not yet reaped: not an active guest
    argv = read_cmdline(pid, proc_root)
    exe_link = read_link(f"{proc_root}/{pid}/exe")
    if not argv or not is_qemu_program(stat.comm, argv[0], exe_link):
        return None  # a kernel thread, or a process that does not even claim to be QEMU
    program = _bounded(argv[0])
    try:
        guest = _read_trusted_guest(pid, proc_root, argv, stat.ppid, stat.start_time)
    except _NotAGuest as error:
        return IgnoredProcess(pid, program, str(error))
    except Exception as error:  # pylint: disable=broad-except  # one hostile process must not end the scan
        return IgnoredProcess(pid, program, f"reading it failed unexpectedly ({type(error).__name__}: "
                                            f"{_bounded(str(error))})")
    after = read_stat(pid, proc_root)
    if guest is None or after is None or after.start_time != stat.start_time or after.state in GONE_STATES:
        return None  # it exited (or the pid was reused) while we read it
    return guest


def _read_trusted_guest(pid: int, proc_root: str, argv: tuple[str, ...], ppid: int,
                        start_time: int | None) -> ActiveGuest | None:
    exe, problem, note = process_emulator(pid, proc_root)
    if exe is None:
        raise _NotAGuest(problem or "its executable cannot be examined")
    status = read_status(pid, proc_root)
    if status is None:
        return None  # /proc/PID/status is readable by anyone while the process lives
    name = guest_name(argv)
    if name is not None and len(name) > MAX_NAME:
        raise _NotAGuest(f"its -name is longer than {MAX_NAME} characters")
    uuid_values = option_values(argv, "uuid")
    uuid = guest_uuid(argv)
    if uuid_values and uuid_values[-1].strip() and uuid is None:
        raise _NotAGuest(f"invalid -uuid {_bounded(uuid_values[-1], 80)!r}")
    cwd = read_cwd(pid, proc_root)
    monitors, unresolved = control_monitors(argv, pid, proc_root, cwd)
    evidence = libvirt_evidence(argv, process_comm(ppid, proc_root) if ppid else "", read_cgroup(pid, proc_root))
    return ActiveGuest(
        pid=pid, argv=argv, exe=exe, name=name, uuid=uuid,
        qmp=tuple(monitors), pidfile=_last_path_option(argv, "pidfile", cwd),
        managed_by="libvirt" if evidence else None, libvirt_evidence=tuple(evidence),
        uid=status.uid, gid=status.gid, groups=status.groups,
        unresolved_monitors=tuple(unresolved), start_time=start_time, cwd=cwd, exe_note=note)


def is_qemu_program(comm: str, argv0: str, exe: str | None) -> bool:
    """Whether a process CLAIMS to be QEMU (and so is worth a report when it is not a trusted one).

    comm is cut to 15 characters and ``-name process=`` renames it, so the program's name counts too.
    """
    candidates = [comm, os.path.basename(argv0)]
    if exe:
        candidates.append(os.path.basename(exe.replace(" (deleted)", "")))
    return any(candidate.startswith(QEMU_PROGRAM_PREFIXES) for candidate in candidates)


def _bounded(text: str, limit: int = _PROGRAM_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# --- what the command line says ----------------------------------------------------------

def guest_name(argv: Sequence[str]) -> str | None:
    """``-name foo`` or ``-name guest=foo,debug-threads=on`` (``,,`` is a literal comma)."""
    values = option_values(argv, "name")
    if not values:
        return None
    return option_dict(values[-1], implied_key="guest").get("guest") or None


def guest_uuid(argv: Sequence[str]) -> str | None:
    """``-uuid``, lower case; None when absent or not a UUID in QEMU's only form (8-4-4-4-12 hex digits)."""
    values = option_values(argv, "uuid")
    return normalize_uuid(values[-1]) if values else None


def control_monitors(argv: Sequence[str], pid: int, proc_root: str = "/proc",
                     cwd: str | None = None) -> tuple[list[Endpoint], list[str]]:
    """QMP endpoints on the command line, and a note for each control monitor we cannot reach.

    Forms: ``-qmp``/``-qmp-pretty`` with QEMU's legacy chardev syntax
    (``unix:PATH,server=on``, ``tcp:HOST:PORT,server=on``, ``chardev:ID``), and
    ``-chardev socket,id=ID,...`` paired with ``-mon chardev=ID,mode=control``.
    Only listening (server) sockets count: a monitor that connects out is not ours to dial.
    """
    chardevs = {}
    for value in option_values(argv, "chardev"):
        options = option_dict(value, implied_key="backend")
        if options.get("id"):
            chardevs[options["id"]] = options
    endpoints: list[Endpoint] = []
    unresolved: list[str] = []

    def add(endpoint: Endpoint | None, note: str | None) -> None:
        if endpoint is not None and endpoint not in endpoints:
            endpoints.append(endpoint)
        elif endpoint is None and note:
            unresolved.append(note)

    for value in option_values(argv, "qmp") + option_values(argv, "qmp-pretty"):
        if value.startswith("chardev:"):
            add(*_chardev_endpoint(chardevs.get(value[len("chardev:"):]), pid, proc_root, cwd))
        else:
            add(*_legacy_endpoint(value, cwd))
    for value in option_values(argv, "mon"):
        options = option_dict(value, implied_key="chardev")
        if options.get("mode") == "control":
            add(*_chardev_endpoint(chardevs.get(options.get("chardev", "")), pid, proc_root, cwd))
    return endpoints, unresolved


def _legacy_endpoint(value: str, cwd: str | None) -> tuple[Endpoint | None, str | None]:
    """QEMU's ``-qmp`` shorthand: ``unix:PATH[,opts]`` or ``tcp:HOST:PORT[,opts]``."""
    kind, sep, rest = value.partition(":")
    if not sep or kind not in ("unix", "tcp"):
        return None, f"-qmp {value} is not a socket (stdio, pty, ...)"
    parts = split_option_string(rest)
    options = dict(part.partition("=")[::2] for part in parts[1:])
    if not _flag(options, "server"):
        return None, f"-qmp {value} connects out to a server rather than listening"
    if kind == "unix":
        return unix_endpoint(_absolute(parts[0], cwd)), None
    host, port = parts[0].rpartition(":")[::2]
    return _tcp(host, port, f"-qmp {value}")


def _chardev_endpoint(options: dict[str, str] | None, pid: int, proc_root: str,
                      cwd: str | None) -> tuple[Endpoint | None, str | None]:
    if options is None:
        return None, "a control monitor refers to a chardev that is not on the command line"
    label = f"chardev {options.get('id')}"
    if options.get("backend") != "socket":
        return None, f"{label} is a {options.get('backend', 'non-socket')} chardev, not a socket"
    if not _flag(options, "server"):
        return None, f"{label} connects out to a server rather than listening"
    if options.get("path"):
        if _flag(options, "abstract"):
            return None, f"{label} is an abstract unix socket"
        return unix_endpoint(_absolute(options["path"], cwd)), None
    if options.get("fd", "").isdigit():
        # libvirt binds the socket itself and passes QEMU the listening fd; find its path.
        path = unix_path_of_fd(pid, options["fd"], proc_root)
        if path:
            return unix_endpoint(path), None
        return None, f"{label} is a socket passed as fd {options['fd']} whose path we cannot read"
    if options.get("port"):
        return _tcp(options.get("host", ""), options["port"], label)
    return None, f"{label} has no path, fd or port"


def _flag(options: dict[str, str], key: str) -> bool:
    """A boolean chardev option: bare (``server``) or with a value (``server=on``)."""
    return key in options and options[key].lower() in _TRUE


def _tcp(host: str, port: str, label: str) -> tuple[Endpoint | None, str | None]:
    label = _bounded(label, 120)
    if not (port.isdigit() and port.isascii() and len(port) <= 5 and 0 < int(port) < 65536):
        return None, f"{label} has no port from 1 to 65535"
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    # A monitor listening on every address is reached through loopback.
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return tcp_endpoint(host, int(port)), None


def _absolute(path: str, cwd: str | None) -> str:
    """QEMU resolves relative paths against its own working directory, not ours."""
    if os.path.isabs(path) or not cwd:
        return path
    return os.path.normpath(os.path.join(cwd, path))


def _last_path_option(argv: Sequence[str], option: str, cwd: str | None) -> str | None:
    values = option_values(argv, option)
    return _absolute(values[-1], cwd) if values and values[-1] else None


@dataclass(frozen=True)
class GuestDisk:
    """A local file or device the guest's command line opens as a disk."""

    path: str         # absolute where QEMU's working directory is known
    read_only: bool   # readonly/read-only set on the option, or a CD-ROM
    option: str       # the option that names it: drive, blockdev, or a shorthand (hda, cdrom, ...)

    def report(self) -> dict[str, Any]:
        return {"path": self.path, "read_only": self.read_only, "option": self.option}


def guest_disks(argv: Sequence[str], cwd: str | None = None) -> list[GuestDisk]:
    """The local disk paths in a QEMU command line, in order, each once.

    Reads ``-drive`` (``file=``, ``file.filename=``), ``-blockdev`` (``filename``, as
    ``key=value`` or JSON) and the shorthand options (``-hda PATH``). Protocols
    (``nbd:``, ``json:`` pseudo-paths, network drivers) are not local files and are left
    out. The command line is hostile input: values that are not plausible paths are
    skipped and the list is capped at MAX_DISKS.
    """
    disks: dict[str, GuestDisk] = {}
    for _index, option, value in iter_options(argv):
        if not value or len(disks) >= MAX_DISKS:
            continue
        for path, read_only in _disk_paths_of(option, value):
            disk = _local_disk(path, read_only, option, cwd)
            if disk is not None and (disk.path not in disks or disk.read_only < disks[disk.path].read_only):
                # A path opened both ways counts as writable: that is what the destination must allow.
                disks[disk.path] = disk
    return list(disks.values())[:MAX_DISKS]


def _disk_paths_of(option: str, value: str) -> list[tuple[str, bool]]:
    if option in PATH_VALUED_OPTIONS:
        return [(value, option in _READ_ONLY_SHORTHANDS)]
    if option not in ("drive", "blockdev"):
        return []
    if value.lstrip().startswith("{"):
        return _json_disk_paths(value)
    options = option_dict(value)
    read_only = any(_on(options.get(key)) for key in _READ_ONLY_KEYS) or options.get("media") == "cdrom"
    keys = ("filename",) if option == "blockdev" else ("file", "filename")
    return [(path, read_only) for key, path in options.items()
            if (key in keys or key.endswith(".filename")) and path]


def _json_disk_paths(value: str) -> list[tuple[str, bool]]:
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
        return []
    found: list[tuple[str, bool]] = []
    _walk_json(parsed, False, found, 0)
    return found


def _walk_json(node: Any, read_only: bool, found: list[tuple[str, bool]], depth: int) -> None:
    """Every ``filename`` string in a JSON block node, read-only if this node or a parent is."""
    if depth > _JSON_DEPTH or len(found) >= MAX_DISKS or not isinstance(node, dict):
        return
    read_only = read_only or any(node.get(key) in (True, "on") for key in _READ_ONLY_KEYS)
    for key, item in node.items():
        if key == "filename" and isinstance(item, str) and item:
            found.append((item, read_only))
        elif isinstance(item, dict):
            _walk_json(item, read_only, found, depth + 1)


def _on(flag: str | None) -> bool:
    return flag is not None and flag.lower() in _TRUE


def _local_disk(path: str, read_only: bool, option: str, cwd: str | None) -> GuestDisk | None:
    """The disk if ``path`` is a plausible local path; None for protocols and junk."""
    if len(path) > MAX_DISK_PATH or "\0" in path or "\n" in path:
        return None
    if not path.startswith("/") and _PROTOCOL.match(path):
        return None
    if path.startswith("/dev/fd/") or path.startswith("/proc/"):
        return None  # a descriptor passed by the parent: no path the destination could see
    return GuestDisk(path=_absolute(path, cwd), read_only=read_only, option=option)


def parse_memory_mib(size: str) -> int | None:
    """QEMU's ``-m`` size: a number of MiB, or a number with a k/M/G/T (or b) suffix."""
    text = size.strip()
    if not text or len(text) > 32:
        return None
    factor = _SIZE_SUFFIXES.get(text[-1].lower())
    number = text[:-1] if factor is not None else text
    try:
        value = float(number) * (factor if factor is not None else 1)
    except ValueError:
        return None
    # inf, nan, negative and absurd sizes come only from command lines QEMU would refuse.
    if not math.isfinite(value) or value < 0 or value > MAX_MEMORY_MIB:
        return None
    return int(value)


def libvirt_evidence(argv: Sequence[str], parent_comm: str, cgroup: str) -> list[str]:
    """Traces that only libvirt leaves on a QEMU process; empty when there are none.

    We look for what libvirt does and hand-written command lines do not: the
    ``masterKey0`` secret object libvirt gives every guest, its ``charmonitor``
    control monitor, a libvirt daemon (or the embedded driver in virsh) as the
    parent, and libvirt's cgroup/machine scope. Plain conventions that libvirt
    shares with others (``-name guest=X,debug-threads=on``, ``-S``, ``-nodefaults``)
    are deliberately not evidence. One trace is enough: wrongly treating a guest
    as libvirt's only makes us leave it alone, while missing one would make us
    fight libvirt over its monitor.
    """
    evidence = []
    for value in option_values(argv, "object"):
        options = option_dict(value, implied_key="qom-type")
        if options.get("qom-type") == "secret" and options.get("id") == "masterKey0":
            evidence.append("libvirt's masterKey0 secret object")
            break
    for value in option_values(argv, "mon"):
        if option_dict(value, implied_key="chardev").get("chardev") == "charmonitor":
            evidence.append("libvirt's charmonitor monitor")
            break
    if parent_comm in LIBVIRT_COMMS:
        evidence.append(f"started by {parent_comm}")
    if "machine-qemu" in cgroup or "libvirt" in cgroup:
        evidence.append("in a libvirt machine cgroup")
    return evidence


# --- lookups ---------------------------------------------------------------------------

def _guests(guests: Sequence[ActiveGuest] | None, proc_root: str) -> Sequence[ActiveGuest]:
    return scan_guests(proc_root) if guests is None else guests


def normalize_uuid(uuid: str | None) -> str | None:
    """A UUID in canonical lower case, or None for nothing or anything that is not a UUID."""
    text = uuid.strip() if uuid else ""
    if not _UUID_FORM.fullmatch(text):
        return None
    return str(uuidlib.UUID(text))


def _wanted_uuid(uuid: str | None) -> str | None:
    """The UUID a caller asks for; one that is not a UUID stays as given, so it matches no guest."""
    return normalize_uuid(uuid) or (uuid.strip().lower() if uuid and uuid.strip() else None)


def find_guests(name: str | None = None, uuid: str | None = None,
                guests: Sequence[ActiveGuest] | None = None, proc_root: str = "/proc") -> list[ActiveGuest]:
    """Active guests matching every filter given (no filter: all of them)."""
    wanted_uuid = _wanted_uuid(uuid)
    return [guest for guest in _guests(guests, proc_root)
            if (name is None or guest.name == name) and (wanted_uuid is None or guest.uuid == wanted_uuid)]


def guest_by_name(name: str, guests: Sequence[ActiveGuest] | None = None,
                  proc_root: str = "/proc") -> ActiveGuest | None:
    found = find_guests(name=name, guests=guests, proc_root=proc_root)
    return found[0] if found else None


def guest_by_uuid(uuid: str, guests: Sequence[ActiveGuest] | None = None,
                  proc_root: str = "/proc") -> ActiveGuest | None:
    found = find_guests(uuid=uuid, guests=guests, proc_root=proc_root)
    return found[0] if found else None


def guest_by_endpoint(endpoint: str | Endpoint, guests: Sequence[ActiveGuest] | None = None,
                      proc_root: str = "/proc") -> ActiveGuest | None:
    wanted = parse_endpoint(endpoint)
    return next((guest for guest in _guests(guests, proc_root)
                 if any(same_endpoint(wanted, candidate) for candidate in guest.qmp)), None)


def guest_serving(endpoint: str | Endpoint, guests: Sequence[ActiveGuest] | None = None,
                  proc_root: str = "/proc") -> ActiveGuest | None:
    """The guest that OWNS the socket listening at ``endpoint``; None when nothing listens there.

    Naming a socket on one's command line proves nothing (anyone can); holding the
    listening socket does. A listener that is not a trusted guest is refused, naming
    it and the guests whose command lines name the socket.
    """
    wanted = parse_endpoint(endpoint)
    if wanted.is_unix:
        inodes = unix_listener_inodes(str(wanted.path), proc_root)
    else:
        inodes = tcp_listener_inodes(wanted.host, int(wanted.port or 0), proc_root)
    if not inodes:
        return None
    candidates = list(_guests(guests, proc_root))
    owners = holders(inodes, proc_root, candidates=[guest.pid for guest in candidates])
    serving = [guest for guest in candidates if guest.pid in owners]
    if serving:
        return serving[0]
    if not owners:
        return None  # the socket belongs to no process we can see (being torn down)
    naming = [guest.describe() for guest in candidates if any(same_endpoint(wanted, qmp) for qmp in guest.qmp)]
    also = f"; the command line of {', '.join(naming)} names it" if naming else ""
    raise PreconditionError(
        f"the QMP socket {wanted} is served by {', '.join(describe_process(pid, proc_root) for pid in owners)}, "
        f"which is not a trusted QEMU guest{also}; refusing to save through it")


def same_endpoint(first: Endpoint, second: Endpoint) -> bool:
    """Whether two endpoints reach the same monitor (symlinks, ``..`` and loopback aliases aside)."""
    if first.kind != second.kind:
        return False
    if first.is_unix:
        return os.path.realpath(str(first.path)) == os.path.realpath(str(second.path))
    if first.port != second.port:
        return False
    return first.host == second.host or (first.host in _WILDCARD_HOSTS and second.host in _WILDCARD_HOSTS)


def check_identity(name: str | None, uuid: str | None, guests: Sequence[ActiveGuest] | None = None,
                   proc_root: str = "/proc") -> IdentityCheck:
    """Which active guests hold ``name`` and ``uuid``, together or apart."""
    wanted_uuid = _wanted_uuid(uuid)
    both = name_only = uuid_only = None
    for guest in _guests(guests, proc_root):
        has_name = name is not None and guest.name == name
        has_uuid = wanted_uuid is not None and guest.uuid == wanted_uuid
        if not (has_name or has_uuid):
            continue
        # What the caller does not know (None) cannot disagree.
        if (has_name or name is None) and (has_uuid or wanted_uuid is None):
            both = both or guest
        elif has_name:
            name_only = name_only or guest
        else:
            uuid_only = uuid_only or guest
    return IdentityCheck(name=name, uuid=wanted_uuid, both=both, name_only=name_only, uuid_only=uuid_only)


# --- live state, over QMP ----------------------------------------------------------------

@dataclass(frozen=True)
class GuestProbe:
    """What a guest's monitor told us; ``state`` is ``unknown`` when we could not ask."""

    state: str
    state_reason: str | None = None
    machine: str | None = None
    memory_mib: int | None = None
    trace: list[dict[str, Any]] = field(default_factory=list)


def probe_guest(guest: ActiveGuest, timeout: float = 2.0, trace: bool = False) -> GuestProbe:
    """Ask a guest's QMP monitor for its run state, machine type and memory; read-only.

    ``timeout`` bounds the connection (greeting included) and each query, so a busy
    or stuck monitor costs at most a few seconds. Guests libvirt manages are not
    probed: their monitor is libvirt's, and a client of ours would stand in its way.
    """
    reason = _unprobed_reason(guest)
    if reason is not None or guest.endpoint is None:  # (no endpoint is one of the reasons)
        return GuestProbe(state="unknown", state_reason=reason)
    monitor = Monitor(guest.endpoint, connect_timeout=timeout, command_timeout=timeout, trace=trace,
                      peer_pid=guest.pid)
    try:
        with monitor:
            state = monitor.status()
            machine = _optional(monitor.machine_type)
            memory = _optional(monitor.memory_bytes)
    except MonitorError as error:
        return GuestProbe(state="unknown", state_reason=str(error), trace=monitor.trace)
    return GuestProbe(state=state, machine=machine, memory_mib=memory // MIB if memory is not None else None,
                      trace=monitor.trace)


def _unprobed_reason(guest: ActiveGuest) -> str | None:
    if guest.libvirt_managed:
        return (f"libvirt manages this guest ({', '.join(guest.libvirt_evidence)}) and its monitor belongs "
                f"to libvirt, so it was not queried; ask libvirt (virsh domstate {guest.name or guest.uuid}).")
    if guest.endpoint is None:
        details = f" ({'; '.join(guest.unresolved_monitors)})" if guest.unresolved_monitors else ""
        return ("The guest has no QMP monitor this host can connect to: no listening -qmp or "
                f"-mon mode=control socket on its command line{details}.")
    if not HAS_QEMU_QMP:
        return f"The Python library {QEMU_QMP_REQUIREMENT} is not installed on the host, so QMP was not queried."
    return None


def _optional(query: Callable[[], T]) -> T | None:
    """A detail that completes the report; once the state is known, missing it fails nothing."""
    try:
        return query()
    except MonitorError:
        return None


def guest_report(guest: ActiveGuest, probe: GuestProbe) -> dict[str, Any]:
    """One entry of guest_info's ``guests``: /proc facts, completed by the probe where it answered.

    Command lines and paths are bytes; what is not UTF-8 is shown as ``\\xNN`` in the
    text fields, and the exact bytes are given in base64 (``argv_base64``, ``cwd_base64``).
    """
    exact = not all(is_plain_text(arg) for arg in guest.argv + ((guest.cwd,) if guest.cwd else ()))
    report = {
        "name": guest.name,
        "uuid": guest.uuid,
        "pid": guest.pid,
        "state": probe.state,
        "state_reason": probe.state_reason,
        "qmp": str(guest.endpoint) if guest.endpoint is not None else None,
        "managed_by": guest.managed_by or "none",
        "machine": probe.machine or guest.machine_option,
        "memory_mib": probe.memory_mib if probe.memory_mib is not None else guest.memory_mib,
        "disks": [disk.report() for disk in guest_disks(guest.argv, guest.cwd)],
        "argv": list(guest.argv),
        "cwd": guest.cwd,
        "exe": guest.exe,
        "uid": guest.uid,
        "gid": guest.gid,
        "groups": list(guest.groups),
        "argv_base64": [_base64(arg) for arg in guest.argv] if exact else None,
        "cwd_base64": _base64(guest.cwd) if exact and guest.cwd is not None else None,
        "unit": _unit_report(guest.pid),  # systemd (issue 15)
    }
    safe: dict[str, Any] = json_safe(report)
    return safe


def ignored_report(process: IgnoredProcess) -> dict[str, Any]:
    """One entry of guest_info's ``ignored``."""
    safe: dict[str, Any] = json_safe(process.report())
    return safe


def _base64(text: str) -> str:
    return base64.b64encode(fs_bytes(text)).decode("ascii")


def _unit_report(pid: int) -> dict[str, Any] | None:
    """The systemd unit that owns the guest, if any."""
    unit = guest_unit(pid)
    return unit.to_dict() if unit is not None else None
