"""Build and cache the test guest: Debian's cloud kernel plus a busybox initramfs.

The kernel, busybox and the QEMU guest agent come as Debian packages that are
downloaded and unpacked, never installed. The agent (``qemu-ga``, started by
``init.sh`` when the kernel command line says ``agent=1``) is a dynamic binary: the
shared libraries it needs are the build host's, found with ``ldd`` and copied to
the same paths in the initramfs. The initramfs is assembled by :mod:`harness.cpio`
around ``init.sh``. Everything lands in ``.cache/guest`` and is rebuilt only when
an input changes (package versions, the agent's libraries, init script, archive
writer); the files are replaced whole, never rewritten in place (a cache copied
with hard links shares them with other checkouts).

Run as ``python3 -m harness.assets`` (from ``tests/``) to build and print the paths.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness import cpio
from harness.paths import CACHE_DIR, HARNESS_DIR

GUEST_DIR = CACHE_DIR / "guest"
DEBS_DIR = CACHE_DIR / "debs"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# The guest agent is apt's candidate (bookworm's, like busybox); it links against the build host's libraries.
AGENT_PACKAGE = "qemu-guest-agent"
AGENT_BINARY = "usr/sbin/qemu-ga"
# What the guest needs to reach a virtio disk, and the agent its virtio-serial port (virtio_console
# is a module in Debian's cloud kernel); dependencies are resolved from the modules.
DISK_MODULES = ("virtio_pci", "virtio_blk", "virtio_console")


@dataclass(frozen=True)
class GuestAssets:
    kernel: Path
    initramfs: Path


def run(*argv: str, cwd: Path | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True)
    return result.stdout


def download_deb(spec: str, dest: Path = DEBS_DIR) -> Path:
    """Download one package (``name`` or ``name=version``) with apt and return the .deb."""
    dest.mkdir(parents=True, exist_ok=True)
    name = spec.split("=", 1)[0].split("/", 1)[0]
    before = set(dest.glob(f"{name}_*.deb"))
    run("apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", spec, cwd=dest)
    after = set(dest.glob(f"{name}_*.deb"))
    candidates = sorted(after - before) or sorted(after, key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise RuntimeError(f"apt-get download {spec} produced no .deb in {dest}")
    return candidates[-1]


def deb_field(deb: Path, field: str) -> str:
    return run("dpkg-deb", "-f", str(deb), field).strip()


def candidate_version(package: str) -> str:
    """The version apt would install (backports stay at their low default priority)."""
    policy = run("apt-cache", "policy", package)
    match = re.search(r"Candidate:\s*(\S+)", policy)
    if not match or match.group(1) == "(none)":
        raise RuntimeError(f"apt knows no candidate for {package}; run apt-get update")
    return match.group(1)


def _cached_deb(package: str, version: str) -> Path:
    """Return the cached .deb of package=version, downloading it when missing."""
    file_version = version.replace(":", "%3a")
    for deb in DEBS_DIR.glob(f"{package}_*.deb"):
        if deb.name.startswith(f"{package}_{file_version}_") or deb_field(deb, "Version") == version:
            return deb
    return download_deb(f"{package}={version}")


def kernel_package() -> Path:
    meta = _cached_deb(KERNEL_META_PACKAGE, candidate_version(KERNEL_META_PACKAGE))
    depends = deb_field(meta, "Depends")
    match = re.search(r"(linux-image-[\w.+-]+)\s*\(=\s*([^)\s]+)\)", depends)
    if not match:
        raise RuntimeError(f"cannot find the kernel image package in {meta.name}: {depends}")
    return _cached_deb(match.group(1), match.group(2))


def busybox_package() -> Path:
    return _cached_deb(BUSYBOX_PACKAGE, candidate_version(BUSYBOX_PACKAGE))


def agent_package() -> Path:
    return _cached_deb(AGENT_PACKAGE, candidate_version(AGENT_PACKAGE))


_LDD_LINE = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def shared_libraries(binary: Path) -> list[Path]:
    """The libraries (and the dynamic loader) ``binary`` loads, as the build host resolves them."""
    out = run("ldd", str(binary))
    if "not found" in out:
        raise RuntimeError(f"{binary.name} needs libraries this host does not have:\n{out}")
    libraries = []
    for line in out.splitlines():
        match = _LDD_LINE.match(line)
        if match:
            libraries.append(Path(match.group(1)))
    return sorted(set(libraries))


def _module_dependencies(ko: Path) -> list[str]:
    match = re.search(rb"\0depends=([^\0]*)\0", b"\0" + ko.read_bytes())
    if not match or not match.group(1):
        return []
    return match.group(1).decode().split(",")


def modules_in_load_order(module_root: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Resolve ``wanted`` and their dependencies to .ko files, dependencies first."""
    by_name = {ko.stem.replace("-", "_"): ko for ko in module_root.rglob("*.ko")}
    ordered: list[Path] = []

    def visit(name: str) -> None:
        ko = by_name.get(name.replace("-", "_"))
        if ko is None:
            raise RuntimeError(f"kernel module {name} not found under {module_root}")
        if ko in ordered:
            return
        for dependency in _module_dependencies(ko):
            visit(dependency)
        ordered.append(ko)

    for module in wanted:
        visit(module)
    return ordered


