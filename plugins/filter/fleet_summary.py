# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Documentation of the savestate.qemu.fleet_summary filter, which fleet.py implements.

fleet.py holds several filters; ansible-doc, ansible-test and galaxy-importer look for a
filter's documentation in a Python file named after the filter, so each has one here.
"""

from __future__ import annotations

from typing import Any

DOCUMENTATION = r"""
name: fleet_summary
short_description: A host's drain or restore as lines of a table
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - A headline (what happened, or what would happen in check mode), a table (guest, before, image, size, seconds, MiB/s, after)
    and one line per problem.
options:
  _input:
    description: Rows from P(savestate.qemu.drain_rows#filter) or P(savestate.qemu.restore_rows#filter).
    type: list
    required: true
    elements: raw
  host:
    description: The host's name.
    type: str
    required: true
  role:
    description: V(drain) or V(restore).
    type: str
    required: true
  check_mode:
    description: Whether the role ran in check mode.
    type: bool
  seconds:
    description: The role's wall time.
    type: float
"""

EXAMPLES = r"""
- ansible.builtin.set_fact:
    msg: "{{ rows | savestate.qemu.fleet_summary(inventory_hostname, 'drain') }}"
"""

RETURN = r"""
_value:
  description: Lines of text.
  type: list
  elements: str
"""


class FilterModule:
    """Registers no filter: fleet.py does (ansible loads every file here as a filter plugin)."""

    def filters(self) -> dict[str, Any]:
        return {}
