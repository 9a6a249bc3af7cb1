"""Active-guest discovery against fake /proc trees, and the QMP probe against a fake monitor."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._host import (
    ActiveGuest,
    check_identity,
    find_guests,
    guest_by_endpoint,
    guest_by_name,
    guest_by_uuid,
    guest_report,
    parse_memory_mib,
    probe_guest,
    read_guest,
    scan_guests,
    scan_host,
)
from ansible_collections.savestate.qemu.plugins.module_utils._monitor import Endpoint, tcp_endpoint, unix_endpoint
from ansible_collections.savestate.qemu.tests.unit.fake_qmp import FakeQMPServer

QEMU = "/usr/bin/qemu-system-x86_64"
UUID_A = "6f1e9a4c-3b1d-4c61-9a0e-3f5d2f0d6a11"
UUID_B = "0b5c6f3e-2d4a-4e8f-9c1b-7a6d5e4f3a2b"
NET_UNIX_HEADER = "Num       RefCount Protocol Flags    Type St Inode Path\n"


class FakeProc:
    """A /proc tree with just the files discovery reads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def add(self, pid: int, argv: Sequence[str], comm: str | None = None, state: str = "S", ppid: int = 1,
            exe: str | None = QEMU, cwd: str | None = "/", cgroup: str = "0::/\n",
            fds: dict[int, str] | None = None, net_unix: dict[int, str] | None = None,
            uid: int = 0, gid: int = 0, groups: Sequence[int] = ()) -> Path:
        directory = self.root / str(pid)
        directory.mkdir()
        comm = comm if comm is not None else os.path.basename(argv[0])[:15] if argv else "kworker/0:1"
        (directory / "stat").write_text(f"{pid} ({comm}) {state} {ppid} {pid} {pid} 0 -1 4194560 0 0\n")
        (directory / "comm").write_text(comm + "\n")
        (directory / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
                                          f"Gid:\t{gid}\t{gid}\t{gid}\t{gid}\n"
                                          f"Groups:\t{' '.join(str(g) for g in groups)}\n")
        (directory / "cmdline").write_bytes(b"".join(arg.encode() + b"\0" for arg in argv))
        (directory / "cgroup").write_text(cgroup)
        if exe is not None:
            (directory / "exe").symlink_to(exe)
        if cwd is not None:
            (directory / "cwd").symlink_to(cwd)
        (directory / "fd").mkdir()
        for fd, target in (fds or {}).items():
            (directory / "fd" / str(fd)).symlink_to(target)
        if net_unix is not None:
            (directory / "net").mkdir()
            (directory / "net" / "unix").write_text(NET_UNIX_HEADER + "".join(
                f"0000000000000000: 00000002 00000000 00010000 0001 01 {inode} {path}\n"
                for inode, path in net_unix.items()))
        return directory

    def qemu(self, pid: int, *args: str, **kwargs) -> Path:
        return self.add(pid, [QEMU, *args], **kwargs)


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


@pytest.fixture(scope="module")
def emulators() -> Iterator[Path]:
    """A root-owned directory only root can write (unlike /tmp), holding stand-in emulator files."""
    if os.geteuid() != 0:
        pytest.skip("trusted emulators are root-owned: run as root")
    path = Path(tempfile.mkdtemp(prefix="ssq-emu-", dir="/run"))
    path.chmod(0o755)
    for name in ("qemu-kvm", "qemu-system-aarch64", "qemu-system-x86_64 (deleted)"):
        (path / name).write_bytes(b"")
        (path / name).chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def only_guest(proc: FakeProc) -> ActiveGuest:
    guests = scan_guests(str(proc.root))
    assert len(guests) == 1, guests
    return guests[0]


# --- names and UUIDs -----------------------------------------------------------------

@pytest.mark.parametrize("name_value, expected", [
    ("web1", "web1"),
    ("guest=web1,debug-threads=on", "web1"),
    ("web1,process=qemu-web1", "web1"),
    ("guest=a,,b,debug-threads=on", "a,b"),
    ("guest=with space", "with space"),
    ("debug-threads=on", None),
])
def test_names(proc, name_value, expected):
    proc.qemu(100, "-name", name_value, "-uuid", UUID_A.upper())
    guest = only_guest(proc)
    assert guest.name == expected
    assert guest.uuid == UUID_A  # normalised to lower case


