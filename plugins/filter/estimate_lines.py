# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The documentation of the savestate.qemu.estimate_lines filter; fleet.py holds its code."""

from __future__ import annotations

from ansible_collections.savestate.qemu.plugins.plugin_utils._filter_docs import DocumentationOnly

DOCUMENTATION = r"""
name: estimate_lines
short_description: A drain estimate as lines of text
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - Two lines of totals (images, free space, duration, the bandwidth and what it rests on, C(measured on DATE) or
    C(default assumption)), then one line per guest; every line starts with the host's name.
options:
  _input:
    description: The result of P(savestate.qemu.drain_estimate#filter).
    type: dict
    required: true
  host:
    description: The host's name.
    type: str
    required: true
"""

EXAMPLES = r"""
- ansible.builtin.debug:
    msg: "{{ estimate | savestate.qemu.estimate_lines(inventory_hostname) }}"
"""

RETURN = r"""
_value:
  description: Lines of text.
  type: list
  elements: str
"""

FilterModule = DocumentationOnly
