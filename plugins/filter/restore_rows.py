# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The documentation of the savestate.qemu.restore_rows filter; fleet.py holds its code."""

from __future__ import annotations

from ansible_collections.savestate.qemu.plugins.plugin_utils._filter_docs import DocumentationOnly

DOCUMENTATION = r"""
name: restore_rows
short_description: One summary row per guest of a host restore
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - Turns what P(savestate.qemu.host_restore#role) collected into rows with the same keys as P(savestate.qemu.drain_rows#filter).
  - Internal to the role; its arguments may change.
extends_documentation_fragment:
  - savestate.qemu._fleet.JOBS
options:
  _input:
    description: The async_status results of the restore jobs.
    type: list
    required: true
    elements: raw
  rejected:
    description: Names of guests whose image was refused, and why.
    type: dict
    required: true
  active:
    description: Manifest entries whose guest was already active.
    type: list
    required: true
    elements: raw
  unknown:
    description: Names asked for that the manifest does not list.
    type: list
    required: true
    elements: str
  remove_images:
    description: Whether images are deleted after their restore.
    type: bool
  entries:
    description: The manifest's entries.
    type: list
    elements: raw
  target_state:
    description: The role's C(host_restore_state).
    type: str
  discarded:
    description: The manifest's discard records (C(discarded) of P(savestate.qemu.restore_plan#filter)), one row each
      with result C(discarded).
    type: list
    elements: raw
  stale:
    description:
      - P(savestate.qemu.restore_plan#filter)'s C(stale) entries (images too old to restore, with C(age_s) and
        C(max_age_s)); each gets a row with C(result=stale), which is not a failure.
    type: list
    elements: raw
    default: []
    version_added: 1.0.0
"""

EXAMPLES = r"""
- ansible.builtin.set_fact:
    rows: "{{ results | savestate.qemu.restore_rows({}, [], [], before) }}"
"""

RETURN = r"""
_value:
  description:
    - One row (a dict) per guest the restore looked at, with the keys of P(savestate.qemu.drain_rows#filter)'s rows.
    - A restored guest's row also has C(clock_synced), the restore's C(guest.clock_synced) (V(true), V(false) or
      V(no agent)).
  type: list
  elements: raw
"""

FilterModule = DocumentationOnly