def test_last_option_wins_as_in_qemu(proc):
    proc.qemu(100, "-name", "first", "-name", "guest=second", "-uuid", UUID_A, "-uuid", UUID_B)
    guest = only_guest(proc)
    assert (guest.name, guest.uuid) == ("second", UUID_B)


def test_guest_without_name_or_uuid(proc):
    proc.qemu(100, "-m", "64")
    guest = only_guest(proc)
    assert (guest.name, guest.uuid, guest.qmp, guest.endpoint) == (None, None, (), None)


# --- which processes count ---------------------------------------------------------------

def test_only_live_qemu_processes(proc, emulators):
    proc.qemu(100, "-name", "alive")
    proc.qemu(101, "-name", "zombie", state="Z")  # exited, not reaped: not active
    proc.qemu(102, "-name", "dead", state="X")
    proc.add(103, ["/usr/bin/python3", "-c", "pass"], exe="/usr/bin/python3.11")
    proc.add(104, [], comm="kthreadd", exe=None)  # kernel thread: empty cmdline
    proc.add(105, ["/usr/libexec/qemu-kvm", "-name", "rhel"], exe=str(emulators / "qemu-kvm"))
    proc.add(106, ["/opt/qemu/bin/qemu-system-aarch64", "-name", "arm"], exe=str(emulators / "qemu-system-aarch64"))

    assert [(g.pid, g.name) for g in scan_guests(str(proc.root))] == [(100, "alive"), (105, "rhel"), (106, "arm")]


def test_renamed_process_is_still_qemu(proc, emulators):
    # -name process=web1 renames the main thread, so comm no longer says qemu.
    proc.qemu(100, "-name", "web1,process=web1", comm="web1")
    proc.add(101, ["qemu-system-x86_64", "-name", "bare-argv0"], comm="worker",
             exe=str(emulators / "qemu-system-x86_64 (deleted)"))
    guests = scan_guests(str(proc.root))
    assert [g.name for g in guests] == ["web1", "bare-argv0"]
    # A binary replaced by an upgrade: the open inode is judged, and the path is what restore would run.
    assert guests[1].exe == str(emulators / "qemu-system-x86_64") and "replaced" in guests[1].exe_note


def test_unreadable_and_vanishing_entries_are_skipped(proc):
    proc.qemu(100, "-name", "fine")
    gone = proc.qemu(101, "-name", "gone")
    (gone / "cmdline").unlink()                  # exited between reading stat and cmdline
    unreadable = proc.qemu(102, "-name", "unreadable")
    (unreadable / "stat").unlink()
    (unreadable / "stat").mkdir()                # reading fails with an OSError (root ignores modes)
    garbage = proc.qemu(103, "-name", "garbage")
    (garbage / "stat").write_text("103 no parentheses here\n")
    no_exe = proc.qemu(104, "-name", "no-exe", exe=None, cwd=None)
    (proc.root / "self").symlink_to("100")
    (proc.root / "net").mkdir()
    assert no_exe.exists()

    scan = scan_host(str(proc.root))
    assert [g.name for g in scan.guests] == ["fine"]
    # Without a readable executable nothing proves it is QEMU: reported, not a guest.
    assert [(i.pid, i.program) for i in scan.ignored] == [(104, QEMU)]
    assert "its executable cannot be read" in scan.ignored[0].reason
    assert read_guest(999, str(proc.root)) is None  # never existed


def test_missing_proc_root_means_no_guests(tmp_path):
    assert scan_guests(str(tmp_path / "nowhere")) == []


def test_comm_with_spaces_and_parentheses(proc):
    proc.qemu(100, "-name", "odd", comm="qemu-system-x8) (")
    assert only_guest(proc).name == "odd"


