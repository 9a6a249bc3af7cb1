# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Guests that live in systemd units: find the unit, save and restore through it.

A QEMU started by ``qemu@g1.service`` or ``systemd-run`` belongs to its unit: the
unit's restart policy, runtime directory and resource limits act on it. So

- at save, the unit is recorded in the image (:class:`UnitRecord`): its name,
  whether it is *persistent* (a unit file, template instances included) or
  *transient* (``systemd-run``), and for a transient one the properties that
  recreate it;
- a save that ends the guest queues ``systemctl stop --no-block UNIT`` before
  QMP ``quit`` (:func:`stop_unit_before_quit`): the pending stop job suppresses
  every ``Restart=``, and ``ExecStop=``/``RuntimeDirectory=`` clean-up run as for
  any stop; then :func:`check_unit_stopped` verifies that no new QEMU came up;
- a restore starts QEMU *inside* the unit (:class:`Placement`): a runtime drop-in
  replacing ``ExecStart=`` then ``systemctl start`` for a persistent unit,
  ``systemd-run --unit=NAME --property=...`` for a transient one, and for a guest
  saved without a unit, a scope of its own in ``machine.slice`` so that it
  outlives the SSH session, logind and the job that ran the restore. Where
  systemd is not PID 1, none of this applies: today's detached session remains.

Facts this rests on were measured on a Debian 12 host (systemd 252); see the
user guide's "systemd-managed guests".
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._commands import output_of, run_bounded
from ansible_collections.savestate.qemu.plugins.module_utils._errors import MigrationError, PreconditionError
from ansible_collections.savestate.qemu.plugins.module_utils._proc import process_gone, process_started_at, read_cgroup
from ansible_collections.savestate.qemu.plugins.module_utils._timestamps import parse_utc, utc_text

KIND_PERSISTENT = "persistent"
KIND_TRANSIENT = "transient"
KIND_SCOPE = "scope"           # a scope we create for a guest saved without a unit
UNIT_OPTION_AUTO = "auto"
UNIT_OPTION_NONE = "none"
DROPIN_NAME = "50-savestate-restore.conf"
DROPIN_ROOT = "/run/systemd/system"
SCOPE_PREFIX = "savestate-qemu-"   # never "machine-qemu...": that is libvirt's, discovery would leave the guest alone
# The role guest_autosave's target: guests ordered Before= it are saved at shutdown before they stop.
GUESTS_TARGET = "savestate-guests.target"
SYSTEMCTL_TIMEOUT = 30.0
STOP_TIMEOUT = 90.0
EXIT_POLL = 0.02

# Properties of a transient unit worth recreating, as ``systemctl show`` names them, with the
# value that means "not set" (skipped). CPUQuotaPerSecUSec is translated to CPUQuota=.
TRANSIENT_PROPERTIES: dict[str, tuple[str, ...]] = {
    "Description": (),
    "Slice": ("system.slice",),
    "MemoryMax": ("infinity",),
    "MemoryHigh": ("infinity",),
    "MemoryLow": ("0",),
    "MemorySwapMax": ("infinity",),
    "TasksMax": ("infinity",),
    "CPUWeight": ("[not set]",),
    "CPUQuotaPerSecUSec": ("infinity",),
    "IOWeight": ("[not set]",),
    "AllowedCPUs": ("",),
    "Nice": ("0",),
    "Restart": ("no",),
    "RestartUSec": ("100ms",),
    "User": ("",),
    "Group": ("",),
    "Environment": ("",),
    "RuntimeDirectory": ("",),
    "RuntimeDirectoryPreserve": ("no",),
    "KillMode": ("control-group",),
    "TimeoutStopUSec": ("1min 30s",),
}
# Set by the restore itself, never copied from the record.
RESTORE_OWNED = frozenset({"ExecStart", "WorkingDirectory", "StandardOutput", "StandardError", "Type"})


@dataclass(frozen=True)
class UnitRecord:
    """The unit a guest ran in, as the image records it."""

    name: str
    kind: str                                      # KIND_PERSISTENT or KIND_TRANSIENT
    properties: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "properties": dict(self.properties)}


# --- systemd on this host ------------------------------------------------------------

def systemd_booted() -> bool:
    """Whether systemd is PID 1 here (sd_booted()'s test)."""
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def _systemctl(*args: str, check: bool = True) -> str:
    argv = ["systemctl", *args]
    done = run_bounded(argv, SYSTEMCTL_TIMEOUT)
    if check and done.returncode != 0:
        raise PreconditionError(f"'{' '.join(argv)}' failed: {output_of(done)}")
    return done.stdout


def show(unit: str, *properties: str) -> dict[str, str]:
    """``systemctl show`` of a unit as a dict; empty when systemd cannot be asked."""
    try:
        text = _systemctl("show", unit, *(f"--property={p}" for p in properties))
    except PreconditionError:
        return {}
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value
    return values


