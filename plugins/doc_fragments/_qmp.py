# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this doc fragment is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

from __future__ import annotations


class ModuleDocFragment:
    """Options of every module that talks to QEMU over QMP.

    Must be kept in sync with ``QMP_ARGS`` in plugins/module_utils/_module.py.
    """

    DOCUMENTATION = r"""
options:
  qmp_trace:
    description:
      - Return the exact QMP conversation with QEMU as C(qmp_trace), for debugging and bug reports.
      - It is a list with one entry per message, in order, each with C(time) (UTC, ISO 8601),
        C(endpoint) (the monitor's socket path or C(host:port)), C(direction) (V(sent) or V(received)),
        C(kind) (V(greeting), V(command), V(reply), V(event), or V(fd) for a file descriptor passed
        over the socket) and C(message) (the QMP message).
      - Secrets in messages, such as passwords and the data of C(secret) objects, are replaced by
        V(<redacted>).
    type: bool
    default: false
requirements:
  - qemu.qmp >= 0.0.4 (the Python QMP library) on the managed host
"""
