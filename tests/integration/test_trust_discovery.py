"""What a guest is, and who is on the other end of its socket, against an unprivileged attacker.

Each test runs the attacker as ``nobody`` (``setpriv --reuid=nobody``) against the
real modules through Ansible and asserts the EFFECT is blocked: the impostor is
not a guest, nothing is written for it, its socket gets no command, and a
hostile command line does not break discovery for the real guest next to it.

Impostors need not boot: the real QEMU binary "held" before it binds its monitor
(an earlier ``-chardev socket,...,server=on,wait=on`` makes it wait for a client
that never comes) is a live process running the trusted emulator, and
``exec -a qemu-system-x86_64 python3`` is a process that merely claims to be QEMU.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.guest import GuestSpec
from harness.processes import kill_and_wait
from integration.ansible_runner import run_module
from integration.common import failed, ok, save

pytestmark = pytest.mark.integration

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
SYSTEM_QEMU = "/usr/bin/qemu-system-x86_64"
FAKE_QMP = r"""
import json, os, socket, sys
path, log = sys.argv[1], sys.argv[2]
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
listener.listen(8)
print("ready", flush=True)
def serve(conn):
    conn.sendall(b'{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": ""}, "capabilities": []}}\n')
    decoder, pending = json.JSONDecoder(), ""
    while True:
        data = conn.recv(65536)
        if not data:
            return
        with open(log, "ab") as handle:
            handle.write(data)
        pending += data.decode(errors="replace")
        while pending.strip():  # clients send one JSON object after another, not lines
            try:
                request, end = decoder.raw_decode(pending.lstrip())
            except ValueError:
                break
            pending = pending.lstrip()[end:]
            reply = {"return": {}}  # "{}" to everything
            if isinstance(request, dict) and "id" in request:
                reply["id"] = request["id"]
            conn.sendall(json.dumps(reply).encode() + b"\n")
while True:
    conn, _ = listener.accept()
    try:
        serve(conn)
    except OSError:
        pass  # the client hung up on us
    conn.close()
