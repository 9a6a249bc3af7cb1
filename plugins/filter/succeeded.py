# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Documentation of the savestate.qemu.succeeded filter, which fleet.py implements.

fleet.py holds several filters; ansible-doc, ansible-test and galaxy-importer look for a
filter's documentation in a Python file named after the filter, so each has one here.
"""

from __future__ import annotations

from typing import Any

DOCUMENTATION = r"""
name: succeeded
short_description: The async jobs that finished without failing
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - Keeps the async_status results of jobs that finished and did not fail.
options:
  _input:
    description: async_status results.
    type: list
    required: true
    elements: raw
"""

EXAMPLES = r"""
- ansible.builtin.set_fact:
    ok: "{{ results | savestate.qemu.succeeded }}"
"""

RETURN = r"""
_value:
  description: The successful results.
  type: list
  elements: raw
"""


class FilterModule:
    """Registers no filter: fleet.py does (ansible loads every file here as a filter plugin)."""

    def filters(self) -> dict[str, Any]:
        return {}
