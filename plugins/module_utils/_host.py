# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""The QEMU guests active on this host, read from /proc without talking to them.

A guest is a live ``qemu-system-*`` or ``qemu-kvm`` process. Its command line
tells us its name, UUID, pidfile and where its QMP monitors listen; a few
libvirt-specific traces tell us whether libvirt manages it. Nothing here needs
QMP, so a guest whose monitor is busy is still found.

/proc changes under our feet: a process can exit between two reads, and some
entries are unreadable to unprivileged users. Every such case means "skip this
detail" (or the whole process), never an exception. The /proc root is a parameter
so that tests can build a fake tree.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ansible_collections.savestate.qemu.plugins.module_utils._errors import MonitorError
from ansible_collections.savestate.qemu.plugins.module_utils._monitor import (
    HAS_QEMU_QMP,
    QEMU_QMP_REQUIREMENT,
    Endpoint,
    Monitor,
    parse_endpoint,
    tcp_endpoint,
    unix_endpoint,
)
from ansible_collections.savestate.qemu.plugins.module_utils._qemu_argv import (
    option_dict,
    option_values,
    split_option_string,
)
from ansible_collections.savestate.qemu.plugins.module_utils._systemd import guest_unit
from ansible_collections.savestate.qemu.plugins.module_utils._sockets import (
    LIBVIRT_COMMS,
    pids,
    process_comm,
    read_text,
    unix_path_of_fd,
)

T = TypeVar("T")
MIB = 1 << 20
QEMU_PROGRAM_PREFIXES = ("qemu-system-", "qemu-kvm")
# States of a process that no longer runs: zombie (exited, not reaped) and dead.
_GONE_STATES = frozenset("ZXx")
_TRUE = frozenset(("", "on", "yes", "true", "y"))
_WILDCARD_HOSTS = frozenset(("", "0.0.0.0", "::", "127.0.0.1", "::1", "localhost"))
_SIZE_SUFFIXES = {"b": 1 / (1 << 20), "k": 1 / 1024, "m": 1, "g": 1 << 10, "t": 1 << 20}


@dataclass(frozen=True)
class ActiveGuest:
    """One running QEMU process, as its command line and /proc describe it."""

    pid: int
    argv: tuple[str, ...]
    exe: str | None
    name: str | None
    uuid: str | None
    qmp: tuple[Endpoint, ...]            # control monitors we could connect to
    pidfile: str | None
    managed_by: str | None               # 'libvirt' or None
    libvirt_evidence: tuple[str, ...]    # why we think libvirt manages it
    unresolved_monitors: tuple[str, ...] = ()  # control monitors whose address we could not work out

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

def scan_guests(proc_root: str = "/proc") -> list[ActiveGuest]:
    """Every live QEMU process on the host, by pid."""
    guests = (read_guest(pid, proc_root) for pid in pids(proc_root))
    return [guest for guest in guests if guest is not None]


def read_guest(pid: int, proc_root: str = "/proc") -> ActiveGuest | None:
    """The guest behind ``pid``, or None if it is not a live QEMU (or vanished while we read)."""
    stat = _parse_stat(read_text(f"{proc_root}/{pid}/stat"))
    if stat is None:
        return None
    comm, state, ppid = stat
    if state in _GONE_STATES:
        return None  # exited but not yet reaped: not an active guest
    argv = _read_argv(f"{proc_root}/{pid}/cmdline")
    if not argv:
        return None
    exe = _readlink(f"{proc_root}/{pid}/exe")
    if not is_qemu_program(comm, argv[0], exe):
        return None
    cwd = _readlink(f"{proc_root}/{pid}/cwd")
    monitors, unresolved = control_monitors(argv, pid, proc_root, cwd)
    evidence = libvirt_evidence(argv, process_comm(ppid, proc_root) if ppid else "",
                                read_text(f"{proc_root}/{pid}/cgroup") or "")
    return ActiveGuest(
        pid=pid, argv=argv, exe=exe, name=guest_name(argv), uuid=guest_uuid(argv),
        qmp=tuple(monitors), pidfile=_last_path_option(argv, "pidfile", cwd),
        managed_by="libvirt" if evidence else None, libvirt_evidence=tuple(evidence),
        unresolved_monitors=tuple(unresolved))