def unit_of_cgroup(cgroup_text: str) -> Optional[str]:
    """The innermost service or scope in a /proc/PID/cgroup text (cgroup2 first, then legacy)."""
    paths = []
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and (parts[0] == "0" and parts[1] == "" or parts[1] == "name=systemd"):
            paths.append(parts[2])
    for path in paths:
        for component in reversed(path.split("/")):
            if component.endswith((".service", ".scope")):
                return component
    return None


def _is_login_session(unit: str) -> bool:
    return bool(re.fullmatch(r"session-[^.]+\.scope", unit)) or unit.startswith(("user@", "user-"))


def guest_unit(pid: int) -> Optional[UnitRecord]:
    """The unit that owns the QEMU ``pid``, or None (no systemd, a login session, a shell's job).

    A service owns the guest when QEMU is its main process; a scope that is not a
    login session (``systemd-run --scope``, ours) owns it too.
    """
    if not systemd_booted():
        return None
    unit = unit_of_cgroup(read_cgroup(pid))
    if unit is None or _is_login_session(unit):
        return None
    wanted = ["Id", "Transient", "MainPID", "LoadState", *TRANSIENT_PROPERTIES]
    state = show(unit, *wanted)
    if not state or (unit.endswith(".service") and state.get("MainPID") != str(pid)):
        return None
    if state.get("Transient") != "yes":
        return UnitRecord(unit, KIND_PERSISTENT)
    return UnitRecord(unit, KIND_TRANSIENT, transient_properties(state))


def transient_properties(state: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The ``--property=`` assignments that recreate a transient unit (defaults left out)."""
    properties = []
    for key, defaults in TRANSIENT_PROPERTIES.items():
        value = state.get(key)
        if value is None or value in defaults or value == "":
            continue
        if key == "CPUQuotaPerSecUSec":
            percent = _cpu_quota_percent(value)
            if percent:
                properties.append(("CPUQuota", percent))
            continue
        if key == "RestartUSec":
            properties.append(("RestartSec", value.replace(" ", "")))
            continue
        if key == "TimeoutStopUSec":
            properties.append(("TimeoutStopSec", value.replace(" ", "")))
            continue
        properties.append((key, value))
    return tuple(properties)


def _cpu_quota_percent(value: str) -> Optional[str]:
    """``systemctl show`` prints CPUQuotaPerSecUSec as a time span per second: 500ms is 50%."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(us|ms|s)", value)
    if not match:
        return None
    per_second = float(match.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[match.group(2)]
    return f"{round(per_second * 100)}%"


# --- save: end the guest through its unit ----------------------------------------------

def stop_unit_before_quit(unit: Optional[UnitRecord]) -> None:
    """Queue a stop job for the guest's unit: QEMU's exit on ``quit`` then ends the unit.

    ``--no-block``: the stop job waits (ExecStop=, KillSignal=) for QEMU, which is
    paused with its image complete; the queued job keeps ``Restart=`` from firing
    when QEMU exits with ``quit``.
    """
    if unit is None:
        return
    _systemctl("stop", "--no-block", unit.name)


def check_unit_stopped(unit: Optional[UnitRecord], old_pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """After the save ended the guest: the unit must go inactive, with no new QEMU in it."""
    if unit is None:
        return
    deadline = time.monotonic() + timeout
    while True:
        state = show(unit.name, "ActiveState", "MainPID", "SubState")
        active, main_pid = state.get("ActiveState", ""), state.get("MainPID", "0")
        if active in ("inactive", "failed", ""):
            return
        if main_pid not in ("0", str(old_pid)) and active == "active":
            raise MigrationError(
                f"the image is saved and QEMU (pid {old_pid}) quit, but {unit.name} started again "
                f"(new main pid {main_pid}, {state.get('SubState')}): its Restart= fired and booted the "
                "guest afresh, so the image no longer matches the disk; stop the unit before restoring")
        if time.monotonic() > deadline:
            raise MigrationError(f"the image is saved and QEMU (pid {old_pid}) quit, but {unit.name} is still "
                                 f"{active} after {timeout:g} s")
        time.sleep(0.1)


# --- restore: where QEMU starts ------------------------------------------------------

def unit_escape(text: str) -> str:
    """``systemd-escape`` for one unit name component."""
    out = []
    for index, char in enumerate(text):
        if char.isascii() and (char.isalnum() or char in ":_" or (char == "." and index > 0)):
            out.append(char)
        elif char == "/":
            out.append("-")
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode("utf-8", "surrogateescape"))
    return "".join(out)


def exec_quote(argv: Sequence[str]) -> str:
    """A command line for ``ExecStart=`` in a unit file: each word quoted, specifiers and
    variables escaped (``%%``, ``$$``), so systemd passes exactly these words."""
    words = []
    for arg in argv:
        escaped = (arg.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
                   .replace("%", "%%").replace("$", "$$"))
        words.append(f'"{escaped}"')
    return " ".join(words)


def _unit_value(value: str) -> str:
    """A path for a unit file setting: ``%`` is a specifier there."""
    return value.replace("%", "%%")


@dataclass
class UnitProcess:
    """QEMU run by systemd: the part of :class:`subprocess.Popen` that the restore uses.

    It is systemd's child, not ours: liveness is read from /proc, and killing it
    goes through the unit so that systemd sees a stop, not a crash to restart.
    """

    pid: int
    unit: str
    returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None and not _alive(self.pid):
            status = show(self.unit, "ExecMainStatus").get("ExecMainStatus", "")
            self.returncode = int(status) if status.isdigit() else 1
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.unit, timeout or 0)
            time.sleep(EXIT_POLL)
        return self.returncode or 0

    def send_signal(self, signum: int) -> None:
        if signum == signal.SIGKILL:
            _systemctl("kill", "--signal=SIGKILL", self.unit, check=False)
            _systemctl("stop", self.unit, check=False)
        else:
            _systemctl("kill", f"--signal={signum}", self.unit, check=False)


