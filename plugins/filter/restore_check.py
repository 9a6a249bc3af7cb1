# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The savestate.qemu.restore_check filter: which guests the emulator that will restore them can load."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._emulator_info import resolve_machine, restore_problem

DOCUMENTATION = r"""
name: restore_check
short_description: Tell the guests an emulator can restore from those it would strand
version_added: 1.0.0
author:
  - savestate.qemu contributors
description:
  - Matches guests (as M(savestate.qemu.guest_info) lists them) or manifest entries (as M(savestate.qemu.drain_manifest)
    reads them) against the emulator that will restore each, as M(savestate.qemu.emulator_info) described it.
  - A guest is stranded when that emulator does not have its machine type (QEMU loads a saved guest only on the machine
    type it was saved on), cannot load its image format (V(sparse) needs QEMU 9.0 or newer, a compressed format its
    decompressor), or could not be asked.
  - A running guest's machine type may be an alias from its command line (V(pc)); it is resolved with the aliases of the
    emulator the guest runs on now, as a save would record it.
  - The same check as the P(savestate.qemu.host_drain#role), P(savestate.qemu.host_restore#role) and
    P(savestate.qemu.guest_move#role) roles make.
options:
  _input:
    description: Active guests (with C(exe), C(machine)) or manifest entries (with C(path), C(machine), C(format)).
    type: list
    elements: dict
    required: true
  emulators:
    description: RV(savestate.qemu.emulator_info#module:emulators).
    type: dict
    required: true
  emulator:
    description:
      - The emulator that will restore every guest. Unset, each guest's own - the image's recorded emulator (see
        O(images)), else the one the guest runs on now (C(exe)).
    type: str
  image_format:
    description: The image format, for guests that do not say (active guests to be saved).
    type: str
  images:
    description: RV(savestate.qemu.emulator_info#module:images), for manifest entries (keyed by their C(path)).
    type: dict
"""

EXAMPLES = r"""
- savestate.qemu.emulator_info:
    emulators: "{{ info.guests | map(attribute='exe') | list + ['/opt/qemu/bin/qemu-system-x86_64'] }}"
  register: emulators

- ansible.builtin.set_fact:
    check: "{{ info.guests | savestate.qemu.restore_check(emulators.emulators, '/opt/qemu/bin/qemu-system-x86_64', 'raw') }}"
"""

RETURN = r"""
_value:
  description:
    - C(ok), the guests the emulator can restore; C(stranded), the others, each with C(name), C(uuid), C(machine),
      C(format), C(emulator) (the path that was asked), C(reason) (V(machine), V(format), V(emulator) or V(image)),
      C(msg) and C(item) (the guest or entry); C(rows), a summary row per stranded guest as the roles show them
      (C(result=stranded), the guest left running).
  type: dict
"""


def _current(item: Mapping[str, Any]) -> Optional[str]:
    """The emulator a running guest runs on now (guest_info's ``exe``, else its argv[0])."""
    argv = item.get("argv") or []
    return item.get("exe") or (argv[0] if argv else None)


def restore_check(items: Iterable[Mapping[str, Any]], emulators: Optional[Mapping[str, Any]],
                  emulator: Optional[str] = None, image_format: Optional[str] = None,
                  images: Optional[Mapping[str, Any]] = None) -> dict[str, list[Any]]:
    """Split ``items`` into ``ok`` and ``stranded`` (with why) for the emulator that will restore each."""
    emulators, images = emulators or {}, images or {}
    ok: list[Any] = []
    stranded: list[dict[str, Any]] = []
    for item in items:
        recorded = images.get(str(item.get("path"))) or {}
        current = _current(item)
        target = emulator or recorded.get("emulator") or current
        machine = resolve_machine(item.get("machine") or recorded.get("machine"), emulators.get(current or ""))
        item_format = item.get("format") or recorded.get("format") or image_format
        if recorded.get("problem"):
            problem: Optional[tuple[str, str]] = ("image", f"its image cannot be read: {recorded['problem']}")
        else:
            problem = restore_problem(emulators.get(target or ""), machine, item_format)
        if problem is None:
            ok.append(item)
            continue
        stranded.append({"name": item.get("name"), "uuid": item.get("uuid"), "machine": machine, "format": item_format,
                         "emulator": target, "reason": problem[0], "msg": problem[1], "item": item})
    return {"ok": ok, "stranded": stranded, "rows": [_row(entry) for entry in stranded]}


def _row(stranded: Mapping[str, Any]) -> dict[str, Any]:
    """A summary row in the roles' shape (see fleet.py): the guest stays as it was, nothing is written."""
    state = stranded["item"].get("state")
    return {"guest": stranded["name"], "name": stranded["name"], "uuid": stranded["uuid"], "before": state,
            "image": None, "size": None, "seconds": None, "mib_s": None, "after": state, "result": "stranded",
            "msg": f"{stranded['msg']}; not saved, so it keeps running", "machine": stranded["machine"], "emulator": stranded["emulator"]}


class FilterModule:
    """savestate.qemu.restore_check."""

    def filters(self) -> dict[str, Any]:
        return {"restore_check": restore_check}