# --- monitors ------------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["-qmp", "unix:/run/q/a.sock,server=on,wait=off"], [unix_endpoint("/run/q/a.sock")]),
    (["-qmp", "unix:/run/q/a.sock,server,nowait"], [unix_endpoint("/run/q/a.sock")]),
    (["-qmp-pretty", "unix:/run/q/a.sock,server=on"], [unix_endpoint("/run/q/a.sock")]),
    (["-qmp", "unix:/run/q/a,,b.sock,server=on"], [unix_endpoint("/run/q/a,b.sock")]),
    (["--qmp", "unix:/run/q/a.sock,server=on"], [unix_endpoint("/run/q/a.sock")]),
    (["-qmp", "tcp:127.0.0.1:4444,server=on,wait=off"], [tcp_endpoint("127.0.0.1", 4444)]),
    (["-qmp", "tcp::4444,server"], [tcp_endpoint("127.0.0.1", 4444)]),
    (["-qmp", "tcp:0.0.0.0:4444,server"], [tcp_endpoint("127.0.0.1", 4444)]),
    (["-qmp", "tcp:[::]:4444,server"], [tcp_endpoint("::1", 4444)]),
    (["-qmp", "tcp:[fd00::5]:4444,server"], [tcp_endpoint("fd00::5", 4444)]),
    (["-chardev", "socket,id=mon0,path=/run/q/b.sock,server=on,wait=off",
      "-mon", "chardev=mon0,mode=control"], [unix_endpoint("/run/q/b.sock")]),
    (["-chardev", "socket,id=mon0,host=127.0.0.1,port=5555,server=on,wait=off",
      "-mon", "mon0,mode=control,pretty=on"], [tcp_endpoint("127.0.0.1", 5555)]),
    (["-chardev", "socket,id=mon0,path=/run/q/c.sock,server=on", "-qmp", "chardev:mon0"],
     [unix_endpoint("/run/q/c.sock")]),
    (["-qmp", "unix:/run/q/a.sock,server=on", "-chardev", "socket,id=m,path=/run/q/b.sock,server=on",
      "-mon", "chardev=m,mode=control"], [unix_endpoint("/run/q/a.sock"), unix_endpoint("/run/q/b.sock")]),
    # Not QMP monitors we can dial:
    (["-chardev", "socket,id=hmp,path=/run/q/hmp.sock,server=on", "-mon", "chardev=hmp"], []),
    (["-chardev", "socket,id=hmp,path=/run/q/hmp.sock,server=on", "-mon", "chardev=hmp,mode=readline"], []),
    (["-monitor", "unix:/run/q/hmp.sock,server=on"], []),
    (["-qmp", "stdio"], []),
    (["-qmp", "unix:/run/q/client.sock"], []),
    (["-qmp", "unix:/run/q/off.sock,server=off"], []),
    (["-chardev", "socket,id=m,path=/run/q/client.sock", "-mon", "chardev=m,mode=control"], []),
    (["-chardev", "socket,id=m,path=abs,abstract=on,server=on", "-mon", "chardev=m,mode=control"], []),
    (["-mon", "chardev=missing,mode=control"], []),
])
def test_monitor_forms(proc, args, expected):
    proc.qemu(100, "-name", "g", *args)
    assert list(only_guest(proc).qmp) == expected


def test_unreachable_monitors_are_explained(proc):
    proc.qemu(100, "-qmp", "stdio", "-chardev", "socket,id=m,path=/run/q/c.sock", "-mon", "chardev=m,mode=control")
    guest = only_guest(proc)
    assert guest.endpoint is None
    assert guest.unresolved_monitors == ("-qmp stdio is not a socket (stdio, pty, ...)",
                                         "chardev m connects out to a server rather than listening")


def test_relative_paths_are_qemus_not_ours(proc):
    proc.qemu(100, "-qmp", "unix:run/qmp.sock,server=on", "-pidfile", "qemu.pid", cwd="/srv/vm1")
    guest = only_guest(proc)
    assert guest.qmp == (unix_endpoint("/srv/vm1/run/qmp.sock"),)
    assert guest.pidfile == "/srv/vm1/qemu.pid"


