# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The documentation of the savestate.qemu.failures filter; fleet.py holds its code."""

from __future__ import annotations

from ansible_collections.savestate.qemu.plugins.plugin_utils._filter_docs import DocumentationOnly

DOCUMENTATION = r"""
name: failures
short_description: The failed rows of a drain or restore summary
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - Returns C(name), C(uuid) and C(msg) of every row whose C(result) is V(failed).
extends_documentation_fragment:
  - savestate.qemu._fleet
"""

EXAMPLES = r"""
- ansible.builtin.set_fact:
    failed: "{{ rows | savestate.qemu.failures }}"
"""

RETURN = r"""
_value:
  description: One dict per failed guest.
  type: list
  elements: raw
"""

FilterModule = DocumentationOnly
