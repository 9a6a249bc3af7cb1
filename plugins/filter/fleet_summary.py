# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The documentation of the savestate.qemu.fleet_summary filter; fleet.py holds its code."""

from __future__ import annotations

from ansible_collections.savestate.qemu.plugins.plugin_utils._filter_docs import DocumentationOnly

DOCUMENTATION = r"""
name: fleet_summary
short_description: A host's drain or restore as lines of a table
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - A headline (what happened, or what would happen in check mode), a table (guest, before, image, size, seconds, MiB/s, after)
    and one line per problem.
extends_documentation_fragment:
  - savestate.qemu._fleet
  - savestate.qemu._fleet.REPORT
options:
  host:
    description: The host's name.
    type: str
    required: true
  seconds:
    description: The role's wall time.
    type: float
"""

EXAMPLES = r"""
- ansible.builtin.set_fact:
    msg: "{{ rows | savestate.qemu.fleet_summary(inventory_hostname, 'drain') }}"
"""

RETURN = r"""
_value:
  description: Lines of text.
  type: list
  elements: str
"""

FilterModule = DocumentationOnly
