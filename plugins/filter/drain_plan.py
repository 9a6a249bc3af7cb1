# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The documentation of the savestate.qemu.drain_plan filter; fleet.py holds its code."""

from __future__ import annotations

from ansible_collections.savestate.qemu.plugins.plugin_utils._filter_docs import DocumentationOnly

DOCUMENTATION = r"""
name: drain_plan
short_description: Decide what a host drain does with each guest
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - Sorts the active guests of a host into those to save, the entries of an earlier drain to keep, the guests left to
    their manager (libvirt's) and the guests refused.
  - An earlier manifest entry is kept while its image exists and its guest is not active again.
  - A guest is refused, and left running, when it has no name, a name that cannot be a file name, or the name of another
    active guest; a name asked for that is neither active nor kept is refused too.
  - Used by the P(savestate.qemu.host_drain#role) role.
options:
  _input:
    description: The active guests, as M(savestate.qemu.guest_info) returns them in RV(savestate.qemu.guest_info#module:guests).
    type: list
    elements: dict
    required: true
  earlier:
    description: The result of M(savestate.qemu.drain_manifest) reading the manifest already in the drain directory.
    type: raw
  wanted:
    description: The names of the guests to drain; empty drains every guest.
    type: list
    elements: str
    default: []
  exclude:
    description: Names of guests to leave running.
    type: list
    elements: str
    default: []
"""

EXAMPLES = r"""
- ansible.builtin.set_fact:
    plan: "{{ info.guests | savestate.qemu.drain_plan(earlier=manifest, wanted=[], exclude=['build1']) }}"
"""

RETURN = r"""
_value:
  description:
    - C(to_save), the guests to save; C(kept), the earlier entries kept; C(skipped), the guests another manager owns;
      C(failures), the refusals, each with C(name), C(uuid) and C(msg).
  type: dict
"""

FilterModule = DocumentationOnly
