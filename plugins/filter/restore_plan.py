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
    description: Names to restore first, in this order; the others follow by priority (highest first), then by name.
    type: list
    elements: str
    default: []
  priorities:
    description:
      - Priorities by guest name, over the C(priority) recorded in each manifest entry; an entry with neither has
        priority V(0).
    type: dict
    default: {}
    version_added: 1.0.0
  max_age:
    description:
      - The oldest image to restore, in seconds or as a duration (V(900), V(15m), V(1h30m), V(2d)); V(null) for no
        limit. The age is taken from the entry's C(saved_at), else its fingerprint's C(mtime); an entry with neither
        counts as too old.
    type: raw
    version_added: 1.0.0
  now:
    description: The time to compute the ages at, in seconds since the epoch; by default the current time.
    type: float
    version_added: 1.0.0
"""

EXAMPLES = r"""
- ansible.builtin.set_fact:
    plan: "{{ manifest | savestate.qemu.restore_plan(info.guests, wanted=[], order=['db1']) }}"

- ansible.builtin.set_fact:
    plan: "{{ manifest | savestate.qemu.restore_plan(info.guests, priorities={'web1': 10}, max_age='2h') }}"
"""

RETURN = r"""
_value:
  description:
    - C(pending), the entries to restore in order; C(active), those already running with the image's name and UUID;
      C(rejected), name to why its image is not restored; C(stale), the entries older than O(max_age), each with
      C(age_s) (V(null) when unknown) and C(max_age_s); C(unknown), names asked for that the manifest does not list;
      C(entries), every selected entry in order (every entry has its C(priority)); C(discarded), the manifest's
      discard records of the guests in scope (their entries, unless saved again after the discard, are never restored).
  type: dict
"""

FilterModule = DocumentationOnly
