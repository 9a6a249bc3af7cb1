#!/usr/bin/python
# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: save_image_define
short_description: Rewrite the domain XML or the restore state inside a QEMU save image
version_added: 1.0.0
description:
  - Changes what a finished save image says about its guest without touching the saved RAM and
    device state, like libvirt's C(virsh save-image-define). Typical use is pointing an image at
    disks that moved, or at another QEMU binary, before restoring it on another host.
  - Give a whole new domain XML with O(xml), or make targeted edits with O(disk_paths) and
    O(emulator), or both; O(restore_state) decides whether the guest runs or stays paused after
    the restore.
  - "Edits that would describe another guest are refused with libvirt's words, for example
    C(unsupported configuration: Target domain name 'other' does not match source 'web01'): the
    name, UUID, memory size, vCPU count, architecture, machine type, virtualization type and the
    number of disks must stay as saved."
  - The new XML must fit in the space the image reserved for it (64 KiB more than the XML it was
    written with); otherwise the module fails with C(new xml too large to fit in file).
  - The image is opened once (never through a symbolic link) and its MAC verified before anything
    is changed; an authenticated image is signed again after the edit with this host's image key.
    An image without a valid MAC is refused unless O(allow_unauthenticated=true), and then edited
    but not signed, so that an edit never turns an image into an authenticated one.
  - The rewrite is crash-safe. The old header and XML go to a journal first, in root's private
    state directory (C(/var/lib/savestate-qemu/journals/), named after the image's device and
    inode; never next to the image). If the edit is interrupted, reading the image fails
    until this module runs again on it, which rolls the image back to how it was before the
    interrupted edit (and then applies the requested edit).
  - Works on images written by this collection and by libvirt (libvirt's with
    O(allow_unauthenticated=true)), in every format. Incomplete images (their save never
    finished) are refused.
author:
  - savestate.qemu contributors (@savestate)
extends_documentation_fragment:
  - savestate.qemu._attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - The diff shows the domain XML before and after (both normalized by the same XML
        serializer, so that only real changes show), and the restore state when it changes.
  idempotent:
    support: full
    details:
      - When nothing would change, the image is not written at all (its contents and modification time stay).
options:
  allow_unauthenticated:
    description:
      - Edit an image that carries no valid MAC of this host's image key (libvirt's images, another
        fleet's, images changed after the save).
      - The image stays unauthenticated after the edit.
    type: bool
    default: false
  path:
    description:
      - The save image to change.
    type: path
    required: true
  xml:
    description:
      - A complete domain XML to store instead of the current one.
      - For images written by this collection it must keep the C(savestate:qemu-save) element
        inside C(<metadata>); start from the RV(xml) that M(savestate.qemu.save_image_info) returns.
      - Compared byte for byte with the stored XML to decide whether anything changes.
      - O(disk_paths) and O(emulator) are applied on top of it.
    type: str
  disk_paths:
    description:
      - Disk image paths to replace, old path to new path.
      - Changes the C(<disk>) sources of the domain XML and, in images written by this collection,
        the recorded disks and every place the recorded QEMU command line names the disk
        (C(-drive file=...), C(-blockdev) C(filename), C(-hda) and similar), because
        M(savestate.qemu.restore) starts QEMU with that command line.
      - Paths are compared exactly as stored. Paths not found in the image are ignored.
    type: dict
  emulator:
    description:
      - Path of the QEMU binary to restore with. In images written by this collection it replaces
        the recorded emulator and the first argument of the recorded command line; in libvirt's
        images it replaces C(<emulator>).
    type: path
  restore_state:
    description:
      - Whether the guest runs (V(running)) or stays paused (V(paused)) after a restore.
      - Leave it out to keep what the image says.
    type: str
    choices: [running, paused]
requirements:
  - lxml
seealso:
  - module: savestate.qemu.save_image_info
  - module: savestate.qemu.restore
  - name: The save image format
    description: Byte layout, metadata namespace, the journal (docs/image-format.md in the collection).
    link: https://github.com/savestate/savestate.qemu/blob/main/docs/image-format.md
"""

EXAMPLES = r"""
- name: Point an image at the disks' new home before restoring it on another host
  savestate.qemu.save_image_define:
    path: /srv/moved/web01.save
    disk_paths:
      /var/lib/images/web01.qcow2: /srv/moved/web01.qcow2

- name: Restore with the QEMU build installed on this host
  savestate.qemu.save_image_define:
    path: /srv/moved/web01.save
    emulator: /usr/libexec/qemu-kvm

- name: Make the guest come back paused
  savestate.qemu.save_image_define:
    path: /var/lib/savestate/web01.save
    restore_state: paused