def test_pidfile(proc):
    proc.qemu(100, "-pidfile", "/run/q/web1.pid")
    assert only_guest(proc).pidfile == "/run/q/web1.pid"


def test_monitor_passed_as_fd_is_resolved_through_the_socket_inode(proc):
    # libvirt binds the monitor socket itself and hands QEMU the listening fd.
    proc.qemu(100, "-chardev", "socket,id=charmonitor,fd=23,server=on,wait=off",
              "-mon", "chardev=charmonitor,id=monitor,mode=control",
              fds={23: "socket:[424242]", 3: "/dev/null"},
              net_unix={424242: "/var/lib/libvirt/qemu/domain-1-web1/monitor.sock", 7: "/run/other.sock"})
    assert only_guest(proc).qmp == (unix_endpoint("/var/lib/libvirt/qemu/domain-1-web1/monitor.sock"),)


def test_monitor_fd_that_cannot_be_read(proc):
    proc.qemu(100, "-chardev", "socket,id=charmonitor,fd=23,server=on,wait=off",
              "-mon", "chardev=charmonitor,mode=control", fds={23: "pipe:[5]"})
    guest = only_guest(proc)
    assert guest.endpoint is None
    assert "passed as fd 23" in guest.unresolved_monitors[0]


# --- libvirt -------------------------------------------------------------------------

LIBVIRT_ARGV = (
    "-name", "guest=lvg,debug-threads=on", "-S",
    "-object", '{"qom-type":"secret","id":"masterKey0","format":"raw",'
               '"file":"/var/lib/libvirt/qemu/domain-1-lvg/master-key.aes"}',
    "-machine", "pc-i440fx-10.0,usb=off,dump-guest-core=off,memory-backend=pc.ram,acpi=off",
    "-m", "size=131072k", "-uuid", UUID_A, "-no-user-config", "-nodefaults",
    "-chardev", "socket,id=charmonitor,fd=7,server=on,wait=off",
    "-mon", "chardev=charmonitor,id=monitor,mode=control",
)


def test_libvirt_guest_as_libvirt_starts_it(proc):
    proc.qemu(100, *LIBVIRT_ARGV, fds={7: "socket:[99]"}, net_unix={99: "/var/lib/libvirt/qemu/d/monitor.sock"})
    guest = only_guest(proc)
    assert guest.managed_by == "libvirt" and guest.libvirt_managed
    assert guest.libvirt_evidence == ("libvirt's masterKey0 secret object", "libvirt's charmonitor monitor")
    assert guest.name == "lvg" and guest.uuid == UUID_A
    assert guest.endpoint == unix_endpoint("/var/lib/libvirt/qemu/d/monitor.sock")
    assert guest.memory_mib == 128
    assert guest.machine_option == "pc-i440fx-10.0"


@pytest.mark.parametrize("parent, cgroup, evidence", [
    ("virtqemud", "0::/\n", "started by virtqemud"),
    ("libvirtd", "0::/\n", "started by libvirtd"),
    ("bash", "0::/machine.slice/machine-qemu\\x2d1\\x2dweb1.scope/libvirt/emulator\n", "in a libvirt machine cgroup"),
    ("bash", "4:memory:/machine/qemu-1-web1.libvirt-qemu\n", "in a libvirt machine cgroup"),
])
def test_libvirt_parents_and_cgroups(proc, parent, cgroup, evidence):
    proc.add(50, [f"/usr/sbin/{parent}"], comm=parent, exe=f"/usr/sbin/{parent}")
    proc.qemu(100, "-name", "web1", ppid=50, cgroup=cgroup)
    guest = next(g for g in scan_guests(str(proc.root)) if g.pid == 100)
    assert guest.libvirt_evidence == (evidence,)


def test_hand_started_guest_is_not_libvirts(proc):
    # The conventions libvirt shares with everyone are not evidence.
    proc.add(50, ["/bin/bash"], comm="bash", exe="/bin/bash")
    proc.qemu(100, "-name", "guest=web1,debug-threads=on", "-S", "-nodefaults", "-no-user-config",
              "-object", "secret,id=sec0,data=x", "-chardev", "socket,id=monitor0,path=/run/q.sock,server=on",
              "-mon", "chardev=monitor0,mode=control", ppid=50, cgroup="0::/system.slice/qemu-web1.service\n")
    guest = next(g for g in scan_guests(str(proc.root)) if g.pid == 100)
    assert guest.managed_by is None and guest.libvirt_evidence == ()


