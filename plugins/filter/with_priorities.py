# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The documentation of the savestate.qemu.with_priorities filter; fleet.py holds its code."""

from __future__ import annotations

from ansible_collections.savestate.qemu.plugins.plugin_utils._filter_docs import DocumentationOnly

DOCUMENTATION = r"""
name: with_priorities
short_description: Set the restore priority of manifest entries or saved images
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - Returns copies of the items, with C(priority) set to O(priorities[NAME]) for the items whose C(name) is listed there;
    the others are unchanged.
  - Used by the P(savestate.qemu.host_drain#role) role to record C(host_drain_priorities) in the manifest, from which
    P(savestate.qemu.host_restore#role) starts the guests of higher priority first.
options:
  _input:
    description: Items with a C(name) (manifest entries, or M(savestate.qemu.save)'s RV(savestate.qemu.save#module:image)).
    type: list
    required: true
    elements: dict
  priorities:
    description: Whole numbers by name.
    type: dict
    default: {}
"""

EXAMPLES = r"""
- ansible.builtin.set_fact:
    entries: "{{ kept | savestate.qemu.with_priorities({'db1': 100}) }}"
"""

RETURN = r"""
_value:
  description: The items, with C(priority) set where O(priorities) names them.
  type: list
  elements: dict
"""

FilterModule = DocumentationOnly
