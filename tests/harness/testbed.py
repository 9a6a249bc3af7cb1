"""The multi-host test bed: N Debian 12 hypervisors (hv1..hvN) on the build machine.

Each host is a systemd-nspawn container booted from the cached root file system of
:mod:`harness.systemd_host`, on an overlay of its own, so it has

- its own PID namespace and ``/proc``, its own mount namespace (``/var/lib``, ``/run``,
  image directories live in its overlay's upper directory), its own hostname and machine-id;
- its own network namespace with one interface (``host0``) on a bridge of the build
  machine, ``<name>br0`` (``svqbr0``: 10.213.7.1/24, used only inside this machine);
  hvN has 10.213.7.(10+N), set by a unit inside the host;
- its own sshd (its own host key, listed in a generated known_hosts file), the
  unprivileged ``tester`` with key authentication and passwordless sudo.

The controller (this machine) reaches the hosts directly at their addresses, and the
hosts reach each other (their ``/etc/hosts`` and ``/etc/ssh/ssh_known_hosts`` list the
whole fleet). Ansible runs against an ordinary YAML inventory with the collection
installed from its built tarball (:func:`installed_collection`).

Everything of a fleet is named after its ``name`` (``svq``): the machines ``svq-hv1``...,
their cgroups ``svq-hv1-<pid of the launcher>``, the bridge, the veths ``vb-svq-hv1``,
and it lives in one directory (``/var/tmp/savestate-testbed``). :func:`reap` finds all
of it by those names, without any state file, so :func:`up` first removes whatever a
killed run left, and :func:`down` leaves nothing behind.

CLI (from ``tests/``, as root)::

    python3 -m harness.testbed up [N] [--inventory PATH]   # boot hv1..hvN, write the inventory
    python3 -m harness.testbed down                        # tear everything down
    python3 -m harness.testbed shell hv2 [--user tester]   # SSH into a host
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import heartbeat
from harness.paths import PROJECT_ROOT, VENV_DIR, scratch_copy
from harness.systemd_host import (GUEST_ASSETS_IN_HOST, KEYS_IN_HOST, QEMU72_IN_HOST, TEST_USER, VENV_IN_HOST,
                                  HostUnavailable, SystemdHost, cgroup_pids, cgroup_roots, kill_cgroup,
                                  unavailable_reason)

DEFAULT_NAME = "svq"
DEFAULT_SUBNET = "10.213.7"
DEFAULT_BASE = Path(os.environ.get("SAVESTATE_TESTBED_DIR", "/var/tmp/savestate-testbed"))
GUESTS_DIR = "/var/lib/qemu-guests"
QMP_DIR = "/run/qemu-guests"
NET_UNIT = "savestate-testbed-net.service"
# The hosts' QEMU 10.0 (bookworm-backports) and Debian 12's 7.2 (bound in at /opt/qemu-7.2).
QEMUS = {"10.0": ["/usr/bin/qemu-system-x86_64"],
         "7.2": [f"{QEMU72_IN_HOST}/usr/bin/qemu-system-x86_64", "-L", f"{QEMU72_IN_HOST}/usr/share/qemu"]}
BOOT_TIMEOUT = 120.0
ANSIBLE_PLAYBOOK = VENV_DIR / "bin" / "ansible-playbook"
ANSIBLE = VENV_DIR / "bin" / "ansible"
ANSIBLE_GALAXY = VENV_DIR / "bin" / "ansible-galaxy"
RESULT_CALLBACK_DIR = PROJECT_ROOT / "tests" / "integration" / "callback_plugins"


class TestbedError(RuntimeError):
    """The test bed cannot be brought up or used (the message says why and what to do)."""

    __test__ = False  # not a pytest test class


@dataclass(frozen=True)
class TestbedConfig:
    """Names and addresses of one fleet; the default is the one the tests use."""

    __test__ = False  # not a pytest test class

    name: str = DEFAULT_NAME
    subnet: str = DEFAULT_SUBNET  # the first three octets of a /24
    base_dir: Path = DEFAULT_BASE

    @classmethod
    def for_worker(cls, worker: str | None = None) -> TestbedConfig:
        """A fleet per pytest-xdist worker (``gw0`` gets the default one, ``gwN`` ``svqN`` on
        10.213.(7+N).0/24), so that parallel workers never share hosts, bridge or directory."""
        worker = worker if worker is not None else os.environ.get("PYTEST_XDIST_WORKER", "gw0")
        index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
        if index == 0:
            return cls()
        name = f"{DEFAULT_NAME}{index}"
        return cls(name, f"10.213.{7 + index}", DEFAULT_BASE.with_name(f"{DEFAULT_BASE.name}-{name}"))

    @property
    def bridge(self) -> str:
        return f"{self.name}br0"

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    def address(self, index: int) -> str:
        return f"{self.subnet}.{10 + index}"

    def machine(self, host: str) -> str:
        return f"{self.name}-{host}"

    @property
    def key(self) -> Path:
        return self.base_dir / "controller" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.base_dir / "controller" / "known_hosts"

    @property
    def control_path_dir(self) -> Path:
        return self.base_dir / "controller" / "cp"

    @property
    def default_inventory(self) -> Path:
        return self.base_dir / "inventory.yml"


# -- the hosts --------------------------------------------------------------------------------


class TestbedHost(SystemdHost):
    """One hypervisor of the fleet: an nspawn container on the fleet's bridge."""

    __test__ = False  # not a pytest test class

    def __init__(self, config: TestbedConfig, index: int, fleet_hosts: dict[str, str]) -> None:
        self.config = config
        self.index = index
        self.name = f"hv{index}"
        self.address = config.address(index)
        self.fleet_hosts = fleet_hosts  # name -> address, for /etc/hosts
        workdir = config.base_dir / self.name
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir, machine=config.machine(self.name), key=config.key, bind_collection=False)
        self.host_key = workdir / "hostkey" / "ssh_host_ed25519_key"
        if not self.host_key.exists():
            self.host_key.parent.mkdir(exist_ok=True)
            _quiet(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{self.name}", "-f", str(self.host_key)])

    def __repr__(self) -> str:
        return f"TestbedHost({self.name}, {self.address}, leader={self.leader})"

    def known_hosts_line(self) -> str:
        kind, key = self.host_key.with_name(self.host_key.name + ".pub").read_text().split()[:2]
        return f"{self.name},{self.address} {kind} {key}\n"

    # -- SystemdHost hooks --------------------------------------------------------------

    def network_args(self) -> list[str]:
        return [f"--network-bridge={self.config.bridge}", f"--hostname={self.name}"]

    def prepare_overlay(self) -> None:
        """Per-host identity, written into the overlay's upper directory before the boot."""
        root = self.merged
        (root / "etc/hostname").write_text(self.name + "\n")
        (root / "etc/machine-id").unlink(missing_ok=True)
        (root / "etc/machine-id").write_text(uuidlib.uuid4().hex + "\n")
        hosts = "".join(f"{address} {name}\n" for name, address in self.fleet_hosts.items())
        (root / "etc/hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{hosts}")
        self._prepare_sshd(root)
        self._prepare_network(root)

    def _prepare_sshd(self, root: Path) -> None:
        # Listens on every address (host0's comes up during the boot); its own host key only;
        # keys in ~/.ssh/authorized_keys work as on any host, the controller's key comes bound in.
        (root / "etc/ssh/sshd_config.d/savestate.conf").write_text(
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "UseDNS no\nHostKey /etc/ssh/ssh_host_ed25519_key\n"
            f"AuthorizedKeysFile .ssh/authorized_keys {KEYS_IN_HOST}/authorized_keys\n")
        for suffix in ("", ".pub"):
            target = root / f"etc/ssh/ssh_host_ed25519_key{suffix}"
            target.unlink(missing_ok=True)
            shutil.copyfile(self.host_key.with_name(self.host_key.name + suffix), target)
            target.chmod(0o600 if not suffix else 0o644)
        shutil.copyfile(self.config.known_hosts, root / "etc/ssh/ssh_known_hosts")
        (root / "etc/ssh/ssh_known_hosts").chmod(0o644)

    def _prepare_network(self, root: Path) -> None:
        unit = root / "etc/systemd/system" / NET_UNIT
        unit.write_text(
            "[Unit]\nDescription=savestate test bed: this host's address on the private network\n"
            "DefaultDependencies=no\nBefore=network.target ssh.service\nWants=network.target\n"
            "[Service]\nType=oneshot\nRemainAfterExit=yes\n"
            "ExecStart=/sbin/ip link set host0 up\n"
            f"ExecStart=/sbin/ip address replace {self.address}/24 dev host0\n"
            "[Install]\nWantedBy=multi-user.target\n")
        wants = root / "etc/systemd/system/multi-user.target.wants" / NET_UNIT
        wants.unlink(missing_ok=True)
        wants.symlink_to(f"/etc/systemd/system/{NET_UNIT}")

    def ssh_options(self) -> list[str]:
        return ["-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={self.config.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=10"]

    def ssh_argv(self, user: str = "root") -> list[str]:
        return ["ssh", "-F", "/dev/null", *self.ssh_options(), "-l", user, self.address]

    # -- guests -------------------------------------------------------------------------

    def start_guest(self, name: str, **options: Any) -> TestbedGuest:
        """Start a test guest in this host (see :class:`GuestOptions` for the options)."""
        guest = TestbedGuest(self, name, GuestOptions(**options))
        guest.start()
        return guest

    def memory_pss_mib(self) -> float:
        """Proportional set size of every process of the host (its guests included), in MiB."""
        total = 0
        for pid in cgroup_pids(self._cgroup_dirs()[0]) if self._cgroup_dirs() else []:
            with contextlib.suppress(OSError, StopIteration):
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                total += int(next(line.split()[1] for line in rollup if line.startswith("Pss:")))
        return total / 1024

    def path(self, inside: str) -> Path:
        """A path inside the host, as the controller sees it (through the host's overlay)."""
        return self.merged / inside.lstrip("/")


def _quiet(argv: Sequence[str]) -> None:
    subprocess.run(list(argv), check=True, stdin=subprocess.DEVNULL, capture_output=True)


# -- guests -----------------------------------------------------------------------------------


@dataclass
class GuestOptions:
    """How to start a test guest inside a host.

    ``memory_mib`` defaults to 128, or ``fill_mib + 256``; ``fill_mib`` fills that much guest RAM
    with random data (a tmpfs, before the heartbeat starts; ~50 MiB/s under TCG); ``qmp`` is True (``/run/qemu-guests/NAME.qmp``),
    a path, or False (no monitor); ``unit`` starts the guest as a transient systemd service of
    that name (``systemd-run``) instead of by hand from a root SSH session; ``disk_mib`` adds
    a raw virtio disk in ``/var/lib/qemu-guests`` that the heartbeat is written to.
    """

    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    memory_mib: int | None = None
    fill_mib: int = 0
    qemu: str = "10.0"
    paused: bool = False
    qmp: bool | str = True
    unit: str | None = None
    disk_mib: int = 0
    machine: str = "pc"
    extra_args: tuple[str, ...] = ()
    ready_timeout: float | None = None

    @property
    def memory(self) -> int:
        # The filled tmpfs cannot be swapped or freed: with less than ~256 MiB besides it the guest
        # kernel runs out of memory and panics (measured: 896 of 1024 MiB panics, 1024 of 1280 runs).
        return self.memory_mib or (self.fill_mib + 256 if self.fill_mib else 128)


# QMP ``stop`` from inside the host (the monitor is a unix socket in the host's /run).
_PAUSE_SCRIPT = """
import json, socket, sys
monitor = socket.socket(socket.AF_UNIX)
monitor.connect(sys.argv[1])
stream = monitor.makefile("rw")
stream.readline()
for command in ("qmp_capabilities", "stop"):
    stream.write(json.dumps({"execute": command}) + "\\n")
    stream.flush()
    while "return" not in json.loads(stream.readline()):
        pass
"""


class TestbedGuest:
    """A test guest running inside one host; its serial log is read through the host's overlay."""

    __test__ = False  # not a pytest test class

    def __init__(self, host: TestbedHost, name: str, options: GuestOptions) -> None:
        if options.qemu not in QEMUS:
            raise TestbedError(f"qemu must be one of {sorted(QEMUS)}, not {options.qemu!r}")
        self.host = host
        self.name = name
        self.options = options
        self.uuid = options.uuid
        self.serial = f"{GUESTS_DIR}/{name}.serial"
        self.disk = f"{GUESTS_DIR}/{name}.raw" if options.disk_mib else None
        self.qmp: str | None = (options.qmp if isinstance(options.qmp, str)
                                else f"{QMP_DIR}/{name}.qmp" if options.qmp else None)

    def __repr__(self) -> str:
        return f"TestbedGuest({self.name} on {self.host.name})"

    def argv(self) -> list[str]:
        options = self.options
        kernel = ["console=ttyS0", "quiet", "panic=-1"]
        if options.fill_mib:
            kernel.append(f"fill={options.fill_mib}")
        argv = [*QEMUS[options.qemu], "-name", f"guest={self.name},debug-threads=on", "-uuid", self.uuid,
                "-machine", options.machine, "-accel", "tcg", "-m", str(options.memory),
                "-nodefaults", "-no-user-config", "-display", "none",
                "-kernel", f"{GUEST_ASSETS_IN_HOST}/vmlinuz", "-initrd", f"{GUEST_ASSETS_IN_HOST}/initramfs.cpio.gz",
                "-chardev", f"file,id=serial0,path={self.serial},append=on", "-serial", "chardev:serial0"]
        if self.disk:
            kernel.append("disk=1")
            argv += ["-drive", f"file={self.disk},format=raw,if=virtio,id=disk0"]
        argv += ["-append", " ".join(kernel)]
        if self.qmp:
            argv += ["-qmp", f"unix:{self.qmp},server=on,wait=off"]
        if options.paused:
            argv.append("-S")
        return argv + list(options.extra_args)

    def start(self) -> TestbedGuest:
        setup = f"mkdir -p {GUESTS_DIR} {QMP_DIR}"
        if self.disk:
            setup += f" && truncate -s {self.options.disk_mib}M {self.disk}"
        command = shlex.join(self.argv())
        if self.options.unit:
            launch = f"systemd-run --quiet --unit={shlex.quote(self.options.unit)} -- {command}"
        else:  # by hand, as an operator would: it stays in root's (abandoned) session scope
            log = shlex.quote(f"{GUESTS_DIR}/{self.name}.qemu.log")
            launch = f"{{ setsid nohup {command} >{log} 2>&1 </dev/null & }}"
        self.host.sh(f"{setup} && {launch}")
        self.wait_started()
        return self

    def wait_started(self) -> None:
        """Running: until the heartbeat has ticked twice; paused: until its QMP socket exists."""
        timeout = self.options.ready_timeout or 90.0 + self.options.fill_mib / 4
        deadline = time.monotonic() + timeout
        while True:
            if self.options.paused and (not self.qmp or self._qmp_listening()):
                return
            if not self.options.paused and self.last_tick() >= 2:
                return
            if self.serial_log.exists() and b"Kernel panic" in self.serial_log.read_bytes():
                raise TestbedError(f"guest {self.name} on {self.host.name} panicked (with fill_mib, give it"
                                   f" memory_mib >= fill_mib + 256): see {self.serial_log}")
            if time.monotonic() > deadline:
                raise TestbedError(f"guest {self.name} on {self.host.name} did not start within {timeout:g} s: "
                                   + self.host.ssh(f"tail -5 {GUESTS_DIR}/{self.name}.qemu.log").stdout)
            time.sleep(0.2)

    def pause(self) -> None:
        """Pause the running guest through its monitor, as an operator's ``stop`` would."""
        self.host.write("/root/pause.py", _PAUSE_SCRIPT)
        self.host.sh(f"{VENV_IN_HOST}/bin/python /root/pause.py {shlex.quote(str(self.qmp))}")

    def _qmp_listening(self) -> bool:
        # Asked inside the host: /run is the host's own tmpfs, not on the overlay the controller sees.
        return self.host.ssh(f"test -S {shlex.quote(str(self.qmp))}").returncode == 0

    def on(self, host: TestbedHost) -> TestbedGuest:
        """The same guest as seen on another host (after a move)."""
        return TestbedGuest(host, self.name, self.options)

    @property
    def serial_log(self) -> Path:
        return self.host.path(self.serial)

    def ticks(self) -> list[int]:
        return heartbeat.ticks(self.serial_log)

    def last_tick(self) -> int:
        return heartbeat.last_tick(self.serial_log)

    def wait_tick_above(self, value: int, timeout: float = 60.0) -> int:
        return heartbeat.wait_tick_above(self.serial_log, value, timeout, f"{self.name} on {self.host.name}")

    def assert_continued(self, saved_tick: int, timeout: float = 60.0) -> None:
        """The heartbeat on this host goes on from ``saved_tick`` without a reboot or a gap."""
        self.wait_tick_above(saved_tick + 2, timeout)
        ticks = self.ticks()
        tail = ticks[ticks.index(saved_tick):] if saved_tick in ticks else [saved_tick, *ticks]
        assert ticks.count(1) <= 1 and (saved_tick in ticks or 1 not in ticks), \
            f"{self.name} on {self.host.name} booted again instead of resuming"
        assert all(b == a + 1 for a, b in zip(tail, tail[1:])), \
            f"{self.name} on {self.host.name}: the heartbeat skipped or restarted after tick {saved_tick}"

    def pids(self) -> list[int]:
        """QEMU processes of this guest in its host (host pids, as the host sees them)."""
        out = self.host.ssh(f"pgrep -f -- {shlex.quote('guest=' + self.name + ',')}").stdout
        return [int(pid) for pid in out.split()]

    def stop(self) -> None:
        if self.options.unit:
            self.host.ssh(f"systemctl stop {shlex.quote(self.options.unit)}")
        self.host.ssh(f"pkill -KILL -f -- {shlex.quote('guest=' + self.name + ',')}")


# -- the collection, as users install it --------------------------------------------------------


@dataclass(frozen=True)
class InstalledCollection:
    tarball: Path
    path: Path               # .../ansible_collections/savestate/qemu
    env: dict[str, str]      # ANSIBLE_COLLECTIONS_PATH and friends: sees only the installed copy


@functools.cache
def installed_collection() -> InstalledCollection:
    """Build the working tree's tarball (``ansible-galaxy collection build``) and install it into
    a temporary collections path; cached for the process, removed when it exits."""
    root = Path(tempfile.mkdtemp(prefix="ssq-collection-"))
    atexit.register(shutil.rmtree, root, True)
    source, output, collections = root / "src", root / "dist", root / "collections"
    source.mkdir()
    scratch_copy(source)
    _checked([str(ANSIBLE_GALAXY), "collection", "build", "--output-path", str(output)], cwd=source)
    tarball = next(output.glob("savestate-qemu-*.tar.gz"))
    # The development venv links the working tree in as savestate.qemu: hide it.
    env = {"ANSIBLE_COLLECTIONS_PATH": str(collections), "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "false"}
    _checked([str(ANSIBLE_GALAXY), "collection", "install", "--force", "-p", str(collections), str(tarball)],
             cwd=root, env=env)
    return InstalledCollection(tarball, collections / "ansible_collections" / "savestate" / "qemu", env)


def _checked(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=600, check=False)
    if done.returncode != 0:
        raise TestbedError(f"{shlex.join(argv)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


# -- the fleet --------------------------------------------------------------------------------


@dataclass
class PlaybookRun:
    """What ``ansible-playbook`` did: exit code, screen output, and every task result as data."""

    returncode: int
    stdout: str
    stderr: str
    results: list[dict[str, Any]]

    def host_results(self, host: str) -> list[dict[str, Any]]:
        return [r for r in self.results if r.get("_host") == host]

    def check(self) -> PlaybookRun:
        if self.returncode != 0:
            raise AssertionError(f"ansible-playbook exited {self.returncode}:\n{self.stdout[-6000:]}\n{self.stderr[-3000:]}")
        return self


class Fleet:
    """The booted hosts, their inventory, and Ansible over SSH against them."""

    def __init__(self, config: TestbedConfig, hosts: list[TestbedHost], inventory: Path) -> None:
        self.config = config
        self.hosts = hosts
        self.inventory = inventory

    def __getitem__(self, name: str) -> TestbedHost:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def __iter__(self) -> Iterator[TestbedHost]:
        return iter(self.hosts)

    def ansible_env(self, result_file: Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for ansible commands: the tarball-installed collection, no colours."""
        env = {**os.environ, **installed_collection().env, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
               "ANSIBLE_RETRY_FILES_ENABLED": "0",
               "PATH": f"{VENV_DIR / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
        for variable in ("ANSIBLE_PYTHON_INTERPRETER", "ANSIBLE_STDOUT_CALLBACK", "ANSIBLE_INVENTORY"):
            env.pop(variable, None)  # the inventory says
        if result_file is not None:
            env.update({"ANSIBLE_CALLBACK_PLUGINS": str(RESULT_CALLBACK_DIR),
                        "ANSIBLE_CALLBACKS_ENABLED": "savestate_result_file", "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
                        "SAVESTATE_RESULT_FILE": str(result_file)})
        return {**env, **(extra or {})}

    def run_playbook(self, playbook: str | Path, extra_vars: dict[str, Any] | None = None, *,
                     limit: str | None = None, check: bool = False, forks: int | None = None,
                     timeout: float = 1800.0, env: dict[str, str] | None = None,
                     args: Sequence[str] = ()) -> PlaybookRun:
        """Run a playbook (a path, or YAML text) with real ``ansible-playbook`` over SSH."""
        with tempfile.TemporaryDirectory(prefix="ssq-play-") as scratch:
            path = Path(playbook) if isinstance(playbook, Path) or "\n" not in playbook else Path(scratch) / "play.yml"
            if not path.exists() and isinstance(playbook, str):
                path.write_text(playbook)
            result_file = Path(scratch) / "results.jsonl"
            argv = [str(ANSIBLE_PLAYBOOK), "-i", str(self.inventory), str(path.resolve())]
            if extra_vars:
                (Path(scratch) / "extra.json").write_text(json.dumps(extra_vars))
                argv += ["-e", f"@{Path(scratch) / 'extra.json'}"]
            argv += [*(["--limit", limit] if limit else []), *(["--check"] if check else []),
                     *(["--forks", str(forks)] if forks else []), *args]
            return self._run(argv, result_file, env, timeout, cwd=path.resolve().parent)

    def run_module(self, host: str, module: str, module_args: dict[str, Any] | None = None, *,
                   timeout: float = 600.0, env: dict[str, str] | None = None) -> dict[str, Any]:
        """One module on one host (``ansible HOST -m MODULE``), as tester with become; its result.

        A failing module is a result with ``failed: true``; ``_stdout``/``_stderr`` hold the screen."""
        name = module if "." in module else f"savestate.qemu.{module}"
        with tempfile.TemporaryDirectory(prefix="ssq-adhoc-") as scratch:
            result_file = Path(scratch) / "results.jsonl"
            argv = [str(ANSIBLE), host, "-i", str(self.inventory), "-m", name,
                    *(["-a", json.dumps(module_args)] if module_args else [])]
            run = self._run(argv, result_file, env, timeout, cwd=Path(scratch))
        results = run.host_results(host)
        if not results:
            raise TestbedError(f"ansible gave no result for {host}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        result = results[-1]
        result.setdefault("failed", result.get("_status") != "ok")
        result.setdefault("changed", False)
        return {**result, "_stdout": run.stdout, "_stderr": run.stderr}

    def _run(self, argv: list[str], result_file: Path, env: dict[str, str] | None, timeout: float,
             cwd: Path) -> PlaybookRun:
        try:
            done = subprocess.run(argv, cwd=cwd, env=self.ansible_env(result_file, env), capture_output=True,
                                  text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as exc:
            raise TestbedError(f"{shlex.join(argv)} did not finish within {timeout:g} s\n{exc.stdout!r}") from None
        results = []
        if result_file.exists():
            results = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        return PlaybookRun(done.returncode, done.stdout, done.stderr, results)

    def down(self) -> None:
        """Tear the fleet down (see :func:`down`) and collect its nspawn processes."""
        down(self.config)
        for host in self.hosts:
            if host.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    host.process.wait(10)
            host.process = None
            host.leader = None


def write_inventory(config: TestbedConfig, hosts: Sequence[TestbedHost], path: Path) -> Path:
    """An ordinary Ansible inventory (YAML): group ``hypervisors``, SSH as tester, become."""
    common = (f"-o UserKnownHostsFile={config.known_hosts} -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes")
    lines = ["# The savestate.qemu test bed (tests/harness/testbed.py); regenerated by every `up`.",
             "all:", "  children:", "    hypervisors:", "      hosts:"]
    for host in hosts:
        lines += [f"        {host.name}:", f"          ansible_host: {host.address}"]
    lines += ["      vars:",
              f"        ansible_user: {TEST_USER}",
              "        ansible_become: true",
              f"        ansible_ssh_private_key_file: {config.key}",
              f"        ansible_python_interpreter: {VENV_IN_HOST}/bin/python",
              f"        ansible_ssh_common_args: {json.dumps(common)}",
              f"        ansible_control_path_dir: {config.control_path_dir}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _prepare_controller(config: TestbedConfig) -> None:
    config.key.parent.mkdir(parents=True, exist_ok=True)
    config.control_path_dir.mkdir(exist_ok=True)
    os.chmod(config.base_dir, 0o755)
    if not config.key.exists():
        _quiet(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "savestate-testbed", "-f", str(config.key)])


def _ensure_bridge(config: TestbedConfig) -> None:
    if subprocess.run(["ip", "link", "show", config.bridge], capture_output=True, check=False).returncode != 0:
        _quiet(["ip", "link", "add", config.bridge, "type", "bridge"])
    _quiet(["ip", "address", "replace", f"{config.gateway}/24", "dev", config.bridge])
    _quiet(["ip", "link", "set", config.bridge, "up"])


def up(n: int = 3, inventory: Path | None = None, config: TestbedConfig | None = None) -> Fleet:
    """Boot hv1..hvN in parallel (reaping whatever an earlier run left) and write the inventory."""
    config = config or TestbedConfig()
    if not 1 <= n <= 200:
        raise TestbedError(f"the test bed has 1 to 200 hosts, not {n}")
    reason = unavailable_reason() or _missing_tool()
    if reason:
        raise TestbedError(f"the test bed cannot run here: {reason}")
    _refuse_if_owned_by_a_live_run(config)
    reap(config)
    _prepare_controller(config)
    _ensure_bridge(config)
    names = {f"hv{i}": config.address(i) for i in range(1, n + 1)}
    hosts = [TestbedHost(config, i, names) for i in range(1, n + 1)]
    config.known_hosts.write_text("".join(host.known_hosts_line() for host in hosts))
    try:
        with ThreadPoolExecutor(max_workers=n) as pool:
            for future in [pool.submit(host.boot, BOOT_TIMEOUT) for host in hosts]:
                future.result()
    except BaseException:
        reap(config)
        raise
    path = write_inventory(config, hosts, inventory or config.default_inventory)
    if path != config.default_inventory:
        write_inventory(config, hosts, config.default_inventory)
    _write_state(config, hosts, path)
    return Fleet(config, hosts, path)


def _write_state(config: TestbedConfig, hosts: Sequence[TestbedHost], inventory: Path) -> None:
    """For humans and `shell`: what is up (teardown does not need it)."""
    state = {"owner": os.getpid(), "inventory": str(inventory),
             "hosts": {h.name: {"address": h.address, "machine": h.machine, "leader": h.leader,
                                "cgroup": h.cgroup_name, "root": str(h.merged)} for h in hosts}}
    (config.base_dir / "state.json").write_text(json.dumps(state, indent=1) + "\n")


def _fleet_cgroups(config: TestbedConfig) -> list[Path]:
    pattern = re.compile(rf"^{re.escape(config.name)}-hv\d+-\d+$")
    return [d for root in cgroup_roots() for d in root.glob(f"{config.name}-hv*") if pattern.match(d.name)]


def _refuse_if_owned_by_a_live_run(config: TestbedConfig) -> None:
    for directory in _fleet_cgroups(config):
        owner = int(directory.name.rsplit("-", 1)[-1])
        if owner != os.getpid() and Path(f"/proc/{owner}").exists() and cgroup_pids(directory):
            raise TestbedError(f"a test bed {config.name!r} is up and owned by the running process {owner}; "
                               f"wait for it or run `python3 -m harness.testbed down`")


def reap(config: TestbedConfig | None = None, graceful: float = 0.0) -> None:
    """Remove every trace of a fleet, found by its names: containers (their cgroups), overlay
    mounts, nspawn's runtime leftovers, veths, the bridge, SSH masters and the directory."""
    config = config or TestbedConfig()
    cgroups = _fleet_cgroups(config)
    if graceful:
        _poweroff_all(cgroups, graceful)
    for directory in cgroups:
        kill_cgroup(directory)
    _stop_ssh_masters(config)
    _unmount_all(config)
    for leftover in Path("/run/systemd/nspawn/propagate").glob(f"{config.name}-hv*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for link in _links(config):
        subprocess.run(["ip", "link", "delete", link], capture_output=True, check=False)
    shutil.rmtree(config.base_dir, ignore_errors=True)


def _poweroff_all(cgroups: list[Path], timeout: float) -> None:
    """Ask every container's systemd to power off (as a host shuts down), wait for them together."""
    for directory in cgroups:
        for pid in cgroup_pids(directory):
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                nspid = next(line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:"))
                if len(nspid) > 1 and nspid[-1] == "1":
                    os.kill(pid, signal.SIGRTMIN + 4)
    deadline = time.monotonic() + timeout
    while any(cgroup_pids(d) for d in cgroups) and time.monotonic() < deadline:
        time.sleep(0.2)


def _stop_ssh_masters(config: TestbedConfig) -> None:
    """Ansible's ControlPersist masters for the fleet (their sockets live in the fleet's directory)."""
    for socket_path in config.control_path_dir.glob("*") if config.control_path_dir.is_dir() else []:
        subprocess.run(["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "testbed"],
                       capture_output=True, timeout=10, check=False)


def _unmount_all(config: TestbedConfig) -> None:
    base = str(config.base_dir.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for mountpoint in sorted((m for m in mounts if m.startswith(base)), key=len, reverse=True):
        with contextlib.suppress(OSError):  # nspawn's lock of the image directory, by inode
            stat = os.stat(mountpoint)
            Path(f"/run/systemd/nspawn/locks/inode-{stat.st_dev}:{stat.st_ino}").unlink(missing_ok=True)
        subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)


def _links(config: TestbedConfig) -> list[str]:
    """The fleet's bridge and any host-side veth (``vb-NAME-hvN``) a dead nspawn left."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    veths = [n for n in names if n.startswith(f"vb-{config.name}-hv")]
    return veths + ([config.bridge] if config.bridge in names else [])


def leftovers(config: TestbedConfig | None = None) -> list[str]:
    """What of a fleet is still there (empty after :func:`down`): for tests and for humans."""
    config = config or TestbedConfig()
    found = [f"cgroup {d}" for d in _fleet_cgroups(config)]
    base = str(config.base_dir.resolve()) + "/"
    found += [f"mount {line.split()[1]}" for line in Path("/proc/self/mounts").read_text().splitlines()
              if line.split()[1].startswith(base)]
    found += [f"link {name}" for name in _links(config)]
    found += [f"nspawn {p}" for p in Path("/run/systemd/nspawn/propagate").glob(f"{config.name}-hv*")]
    found += [f"process {pid} ({root})" for pid, root in _processes_rooted_under(config.base_dir)]
    if config.base_dir.exists():
        found.append(f"directory {config.base_dir}")
    return found


def _processes_rooted_under(base: Path) -> Iterator[tuple[int, str]]:
    prefix = str(base.resolve()) + "/"
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                root = os.readlink(entry / "root")
                if root.startswith(prefix):
                    yield int(entry.name), root


def down(config: TestbedConfig | None = None) -> None:
    """Power the hosts off (30 s), then remove everything :func:`reap` knows of."""
    reap(config or TestbedConfig(), graceful=30.0)


def attach(config: TestbedConfig | None = None) -> Fleet:
    """The fleet a previous ``up`` (the CLI) left running, from its state file."""
    config = config or TestbedConfig()
    try:
        state = json.loads((config.base_dir / "state.json").read_text())
    except FileNotFoundError:
        raise TestbedError("no test bed is up (python3 -m harness.testbed up)") from None
    names = {name: info["address"] for name, info in state["hosts"].items()}
    hosts = []
    for name, info in state["hosts"].items():
        host = TestbedHost(config, int(name[2:]), names)
        host.leader = info["leader"]
        hosts.append(host)
    return Fleet(config, hosts, Path(state["inventory"]))


@contextlib.contextmanager
def running(n: int = 3, config: TestbedConfig | None = None) -> Iterator[Fleet]:
    """``with running(3) as fleet:`` up, then down whatever happens."""
    config = config or TestbedConfig()
    fleet = up(n, config=config)
    try:
        yield fleet
    finally:
        fleet.down()


# -- CLI --------------------------------------------------------------------------------------


def _missing_tool() -> str | None:
    for tool in ("ip", "ssh-agent", "ssh-add", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _config_from(args: argparse.Namespace) -> TestbedConfig:
    return TestbedConfig(args.name, args.subnet, Path(args.dir))


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m harness.testbed", description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--name", default=DEFAULT_NAME, help="prefix of machines, cgroups and the bridge")
    parser.add_argument("--subnet", default=DEFAULT_SUBNET, help="first three octets of the private /24")
    parser.add_argument("--dir", default=str(DEFAULT_BASE), help="where overlays, keys and the inventory live")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="boot hv1..hvN (reaping any earlier fleet)")
    start.add_argument("n", nargs="?", type=int, default=3)
    start.add_argument("--inventory", type=Path, help="where to write the inventory (also kept in --dir)")
    commands.add_parser("down", help="power off and remove everything")
    commands.add_parser("status", help="list what of the fleet exists")
    commands.add_parser("check", help="say whether the test bed can run on this machine")
    shell = commands.add_parser("shell", help="an SSH shell (or command) on a host")
    shell.add_argument("host")
    shell.add_argument("--user", default=TEST_USER)
    shell.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    config = _config_from(args)
    try:
        return _dispatch(args, config)
    except (TestbedError, HostUnavailable) as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, config: TestbedConfig) -> int:
    if args.command == "up":
        started = time.monotonic()
        fleet = up(args.n, args.inventory, config)
        print(f"{len(fleet.hosts)} hosts up in {time.monotonic() - started:.1f} s; inventory: {fleet.inventory}")
        for host in fleet:
            print(f"  {host.name}  {host.address}  leader pid {host.leader}")
        return 0
    if args.command == "down":
        down(config)
        left = leftovers(config)
        print("test bed down" if not left else "left behind:\n  " + "\n  ".join(left))
        return 0 if not left else 1
    if args.command == "check":
        reason = unavailable_reason() or _missing_tool()
        print(f"==> test bed: {'unavailable: ' + reason if reason else 'ready'}")
        return 0
    if args.command == "status":
        print("\n".join(leftovers(config)) or "nothing is up")
        return 0
    host = attach(config)[args.host]
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return subprocess.call([*host.ssh_argv(args.user), *command])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
