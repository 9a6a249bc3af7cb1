# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Small helpers the molecule scenarios use on their test guests, independent of the collection.

    testguest.py pids MARKER [PIDFILE...]
        JSON list of the live QEMU processes whose command line contains MARKER,
        and of those the pidfiles name
    testguest.py qmp SOCKET COMMAND   run one QMP command on a unix socket, print its JSON return value

The scenarios clean up with ``pids`` (then kill by pid), so that a broken module
under test cannot stop the cleanup from finding what the scenario started.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys


def live_qemu_argv(pid: str) -> list[str] | None:
    """The command line of a live QEMU process, or None (gone, a zombie, or not QEMU)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().decode(errors="replace").split("\0")
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    if state in ("Z", "X") or not os.path.basename(argv[0]).startswith("qemu-system-"):
        return None
    return argv


def read_pidfile(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def qemu_pids(marker: str, pidfiles: list[str]) -> list[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            argv = live_qemu_argv(entry)
            if argv is not None and any(marker in arg for arg in argv[1:]):
                found.add(int(entry))
    for path in pidfiles:
        pid = read_pidfile(path)
        if pid.isdigit() and live_qemu_argv(pid) is not None:
            found.add(int(pid))
    return sorted(found)


async def qmp(socket_path: str, command: str) -> object:
    from qemu.qmp import QMPClient  # pylint: disable=import-outside-toplevel

    client = QMPClient("molecule")
    await asyncio.wait_for(client.connect(socket_path), 10)
    try:
        return await asyncio.wait_for(client.execute(command), 10)
    finally:
        await client.disconnect()


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[1] == "pids":
        json.dump(qemu_pids(argv[2], argv[3:]), sys.stdout)
    elif len(argv) == 4 and argv[1] == "qmp":
        json.dump(asyncio.run(qmp(argv[2], argv[3])), sys.stdout)
    else:
        sys.stderr.write(__doc__ or "")
        return 2
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
