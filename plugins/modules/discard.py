#!/usr/bin/python
# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: discard
short_description: Discard a drained guest on purpose, so that no restore brings it back
version_added: 1.0.0
description:
  - Removes the save image of a guest that P(savestate.qemu.host_drain#role) saved and its entry in the drain
    manifest, and records the discard in the manifest (name, UUID, when, by whom, why). Use it for a guest that
    will be rebuilt or booted fresh rather than restored, so that P(savestate.qemu.host_restore#role) does not
    later bring back a stale guest whose disks no longer match its saved RAM. host_restore never restores a
    discarded guest and reports it as V(discarded).
  - The image is the manifest entry's path, or C(<manifest directory>/<name>.save) when the manifest no longer
    lists the guest (a discard interrupted after its manifest write removes the image when run again).
  - Before anything changes, the image must be a regular file with one name that only root (or the user running
    the module) can change, opened without following a symbolic link, with a save image's header magic, of the
    guest named (its name and UUID, when the image records them), and without an interrupted
    M(savestate.qemu.save_image_define) edit. Under the guest's lock (the one restores and saves take), an image
    that another process has open (a restore loading it, a copy) or that M(savestate.qemu.save_image_define) is
    editing is refused too. A refusal changes nothing.
  - The manifest is written first, atomically, with every other entry and record as it was; then the image is
    removed, and emptied through the descriptor it was checked by, so that a restore which opened it just before
    cannot load it either.
  - A guest with neither an image nor a manifest entry has nothing to discard (C(changed=false)).
author:
  - savestate.qemu contributors (@savestate)
extends_documentation_fragment:
  - savestate.qemu._attributes
attributes:
  check_mode:
    support: full
    details:
      - Checks the image and the manifest as a real run does, and reports what it would remove; changes nothing.
  diff_mode:
    support: full
    details:
      - The manifest's text before and after, and whether the image exists before and after.
  idempotent:
    support: full
    details:
      - Once the image and the entry are gone, a run reports C(changed=false) and keeps the first run's record.
options:
  name:
    description:
      - The guest to discard, as the manifest names it.
    type: str
    required: true
  uuid:
    description:
      - The guest's UUID, when known. The discard is refused if the manifest entry or the image records another.
    type: str
  manifest:
    description:
      - The drain manifest (P(savestate.qemu.host_drain#role)'s C(host_drain_dir)/C(host_drain_manifest_name)).
        Its directory holds the image.
    type: path
    default: /var/lib/savestate/drain/savestate-manifest.json
  reason:
    description:
      - Why the guest is discarded; recorded in the manifest and shown by host_restore.
    type: str
  discarded_by:
    description:
      - Who discards it, as recorded in the manifest. By default the user who became root through C(sudo)
        (C(SUDO_USER)), else the user the module runs as.
    type: str
  timeout:
    description:
      - How long to wait, in seconds, for another savestate.qemu operation on this guest (a restore, a save) to
        finish before giving up. A restore still loading the image after that makes the discard fail, changing
        nothing.
    type: float
    default: 30
requirements:
  - lxml
notes:
  - Run it as root (C(become=true)) on the host that holds the images, as host_drain does.
  - A later drain keeps the record while it does not save a guest of that name again.
seealso:
  - module: savestate.qemu.drain_manifest
  - name: The drain manifest
    description: Fields, the C(discarded) records and the version policy (docs/drain-manifest.md in the collection).
    link: https://github.com/savestate/savestate.qemu/blob/main/docs/drain-manifest.md
"""

EXAMPLES = r"""
- name: Discard web1, which will be rebuilt rather than restored
  savestate.qemu.discard:
    name: web1
    reason: rebuilt from the golden image after the kernel upgrade
  become: true

- name: Discard guests of a drain in another directory, checking their UUID
  savestate.qemu.discard:
    manifest: /srv/drain/savestate-manifest.json
    name: "{{ item.name }}"
    uuid: "{{ item.uuid }}"
  loop: "{{ retired_guests }}"
  become: true
"""

RETURN = r"""
msg:
  description: What was discarded, or why there was nothing to discard.
  returned: always
  type: str
  sample: "guest 'web1' discarded: removed its image /var/lib/savestate/drain/web1.save (2150760448 bytes) and its
    manifest entry; recorded as discarded in /var/lib/savestate/drain/savestate-manifest.json"
image:
  description: The guest's image.
  returned: success
  type: dict
  contains:
    path:
      description: The image file.
      type: str
      sample: /var/lib/savestate/drain/web1.save
    existed:
      description: Whether it was there before the task.
      type: bool
      sample: true
    removed:
      description: Whether the task removed it (in check mode, would remove it).
      type: bool
      sample: true
    size:
      description: Its size in bytes, V(null) when it was not there.
      type: int
      sample: 2150760448
entry:
  description: The manifest entry removed (in check mode, that would be removed); V(null) when the manifest listed
    none.
  returned: success
  type: dict
  sample: {name: web1, uuid: 5a5a0001-0000-4000-8000-00000000000a, path: /var/lib/savestate/drain/web1.save,
           state: running, saved_at: "2026-11-24T13:40:16+00:00"}
discarded:
  description: The manifest's record of the discard (this run's, or an earlier run's); V(null) when there is no
    manifest to record it in.
  returned: success
  type: dict
  sample: {name: web1, uuid: 5a5a0001-0000-4000-8000-00000000000a, path: /var/lib/savestate/drain/web1.save,
           saved_at: "2026-11-24T13:40:16+00:00", discarded_at: "2026-11-24T15:02:11+00:00", discarded_by: alice,
           reason: rebuilt from the golden image}
"""

from typing import Any

from ansible_collections.savestate.qemu.plugins.module_utils._discard import (
    DEFAULT_MANIFEST,
    DiscardOutcome,
    DiscardRequest,
    discard_guest,
)
from ansible_collections.savestate.qemu.plugins.module_utils._module import (
    LXML,
    SaveStateModule,
    argument_spec,
    diff_result,
    timeout_args,
)


def _result(outcome: DiscardOutcome, diff: bool, manifest: str) -> dict[str, Any]:
    result: dict[str, Any] = dict(changed=outcome.changed, msg=outcome.msg, image=outcome.image, entry=outcome.entry,
                                  discarded=outcome.record)
    if diff:
        path = outcome.image["path"]
        result["diff"] = [
            diff_result(outcome.manifest_before or "", outcome.manifest_after or "", manifest),
            diff_result(f"{path}: present\n" if outcome.image["existed"] else "",
                        "" if outcome.image["removed"] or not outcome.image["existed"] else f"{path}: present\n",
                        path),
        ]
    return result


def main() -> None:
    module = SaveStateModule(argument_spec(
        timeout_args(30.0),
        name=dict(type="str", required=True),
        uuid=dict(type="str"),
        manifest=dict(type="path", default=DEFAULT_MANIFEST),
        reason=dict(type="str"),
        discarded_by=dict(type="str"),
    ), requires=(LXML,))
    params = module.params
    request = DiscardRequest(name=params["name"], manifest=params["manifest"], uuid=params["uuid"],
                             reason=params["reason"], discarded_by=params["discarded_by"], timeout=params["timeout"])
    outcome = module.run(lambda: discard_guest(request, module.check_mode))
    module.exit(**_result(outcome, module.diff, params["manifest"]))


if __name__ == "__main__":
    main()
