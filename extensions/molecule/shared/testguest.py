# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What the molecule scenarios do to their test guests outside the collection, with the
test harness (tests/harness) rather than the code under test:

    testguest.py pids MARKER [PIDFILE...]
        JSON list of the live QEMU processes whose command line contains MARKER,
        and of those the pidfiles name
    testguest.py qmp SOCKET COMMAND
        run one QMP command on a unix socket, print its JSON return value

The scenarios clean up with ``pids`` (then kill by pid), so that a broken module
under test cannot stop the cleanup from finding what the scenario started.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))


def qemu_pids(marker: str, pidfiles: list[str]) -> list[int]:
    from harness.processes import is_qemu, process_info, qemu_processes  # pylint: disable=import-outside-toplevel

    found = {process.pid for process in qemu_processes(marker)}
    for path in pidfiles:
        try:
            pid = int(Path(path).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            continue
        info = process_info(pid)
        if info is not None and is_qemu(info) and info.state != "Z":
            found.add(pid)
    return sorted(found)


def qmp(socket_path: str, command: str) -> object:
    from harness.guest import qmp_execute  # pylint: disable=import-outside-toplevel

    return qmp_execute(socket_path, command)


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[1] == "pids":
        json.dump(qemu_pids(argv[2], argv[3:]), sys.stdout)
    elif len(argv) == 4 and argv[1] == "qmp":
        json.dump(qmp(argv[2], argv[3]), sys.stdout)
    else:
        sys.stderr.write(__doc__ or "")
        return 2
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
