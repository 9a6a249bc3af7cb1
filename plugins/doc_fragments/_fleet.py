# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this doc fragment is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

from __future__ import annotations


class ModuleDocFragment:
    """Options that the filters of the host_drain and host_restore roles (plugins/filter/fleet.py) share."""

    # The filters that read summary rows.
    DOCUMENTATION = r"""
options:
  _input:
    description: Rows from P(savestate.qemu.drain_rows#filter) or P(savestate.qemu.restore_rows#filter).
    type: list
    required: true
    elements: raw
"""

    # The filters that report a finished drain or restore.
    REPORT = r"""
options:
  role:
    description: V(drain) or V(restore).
    type: str
    required: true
  check_mode:
    description: Whether the role ran in check mode.
    type: bool
"""

    # The filters that turn a role's async jobs into rows.
    JOBS = r"""
options:
  guests_before:
    description: M(savestate.qemu.guest_info) guests before the role changed anything.
    type: list
    required: true
    elements: raw
  check_mode:
    description: Whether the role runs in check mode.
    type: bool
  timeout:
    description: Seconds a job may take, for the message of one that did not finish.
    type: int
"""
