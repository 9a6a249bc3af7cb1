#!/usr/bin/python
# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: emulator_info
short_description: Tell what a QEMU emulator can restore (version, machine types, image formats)
version_added: 1.0.0
description:
  - Asks QEMU system emulators of the host for their version (C(-version)) and machine types
    (C(-machine help), aliases included), and says which save image formats each can load on this host.
  - QEMU loads a saved guest only on the machine type it was saved with. Matched with
    the P(savestate.qemu.restore_check#filter) filter, this tells before a drain, a restore or a move
    whether the QEMU that will restore a guest can (a QEMU upgrade may drop the machine type).
  - Only trusted emulators are run, as M(savestate.qemu.restore) judges them - a C(qemu-system-*) or
    C(qemu-kvm) binary owned by root, writable by nobody else, in directories only root can write. An
    emulator that is not trusted, or does not answer, is reported with its RV(emulators.problem), not run.
  - Can also read the emulator, machine type and format recorded in save images (O(images)), and
    describe those emulators too.
  - Read-only; runs in check mode.
author:
  - savestate.qemu contributors (@savestate)
extends_documentation_fragment:
  - savestate.qemu._attributes
  - savestate.qemu._attributes.INFO_MODULE
options:
  emulators:
    description:
      - The emulators to describe, by absolute path (a bare name is looked up in C(PATH)).
    type: list
    elements: str
    default: []
  images:
    description:
      - Save images whose recorded emulator, machine type and format to report (in RV(images)); their
        emulators are described in RV(emulators) as well.
    type: list
    elements: path
    default: []
requirements:
  - lxml (for O(images))
seealso:
  - module: savestate.qemu.guest_info
  - module: savestate.qemu.restore
"""

EXAMPLES = r"""
- name: Ask the QEMU the host will have after the upgrade
  savestate.qemu.emulator_info:
    emulators: [/opt/qemu-10.1/bin/qemu-system-x86_64]
  register: after

- name: Refuse to drain a guest it cannot bring back
  ansible.builtin.assert:
    that: "'pc-i440fx-7.2' in after.emulators['/opt/qemu-10.1/bin/qemu-system-x86_64'].machines"
"""

RETURN = r"""
emulators:
  description: Each emulator asked about, keyed by the path as given.
  returned: always
  type: dict
  sample:
    /usr/bin/qemu-system-x86_64:
      given: /usr/bin/qemu-system-x86_64
      path: /usr/bin/qemu-system-x86_64
      version: 7.2.22
      machines: [pc, pc-i440fx-7.2, pc-i440fx-7.1, q35, pc-q35-7.2]
      aliases: {pc: pc-i440fx-7.2, q35: pc-q35-7.2}
      formats: [raw, gzip, xz, zstd]
      problem: null
  contains:
    given:
      description: The path as given.
      type: str
    path:
      description: The resolved real path that was run; V(null) when it was not run.
      type: str
    version:
      description: The QEMU version, V(null) when it did not say.
      type: str
    machines:
      description: The machine types of C(-machine help), aliases included.
      type: list
      elements: str
    aliases:
      description: Each alias and the versioned machine type it stands for.
      type: dict
    formats:
      description:
        - The save image formats it can load here; V(sparse) needs QEMU 9.0 or newer, a compressed
          format its decompressor on the host.
      type: list
      elements: str
    problem:
      description: Why the emulator was not run or did not answer; V(null) when it answered.
      type: str
images:
  description: For each image of O(images), keyed by its path, what it records.
  returned: always
  type: dict
  contains:
    emulator:
      description: The emulator the image's guest ran on, which M(savestate.qemu.restore) runs by default.
      type: str
    machine:
      description: The versioned machine type.
      type: str
    format:
      description: The image format.
      type: str
    problem:
      description: Why the image could not be read; V(null) when it could.
      type: str
"""

from typing import Any

from ansible_collections.savestate.qemu.plugins.module_utils._emulator_info import describe_emulator
from ansible_collections.savestate.qemu.plugins.module_utils._errors import SaveStateError
from ansible_collections.savestate.qemu.plugins.module_utils._image_info import load_image
from ansible_collections.savestate.qemu.plugins.module_utils._module import LXML, SaveStateModule, requirement_problem


def read_image_record(path: str) -> dict[str, Any]:
    """What restoring the image at ``path`` needs of an emulator."""
    try:
        image, record = load_image(path, allow_incomplete=True)
    except SaveStateError as error:
        return {"emulator": None, "machine": None, "format": None, "problem": str(error)}
    return {"emulator": record.emulator, "machine": record.machine, "format": image.format.label, "problem": None}


def describe(emulators: list[str], images: list[str]) -> dict[str, Any]:
    """The module's result: each image's record, then each emulator (given or recorded) described once."""
    records = {path: read_image_record(path) for path in dict.fromkeys(images)}
    wanted = list(emulators) + [record["emulator"] for record in records.values() if record["emulator"]]
    return dict(changed=False, images=records,
                emulators={path: describe_emulator(path) for path in dict.fromkeys(wanted)})


def main() -> None:
    module = SaveStateModule({"emulators": {"type": "list", "elements": "str", "default": []},
                              "images": {"type": "list", "elements": "path", "default": []}})
    problem = requirement_problem(LXML) if module.params["images"] else None
    if problem is not None:  # lxml reads an image's domain XML; describing emulators needs none
        module.fail(problem[0])
    module.exit(**module.run(lambda: describe(module.params["emulators"], module.params["images"])))


if __name__ == "__main__":
    main()