# --- lookups -------------------------------------------------------------------------

@pytest.fixture
def host(proc: FakeProc) -> list[ActiveGuest]:
    proc.qemu(100, "-name", "web1", "-uuid", UUID_A, "-qmp", "unix:/run/q/web1.sock,server=on")
    proc.qemu(200, "-name", "db1", "-uuid", UUID_B, "-qmp", "tcp:0.0.0.0:4444,server=on")
    proc.qemu(300, "-name", "web1", "-qmp", "unix:/run/q/web1-copy.sock,server=on")
    return scan_guests(str(proc.root))


def test_find_by_name_and_uuid(host, proc):
    assert [g.pid for g in find_guests(guests=host)] == [100, 200, 300]
    assert [g.pid for g in find_guests(name="web1", guests=host)] == [100, 300]
    assert [g.pid for g in find_guests(uuid=UUID_A.upper(), guests=host)] == [100]
    assert find_guests(name="db1", uuid=UUID_A, guests=host) == []
    assert guest_by_name("db1", guests=host).pid == 200
    assert guest_by_uuid(UUID_B, guests=host).pid == 200
    assert guest_by_name("nope", guests=host) is None
    # Without a list, the /proc root given is scanned.
    assert [g.pid for g in find_guests(name="db1", proc_root=str(proc.root))] == [200]


@pytest.mark.parametrize("endpoint, pid", [
    ("/run/q/web1.sock", 100),
    ("unix:/run/q/../q/web1.sock", 100),
    ("127.0.0.1:4444", 200),
    ("localhost:4444", 200),
    ("tcp:127.0.0.1:4445", None),
    ("/run/q/other.sock", None),
])
def test_find_by_endpoint(host, endpoint, pid):
    found = guest_by_endpoint(endpoint, guests=host)
    assert (found.pid if found else None) == pid


def test_identity_check(host):
    same = check_identity("db1", UUID_B, guests=host)
    assert (same.both.pid, same.name_only, same.uuid_only, same.conflict) == (200, None, None, False)

    swapped = check_identity("db1", UUID_A, guests=host)
    assert swapped.both is None
    assert (swapped.name_only.pid, swapped.uuid_only.pid, swapped.conflict) == (200, 100, True)
    assert swapped.describe_conflict() == (
        f"the name 'db1' is held by 'db1' (pid 200, uuid {UUID_B}); "
        f"the UUID {UUID_A} is held by 'web1' (pid 100, uuid {UUID_A})")

    free = check_identity("new", "11111111-2222-3333-4444-555555555555", guests=host)
    assert (free.both, free.name_only, free.uuid_only, free.conflict) == (None, None, None, False)

    name_taken = check_identity("web1", "11111111-2222-3333-4444-555555555555", guests=host)
    assert name_taken.name_only.pid == 100 and name_taken.conflict

    unknown_uuid = check_identity("db1", None, guests=host)
    assert unknown_uuid.both.pid == 200 and not unknown_uuid.conflict
    unknown_name = check_identity(None, UUID_B.upper(), guests=host)
    assert unknown_name.both.pid == 200 and unknown_name.uuid == UUID_B


# --- sizes ---------------------------------------------------------------------------

@pytest.mark.parametrize("size, mib", [
    ("128", 128), ("128M", 128), ("2G", 2048), ("2g", 2048), ("131072k", 128), ("1T", 1 << 20),
    ("1.5G", 1536), ("", None), ("lots", None),
])
def test_parse_memory(size, mib):
    assert parse_memory_mib(size) == mib


def test_memory_and_machine_from_argv(proc):
    proc.qemu(100, "-M", "q35,accel=kvm", "-m", "size=2G,slots=4,maxmem=8G")
    guest = only_guest(proc)
    assert (guest.machine_option, guest.memory_mib) == ("q35", 2048)
    proc.qemu(101, "-machine", "type=pc")
    assert read_guest(101, str(proc.root)).machine_option == "pc"


