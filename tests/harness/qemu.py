"""The QEMU builds the tests run on: the system's 10.0 and an unpacked 7.2.

QEMU 10.0 comes from bookworm-backports and is installed normally. QEMU 7.2 is
Debian 12's own build, unpacked (not installed) into ``/var/cache/savestate-qemu/qemu-7.2`` (root-owned
directories, as the modules require of an emulator they run) from the
qemu-system-x86, qemu-system-common (accelerator modules) and qemu-system-data
(firmware) packages. QEMU finds its modules relative to its own binary; guests
started by the harness pass ``-L`` at the unpacked firmware directory, into which
the firmware Debian ships separately (SeaBIOS, iPXE ROMs) is linked.

``SAVESTATE_TEST_QEMU`` selects builds by name (comma separated, e.g. ``7.2``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from harness.assets import run, deb_field, download_deb
from harness.paths import SHARED_CACHE_DIR

QEMU72_DIR = SHARED_CACHE_DIR / "qemu-7.2"
QEMU72_PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data")
# Firmware that Debian's qemu-system-data leaves to other packages.
EXTERNAL_FIRMWARE_DIRS = (Path("/usr/share/seabios"), Path("/usr/lib/ipxe/qemu"))


@dataclass(frozen=True)
class QemuBuild:
    name: str
    binary: Path
    firmware_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def argv_prefix(self) -> list[str]:
        prefix = [str(self.binary)]
        if self.firmware_dir is not None:
            prefix += ["-L", str(self.firmware_dir)]
        return prefix

    def version(self) -> str:
        out = subprocess.run([str(self.binary), "--version"], check=True,
                             capture_output=True, text=True).stdout
        match = re.search(r"version (\d+\.\d+\.\d+)", out)
        return match.group(1) if match else out.splitlines()[0]

    def __str__(self) -> str:
        return f"qemu-{self.name}"


SYSTEM_QEMU = QemuBuild("10.0", Path("/usr/bin/qemu-system-x86_64"))
QEMU72 = QemuBuild("7.2", QEMU72_DIR / "usr/bin/qemu-system-x86_64",
                   firmware_dir=QEMU72_DIR / "usr/share/qemu")
ALL_BUILDS = (SYSTEM_QEMU, QEMU72)


def selected_builds() -> list[QemuBuild]:
    wanted = os.environ.get("SAVESTATE_TEST_QEMU", "")
    names = {n.strip() for n in wanted.split(",") if n.strip()}
    return [b for b in ALL_BUILDS if not names or b.name in names]


def _newest(versions: list[str]) -> str:
    best = versions[0]
    for version in versions[1:]:
        if subprocess.run(["dpkg", "--compare-versions", version, "gt", best], check=False).returncode == 0:
            best = version
    return best


def _missing_libraries(deb: Path) -> list[str]:
    depends = deb_field(deb, "Depends")
    libraries = [d.split()[0] for d in depends.split(",") if d.strip().startswith("lib")]
    status = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *libraries],
                            capture_output=True, text=True, check=False)
    installed = {line.split()[0] for line in status.stdout.splitlines() if line.endswith(" installed")}
    return [lib for lib in libraries if lib not in installed]


def ensure_qemu72() -> QemuBuild:
    """Unpack QEMU 7.2 into the cache (once) and install the libraries it links to."""
    stamp = QEMU72_DIR / ".version"
    version = _newest(_madison_72(QEMU72_PACKAGES[0]))
    if stamp.exists() and stamp.read_text().strip() == version and QEMU72.binary.exists():
        return QEMU72
    if QEMU72_DIR.exists():
        shutil.rmtree(QEMU72_DIR)
    QEMU72_DIR.mkdir(parents=True)
    for directory in (QEMU72_DIR.parent, QEMU72_DIR):
        directory.chmod(0o755)
    debs = []
    for package in QEMU72_PACKAGES:
        package_version = _newest(_madison_72(package))
        debs.append(download_deb(f"{package}={package_version}"))
    for deb in debs:
        run("dpkg-deb", "-x", str(deb), str(QEMU72_DIR))
    missing = _missing_libraries(debs[0])
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], check=True)
    _link_external_firmware(QEMU72.firmware_dir)
    stamp.write_text(version + "\n")
    return QEMU72


def _madison_72(package: str) -> list[str]:
    madison = run("apt-cache", "madison", package)
    versions = [line.split("|")[1].strip() for line in madison.splitlines() if "|" in line]
    versions = [v for v in versions if ":7.2+" in v]
    if not versions:
        raise RuntimeError(f"apt knows no QEMU 7.2 build of {package}; run apt-get update")
    return versions


def _link_external_firmware(firmware_dir: Path) -> None:
    for source_dir in EXTERNAL_FIRMWARE_DIRS:
        if not source_dir.is_dir():
            continue
        for blob in source_dir.iterdir():
            link = firmware_dir / blob.name
            if not link.exists():
                link.symlink_to(blob)


if __name__ == "__main__":
    for build in (SYSTEM_QEMU, ensure_qemu72()):
        print(f"{build}: {build.binary} ({build.version()})")
