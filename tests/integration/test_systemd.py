"""Guests under systemd (issue 15), on a Debian 12 host with systemd as PID 1.

The host is a systemd-nspawn container (:mod:`harness.systemd_host`), booted once
for this file; the modules run in it through real Ansible over SSH, as the
unprivileged ``tester`` with ``become``, exactly as a playbook would. Guests are
the project's test guest (kernel + busybox initramfs, bound read-only into the
host) started by units; their serial logs are read through the container's
overlay. Each test asserts the effect: which unit QEMU runs in, that the
heartbeat continued (no cold boot), that ``systemctl stop`` stops it.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import heartbeat
from harness.qemu import QEMU72_DIR
from harness.qemu import selected_builds
from harness.systemd_host import GUEST_ASSETS_IN_HOST, QEMU72_IN_HOST, SystemdHost, unavailable_reason

pytestmark = [pytest.mark.integration]

REASON = unavailable_reason()
if REASON:
    pytest.skip(f"no systemd host: {REASON}", allow_module_level=True)

GUESTS = "/var/lib/qemu-guests"
IMAGES = "/var/lib/qemu-saves"
# The host's QEMU 10.0 (bookworm-backports) and Debian 12's 7.2 (unpacked on the build machine, bound in).
QEMUS = {"10.0": ["/usr/bin/qemu-system-x86_64"],
         "7.2": [f"{QEMU72_IN_HOST}/usr/bin/qemu-system-x86_64", "-L", f"{QEMU72_IN_HOST}/usr/share/qemu"]}
SELECTED = [build.name for build in selected_builds()]


def qemu_param(version: str, *before: str) -> object:
    marks = []
    if version not in SELECTED:
        marks.append(pytest.mark.skip(reason=f"QEMU {version} not selected (SAVESTATE_TEST_QEMU)"))
    elif version == "7.2" and not QEMU72_DIR.is_dir():
        marks.append(pytest.mark.skip(reason="QEMU 7.2 is not unpacked in .cache (make setup)"))
    return pytest.param(*before, version, marks=marks, id="-".join([*before, f"qemu-{version}"]))


def guest_argv(name: str, uuid: str, qmp: str, qemu: str = "10.0") -> list[str]:
    return [*QEMUS[qemu], "-name", f"guest={name},debug-threads=on", "-uuid", uuid, "-machine", "pc", "-accel", "tcg",
            "-m", "128", "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", f"{GUEST_ASSETS_IN_HOST}/vmlinuz", "-initrd", f"{GUEST_ASSETS_IN_HOST}/initramfs.cpio.gz",
            "-chardev", f"file,id=serial0,path={GUESTS}/{name}.serial,append=on", "-serial", "chardev:serial0",
            "-append", "console=ttyS0 quiet panic=-1", "-qmp", f"unix:{qmp},server=on,wait=off"]


@pytest.fixture(scope="module")
def host() -> Iterator[SystemdHost]:
    workdir = Path(tempfile.mkdtemp(prefix="ssq-hv-"))
    machine = SystemdHost(workdir)
    started = time.monotonic()
    machine.boot()
    print(f"systemd host booted in {time.monotonic() - started:.1f} s")
    try:
        machine.sh(f"mkdir -p {GUESTS} {IMAGES}")
        yield machine
    finally:
        machine.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


class HostGuest:
    """A test guest inside the systemd host, seen from outside through the overlay."""

    def __init__(self, host: SystemdHost, name: str) -> None:
        self.host = host
        self.name = name
        self.uuid = str(uuidlib.uuid4())

    @property
    def serial(self) -> Path:
        return self.host.merged / GUESTS.lstrip("/") / f"{self.name}.serial"

    def ticks(self) -> list[int]:
        return heartbeat.ticks(self.serial)

    def wait_tick_above(self, value: int, timeout: float = 60.0) -> int:
        return heartbeat.wait_tick_above(self.serial, value, timeout, self.name)

    def assert_continued(self, saved_tick: int) -> None:
        self.wait_tick_above(saved_tick + 2)
        ticks = self.ticks()
        assert ticks.count(1) == 1, f"{self.name} booted again instead of resuming"
        assert all(b == a + 1 for a, b in zip(ticks, ticks[1:])), f"{self.name}: the heartbeat skipped or restarted"

    def qemu_pids(self) -> list[int]:
        out = self.host.ssh(f"pgrep -f -- {shlex.quote('guest=' + self.name + ',')}").stdout
        return [int(pid) for pid in out.split()]


def unit_show(host: SystemdHost, unit: str, *properties: str) -> dict[str, str]:
    out = host.sh(f"systemctl show {shlex.quote(unit)} " + " ".join(f"-p {p}" for p in properties))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def install_template(host: SystemdHost, template: str, restart: str, runtime_directory: bool = True,
                     qemu: str = "10.0") -> None:
    """``TEMPLATE@.service`` running the test guest named after the instance, QMP in /run/qemu."""
    argv = guest_argv("%i", "${UUID}", "/run/qemu/%i.qmp", qemu)
    lines = ["[Unit]", f"Description=test guest %i ({restart})", "[Service]",
             f"EnvironmentFile={GUESTS}/%i.env", "ExecStart=" + " ".join(f'"{arg}"' for arg in argv), f"Restart={restart}",
             "RestartSec=1"]
    if runtime_directory:
        lines.append("RuntimeDirectory=qemu")   # removed when the unit stops (no RuntimeDirectoryPreserve=)
    else:
        lines.append("ExecStartPre=mkdir -p /run/qemu")
    host.write(f"/etc/systemd/system/{template}@.service", "\n".join(lines))
    host.sh("systemctl daemon-reload")


def start_unit_guest(host: SystemdHost, template: str, name: str) -> HostGuest:
    guest = HostGuest(host, name)
    host.write(f"{GUESTS}/{name}.env", f"UUID={guest.uuid}")
    host.sh(f"systemctl start {template}@{name}.service")
    guest.wait_tick_above(3)
    return guest


def ok(result: dict) -> dict:
    assert not result["failed"], f"{result.get('msg')}\n{str(result.get('_stdout'))[-3000:]}"
    return result


def save(host: SystemdHost, guest: HostGuest, **options: object) -> dict:
    return ok(host.run_module("save", {"name": guest.name, "path": f"{IMAGES}/{guest.name}.sav", **options}))


def restore(host: SystemdHost, guest: HostGuest, **options: object) -> dict:
    return ok(host.run_module("restore", {"path": f"{IMAGES}/{guest.name}.sav", "name": guest.name, **options}))


def no_dropin(host: SystemdHost, unit: str) -> bool:
    return host.ssh(f"test -e /run/systemd/system/{unit}.d/50-savestate-restore.conf").returncode != 0


@pytest.mark.parametrize("restart,build", [qemu_param("10.0", "always"), qemu_param("10.0", "on-failure"),
                                           qemu_param("7.2", "always")])
def test_template_unit_guest_is_saved_and_restored_inside_its_unit(host: SystemdHost, restart: str, build: str) -> None:
    """Issue 15 items 1, 2 and 5: the unit uses RuntimeDirectory= (removed at the stop) for its QMP socket."""
    name = f"t{restart.replace('-', '')}{build.replace('.', '')}"
    template = f"qemu-{name}"
    install_template(host, template, restart, qemu=build)
    unit = f"{template}@{name}.service"
    guest = start_unit_guest(host, template, name)

    save(host, guest)
    saved_tick = guest.ticks()[-1]
    info = ok(host.run_module("save_image_info", {"path": f"{IMAGES}/{name}.sav"}))
    assert f'"{unit}"' in str(info).replace("'", '"'), info

    time.sleep(3)  # RestartSec=1: a restart would have happened by now
    state = unit_show(host, unit, "ActiveState", "MainPID")
    assert state["ActiveState"] in ("inactive", "failed") and state["MainPID"] == "0", state
    assert guest.qemu_pids() == [], "Restart= booted the guest afresh after the save"
    assert guest.ticks()[-1] == saved_tick

    restored = restore(host, guest)
    assert restored["guest"]["unit"]["name"] == unit
    main_pid = int(unit_show(host, unit, "MainPID")["MainPID"])
    assert main_pid == restored["guest"]["pid"], "the restored QEMU is not the unit's main process"
    assert unit_show(host, unit, "ActiveState")["ActiveState"] == "active"
    guest.assert_continued(saved_tick)
    assert no_dropin(host, unit), "the restore's drop-in was left behind"
    assert unit_show(host, unit, "Restart")["Restart"] == restart  # the unit's own policy again

    host.sh(f"systemctl stop {unit}")
    assert guest.qemu_pids() == [], "systemctl stop did not stop the restored guest"


def test_guest_info_reports_the_unit(host: SystemdHost) -> None:
    install_template(host, "qemu-info", "no")
    guest = start_unit_guest(host, "qemu-info", "ginfo")
    try:
        result = ok(host.run_module("guest_info", {"name": guest.name}))
        units = [g.get("unit") for g in result["guests"]]
        assert {"name": "qemu-info@ginfo.service", "kind": "persistent", "properties": {}} in units, result["guests"]
    finally:
        host.sh("systemctl stop qemu-info@ginfo.service")


@pytest.mark.parametrize("build", [qemu_param("10.0"), qemu_param("7.2")])
def test_transient_unit_keeps_its_properties(host: SystemdHost, build: str) -> None:
    guest = HostGuest(host, f"trans{build.replace('.', '')}")
    unit = f"vm-{guest.name}.service"
    argv = guest_argv(guest.name, guest.uuid, f"/run/{guest.name}.qmp", build)
    host.sh(f"systemd-run --unit={unit} --property=MemoryMax=400M --property=Restart=always "
            f"--property=RestartSec=1 --property=TasksMax=200 -- {shlex.join(argv)}")
    guest.wait_tick_above(3)

    save(host, guest)
    saved_tick = guest.ticks()[-1]
    time.sleep(3)
    assert guest.qemu_pids() == [], "Restart=always booted the guest afresh"
    assert unit_show(host, unit, "ActiveState")["ActiveState"] in ("inactive", "failed")

    restored = restore(host, guest)
    assert restored["guest"]["unit"]["kind"] == "transient"
    state = unit_show(host, unit, "MainPID", "MemoryMax", "TasksMax", "Restart", "Transient")
    assert int(state["MainPID"]) == restored["guest"]["pid"]
    assert (state["MemoryMax"], state["TasksMax"], state["Restart"], state["Transient"]) == \
        (str(400 << 20), "200", "always", "yes")
    guest.assert_continued(saved_tick)
    host.sh(f"systemctl stop {unit}")
    assert guest.qemu_pids() == []


def _hand_started(host: SystemdHost, name: str) -> HostGuest:
    """A guest started by hand from an SSH session (setsid, nohup): no unit of its own."""
    guest = HostGuest(host, name)
    argv = guest_argv(guest.name, guest.uuid, f"/run/{guest.name}.qmp")
    host.sh(f"setsid nohup {shlex.join(argv)} >/dev/null 2>&1 < /dev/null &")
    guest.wait_tick_above(3)
    return guest


def test_hand_started_guest_survives_logout_with_kill_user_processes(host: SystemdHost) -> None:
    guest = _hand_started(host, "hand1")
    save(host, guest)
    saved_tick = guest.ticks()[-1]
    host.write("/etc/systemd/logind.conf.d/kill.conf", "[Login]\nKillUserProcesses=yes\nKillExcludeUsers=nobody")
    host.sh("systemctl restart systemd-logind")
    try:
        restored = restore(host, guest)
        assert restored["guest"]["unit"]["name"] == "savestate-qemu-hand1.scope"
        time.sleep(3)  # the Ansible SSH session has closed; logind kills what stayed in it
        assert guest.qemu_pids() == [restored["guest"]["pid"]], "the restored guest died with the SSH session"
        cgroup = host.sh(f"cat /proc/{restored['guest']['pid']}/cgroup")
        assert "/machine.slice/savestate-qemu-hand1.scope" in cgroup
        guest.assert_continued(saved_tick)
    finally:
        host.sh("rm -f /etc/systemd/logind.conf.d/kill.conf && systemctl restart systemd-logind")
        host.ssh("systemctl stop savestate-qemu-hand1.scope")
    assert guest.qemu_pids() == []


def test_guest_restored_from_a_service_job_survives_the_job(host: SystemdHost) -> None:
    guest = _hand_started(host, "job1")
    save(host, guest)
    saved_tick = guest.ticks()[-1]
    script = ("from ansible_collections.savestate.qemu.plugins.module_utils._restore import RestoreRequest, "
              f"restore_guest; print(restore_guest(RestoreRequest(path='{IMAGES}/job1.sav', name='job1')).guest)")
    out = host.sh("systemd-run --wait --collect --quiet --unit=restore-job "
                  f"--setenv=PYTHONPATH=/opt/savestate-collections /opt/savestate-venv/bin/python -c {shlex.quote(script)}"
                  "; journalctl -u restore-job -o cat --no-pager | tail -5")
    time.sleep(2)  # the job has ended: systemd stopped its cgroup
    pids = guest.qemu_pids()
    assert len(pids) == 1, f"the restored guest died with the service job that restored it: {out}"
    assert "savestate-qemu-job1.scope" in host.sh(f"cat /proc/{pids[0]}/cgroup")
    guest.assert_continued(saved_tick)
    host.sh("systemctl stop savestate-qemu-job1.scope")
    assert guest.qemu_pids() == []


def test_restore_refuses_a_unit_that_is_already_active(host: SystemdHost) -> None:
    guest = _hand_started(host, "dup1")
    save(host, guest)
    host.sh("systemd-run --unit=busy-dup1.service sleep infinity")
    try:
        result = host.run_module("restore", {"path": f"{IMAGES}/dup1.sav", "name": "dup1", "unit": "busy-dup1.service"})
        assert result["failed"] and "already active" in result["msg"], result.get("msg")
        assert guest.qemu_pids() == [], "a QEMU was started although the unit was busy"
    finally:
        host.sh("systemctl stop busy-dup1.service")


AUTOSAVE_PLAYBOOK = """
- hosts: hv
  gather_facts: false
  roles:
    - role: savestate.qemu.guest_autosave
      vars:
        guest_autosave_manage_venv: false
        guest_autosave_python: /opt/savestate-venv/bin/python
        guest_autosave_units: [qemu-auto@.service]
        guest_autosave_max_age: 3600
        guest_autosave_timeout: 60
        guest_autosave_total_timeout: 120
