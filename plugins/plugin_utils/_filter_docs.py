# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this plugin util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""The filter plugin of a file that only documents a filter.

plugins/filter/fleet.py holds all the roles' filters. ansible-doc, ansible-test and
galaxy-importer read a filter's documentation from a Python file named after it
(plugins/filter/rounds.py for ``savestate.qemu.rounds``), so each filter has one. Ansible
loads every file in plugins/filter as a filter plugin and warns about one without a
``FilterModule``: these files set ``FilterModule = DocumentationOnly``, which adds none.
"""

from __future__ import annotations


class DocumentationOnly:
    """A ``FilterModule`` with no filters."""

    def filters(self) -> dict[str, object]:
        return {}
