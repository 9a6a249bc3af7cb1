# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""UUIDs compared one way everywhere.

Users write UUIDs in any letter case, QEMU reports them in lower case, libvirt's XML
may hold either: two texts name the same guest when their canonical forms agree.
"""

from __future__ import annotations

from typing import Optional

from ansible_collections.savestate.qemu.plugins.module_utils._runtime import canonical_uuid


def uuid_form(value: str) -> str:
    """``value`` in the form UUIDs are compared in: canonical lower case, or, if it is no UUID, as
    given without surrounding blanks, lower-cased (so that it matches only itself)."""
    text = value.strip()
    return canonical_uuid(text.lower()) or text.lower()


def same_uuid(first: Optional[str], second: Optional[str]) -> bool:
    """Whether both are given and name the same UUID."""
    if first is None or second is None:
        return False
    return uuid_form(first) == uuid_form(second)