"""


def test_host_shutdown_saves_guests_and_boot_restores_them(host: SystemdHost) -> None:
    done = host.run_playbook(AUTOSAVE_PLAYBOOK)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    install_template(host, "qemu-auto", "always")
    unit_guest = start_unit_guest(host, "qemu-auto", "auto1")
    transient = HostGuest(host, "auto2")
    argv = guest_argv(transient.name, transient.uuid, f"/run/{transient.name}.qmp")
    host.sh(f"systemd-run --unit=vm-auto2.service --property=MemoryMax=300M --property=Before=savestate-guests.target"
            f" -- {shlex.join(argv)}")
    transient.wait_tick_above(3)

    took = host.poweroff()
    print(f"poweroff with two guests took {took:.1f} s")
    ticks = {g.name: g.ticks()[-1] for g in (unit_guest, transient)}
    host.boot()
    deadline = time.monotonic() + 120
    while unit_show(host, "savestate-autosave.service", "ActiveState")["ActiveState"] != "active":
        assert time.monotonic() < deadline, host.sh("journalctl -b -u savestate-autosave --no-pager | tail -20")
        time.sleep(0.5)
    journal = host.sh("journalctl -u savestate-autosave --no-pager -o cat")
    print(journal)
    assert "auto1: saved" in journal and "auto2: saved" in journal, journal
    for guest in (unit_guest, transient):
        guest.assert_continued(ticks[guest.name])
    assert unit_show(host, "qemu-auto@auto1.service", "ActiveState")["ActiveState"] == "active"
    state = unit_show(host, "vm-auto2.service", "MainPID", "MemoryMax")
    assert state["MemoryMax"] == str(300 << 20) and int(state["MainPID"]) == transient.qemu_pids()[0]
    host.sh("systemctl stop qemu-auto@auto1.service vm-auto2.service")


def test_a_guest_booted_afresh_after_the_save_is_reported_as_such(host: SystemdHost) -> None:
    install_template(host, "qemu-fresh", "no")
    guest = start_unit_guest(host, "qemu-fresh", "fresh1")
    save(host, guest)
    time.sleep(1.1)  # saved_at has a resolution of one second
    host.sh("systemctl start qemu-fresh@fresh1.service")  # someone boots the guest from its disk
    try:
        result = restore(host, guest)
        assert not result["changed"] and "booted afresh after the image was saved" in result["msg"], result["msg"]
        assert len(guest.qemu_pids()) == 1
    finally:
        host.sh("systemctl stop qemu-fresh@fresh1.service")