def _parents(paths: list[str]) -> list[str]:
    """Every directory above ``paths`` (relative, ``/``-separated), parents first."""
    found: list[str] = []
    for path in paths:
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            directory = "/".join(parts[:depth])
            if directory not in found:
                found.append(directory)
    return found


def _agent_entries(agent: bytes, libraries: list[Path]) -> list[cpio.Entry]:
    """qemu-ga, its libraries at the paths the host's loader found them, and the hwclock it runs."""
    names = [lib.as_posix().lstrip("/") for lib in libraries]
    entries = [cpio.directory(d) for d in _parents(names) if d not in ("lib",)]
    entries += [cpio.regular(name, lib.read_bytes(), perms=0o755) for name, lib in zip(names, libraries)]
    entries += [
        cpio.regular("bin/qemu-ga", agent, perms=0o755),
        cpio.directory("sbin"),
        cpio.directory("run"),
        # guest-set-time runs /sbin/hwclock -w after it set the system clock.
        cpio.symlink("sbin/hwclock", "/bin/busybox"),
    ]
    return entries


def build_initramfs(busybox: bytes, modules: list[Path], init_script: bytes,
                    agent: bytes = b"", libraries: list[Path] | None = None) -> bytes:
    entries = [cpio.directory(d) for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules", "fill")]
    entries += [
        cpio.char_device("dev/console", 5, 1),
        cpio.char_device("dev/null", 1, 3, perms=0o666),
        cpio.regular("bin/busybox", busybox, perms=0o755),
        cpio.symlink("bin/sh", "busybox"),
        cpio.regular("init", init_script, perms=0o755),
    ]
    if agent:
        entries += _agent_entries(agent, libraries or [])
    entries += [cpio.regular(f"lib/modules/{ko.name}", ko.read_bytes()) for ko in modules]
    order = "".join(f"{ko.name}\n" for ko in modules).encode()
    entries.append(cpio.regular("lib/modules/modules.order", order))
    # mtime=0 keeps the compressed archive byte-for-byte reproducible.
    return gzip.compress(cpio.newc_archive(entries), mtime=0)


def _inputs_fingerprint(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def _replace_file(path: Path, data: bytes) -> None:
    """Write a new file and rename it over ``path``: never into the old inode, which hard links may share."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _agent_binary(agent_deb: Path, scratch: Path) -> Path:
    run("dpkg-deb", "-x", str(agent_deb), str(scratch / "agent"))
    return scratch / "agent" / AGENT_BINARY


_checked: list[GuestAssets] = []  # checked once per process: asking apt takes a second


def ensure_guest_assets() -> GuestAssets:
    """Return the kernel and initramfs, building them first when missing or stale."""
    if not _checked:
        _checked.append(_ensure_guest_assets())
    return _checked[0]


def _ensure_guest_assets() -> GuestAssets:
    kernel_deb, busybox_deb, agent_deb = kernel_package(), busybox_package(), agent_package()
    init_script = (HARNESS_DIR / "init.sh").read_bytes()
    GUEST_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as scratch:
        root = Path(scratch)
        agent = _agent_binary(agent_deb, root)
        libraries = shared_libraries(agent)
        # The libraries are the host's: an upgrade of one (glibc, glib) rebuilds the initramfs.
        fingerprint = _inputs_fingerprint(
            kernel_deb.name.encode(), busybox_deb.name.encode(), agent_deb.name.encode(), init_script,
            *(lib.as_posix().encode() + lib.read_bytes() for lib in libraries),
            (HARNESS_DIR / "cpio.py").read_bytes(), Path(__file__).read_bytes())
        assets = GuestAssets(GUEST_DIR / "vmlinuz", GUEST_DIR / "initramfs.cpio.gz")
        stamp = GUEST_DIR / "inputs.json"
        if stamp.exists() and all(p.exists() for p in (assets.kernel, assets.initramfs)):
            if json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
                return assets
        run("dpkg-deb", "-x", str(kernel_deb), str(root / "kernel"))
        run("dpkg-deb", "-x", str(busybox_deb), str(root / "busybox"))
        vmlinuz = next((root / "kernel" / "boot").glob("vmlinuz-*"))
        modules = modules_in_load_order(root / "kernel" / "lib" / "modules", DISK_MODULES)
        busybox = (root / "busybox" / "bin" / "busybox").read_bytes()
        _replace_file(assets.kernel, vmlinuz.read_bytes())
        _replace_file(assets.initramfs, build_initramfs(busybox, modules, init_script, agent.read_bytes(), libraries))
    _replace_file(stamp, (json.dumps({
        "fingerprint": fingerprint,
        "kernel_package": kernel_deb.name,
        "busybox_package": busybox_deb.name,
        "agent_package": agent_deb.name,
        "agent_libraries": [str(lib) for lib in libraries],
    }, indent=2) + "\n").encode())
    return assets


if __name__ == "__main__":
    built = ensure_guest_assets()
    print(f"kernel:    {built.kernel}\ninitramfs: {built.initramfs}")
