# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The documentation of the savestate.qemu.drain_estimate filter; fleet.py holds its code."""

from __future__ import annotations

from ansible_collections.savestate.qemu.plugins.plugin_utils._filter_docs import DocumentationOnly

DOCUMENTATION = r"""
name: drain_estimate
short_description: What a drain would write and how long it would take
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - Each image is at most its guest's RAM (a raw image holds the RAM in use, a compressed one less), so the sizes and
    durations are upper bounds at the rate assumed.
  - The rate is the save bandwidth measured on the host for the directory and format (the C(bandwidth) that
    M(savestate.qemu.drain_manifest) returns), else O(default_mib_s); RV(_value.measured) and RV(_value.basis) say which.
  - Guests are saved in rounds of O(concurrency); a round lasts as long as its largest guest.
  - Used by the P(savestate.qemu.host_drain#role) role in check mode.
options:
  _input:
    description: The guests to save (M(savestate.qemu.guest_info) guests, with C(name) and C(memory_mib)).
    type: list
    required: true
    elements: dict
  statfs:
    description: C(stat -f -c '%a %S') of the directory or its nearest existing parent; empty when unknown.
    type: str
    required: true
  bandwidth:
    description: The C(bandwidth) of M(savestate.qemu.drain_manifest) (per image format).
    type: dict
    required: true
  image_format:
    description: The image format the drain would write.
    type: str
    required: true
  concurrency:
    description: Saves at the same time.
    type: int
    required: true
  directory:
    description: The image directory, named in the result.
    type: str
    required: true
  margin_mib:
    description: Free space to keep beyond the images, in MiB, for RV(_value.fits).
    type: int
    default: 0
  default_mib_s:
    description: The bandwidth to assume when none was measured.
    type: float
    default: 100
"""

EXAMPLES = r"""
- ansible.builtin.set_fact:
    estimate: "{{ plan.to_save | savestate.qemu.drain_estimate(statfs.stdout, manifest.bandwidth, 'raw', 2, '/var/lib/savestate/drain') }}"
"""

RETURN = r"""
_value:
  description: The estimate.
  type: dict
  contains:
    directory:
      description: O(directory).
      type: str
    format:
      description: O(image_format).
      type: str
    guests:
      description: One item per guest, with C(name), C(image_bytes_max) (its RAM in bytes) and C(seconds).
      type: list
      elements: dict
    image_bytes_max:
      description: The images' total size at most, in bytes.
      type: int
    free_bytes:
      description: The free space, in bytes; V(null) when unknown.
      type: int
    fits:
      description: Whether the images and the margin fit in the free space; V(null) when unknown.
      type: bool
    mib_s:
      description: The bandwidth assumed.
      type: float
    measured:
      description: Whether it was measured on the host (V(false) means O(default_mib_s)).
      type: bool
    basis:
      description: What the bandwidth rests on, C(measured on DATE ...) or C(default assumption ...).
      type: str
    seconds:
      description: The drain's estimated duration at most (the saves only).
      type: float
    concurrency:
      description: O(concurrency).
      type: int
"""

FilterModule = DocumentationOnly
