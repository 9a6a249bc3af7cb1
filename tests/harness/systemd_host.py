"""A Debian 12 host with systemd as PID 1, in systemd-nspawn, for the systemd tests.

The build machine does not run systemd as PID 1 and has no system D-Bus, so the
systemd behaviour of the collection (units, logind, shutdown) is tested inside a
container that does: a debootstrapped bookworm booted with ``systemd-nspawn
--boot``. The recipe is measured in ``/work/shared/reference/systemd-host.md``:

- no host D-Bus: ``--keep-unit --register=no``, so nspawn needs a cgroup of its
  own, which the launcher creates and enters before exec'ing nspawn;
- no machinectl: the container is entered with ``nsenter`` by its leader's pid,
  for short commands only (long ones would block its poweroff); tests use SSH;
- pip inside needs the build machine's CA bundle (bound in for the build).

The root file system is built once and cached OUTSIDE the checkout, in
``/var/cache/savestate-qemu/systemd-host-<hash>/rootfs``, keyed by a hash of
:data:`RECIPE` and of this file's build steps, so a fresh clone (CI) reuses it and only a changed
recipe rebuilds it. Each boot runs on an overlay over the cached tree: tests
never change the cache, and the overlay persists across the poweroff/boot
cycles of one test session.

SSH reaches the container's sshd (on its private network's loopback) through a
``ProxyCommand`` that relays into the container's network namespace; Ansible
connects as the unprivileged ``tester`` with ``become`` (sudo).

``python3 -m harness.systemd_host build`` builds the cache (``make setup`` does);
``python3 -m harness.systemd_host shell`` boots it and opens an SSH shell.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.paths import CACHE_DIR, HARNESS_DIR, PROJECT_ROOT
from harness.qemu import QEMU72_DIR

CACHE_ROOT = Path(os.environ.get("SAVESTATE_SYSTEMD_HOST_CACHE", "/var/cache/savestate-qemu"))
MIRROR = "http://deb.debian.org/debian"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
MACHINE = "savestate-hv"
TEST_USER = "tester"
VENV_IN_HOST = "/opt/savestate-venv"
GUEST_ASSETS_IN_HOST = "/opt/savestate-guest"
# Debian 12's own QEMU 7.2, unpacked by harness.qemu into QEMU72_DIR, bound in read-only.
QEMU72_IN_HOST = "/opt/qemu-7.2"
KEYS_IN_HOST = "/etc/savestate-test"
# The working tree, read-only, where Python finds it as the collection (services in the host use it).
COLLECTIONS_IN_HOST = "/opt/savestate-collections"
COLLECTION_IN_HOST = f"{COLLECTIONS_IN_HOST}/ansible_collections/savestate/qemu"
BOOT_TIMEOUT = 90.0
POWEROFF_TIMEOUT = 90.0

# Everything that decides the content of the root file system; its hash names the cache.
RECIPE = {
    "suite": "bookworm",
    "variant": "minbase",
    "include": ["systemd", "systemd-sysv", "dbus", "libpam-systemd", "python3", "python3-venv",
                "procps", "iproute2", "openssh-server", "openssh-client", "sudo", "ca-certificates",
                "zstd", "gzip", "xz-utils", "less", "seabios", "ipxe-qemu"],
    "backports": ["qemu-system-x86", "qemu-utils"],
    # ansible-core: the host service (roles/guest_autosave) runs the collection's code without a controller
    "pip": ["qemu.qmp==0.0.6", "lxml==6.1.3", "ansible-core==2.19.14"],
    "version": 1,
}


def recipe_hash() -> str:
    """Hash of the recipe and of the code that applies it: a change to either rebuilds."""
    digest = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    for step in (_configure, _install_backports, _install_venv):
        digest.update(inspect.getsource(step).encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    return CACHE_ROOT / f"systemd-host-{recipe_hash()}"


def rootfs() -> Path:
    return cache_dir() / "rootfs"


class HostUnavailable(RuntimeError):
    """This machine cannot run the systemd host (no nspawn, not root, ...)."""


def unavailable_reason() -> str | None:
    """Why the systemd host cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "the systemd host needs root (systemd-nspawn, overlayfs, cgroups)"
    for tool in ("systemd-nspawn", "nsenter", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/sys/fs/cgroup").is_dir():
        return "no cgroup file system"
    if not rootfs().is_dir() and shutil.which("debootstrap") is None:
        return "debootstrap is not installed and the root file system is not cached"
    return None


# -- building the cached root file system ------------------------------------------------


def _run(argv: Sequence[str], **kwargs: object) -> None:
    print("+", shlex.join(argv), flush=True)
    subprocess.run(list(argv), check=True, **kwargs)  # type: ignore[call-overload]


def _in_root(root: Path, script: str) -> None:
    """Run a shell script chrooted in ``root``, with /proc, /dev and the host's CA bundle,
    in a private mount namespace (the mounts vanish with it)."""
    ca = root / "tmp/host-ca.crt"
    ca.touch()
    wrapper = (f"set -e; mount -t proc proc {root}/proc; mount --rbind /dev {root}/dev;"
               f" mount --bind {HOST_CA_BUNDLE} {ca}; exec chroot {root} /bin/sh -ec \"$0\"")
    try:
        _run(["unshare", "--mount", "--propagation", "private", "sh", "-c", wrapper, script],
             env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"})
    finally:
        ca.unlink()


def _install_backports(root: Path) -> None:
    (root / "etc/apt/sources.list.d/backports.list").write_text(
        f"deb {MIRROR} bookworm-backports main\n")
    packages = " ".join(RECIPE["backports"])
    _in_root(root, "apt-get update -q && apt-get install -y -q --no-install-recommends"
                   f" -t bookworm-backports {packages} && apt-get clean")


def _install_venv(root: Path) -> None:
    """The modules' Python dependencies, in a venv (Ansible's interpreter in the host).

    The wheels are downloaded by the build machine's pip (which knows its egress CA)
    and installed offline inside."""
    wheels = root / "tmp/wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "-q", "--isolated", "--only-binary=:all:",
          "--python-version", "3.11", "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
          "-d", str(wheels), *RECIPE["pip"]])
    packages = " ".join(RECIPE["pip"])
    _in_root(root, f"python3 -m venv {VENV_IN_HOST} && {VENV_IN_HOST}/bin/pip install -q --no-index"
                   f" --find-links=/tmp/wheels {packages} && rm -rf /tmp/wheels")


