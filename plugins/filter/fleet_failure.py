# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Documentation of the savestate.qemu.fleet_failure filter, which fleet.py implements.

fleet.py holds several filters; ansible-doc, ansible-test and galaxy-importer look for a
filter's documentation in a Python file named after the filter, so each has one here.
"""

from __future__ import annotations

from typing import Any

DOCUMENTATION = r"""
name: fleet_failure
short_description: Why a drain or restore fails, and what happened to the other guests
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - Names the failed guests with their reasons, and the guests that were saved or restored, or says that none was; in check
    mode says that nothing was changed.
options:
  _input:
    description: Rows from P(savestate.qemu.drain_rows#filter) or P(savestate.qemu.restore_rows#filter).
    type: list
    required: true
    elements: raw
  role:
    description: V(drain) or V(restore).
    type: str
    required: true
  check_mode:
    description: Whether the role ran in check mode.
    type: bool
  manifest:
    description: The drain's manifest path, named in the message.
    type: str
"""

EXAMPLES = r"""
- ansible.builtin.set_fact:
    msg: "{{ rows | savestate.qemu.fleet_failure('drain') }}"
"""

RETURN = r"""
_value:
  description: The message; empty when no guest failed.
  type: str
"""


class FilterModule:
    """Registers no filter: fleet.py does (ansible loads every file here as a filter plugin)."""

    def filters(self) -> dict[str, Any]:
        return {}
