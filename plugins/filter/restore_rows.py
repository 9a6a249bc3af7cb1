# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Documentation of the savestate.qemu.restore_rows filter, which fleet.py implements.

fleet.py holds several filters; ansible-doc, ansible-test and galaxy-importer look for a
filter's documentation in a Python file named after the filter, so each has one here.
"""

from __future__ import annotations

from typing import Any

DOCUMENTATION = r"""
name: restore_rows
short_description: One summary row per guest of a host restore
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - Turns what P(savestate.qemu.host_restore#role) collected into rows with the same keys as P(savestate.qemu.drain_rows#filter).
  - Internal to the role; its arguments may change.
options:
  _input:
    description: The async_status results of the restore jobs.
    type: list
    required: true
    elements: raw
  rejected:
    description: Names of guests whose image was refused, and why.
    type: dict
    required: true
  active:
    description: Manifest entries whose guest was already active.
    type: list
    required: true
    elements: raw
  unknown:
    description: Names asked for that the manifest does not list.
    type: list
    required: true
    elements: str
  guests_before:
    description: M(savestate.qemu.guest_info) guests before the restore.
    type: list
    required: true
    elements: raw
  check_mode:
    description: Whether the role runs in check mode.
    type: bool
  remove_images:
    description: Whether images are deleted after their restore.
    type: bool
  timeout:
    description: Seconds a restore job may take.
    type: int
  entries:
    description: The manifest's entries.
    type: list
    elements: raw
  target_state:
    description: The role's C(host_restore_state).
    type: str
"""

EXAMPLES = r"""
- ansible.builtin.set_fact:
    rows: "{{ results | savestate.qemu.restore_rows({}, [], [], before) }}"
"""

RETURN = r"""
_value:
  description: One dict per guest.
  type: list
  elements: raw
"""


class FilterModule:
    """Registers no filter: fleet.py does (ansible loads every file here as a filter plugin)."""

    def filters(self) -> dict[str, Any]:
        return {}