# --- probing the live state ---------------------------------------------------------------

@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ssq-u"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _guest(endpoint: Endpoint | None, **overrides) -> ActiveGuest:
    # The fake monitor runs in this process, so this process is the guest that serves it.
    fields = dict(pid=os.getpid(), argv=(QEMU, "-m", "256", "-machine", "pc"), exe=QEMU, name="web1", uuid=UUID_A,
                  qmp=(endpoint,) if endpoint else (), pidfile=None, managed_by=None, libvirt_evidence=(),
                  uid=0, gid=0, groups=())
    fields.update(overrides)
    return ActiveGuest(**fields)


def test_probe_reads_state_machine_and_memory(sock_dir):
    with FakeQMPServer(sock_dir / "qmp.sock") as server:
        server.reply("query-status", {"status": "paused", "running": False})
        server.reply("qom-get", "pc-i440fx-10.0-machine")
        server.reply("query-memory-size-summary", {"base-memory": 256 << 20})
        guest = _guest(unix_endpoint(server.address))
        probe = probe_guest(guest, timeout=2, trace=True)

    assert (probe.state, probe.state_reason, probe.machine, probe.memory_mib) == ("paused", None, "pc-i440fx-10.0", 256)
    assert server.commands() == ["qmp_capabilities", "query-status", "qom-get", "query-memory-size-summary"]
    assert [e["kind"] for e in probe.trace][:2] == ["greeting", "command"]
    report = guest_report(guest, probe)
    assert report == {"name": "web1", "uuid": UUID_A, "pid": os.getpid(), "state": "paused", "state_reason": None,
                      "qmp": server.address, "managed_by": "none", "machine": "pc-i440fx-10.0",
                      "memory_mib": 256, "disks": [], "argv": [QEMU, "-m", "256", "-machine", "pc"],
                      "cwd": None, "exe": QEMU, "uid": 0, "gid": 0, "groups": [],
                      "argv_base64": None, "cwd_base64": None, "unit": None}


def test_probe_keeps_the_state_when_a_detail_is_missing(sock_dir):
    with FakeQMPServer(sock_dir / "qmp.sock") as server:
        server.reply("query-status", {"status": "running", "running": True})
        guest = _guest(unix_endpoint(server.address))
        probe = probe_guest(guest, timeout=2)

    assert (probe.state, probe.machine, probe.memory_mib) == ("running", None, None)
    report = guest_report(guest, probe)
    assert (report["machine"], report["memory_mib"]) == ("pc", 256)  # from the command line instead


def test_probe_of_a_busy_monitor_is_quick_and_explained(sock_dir):
    with FakeQMPServer(sock_dir / "qmp.sock", greet=False) as server:
        probe = probe_guest(_guest(unix_endpoint(server.address)), timeout=0.3)
    assert probe.state == "unknown" and "is busy" in probe.state_reason


def test_probe_of_a_dead_monitor(sock_dir):
    probe = probe_guest(_guest(unix_endpoint(str(sock_dir / "gone.sock"))), timeout=0.3)
    assert probe.state == "unknown" and "There is no QMP socket" in probe.state_reason


def test_probe_leaves_libvirt_guests_alone(sock_dir):
    with FakeQMPServer(sock_dir / "qmp.sock") as server:
        guest = _guest(unix_endpoint(server.address), managed_by="libvirt",
                       libvirt_evidence=("libvirt's masterKey0 secret object",))
        probe = probe_guest(guest, timeout=1)
    assert server.calls == [] and server.sessions == []
    assert probe.state == "unknown"
    assert "libvirt manages this guest" in probe.state_reason and "virsh domstate web1" in probe.state_reason
    assert guest_report(guest, probe)["managed_by"] == "libvirt"


