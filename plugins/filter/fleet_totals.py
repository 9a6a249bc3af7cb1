# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The documentation of the savestate.qemu.fleet_totals filter; fleet.py holds its code."""

from __future__ import annotations

from ansible_collections.savestate.qemu.plugins.plugin_utils._filter_docs import DocumentationOnly

DOCUMENTATION = r"""
name: fleet_totals
short_description: The closing line of a host's drain or restore
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - "C(HOST: drain total: OK ok, FAILED failed; BYTES bytes (MIB MiB) in SECONDS s wall, RATE MiB/s aggregate): the guests
    saved or restored in this run, the bytes of their images, the role's wall time and those bytes over it."
extends_documentation_fragment:
  - savestate.qemu._fleet
options:
  host:
    description: The host's name.
    type: str
    required: true
  role:
    description: V(drain) or V(restore).
    type: str
    required: true
  seconds:
    description: The role's wall time; without it, no time and no rate.
    type: float
"""

EXAMPLES = r"""
- ansible.builtin.debug:
    msg: "{{ rows | savestate.qemu.fleet_totals(inventory_hostname, 'drain', 12.3) }}"
"""

RETURN = r"""
_value:
  description: One line of text.
  type: str
"""

FilterModule = DocumentationOnly