def _configure(root: Path) -> None:
    (root / "etc/hostname").write_text(MACHINE + "\n")
    (root / "etc/hosts").write_text(f"127.0.0.1 localhost {MACHINE}\n")
    (root / "var/log/journal").mkdir(parents=True, exist_ok=True)  # persistent: read it after a poweroff
    (root / "etc/ssh/sshd_config.d/savestate.conf").write_text(
        "ListenAddress 127.0.0.1\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        f"PermitRootLogin prohibit-password\nUseDNS no\nAuthorizedKeysFile {KEYS_IN_HOST}/authorized_keys\n")
    (root / f"etc/sudoers.d/{TEST_USER}").write_text(f"{TEST_USER} ALL=(ALL) NOPASSWD: ALL\n")
    (root / "etc/sudoers.d" / TEST_USER).chmod(0o440)
    # The console is read-only and nobody logs in on it.
    _in_root(root, f"useradd -m -s /bin/bash {TEST_USER}; systemctl mask console-getty.service"
                   " getty@tty1.service systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer"
                   " e2scrub_all.timer fstrim.timer 2>/dev/null || true; mkdir -p /var/lib/qemu-guests")


def build(force: bool = False) -> Path:
    """Build the cached root file system unless it is there; return its path."""
    target = rootfs()
    if target.is_dir() and not force:
        print(f"==> systemd host: cached in {target}")
        return target
    if shutil.which("debootstrap") is None:
        raise HostUnavailable("debootstrap is not installed (apt-get install debootstrap)")
    cache_dir().mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rootfs.", dir=cache_dir()) as scratch:
        tree = Path(scratch) / "rootfs"
        _run(["debootstrap", "--variant=" + str(RECIPE["variant"]), "--include=" + ",".join(RECIPE["include"]),
              str(RECIPE["suite"]), str(tree), MIRROR], stdout=subprocess.DEVNULL)
        _install_backports(tree)
        _install_venv(tree)
        _configure(tree)
        (tree / "etc/savestate-recipe.json").write_text(json.dumps(RECIPE, indent=1, sort_keys=True) + "\n")
        if target.exists():
            shutil.rmtree(target)
        tree.rename(target)
    _prune_old_caches()
    print(f"==> systemd host: built {target} in {time.monotonic() - started:.0f} s")
    return target


def _prune_old_caches() -> None:
    """Trees of older recipes only take space (~600 MiB each)."""
    for other in CACHE_ROOT.glob("systemd-host-*"):
        if other != cache_dir():
            shutil.rmtree(other, ignore_errors=True)


# -- running it ----------------------------------------------------------------------------


@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


class SystemdHost:
    """One booted container: ``boot()``, ``ssh()``/``sh()``, ``poweroff()``, ``destroy()``.

    ``machine`` names the container (and its cgroup, ``MACHINE-<pid of the launcher>``);
    ``key`` is the controller's SSH key (one is generated in ``workdir/keys`` when omitted;
    only its public half is bound into the container). Subclasses (the multi-host test bed,
    :mod:`harness.testbed`) change the network with :meth:`network_args`, write per-host
    files into the overlay with :meth:`prepare_overlay` and reach sshd with :meth:`ssh_options`.
    """

    def __init__(self, workdir: Path, guest_assets: Path | None = None, *, machine: str = MACHINE,
                 key: Path | None = None, bind_collection: bool = True) -> None:
        self.workdir = workdir
        self.guest_assets = guest_assets or CACHE_DIR / "guest"
        self.machine = machine
        self.bind_collection = bind_collection
        self.upper = workdir / "upper"
        self.overlay_work = workdir / "work"
        self.merged = workdir / "merged"
        self.keys = workdir / "keys"
        self.console_log = workdir / "console.log"
        self.cgroup_name = f"{machine}-{os.getpid()}"
        self.process: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        for path in (self.upper, self.overlay_work, self.merged, self.keys):
            path.mkdir(parents=True, exist_ok=True)
        self.key = key or self.keys / "id_ed25519"
        if not self.key.exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)])
        (self.keys / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        os.chmod(self.keys, 0o755)

    # -- life cycle ---------------------------------------------------------------------

    def boot(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Boot the container and wait until its sshd answers; clean up if it does not."""
        reap_stale_containers()
        try:
            self._mount_overlay()
            self.prepare_overlay()
            self._start_nspawn()
            self._wait_booted(timeout)
        except BaseException:
            self.destroy()
            raise

    def _mount_overlay(self) -> None:
        if os.path.ismount(self.merged):
            return
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={rootfs()},upperdir={self.upper},workdir={self.overlay_work}", str(self.merged)])

    def prepare_overlay(self) -> None:
        """Write per-host files into the mounted overlay before the boot (none here)."""

    def network_args(self) -> list[str]:
        """nspawn's network options: a private network with only a loopback here."""
        return ["--private-network"]

    def _cgroup_dirs(self) -> list[Path]:
        base = Path("/sys/fs/cgroup")
        candidates = [base / "systemd", base / "unified"]
        if (base / "cgroup.controllers").exists():  # a pure cgroup2 machine
            candidates = [base]
        return [c / self.cgroup_name for c in candidates if c.is_dir()]

    def _enter_own_cgroup(self) -> None:
        """nspawn --keep-unit runs the container in the cgroup it was started in: give it its own."""
        for directory in self._cgroup_dirs():
            directory.mkdir(exist_ok=True)
            (directory / "cgroup.procs").write_text(str(os.getpid()))

    def _start_nspawn(self) -> None:
        argv = ["systemd-nspawn", "--boot", "--quiet", "-D", str(self.merged), f"--machine={self.machine}",
                "--keep-unit", "--register=no", *self.network_args(), "--console=passive",
                f"--bind-ro={self.guest_assets}:{GUEST_ASSETS_IN_HOST}",
                *([f"--bind-ro={QEMU72_DIR}:{QEMU72_IN_HOST}"] if QEMU72_DIR.is_dir() else []),
                f"--bind-ro={self.keys}:{KEYS_IN_HOST}",
                *([f"--bind-ro={PROJECT_ROOT}:{COLLECTION_IN_HOST}"] if self.bind_collection else [])]
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        with open(self.console_log, "ab") as log:
            self.process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            preexec_fn=self._enter_own_cgroup, start_new_session=True)

    def _find_leader(self) -> int | None:
        """The container's PID 1: the process in nspawn's tree whose innermost pid is 1."""
        for directory in self._cgroup_dirs():
            for procs in directory.rglob("cgroup.procs"):
                for pid in procs.read_text().split():
                    with contextlib.suppress(OSError):
                        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                            if line.startswith("NSpid:") and line.split()[1:] and line.split()[-1] == "1" \
                                    and len(line.split()) > 2:
                                return int(pid)
        return None

    def _wait_booted(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.leader is None:
            self._check_running()
            self.leader = self._find_leader()
            if time.monotonic() > deadline:
                raise HostUnavailable(f"the container did not start within {timeout:g} s; see {self.console_log}")
            time.sleep(0.1)
        while True:
            self._check_running()
            state = self.enter(["systemctl", "is-system-running"], timeout=10).stdout.strip()
            if state in ("running", "degraded") and self.ssh("true", timeout=10).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise HostUnavailable(f"the container did not boot within {timeout:g} s (state {state!r});"
                                      f" see {self.console_log}")
            time.sleep(0.3)

    def _check_running(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise HostUnavailable(f"systemd-nspawn exited; see {self.console_log}:\n"
                                  + self.console_log.read_text(errors="replace")[-2000:])

    def poweroff(self, timeout: float = POWEROFF_TIMEOUT) -> float:
        """Power the container off the way a host shuts down; return how long it took."""
        started = time.monotonic()
        if self.process is None:
            return 0.0
        if self.process.poll() is None and self.leader is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, signal.SIGRTMIN + 4)  # systemd: poweroff
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_all()
                raise HostUnavailable(f"the container did not power off within {timeout:g} s") from None
        self.process = None
        self.leader = None
        return time.monotonic() - started

    def _kill_all(self) -> None:
        for _attempt in range(50):
            pids = [pid for d in self._cgroup_dirs() if d.is_dir()
                    for procs in d.rglob("cgroup.procs") for pid in procs.read_text().split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.1)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)

    def destroy(self) -> None:
        """Stop the container however it is, unmount its overlay, remove its cgroups."""
        try:
            self.poweroff(timeout=30)
        except HostUnavailable:
            pass
        self._kill_all()
        self.process = None
        self.leader = None
        if os.path.ismount(self.merged):
            subprocess.run(["umount", "-l", str(self.merged)], check=False)
        with contextlib.suppress(OSError):  # nspawn's mount propagation directory, empty once it exits
            Path(f"/run/systemd/nspawn/propagate/{self.machine}").rmdir()
        for directory in self._cgroup_dirs():
            for sub in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                directory.rmdir()

    # -- commands -----------------------------------------------------------------------

    def enter(self, argv: Sequence[str], timeout: float = 30.0) -> CommandResult:
        """A SHORT command in every namespace of the container (it stays outside its cgroups)."""
        if self.leader is None:
            raise HostUnavailable("the container is not running")
        return _capture(["nsenter", "-t", str(self.leader), "-a", *argv], timeout)

    def ssh_argv(self, user: str = "root") -> list[str]:
        return ["ssh", "-F", "/dev/null", *self.ssh_options(), "-l", user, self.machine]

    def ssh_options(self) -> list[str]:
        proxy = f"nsenter -t {self.leader} -n {sys.executable} {HARNESS_DIR / 'tcp_relay.py'} 127.0.0.1 22"
        return ["-i", str(self.key), "-o", f"ProxyCommand={proxy}", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=10"]

    def ssh(self, command: str, user: str = "root", timeout: float = 60.0) -> CommandResult:
        """A shell command over SSH (a real login session: logind, PAM, the user's scope)."""
        return _capture([*self.ssh_argv(user), command], timeout)

    def sh(self, command: str, timeout: float = 60.0) -> str:
        """Run a command over SSH as root and return its stdout; fail with its stderr."""
        result = self.ssh(command, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"{command!r} exited {result.returncode}: {result.stderr}{result.stdout}")
        return result.stdout

    def write(self, path: str, content: str) -> None:
        """Write a file in the container (through the overlay of a running container)."""
        self.sh(f"mkdir -p {shlex.quote(os.path.dirname(path))} && cat > {shlex.quote(path)} <<'SAVESTATE_EOF'\n"
                f"{content}\nSAVESTATE_EOF")

    def run_module(self, module: str, args: dict[str, object], timeout: float = 300.0,
                   env: dict[str, str] | None = None) -> dict[str, object]:
        """Run one of the collection's modules on this host through real Ansible over SSH,
        as ``tester`` with ``become``; returns the module's result (see ansible_runner)."""
        from integration.ansible_runner import ANSIBLE, ansible_environment, host_result  # the tests' runner
        inventory = self.workdir / "inventory.ini"
        inventory.write_text(self.inventory())
        name = module if "." in module else f"savestate.qemu.{module}"
        argv = [str(ANSIBLE), "hv", "-i", str(inventory), "-m", name, "-a", json.dumps(args)]
        with tempfile.TemporaryDirectory(prefix="ssq-ansible-") as scratch:
            result_file = Path(scratch) / "results.jsonl"
            # No SSH multiplexing: each run's session ends with it, as logind must see.
            extra = {"ANSIBLE_SSH_ARGS": "-o ControlMaster=no", "ANSIBLE_HOST_KEY_CHECKING": "0",
                     "ANSIBLE_PYTHON_INTERPRETER": f"{VENV_IN_HOST}/bin/python", **(env or {})}
            done = subprocess.run(argv, cwd=PROJECT_ROOT, env=ansible_environment(result_file, extra),
                                  capture_output=True, text=True, timeout=timeout, check=False)
            return host_result(done, result_file)

    def run_playbook(self, playbook: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
        """Run a playbook (YAML text) against this host through real Ansible over SSH."""
        inventory = self.workdir / "inventory.ini"
        inventory.write_text(self.inventory())
        path = self.workdir / "playbook.yml"
        path.write_text(playbook)
        env = {**os.environ, "ANSIBLE_SSH_ARGS": "-o ControlMaster=no", "ANSIBLE_HOST_KEY_CHECKING": "0",
               "ANSIBLE_NOCOLOR": "1", "PATH": f"{PROJECT_ROOT / '.venv/bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
        return subprocess.run([str(PROJECT_ROOT / ".venv/bin/ansible-playbook"), "-i", str(inventory), str(path)],
                              cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    def inventory(self) -> str:
        """An Ansible inventory (INI) for this host: SSH as the test user, ``become`` to root."""
        common = " ".join(shlex.quote(o) for o in self.ssh_options())
        return (f"[hv]\n{self.machine} ansible_host={self.machine} ansible_user={TEST_USER} ansible_become=true"
                f" ansible_python_interpreter={VENV_IN_HOST}/bin/python"
                f" ansible_ssh_common_args={shlex.quote(common)}\n")


def _cgroup_roots() -> list[Path]:
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():
        return [base]
    return [root for root in (base / "systemd", base / "unified") if root.is_dir()]


def reap_stale_containers() -> None:
    """Kill containers left by a test run that died (SIGKILL, OOM): their cgroup is named
    after the launching process, which is gone. Other live runs' containers are left alone."""
    for root in _cgroup_roots():
        for directory in root.glob(f"{MACHINE}-*"):
            owner = directory.name.rsplit("-", 1)[-1]
            if not owner.isdigit() or Path(f"/proc/{owner}").exists():
                continue
            kill_cgroup(directory)
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[0] == "overlay" and f"lowerdir={CACHE_ROOT}/" in fields[3] and "/ssq-hv-" in fields[1]:
            if next(_live_processes_under(fields[1]), None) is None:
                subprocess.run(["umount", "-l", fields[1]], check=False)


def cgroup_pids(directory: Path) -> list[int]:
    """Every process in a cgroup and its children (none when it is gone)."""
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for procs in directory.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids += [int(pid) for pid in procs.read_text().split()]
    return pids


def kill_cgroup(directory: Path, timeout: float = 10.0) -> None:
    """SIGKILL everything in a cgroup tree until it is empty, then remove its directories."""
    deadline = time.monotonic() + timeout
    while (pids := cgroup_pids(directory)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    for sub in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        directory.rmdir()


def cgroup_roots() -> list[Path]:
    """The cgroup hierarchies the containers' cgroups are created in."""
    return _cgroup_roots()


def _live_processes_under(root: str) -> Iterator[int]:
    """Processes whose root directory is ``root`` (a container's): none means it is stale."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "root") == root:
                    yield int(entry.name)


def _capture(argv: Sequence[str], timeout: float) -> CommandResult:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:
        return CommandResult(124, str(exc.stdout or ""), f"timed out after {timeout:g} s")
    return CommandResult(done.returncode, done.stdout, done.stderr)


@contextlib.contextmanager
def booted(workdir: Path) -> Iterator[SystemdHost]:
    host = SystemdHost(workdir)
    host.boot()
    try:
        yield host
    finally:
        host.destroy()


def main(argv: Sequence[str]) -> int:
    command = argv[0] if argv else "build"
    if command == "build":
        reason = unavailable_reason()
        if reason and "debootstrap" not in reason:
            print(f"==> systemd host: skipped ({reason})")
            return 0
        build(force="--force" in argv)
        return 0
    if command == "hash":
        print(recipe_hash())
        return 0
    if command == "shell":
        with tempfile.TemporaryDirectory(prefix="ssq-hv-") as scratch, booted(Path(scratch)) as host:
            print(f"booted in {scratch}; leader {host.leader}")
            return subprocess.call(host.ssh_argv())
    print(f"usage: {sys.argv[0]} build [--force] | hash | shell", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
