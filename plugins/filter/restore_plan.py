# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The documentation of the savestate.qemu.restore_plan filter; fleet.py holds its code."""

from __future__ import annotations

from ansible_collections.savestate.qemu.plugins.plugin_utils._filter_docs import DocumentationOnly

DOCUMENTATION = r"""
name: restore_plan
short_description: Decide what a host restore does with each manifest entry
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - Sorts the entries of a drain manifest into those to restore, in order, those already running again (left alone),
    those whose image failed its check, and the names asked for that the manifest does not list.
  - Used by the P(savestate.qemu.host_restore#role) role.
options:
  _input:
    description: The result of M(savestate.qemu.drain_manifest) reading the manifest, with C(images[].problem) when
      the images were checked.
    type: raw
    required: true
  guests:
    description: The active guests, as M(savestate.qemu.guest_info) returns them.
    type: list
    elements: dict
    required: true
  wanted:
    description: The names of the guests to restore; empty restores every entry.
    type: list
    elements: str
    default: []
  order:
    description: Names to restore first, in this order; the others follow by name.
    type: list
    elements: str
    default: []
"""

EXAMPLES = r"""
- ansible.builtin.set_fact:
    plan: "{{ manifest | savestate.qemu.restore_plan(info.guests, wanted=[], order=['db1']) }}"
"""

RETURN = r"""
_value:
  description:
    - C(pending), the entries to restore in order; C(active), those already running with the image's name and UUID;
      C(rejected), name to why its image is not restored; C(unknown), names asked for that the manifest does not list;
      C(entries), every selected entry in order; C(discarded), the manifest's discard records of the guests in scope
      (their entries, unless saved again after the discard, are never restored).
  type: dict
"""

FilterModule = DocumentationOnly
