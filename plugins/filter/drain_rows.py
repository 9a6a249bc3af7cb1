# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The documentation of the savestate.qemu.drain_rows filter; fleet.py holds its code."""

from __future__ import annotations

from ansible_collections.savestate.qemu.plugins.plugin_utils._filter_docs import DocumentationOnly

DOCUMENTATION = r"""
name: drain_rows
short_description: One summary row per guest of a host drain
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - Turns what P(savestate.qemu.host_drain#role) collected (async save results, refused guests, kept manifest entries, libvirt's
    guests, the guest lists before and after) into rows with C(guest), C(name), C(uuid), C(before), C(image), C(size), C(seconds),
    C(mib_s), C(after), C(result), C(msg).
  - Internal to the role; its arguments may change.
extends_documentation_fragment:
  - savestate.qemu._fleet.JOBS
options:
  _input:
    description: The async_status results of the save jobs.
    type: list
    required: true
    elements: raw
  failures:
    description: Guests refused before any save (C(name), C(uuid), C(msg)).
    type: list
    required: true
    elements: raw
  kept:
    description: Manifest entries of guests saved by an earlier run.
    type: list
    required: true
    elements: raw
  skipped:
    description: Guests libvirt manages.
    type: list
    required: true
    elements: raw
  guests_after:
    description: M(savestate.qemu.guest_info) guests after the drain.
    type: list
    required: true
    elements: raw
  image_dir:
    description: The image directory.
    type: str
    required: true
  listed_only:
    description: Guests a check-mode run could only list.
    type: list
    elements: raw
  entries:
    description: Manifest entries written in this run.
    type: list
    elements: raw
"""

EXAMPLES = r"""
- ansible.builtin.set_fact:
    rows: "{{ saves | savestate.qemu.drain_rows([], [], [], before, after, '/srv/drain') }}"
"""

RETURN = r"""
_value:
  description: One row (a dict) per guest the drain looked at.
  type: list
  elements: raw
"""

FilterModule = DocumentationOnly
