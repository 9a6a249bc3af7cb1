# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Short host commands (systemctl, systemd-run), always bounded in time.

Ansible's ``AnsibleModule.run_command`` is the usual way to run a command from a
module, but it has no timeout, and a hung systemd must not hang a save or restore
for ever; it also needs an AnsibleModule, which the code that runs these commands
does not hold (it runs in the guest_autosave service too). So this is the one
place that runs such commands directly.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from ansible_collections.savestate.qemu.plugins.module_utils._errors import PreconditionError


def run_bounded(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with no input, its output captured as text, for at most ``timeout`` seconds.

    Raises PreconditionError when it cannot be started or does not finish in time;
    a non-zero exit status is the caller's to judge.
    """
    try:
        # pylint: disable-next=ansible-bad-function  # run_command has no timeout (see the module docstring)
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PreconditionError(f"'{' '.join(argv)}' failed: {error}") from None


def output_of(done: subprocess.CompletedProcess[str]) -> str:
    """What a failed command said: its error output, else its output."""
    return (done.stderr or done.stdout).strip()
