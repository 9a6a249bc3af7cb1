# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Documentation of the savestate.qemu.failures filter, which fleet.py implements.

fleet.py holds several filters; ansible-doc, ansible-test and galaxy-importer look for a
filter's documentation in a Python file named after the filter, so each has one here.
"""

from __future__ import annotations

from typing import Any

DOCUMENTATION = r"""
name: failures
short_description: The failed rows of a drain or restore summary
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - Returns C(name), C(uuid) and C(msg) of every row whose C(result) is V(failed).
options:
  _input:
    description: Rows from P(savestate.qemu.drain_rows#filter) or P(savestate.qemu.restore_rows#filter).
    type: list
    required: true
    elements: raw
"""

EXAMPLES = r"""
- ansible.builtin.set_fact:
    failed: "{{ rows | savestate.qemu.failures }}"
"""

RETURN = r"""
_value:
  description: One dict per failed guest.
  type: list
  elements: raw
"""


class FilterModule:
    """Registers no filter: fleet.py does (ansible loads every file here as a filter plugin)."""

    def filters(self) -> dict[str, Any]:
        return {}
