# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""What save and restore hand back, and the ``guest`` and ``stats`` dicts, built in one place.

Both orchestrations have one shape: a request (the module's options) goes in, an
:class:`Outcome` comes out (check mode included: then it says what would happen),
and the module layer (``_module.py``) turns the outcome into the module's result.
The ``image`` dict is built by ``_image_info.describe_image``; DESIGN.md lists the keys
of all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

MIB = 1024 * 1024


@dataclass
class Outcome:
    """The result of one save or restore (or, in check mode, what it would be)."""

    changed: bool
    msg: str
    guest: dict[str, Any]
    image: Optional[dict[str, Any]] = None
    stats: Optional[dict[str, Any]] = None
    before: dict[str, Any] = field(default_factory=dict)   # the diff, as dicts
    after: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    trace: list[dict[str, Any]] = field(default_factory=list)


def guest_result(name: Optional[str], uuid: Optional[str], pid: Optional[int], state: Optional[str],
                 qmp: Optional[str], managed_by: Optional[str] = None) -> dict[str, Any]:
    """The ``guest`` return value of save and restore (guest_info lists more per guest)."""
    return {"name": name, "uuid": uuid, "pid": pid, "state": state, "qmp": qmp, "managed_by": managed_by or "none"}


def stats_result(duration: float, size: int) -> dict[str, Any]:
    """The ``stats`` return value: how long moving ``size`` bytes of image took, and how fast."""
    return {"duration_s": round(duration, 3), "bytes": size,
            "throughput_mib_s": round(size / MIB / duration, 1) if duration > 0 else None}