def test_probe_without_a_monitor():
    guest = _guest(None, unresolved_monitors=("-qmp stdio is not a socket (stdio, pty, ...)",))
    probe = probe_guest(guest)
    assert probe.state == "unknown"
    assert "no QMP monitor" in probe.state_reason and "-qmp stdio" in probe.state_reason
    assert guest_report(guest, probe)["qmp"] is None


# --- trust, bounds, hostile processes ----------------------------------------------------

def test_a_process_is_a_guest_only_if_it_runs_a_trusted_emulator(proc, tmp_path):
    user_copy = tmp_path / "qemu-system-x86_64"
    user_copy.write_bytes(b"")
    user_copy.chmod(0o755)
    proc.qemu(100, "-name", "real", uid=107, gid=107, groups=(36, 107))
    proc.add(101, ["qemu-system-x86_64", "-name", "real"], exe="/usr/bin/sleep")          # exec -a disguise
    proc.add(102, [str(user_copy), "-name", "copy"], exe=str(user_copy))                # a copy in /tmp
    proc.add(103, ["/usr/bin/python3", "-name", "real"], exe="/usr/bin/python3")         # does not even claim
    scan = scan_host(str(proc.root))
    assert [(g.pid, g.uid, g.gid, g.groups) for g in scan.guests] == [(100, 107, 107, (36, 107))]
    ignored = {i.pid: i for i in scan.ignored}
    assert sorted(ignored) == [101, 102]
    assert ignored[101].program == "qemu-system-x86_64"
    assert ignored[101].reason.startswith("its executable /usr/bin/sleep is not a trusted emulator")
    assert "writable by group or others" in ignored[102].reason
    assert [g.pid for g in find_guests(name="real", proc_root=str(proc.root))] == [100]
    assert check_identity("real", None, proc_root=str(proc.root)).both.pid == 100


def test_hostile_fields_are_bounded(proc):
    proc.qemu(100, "-name", "ports", "-qmp", "tcp:127.0.0.1:" + "9" * 5000 + ",server=on",
              "-qmp", "tcp:127.0.0.1:0,server=on", "-qmp", "tcp:127.0.0.1:65536,server=on",
              "-qmp", "tcp:127.0.0.1:¹,server=on", "-chardev", "socket,id=m,port=70000,server=on",
              "-mon", "chardev=m,mode=control", "-m", "inf")
    proc.qemu(101, "-name", "nan", "-m", "nan")
    proc.qemu(102, "-name", "huge", "-m", "9" * 400 + "T")
    proc.qemu(103, "-name", "bad-uuid", "-uuid", "/home/u/k")
    proc.qemu(104, "-name", "x" * 5000)
    proc.qemu(105, "-name", "braces", "-uuid", "{" + UUID_A + "}")
    proc.qemu(106, "-name", "fine", "-uuid", UUID_A.upper(), "-m", "1G")
    scan = scan_host(str(proc.root))
    guests = {g.name: g for g in scan.guests}
    assert sorted(guests) == ["fine", "huge", "nan", "ports"]
    assert guests["ports"].qmp == () and len(guests["ports"].unresolved_monitors) == 5
    assert all("no port from 1 to 65535" in note and len(note) < 200 for note in guests["ports"].unresolved_monitors)
    assert [guests[n].memory_mib for n in ("ports", "nan", "huge", "fine")] == [None, None, None, 1024]
    assert guests["fine"].uuid == UUID_A
    reasons = {i.pid: i.reason for i in scan.ignored}
    assert reasons[103] == "invalid -uuid '/home/u/k'"
    assert reasons[104] == "its -name is longer than 1024 characters"
    assert reasons[105].startswith("invalid -uuid")
    # A UUID that is not one matches nothing (it is not "no filter").
    assert find_guests(uuid="/home/u/k", proc_root=str(proc.root)) == []
    report = guest_report(guests["ports"], probe_guest(guests["ports"]))
    assert report["memory_mib"] is None and report["state"] == "unknown"


@pytest.mark.parametrize("memory", ["-1", "1e400", "-inf", "1" * 40, "0x10", ""])
def test_memory_sizes_qemu_would_refuse(memory):
    assert parse_memory_mib(memory) is None


