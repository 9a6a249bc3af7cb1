# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The documentation of the savestate.qemu.succeeded filter; fleet.py holds its code."""

from __future__ import annotations

from ansible_collections.savestate.qemu.plugins.plugin_utils._filter_docs import DocumentationOnly

DOCUMENTATION = r"""
name: succeeded
short_description: The async jobs that finished without failing
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - Keeps the async_status results of jobs that finished and did not fail.
options:
  _input:
    description: async_status results.
    type: list
    required: true
    elements: raw
"""

EXAMPLES = r"""
- ansible.builtin.set_fact:
    ok: "{{ results | savestate.qemu.succeeded }}"
"""

RETURN = r"""
_value:
  description: The successful results.
  type: list
  elements: raw
"""

FilterModule = DocumentationOnly