def is_qemu_program(comm: str, argv0: str, exe: str | None) -> bool:
    # comm is cut to 15 characters and ``-name process=`` renames it, so the program's name counts too.
    candidates = [comm, os.path.basename(argv0)]
    if exe:
        candidates.append(os.path.basename(exe.replace(" (deleted)", "")))
    return any(candidate.startswith(QEMU_PROGRAM_PREFIXES) for candidate in candidates)


def _parse_stat(text: str | None) -> tuple[str, str, int] | None:
    """``(comm, state, ppid)`` from /proc/PID/stat; comm may hold spaces and parentheses."""
    if not text or "(" not in text or ")" not in text:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 1:].split()
    if len(fields) < 2 or not fields[1].lstrip("-").isdigit():
        return None
    return comm, fields[0], int(fields[1])


def _read_argv(path: str) -> tuple[str, ...]:
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError:
        return ()
    parts = raw.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()  # the terminating NUL; empty arguments in between are real (-append "")
    return tuple(arg.decode("utf-8", errors="replace") for arg in parts)


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


# --- what the command line says ----------------------------------------------------------

def guest_name(argv: Sequence[str]) -> str | None:
    """``-name foo`` or ``-name guest=foo,debug-threads=on`` (``,,`` is a literal comma)."""
    values = option_values(argv, "name")
    if not values:
        return None
    return option_dict(values[-1], implied_key="guest").get("guest") or None


def guest_uuid(argv: Sequence[str]) -> str | None:
    values = option_values(argv, "uuid")
    return values[-1].strip().lower() if values and values[-1].strip() else None


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
    if not port.isdigit():
        return None, f"{label} has no numeric port"
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


def parse_memory_mib(size: str) -> int | None:
    """QEMU's ``-m`` size: a number of MiB, or a number with a k/M/G/T (or b) suffix."""
    text = size.strip()
    if not text:
        return None
    factor = _SIZE_SUFFIXES.get(text[-1].lower())
    number = text[:-1] if factor is not None else text
    try:
        return int(float(number) * (factor if factor is not None else 1))
    except ValueError:
        return None


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
    return uuid.strip().lower() if uuid and uuid.strip() else None


def find_guests(name: str | None = None, uuid: str | None = None,
                guests: Sequence[ActiveGuest] | None = None, proc_root: str = "/proc") -> list[ActiveGuest]:
    """Active guests matching every filter given (no filter: all of them)."""
    wanted_uuid = normalize_uuid(uuid)
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
    wanted_uuid = normalize_uuid(uuid)
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
    if reason is not None:
        return GuestProbe(state="unknown", state_reason=reason)
    monitor = Monitor(guest.endpoint, connect_timeout=timeout, command_timeout=timeout, trace=trace)
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
    """One entry of guest_info's ``guests``: /proc facts, completed by the probe where it answered."""
    return {
        "name": guest.name,
        "uuid": guest.uuid,
        "pid": guest.pid,
        "state": probe.state,
        "state_reason": probe.state_reason,
        "qmp": str(guest.endpoint) if guest.endpoint is not None else None,
        "managed_by": guest.managed_by or "none",
        "machine": probe.machine or guest.machine_option,
        "memory_mib": probe.memory_mib if probe.memory_mib is not None else guest.memory_mib,
        "argv": list(guest.argv),
        "unit": _unit_report(guest.pid),  # systemd (issue 15)
    }


def _unit_report(pid: int) -> dict[str, Any] | None:
    """The systemd unit that owns the guest, if any."""
    unit = guest_unit(pid)
    return unit.to_dict() if unit is not None else None