"""


class Attacker:
    """Processes run as nobody, in a directory nobody may write; all killed at the end."""

    def __init__(self, workdir: Path) -> None:
        workdir.chmod(0o755)  # let nobody reach its own directory inside the test's
        self.dir = workdir / "nobody"
        self.dir.mkdir()
        self.dir.chmod(0o777)
        self.processes: list[subprocess.Popen] = []

    def run(self, argv: list[str | bytes], cwd: Path | bytes | None = None, wait_for: Path | None = None,
            ready_line: bool = False) -> subprocess.Popen:
        process = subprocess.Popen(NOBODY + argv, cwd=cwd or self.dir, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE if ready_line else subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(process)
        if ready_line:
            assert process.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 10
        while wait_for is not None and not wait_for.exists():
            assert process.poll() is None and time.monotonic() < deadline, f"{argv} did not start"
            time.sleep(0.02)
        return process

    def held_qemu(self, *args: str | bytes, binary: str = SYSTEM_QEMU, cwd: Path | bytes | None = None,
                  tag: str = "hold") -> subprocess.Popen:
        """The real QEMU as nobody, waiting before it binds anything after ``hold``."""
        hold = self.dir / f"{tag}.sock"
        return self.run([binary, "-chardev", f"socket,id=hold,path={hold},server=on,wait=on",
                         "-display", "none", *args], cwd=cwd, wait_for=hold)

    def disguised(self, *args: str) -> subprocess.Popen:
        """Not QEMU at all: python3 calling itself qemu-system-x86_64, with QEMU-looking arguments."""
        return self.run(["bash", "-c", 'exec -a qemu-system-x86_64 /usr/bin/python3 -c "import time; time.sleep(120)" "$@"',
                         "attacker", *args])

    def fake_qmp(self, path: Path) -> tuple[subprocess.Popen, Path]:
        """A QMP server that answers ``{}`` to every command and logs what it received."""
        script, log = self.dir / "fake_qmp.py", self.dir / f"{path.name}.log"
        script.write_text(FAKE_QMP)
        log.touch()
        log.chmod(0o666)
        return self.run(["/usr/bin/python3", str(script), str(path), str(log)], ready_line=True), log

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                kill_and_wait(process.pid)
            process.wait()


@pytest.fixture
def attacker(workdir: Path, no_leaked_qemu: None) -> Iterator[Attacker]:
    found = Attacker(workdir)
    yield found
    found.stop()


def _guest_info(**args) -> dict:
    result = run_module("guest_info", {"timeout": 3, **args})
    assert not result["failed"], f"{result.get('msg')}\n{result['_stdout'][-3000:]}"
    assert "Traceback" not in result["_stdout"] + result["_stderr"]
    return result


def _ignored(result: dict, pid: int) -> dict:
    matches = [entry for entry in result.get("ignored", []) if entry["pid"] == pid]
    assert len(matches) == 1, f"pid {pid} is not listed as ignored: {result.get('ignored')}"
    return matches[0]


def _listed(result: dict, pid: int) -> dict | None:
    return next((entry for entry in result["guests"] if entry["pid"] == pid), None)


def _no_guest_saved(name: str, path: Path, attacker: Attacker) -> None:
    result = save(path=path, name=name)
    failed(result, "no active QEMU guest matches")
    assert not path.exists() and not list(path.parent.glob(f"{path.name}*"))
    assert not list(attacker.dir.glob("*.lock")), "root created a file in the attacker's directory"


# --- (a) a process that only claims to be QEMU -------------------------------------------

def test_a_disguised_process_is_not_a_guest(attacker, workdir):
    name = f"td-disguised-{uuidlib.uuid4().hex[:8]}"
    impostor = attacker.disguised("-name", name, "-uuid", str(uuidlib.uuid4()),
                                  "-qmp", f"unix:{attacker.dir}/q.sock,server=on")
    key = attacker.disguised("-name", f"{name}-k", "-uuid", f"{attacker.dir}/k")
    time.sleep(0.3)

    result = _guest_info()
    assert _listed(result, impostor.pid) is None and _listed(result, key.pid) is None
    reason = _ignored(result, impostor.pid)["reason"]
    assert _ignored(result, impostor.pid)["program"] == "qemu-system-x86_64"
    assert "is not a trusted emulator" in reason and "python3" in reason
    assert _guest_info(name=name)["guests"] == []

    _no_guest_saved(name, workdir / "disguised.img", attacker)
    _no_guest_saved(f"{name}-k", workdir / "k.img", attacker)
    assert not (attacker.dir / "k.lock").exists()


# --- (b) a copy of QEMU the attacker owns ---------------------------------------------------

def test_a_copy_of_qemu_owned_by_nobody_is_not_trusted(attacker, workdir):
    copy = attacker.dir / "qemu-system-x86_64"
    shutil.copy2(SYSTEM_QEMU, copy)
    os.chown(copy, 65534, 65534)
    name = f"td-copy-{uuidlib.uuid4().hex[:8]}"
    held = attacker.held_qemu("-name", name, binary=str(copy))

    result = _guest_info()
    assert _listed(result, held.pid) is None
    reason = _ignored(result, held.pid)["reason"]
    assert f"its executable {copy} is not a trusted emulator" in reason
    assert "owned by uid 65534" in reason or "writable by group or others" in reason
    _no_guest_saved(name, workdir / "copy.img", attacker)


# --- (c) hostile command lines next to a real guest -----------------------------------------

def test_hostile_command_lines_do_not_break_discovery_or_save(qemu, attacker, guest_factory, workdir):
    huge_port = attacker.held_qemu("-name", "td-huge-port", "-qmp", "tcp:127.0.0.1:" + "9" * 5000 + ",server=on")
    infinite = attacker.disguised("-name", "td-inf", "-m", "inf", "-qmp", "tcp:127.0.0.1:" + "7" * 5000 + ",server=on")
    guest = guest_factory(GuestSpec(name=f"td-real-{qemu.name}", qemu=qemu))

    result = _guest_info()
    real = _listed(result, guest.pid)
    assert real is not None and real["state"] == "running" and real["uid"] == 0
    held = _listed(result, huge_port.pid)  # the real binary: a guest (of nobody), without a usable monitor
    assert held is not None and held["uid"] == 65534 and held["qmp"] is None and held["state"] == "unknown"
    assert _ignored(result, infinite.pid)
    assert _listed(_guest_info(name="td-inf"), infinite.pid) is None

    path, pid = workdir / "real.img", guest.pid
    outcome = ok(save(guest, path))
    assert outcome["guest"]["pid"] == pid and path.exists()


# --- (d) a QMP peer that answers {} -----------------------------------------------------------

def test_a_fake_monitor_answering_empty_objects_is_refused_not_a_crash(attacker):
    sock = attacker.dir / "fake.sock"
    fake, log = attacker.fake_qmp(sock)
    # A genuine QEMU of nobody's whose command line names the socket nobody's fake server holds.
    held = attacker.held_qemu("-name", "td-fake-peer", "-qmp", f"unix:{sock},server=on,wait=off")

    result = _guest_info(name="td-fake-peer")
    entry = _listed(result, held.pid)
    assert entry is not None and entry["state"] == "unknown"
    assert f"served by pid {fake.pid} (python3, uid 65534)" in entry["state_reason"]
    assert fake.poll() is None
    assert f"not by the guest's QEMU pid {held.pid}" in entry["state_reason"]
    assert log.read_bytes() == b"", "the impostor received a command"


# --- (e) the guest is whoever OWNS the socket --------------------------------------------------

def test_save_by_socket_picks_the_owner_not_a_lower_pid_naming_it(qemu, attacker, guest_factory, workdir):
    name = f"td-owner-{qemu.name}"
    socket_path = workdir / name / "qmp.sock"  # where the harness puts this guest's monitor
    impostor = attacker.held_qemu("-name", "td-impostor", "-qmp", f"unix:{socket_path},server=on,wait=off")
    guest = guest_factory(GuestSpec(name=name, qemu=qemu))
    assert impostor.pid < guest.pid and guest.qmp_address == str(socket_path)

    path, pid = workdir / "owner.img", guest.pid
    result = ok(save(path=path, socket=str(socket_path)))
    assert result["guest"]["pid"] == pid
    metadata = ok(run_module("save_image_info", {"path": str(path)}))["metadata"]
    assert metadata["argv"] == guest.argv and "td-impostor" not in metadata["argv"]


def test_an_impostor_listening_on_the_guests_socket_is_refused(qemu, attacker, guest_factory, workdir):
    name = f"td-squat-{qemu.name}"
    guest = guest_factory(GuestSpec(name=name, qemu=qemu))
    socket_path = Path(guest.qmp_address)
    # The guest's socket file is removed (its directory was writable) and nobody binds the path.
    socket_path.parent.chmod(0o777)
    socket_path.unlink()
    fake, log = attacker.fake_qmp(socket_path)

    path = workdir / "squat.img"
    by_name = save(guest, path)
    failed(by_name, f"served by pid {fake.pid}", f"not by the guest's QEMU pid {guest.pid}", "refusing")
    by_socket = save(path=path, socket=str(socket_path))
    failed(by_socket, f"served by pid {fake.pid}", f"(pid {guest.pid}", "not a trusted QEMU guest")
    assert not path.exists() and log.read_bytes() == b"", "the impostor received a command (or an fd)"
    assert guest.is_alive()


# --- (f) bytes that are not UTF-8 ----------------------------------------------------------------

def test_non_utf8_cwd_and_argv_round_trip(attacker):
    cwd = os.fsencode(attacker.dir) + b"/vm\xff"
    os.mkdir(cwd)
    os.chmod(cwd, 0o777)
    name = b"td-bytes-\xfe"
    held = attacker.held_qemu(b"-name", name, cwd=cwd, tag="bytes")

    result = _guest_info()
    entry = _listed(result, held.pid)
    assert entry is not None
    assert entry["name"] == "td-bytes-\\xfe" and entry["cwd"] == os.fsdecode(cwd).encode(
        "utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    assert base64.b64decode(entry["cwd_base64"]) == cwd
    raw = [base64.b64decode(arg) for arg in entry["argv_base64"]]
    assert raw[0] == SYSTEM_QEMU.encode() and name in raw
    assert raw == open(f"/proc/{held.pid}/cmdline", "rb").read().split(b"\0")[:-1]
