"""Real libvirt for the interoperability tests, through its embedded QEMU driver.

``qemu:///embed?root=DIR`` runs libvirt's QEMU driver inside each ``virsh``
process, with all state under DIR: no daemon, no system configuration touched.
Guests started this way keep running after ``virsh`` exits (they are re-parented
like any daemon) and the next ``virsh`` re-attaches to them, so one-shot commands
are enough. The guests boot the harness kernel and initramfs, with the serial
console appended to a file, exactly like :class:`harness.guest.Guest`.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from xml.sax.saxutils import escape

from harness.assets import ensure_guest_assets
from harness import heartbeat
from harness.processes import kill_and_wait, qemu_processes
from harness.qemu import SYSTEM_QEMU, QemuBuild

# No virtlogd (stdio to plain files), no confinement or relabelling: the tests run
# as root on a scratch directory.
QEMU_CONF = """\
stdio_handler = "file"
security_driver = "none"
user = "root"
group = "root"
dynamic_ownership = 0
"""

DOMAIN_TEMPLATE = """\
<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <devices>
    <emulator>{emulator}</emulator>
    <serial type='file'>
      <source path='{serial}' append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class LibvirtError(RuntimeError):
    """virsh failed; the message is virsh's own error text."""


class EmbeddedLibvirt:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"qemu:///embed?root={root}"
        (root / "etc").mkdir(parents=True, exist_ok=True)
        (root / "etc" / "qemu.conf").write_text(QEMU_CONF)
        self._defined: list[str] = []

    def virsh(self, *args: str, check: bool = True, query: bool = False) -> subprocess.CompletedProcess[str]:
        """Run virsh on the embedded driver; ``query`` commands are retried after a silent failure.

        In embedded mode every virsh starts the driver afresh; on a loaded machine it
        sometimes exits non-zero having printed only its start-up log lines (no
        error), before running the command. A query is safe to ask again.
        """
        for _attempt in range(3 if query else 1):
            result = subprocess.run(["virsh", "-q", "-c", self.uri, *args],
                                    capture_output=True, text=True, check=False)
            if result.returncode == 0 or "error" in result.stderr.lower():
                break
            time.sleep(0.5)
        if check and result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
            raise LibvirtError("\n".join(errors) or result.stderr.strip()
                               or f"virsh {' '.join(args)} failed")
        return result

    def serial_log(self, name: str) -> Path:
        return self.root.parent / f"{name}-serial.log"

    def domain_xml(self, name: str, uuid: str, memory_mib: int = 128, fill_mib: int = 0,
                   qemu: QemuBuild = SYSTEM_QEMU) -> str:
        assets = ensure_guest_assets()
        cmdline = "console=ttyS0 quiet panic=-1" + (f" fill={fill_mib}" if fill_mib else "")
        values = {
            "name": name, "uuid": uuid, "memory": max(memory_mib, fill_mib + 128),
            "kernel": assets.kernel, "initrd": assets.initramfs, "cmdline": cmdline,
            "emulator": qemu.binary, "serial": self.serial_log(name),
        }
        return DOMAIN_TEMPLATE.format(**{k: escape(str(v), {"'": "&apos;"}) for k, v in values.items()})

    def define_guest(self, name: str, uuid: str, memory_mib: int = 128, fill_mib: int = 0,
                     qemu: QemuBuild = SYSTEM_QEMU) -> None:
        xml_file = self.root.parent / f"{name}.xml"
        xml_file.write_text(self.domain_xml(name, uuid, memory_mib, fill_mib, qemu))
        self.virsh("define", str(xml_file))
        self._defined.append(name)

    def start(self, name: str, ready_timeout: float = 120.0) -> None:
        self.virsh("start", name)
        self.wait_ready(name, ready_timeout)

    def wait_ready(self, name: str, timeout: float = 120.0) -> None:
        log = self.serial_log(name)
        deadline = time.monotonic() + timeout
        while not (log.exists() and b"READY" in log.read_bytes()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"libvirt guest {name} not READY within {timeout} s")
            time.sleep(0.1)

    def last_tick(self, name: str) -> int:
        return heartbeat.last_tick(self.serial_log(name))

    def save(self, name: str, path: Path, image_format: str = "raw", *extra: str) -> None:
        self.virsh("save", name, str(path), "--image-format", image_format, *extra)

    def restore(self, path: Path, *extra: str) -> None:
        self.virsh("restore", str(path), *extra)

    def domain_state(self, name: str) -> str:
        return self.virsh("domstate", name, query=True).stdout.strip()

    def qemu_pid(self, name: str) -> int | None:
        pidfile = self.root / "run" / "qemu" / f"{name}.pid"
        try:
            return int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def running_domains(self) -> list[str]:
        out = self.virsh("list", "--name", check=False, query=True).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def close(self) -> None:
        """Destroy every running domain; kill whatever QEMU libvirt could not."""
        for name in self.running_domains():
            self.virsh("destroy", name, check=False)
        for process in qemu_processes(str(self.root)):
            kill_and_wait(process.pid)


def virsh_version() -> tuple[int, ...]:
    out = subprocess.run(["virsh", "--version"], capture_output=True, text=True, check=True).stdout
    return tuple(int(x) for x in re.findall(r"\d+", out)[:3])