- name: Store an edited copy of the XML (only host-side details may change)
  block:
    - name: Read the image
      savestate.qemu.save_image_info:
        path: /var/lib/savestate/db01.save
      register: saved

    - name: Replace the XML
      savestate.qemu.save_image_define:
        path: /var/lib/savestate/db01.save
        xml: "{{ saved.xml | replace('/old/nfs/', '/new/nfs/') }}"
      diff: true
"""

RETURN = r"""
authenticated:
  description: Whether the image (after the edit) carries a valid MAC of this host's image key.
  returned: success
  type: bool
  sample: true
image:
  description:
    - The image after the change (in check mode, as it would be); the same dict as M(savestate.qemu.save_image_info)
      returns in RV(image).
    - When the edit is refused or fails once the image was read, the image as it is (nothing was changed), so that
      the failure names the image it concerns.
  returned: success; on failure once the image was read
  type: dict
  contains:
    path:
      description: The image file.
      type: str
    complete:
      description: Always V(true) (incomplete images are refused).
      type: bool
    version:
      description: Header version.
      type: int
    format:
      description: How the migration stream is stored (raw, gzip, bzip2, xz, lzop, zstd, sparse).
      type: str
    was_running:
      description: Whether the guest runs after a restore.
      type: bool
    name:
      description: The guest's name.
      type: str
    uuid:
      description: The guest's UUID.
      type: str
    memory_kib:
      description: Guest memory in KiB.
      type: int
    vcpus:
      description: Number of virtual CPUs.
      type: int
    machine:
      description: The versioned machine type.
      type: str
    stream_offset:
      description: Byte offset of the migration stream (unchanged by this module).
      type: int
    size:
      description: Size of the image file in bytes (unchanged by this module).
      type: int
    origin:
      description: V(savestate) or V(libvirt).
      type: str
    metadata:
      description: This collection's metadata, or V(null) for libvirt's images.
      type: dict
  sample:
    path: /srv/moved/web01.save
    complete: true
    version: 2
    format: raw
    was_running: true
    name: web01
    uuid: 4c7a1a3e-30b6-4e55-9a55-3d7d2a1b0c11
    memory_kib: 1048576
    vcpus: 2
    machine: pc-q35-10.0
    stream_offset: 68093
    size: 412003328
    origin: savestate
    metadata: {}
xml:
  description: The domain XML stored in the image after the change (in check mode, as it would be).
  returned: success
  type: str
  sample: "<domain type=\"kvm\">...</domain>"
recovered:
  description: V(true) when an interrupted earlier edit was rolled back (in check mode, would be).
  returned: success
  type: bool
  sample: false
"""

from typing import Any

from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import normalized
from ansible_collections.savestate.qemu.plugins.module_utils._image_define import (
    RESTORE_STATES,
    DefineOutcome,
    DefineRequest,
    define_image,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image_info import describe_image
from ansible_collections.savestate.qemu.plugins.module_utils._module import (
    ALLOW_UNAUTHENTICATED_ARGS,
    IMAGE_PATH_ARGS,
    LXML,
    SaveStateModule,
    argument_spec,
    diff_result,
)


def _state_name(was_running: bool) -> str:
    return "running" if was_running else "paused"


def _diff(path: str, outcome: DefineOutcome) -> list[dict[str, Any]]:
    before, after = outcome.before, outcome.after
    diffs = [diff_result(normalized(before.xml), normalized(after.xml), path)]
    if before.was_running != after.was_running:
        diffs.append(diff_result(_state_name(before.was_running) + "\n", _state_name(after.was_running) + "\n",
                                 f"{path} (restore state)"))
    return diffs


def _request(module: SaveStateModule) -> DefineRequest:
    disk_paths = module.params["disk_paths"]
    if disk_paths is not None:
        bad = [key for key, value in disk_paths.items() if not key or not isinstance(value, str) or not value]
        if bad:
            module.fail(f"disk_paths maps old paths to new paths, both non-empty strings; check {bad}")
    return DefineRequest(xml=module.params["xml"], disk_paths=disk_paths, emulator=module.params["emulator"],
                         restore_state=module.params["restore_state"],
                         allow_unauthenticated=module.params["allow_unauthenticated"])


def main() -> None:
    module = SaveStateModule(
        argument_spec(
            IMAGE_PATH_ARGS, ALLOW_UNAUTHENTICATED_ARGS,
            xml=dict(type="str"),
            disk_paths=dict(type="dict"),
            emulator=dict(type="path"),
            restore_state=dict(type="str", choices=list(RESTORE_STATES)),
        ),
        requires=(LXML,),
    )
    path = module.params["path"]
    request = _request(module)
    outcome = module.run(lambda: define_image(path, request, check_mode=module.check_mode))
    result = dict(changed=outcome.changed, recovered=outcome.recovered,
                  image=describe_image(outcome.after, outcome.record), xml=outcome.after.xml,
                  authenticated=outcome.authenticated)
    if module.diff:
        result["diff"] = _diff(path, outcome)
    module.exit(**result)


if __name__ == "__main__":
    main()