def _alive(pid: int) -> bool:
    return not process_gone(pid)


@dataclass
class Placement:
    """Where the restored QEMU runs; ``kind`` None means today's detached session."""

    kind: Optional[str]
    unit: Optional[str] = None
    properties: tuple[tuple[str, str], ...] = ()
    note: Optional[str] = None

    def describe(self) -> Optional[dict[str, Any]]:
        if self.kind is None:
            return None
        return {"name": self.unit, "kind": self.kind, "properties": dict(self.properties)}

    @property
    def dropin_dir(self) -> str:
        return os.path.join(DROPIN_ROOT, f"{self.unit}.d")

    # -- the launch ------------------------------------------------------------------

    @property
    def starts_in_unit(self) -> bool:
        """systemd starts QEMU (a service): it is not our child and inherits nothing from us."""
        return self.kind in (KIND_PERSISTENT, KIND_TRANSIENT)

    @property
    def execs_in_place(self) -> bool:
        """``systemd-run --scope`` becomes QEMU: our child, with our file descriptors."""
        return self.kind == KIND_SCOPE

    def popen_argv(self, argv: list[str], uid: Optional[int] = None, gid: Optional[int] = None) -> list[str]:
        """The argv to Popen for a placement that execs in place (a scope), else ``argv``.

        systemd-run must ask the service manager as root, so a scope switches to the
        QEMU's user itself (``--uid``/``--gid``) just before it execs QEMU.
        """
        if self.kind != KIND_SCOPE:
            return argv
        identity = [f"--uid={uid}", f"--gid={gid}"] if uid is not None and gid is not None else []
        return ["systemd-run", "--scope", "--quiet", "--collect", "--slice=machine.slice", *_ordering(),
                f"--unit={self.unit}", "--description=QEMU guest restored by savestate.qemu", *identity,
                "--", *argv]

    def launch(self, argv: list[str], cwd: str, log_path: str) -> UnitProcess:
        """Start QEMU (``argv`` ends with ``-incoming defer``) in the unit; its output goes to ``log_path``."""
        if self.kind == KIND_PERSISTENT:
            self._write_dropin(argv, cwd, log_path)
            try:
                _systemctl("daemon-reload")
                _systemctl("start", self.unit or "")
            except PreconditionError:
                self.settle()
                raise
        elif self.kind == KIND_TRANSIENT:
            options = [f"--property={key}={value}" for key, value in self.properties if key not in RESTORE_OWNED]
            _systemd_run(["--unit", self.unit or "", "--quiet", "--collect", "--service-type=simple",
                          f"--working-directory={cwd}", f"--property=StandardOutput=append:{log_path}",
                          "--property=StandardError=inherit", *_ordering(), *options, "--", *argv])
        else:
            raise PreconditionError(f"cannot launch a guest in a {self.kind} unit")
        return UnitProcess(self._main_pid(), self.unit or "")

    def _write_dropin(self, argv: list[str], cwd: str, log_path: str) -> None:
        os.makedirs(self.dropin_dir, mode=0o755, exist_ok=True)
        text = ("# Written by savestate.qemu's restore; removed once the guest runs.\n[Service]\nType=simple\n"
                f"ExecStart=\nExecStart={exec_quote(argv)}\nRestart=no\n"
                f"WorkingDirectory={_unit_value(cwd)}\n"
                f"StandardOutput=append:{_unit_value(log_path)}\nStandardError=inherit\n")
        path = os.path.join(self.dropin_dir, DROPIN_NAME)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)

    def _main_pid(self) -> int:
        deadline = time.monotonic() + SYSTEMCTL_TIMEOUT
        while True:
            state = show(self.unit or "", "MainPID", "ActiveState", "Result")
            pid = int(state.get("MainPID", "0") or 0)
            if pid:
                return pid
            if state.get("ActiveState") in ("failed", "inactive") or time.monotonic() > deadline:
                raise MigrationError(f"QEMU did not start in {self.unit}: it is {state.get('ActiveState')}"
                                     f" ({state.get('Result')}); see 'journalctl -u {self.unit}'")
            time.sleep(EXIT_POLL)

    def settle(self) -> None:
        """Once the guest runs (or the restore gave up): the unit's own ExecStart=/Restart= apply again."""
        if self.kind != KIND_PERSISTENT:
            return
        path = os.path.join(self.dropin_dir, DROPIN_NAME)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        try:
            os.rmdir(self.dropin_dir)
        except OSError:
            pass  # other drop-ins of the operator's live there
        _systemctl("daemon-reload", check=False)


