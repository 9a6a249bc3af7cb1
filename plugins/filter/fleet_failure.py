# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The documentation of the savestate.qemu.fleet_failure filter; fleet.py holds its code."""

from __future__ import annotations

from ansible_collections.savestate.qemu.plugins.plugin_utils._filter_docs import DocumentationOnly

DOCUMENTATION = r"""
name: fleet_failure
short_description: Why a drain or restore fails, and what happened to the other guests
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - Names the failed guests with their reasons, and the guests that were saved or restored, or says that none was; in check
    mode says that nothing was changed.
extends_documentation_fragment:
  - savestate.qemu._fleet
  - savestate.qemu._fleet.REPORT
options:
  manifest:
    description: The drain's manifest path, named in the message.
    type: str
"""

EXAMPLES = r"""
- ansible.builtin.set_fact:
    msg: "{{ rows | savestate.qemu.fleet_failure('drain') }}"
"""

RETURN = r"""
_value:
  description: The message; empty when no guest failed.
  type: str
"""

FilterModule = DocumentationOnly
