# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The documentation of the savestate.qemu.rounds filter; fleet.py holds its code."""

from __future__ import annotations

from ansible_collections.savestate.qemu.plugins.plugin_utils._filter_docs import DocumentationOnly

DOCUMENTATION = r"""
name: rounds
short_description: Split a host's guests into rounds of concurrent jobs
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - Splits O(_input) into lists of at most O(size) items; the items whose C(name) is listed in O(first) each get a round of
    their own first, in that order.
  - Used by the P(savestate.qemu.host_drain#role) and P(savestate.qemu.host_restore#role) roles.
options:
  _input:
    description: Items (dicts with a C(name)).
    type: list
    required: true
    elements: raw
  size:
    description: Largest round; at least 1.
    type: int
    required: true
  first:
    description: Names to put alone in the first rounds, in this order.
    type: list
    elements: raw
"""

EXAMPLES = r"""
- ansible.builtin.set_fact:
    rounds: "{{ guests | savestate.qemu.rounds(2, ['db1']) }}"
"""

RETURN = r"""
_value:
  description: The rounds, lists of items.
  type: list
  elements: raw
"""

FilterModule = DocumentationOnly
