# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Times as images and manifests record them (``saved_at``, ``discarded_at``): ISO 8601, UTC, to the second."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional


def utc_text(seconds: Optional[float] = None) -> str:
    """``seconds`` since the epoch (default: now) as recorded: ``2026-11-24T13:40:16+00:00``."""
    moment = datetime.now(timezone.utc) if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)
    return moment.isoformat(timespec="seconds")


def parse_utc(text: Any) -> Optional[float]:
    """Seconds since the epoch of a recorded time, or None when ``text`` is not one.

    A trailing "Z" (as libvirt and people write it) and a time without a zone are UTC.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