def _ordering() -> list[str]:
    """Order a unit we create before the autosave role's target, where the role is installed."""
    if show(GUESTS_TARGET, "LoadState").get("LoadState") != "loaded":
        return []
    return [f"--property=Before={GUESTS_TARGET}"]


def _systemd_run(args: list[str]) -> None:
    done = run_bounded(["systemd-run", *args], SYSTEMCTL_TIMEOUT)
    if done.returncode != 0:
        raise PreconditionError(f"systemd-run could not create the unit: {output_of(done)}")


def _unit_file_exists(unit: str) -> bool:
    state = show(unit, "LoadState", "FragmentPath")
    return state.get("LoadState") == "loaded" and bool(state.get("FragmentPath"))


def plan_placement(recorded: Optional[UnitRecord], option: str, guest: str) -> Placement:
    """Where to run the restored QEMU, from the recorded unit and the ``unit`` option."""
    if option == UNIT_OPTION_NONE:
        return Placement(None)
    if not systemd_booted():
        if option != UNIT_OPTION_AUTO or recorded is not None:
            return Placement(None, note="systemd is not running on this host: the guest runs in a session "
                                        "of its own, outside any unit")
        return Placement(None)
    if option != UNIT_OPTION_AUTO:
        if _unit_file_exists(option):
            return Placement(KIND_PERSISTENT, option)
        properties = recorded.properties if recorded is not None and recorded.name == option else ()
        return Placement(KIND_TRANSIENT, option, properties)
    if recorded is None:
        return Placement(KIND_SCOPE, f"{SCOPE_PREFIX}{unit_escape(guest)}.scope")
    if recorded.kind == KIND_PERSISTENT and _unit_file_exists(recorded.name):
        return Placement(KIND_PERSISTENT, recorded.name)
    if recorded.kind == KIND_PERSISTENT:
        return Placement(KIND_SCOPE, f"{SCOPE_PREFIX}{unit_escape(guest)}.scope",
                         note=f"the guest ran in {recorded.name}, which has no unit file here; "
                              "it runs in a scope of its own instead")
    if recorded.name.endswith(".scope"):
        return Placement(KIND_SCOPE, recorded.name if recorded.name.startswith(SCOPE_PREFIX)
                         else f"{SCOPE_PREFIX}{unit_escape(guest)}.scope")
    return Placement(KIND_TRANSIENT, recorded.name, recorded.properties)


def process_start(pid: int, proc_root: str = "/proc") -> Optional[float]:
    """When a process started, in seconds since the epoch."""
    return process_started_at(pid, proc_root)


def booted_after_save(saved_at: Optional[str], pid: int) -> str:
    """A note for "already active" when the active QEMU started after the image was written:
    a restart policy (or someone) booted the guest afresh, so the image is stale, not restored."""
    started = process_start(pid)
    if not saved_at or started is None:
        return ""
    saved = parse_utc(saved_at)
    if saved is None or started <= saved:
        return ""
    when = utc_text(started)
    return (f" and was booted afresh after the image was saved (QEMU pid {pid} started {when}, the image was "
            f"saved {saved_at}): the image is stale, its RAM belongs to an older state of the disks")


def check_unit_free(placement: Placement) -> None:
    """Refuse to start a second QEMU for the guest: its unit must not be active already."""
    if placement.kind is None or placement.unit is None:
        return
    state = show(placement.unit, "ActiveState", "MainPID", "ExecMainStartTimestamp")
    if state.get("ActiveState") in ("active", "activating", "reloading", "deactivating"):
        raise PreconditionError(
            f"{placement.unit} is already {state.get('ActiveState')} (main pid {state.get('MainPID')}, started "
            f"{state.get('ExecMainStartTimestamp') or 'at an unknown time'}): restoring would run a second QEMU "
            "for the same guest and disks; stop the unit first if the image is the state to keep")
