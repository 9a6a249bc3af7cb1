# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The documentation of the savestate.qemu.drain_space filter; fleet.py holds its code."""

from __future__ import annotations

from ansible_collections.savestate.qemu.plugins.plugin_utils._filter_docs import DocumentationOnly

DOCUMENTATION = r"""
name: drain_space
short_description: Tell whether the guests' RAM fits in the drain directory
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - A raw image is about as large as its guest's RAM, so the guests' RAM plus a margin must fit in the free space.
  - Used by the P(savestate.qemu.host_drain#role) role before any guest is saved.
options:
  _input:
    description: The guests to save, each with C(memory_mib).
    type: list
    elements: dict
    required: true
  statfs:
    description: The output of C(stat -f -c '%a %S' DIRECTORY) on the host (free blocks and block size).
    type: str
    required: true
  margin_mib:
    description: Space to keep free beyond the images, in MiB.
    type: int
    required: true
  directory:
    description: The drain directory, named in the message.
    type: str
    required: true
"""

EXAMPLES = r"""
- ansible.builtin.fail:
    msg: "{{ problem }}"
  when: problem | length > 0
  vars:
    problem: "{{ plan.to_save | savestate.qemu.drain_space(statfs.stdout, 512, '/var/lib/savestate') }}"
"""

RETURN = r"""
_value:
  description: Why the RAM does not fit, naming the sizes and what to do; empty when it fits.
  type: str
"""

FilterModule = DocumentationOnly
