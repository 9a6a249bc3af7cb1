# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The documentation of the savestate.qemu.job_lines filter; fleet.py holds its code."""

from __future__ import annotations

from ansible_collections.savestate.qemu.plugins.plugin_utils._filter_docs import DocumentationOnly

DOCUMENTATION = r"""
name: job_lines
short_description: One line per guest of a round of saves or restores, as its job finished
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - "For each job: C(HOST: GUEST saved: BYTES bytes (MIB MiB) in SECONDS s, RATE MiB/s) (or C(restored)), from the
    C(stats) of M(savestate.qemu.save) or M(savestate.qemu.restore); C(HOST: GUEST failed: MESSAGE) for a job that
    failed or did not finish (the message cut to 160 characters; the role's summary has it whole)."
  - Used by the P(savestate.qemu.host_drain#role) and P(savestate.qemu.host_restore#role) roles as the label of each
    job in their wait loops (printed the moment the job is seen finished, without the host) and after each round.
options:
  _input:
    description: The round's C(ansible.builtin.async_status) results (each with the start result's C(item.item), the guest).
    type: list
    required: true
    elements: raw
  host:
    description: The host's name, at the start of every line; empty, the lines start with the guest.
    type: str
    required: true
  role:
    description: V(drain) or V(restore).
    type: str
    required: true
"""

EXAMPLES = r"""
- ansible.builtin.debug:
    msg: "{{ finished.results | savestate.qemu.job_lines(inventory_hostname, 'drain') }}"
"""

RETURN = r"""
_value:
  description: One line per job.
  type: list
  elements: str
"""

FilterModule = DocumentationOnly