def test_unreadable_details_of_one_process_do_not_end_the_scan(proc):
    proc.qemu(100, "-name", "first")
    hostile = proc.qemu(101, "-name", "hostile")
    (hostile / "status").write_text("Uid:\t0\nGid:\t0\n")
    proc.qemu(102, "-name", "last")
    # A cgroup file that cannot be decoded as a str stands in for "any bug we did not foresee".
    (hostile / "cgroup").unlink()
    (hostile / "cgroup").symlink_to(hostile / "cgroup")  # ELOOP: an OSError the reader treats as empty
    assert [g.name for g in scan_guests(str(proc.root))] == ["first", "hostile", "last"]


def test_an_unexpected_error_skips_only_that_process(proc, monkeypatch):
    import ansible_collections.savestate.qemu.plugins.module_utils._host as host

    proc.qemu(100, "-name", "first")
    proc.qemu(101, "-name", "boom")
    proc.qemu(102, "-name", "last")
    real = host.libvirt_evidence

    def fragile(argv, parent_comm, cgroup):  # stands in for a parser bug a hostile argv could trigger
        if "boom" in argv:
            raise OverflowError("cannot convert float infinity to integer")
        return real(argv, parent_comm, cgroup)

    monkeypatch.setattr(host, "libvirt_evidence", fragile)
    scan = scan_host(str(proc.root))
    assert [g.name for g in scan.guests] == ["first", "last"]
    assert [(i.pid, i.reason) for i in scan.ignored] == [
        (101, "reading it failed unexpectedly (OverflowError: cannot convert float infinity to integer)")]


def test_non_utf8_bytes_round_trip_through_the_report(proc):
    directory = proc.add(100, [QEMU, "-name", "web1"], cwd="/")
    (directory / "cmdline").write_bytes(b"/usr/bin/qemu-system-x86_64\0-name\0web\xff\0")
    (directory / "cwd").unlink()
    (directory / "cwd").symlink_to(os.fsdecode(b"/srv/vm\xfe"))
    guest = only_guest(proc)
    assert guest.name == os.fsdecode(b"web\xff") and guest.cwd == os.fsdecode(b"/srv/vm\xfe")
    report = guest_report(guest, probe_guest(guest))
    import base64
    import json
    json.dumps(report).encode("utf-8")  # nothing Ansible would refuse
    assert report["name"] == "web\\xff" and report["cwd"] == "/srv/vm\\xfe"
    assert [base64.b64decode(arg) for arg in report["argv_base64"]] == [b"/usr/bin/qemu-system-x86_64", b"-name", b"web\xff"]
    assert base64.b64decode(report["cwd_base64"]) == b"/srv/vm\xfe"


def test_the_guest_serving_a_socket_is_the_one_holding_the_listener(proc, sock_dir):
    import socket

    from ansible_collections.savestate.qemu.plugins.module_utils._errors import PreconditionError
    from ansible_collections.savestate.qemu.plugins.module_utils._host import guest_serving

    path = str(sock_dir / "qmp.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    inode = os.fstat(listener.fileno()).st_ino
    try:
        # The impostor (lower pid) names the socket; the owner holds it.
        proc.qemu(100, "-name", "impostor", "-qmp", f"unix:{path},server=on")
        proc.qemu(200, "-name", "owner", "-qmp", "unix:/elsewhere.sock,server=on", fds={5: f"socket:[{inode}]"})
        assert guest_by_endpoint(path, proc_root=str(proc.root)).pid == 100  # what a command line says
        assert guest_serving(path, proc_root=str(proc.root)).pid == 200     # who holds the socket
        # The listener held by a process that is not a guest: refused, both named.
        (proc.root / "200" / "exe").unlink()
        (proc.root / "200" / "exe").symlink_to("/usr/bin/sleep")
        with pytest.raises(PreconditionError) as refused:
            guest_serving(path, proc_root=str(proc.root))
        assert "served by pid 200" in str(refused.value) and "(pid 100" in str(refused.value)
        assert guest_serving(str(sock_dir / "nothing.sock"), proc_root=str(proc.root)) is None
    finally:
        listener.close()
