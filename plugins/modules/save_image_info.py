#!/usr/bin/python
# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: save_image_info
short_description: Read and validate a QEMU save image, ours or libvirt's
version_added: 1.0.0
description:
  - Reads the header and the domain XML of a QEMU save image, the file format of libvirt's
    C(virsh save) that M(savestate.qemu.save) also writes, and checks that the image is whole.
  - Works on images written by libvirt in every format (raw, gzip, bzip2, xz, lzop, zstd, sparse)
    and on images written by this collection, which also carry metadata for M(savestate.qemu.restore).
  - An image whose save never finished (partial magic) is reported with RV(image.complete=false)
    rather than failing. An unreadable or malformed image fails with a message naming the problem.
  - The migration stream itself is not decompressed or replayed; only its first bytes are checked.
author:
  - savestate.qemu contributors (@savestate)
extends_documentation_fragment:
  - savestate.qemu._attributes
  - savestate.qemu._attributes.INFO_MODULE
options:
  path:
    description:
      - The save image to read.
    type: path
    required: true
requirements:
  - lxml
seealso:
  - module: savestate.qemu.save_image_define
  - name: The save image format
    description: Byte layout, metadata namespace and checks (docs/image-format.md in the collection).
    link: https://github.com/savestate/savestate.qemu/blob/main/docs/image-format.md
"""

EXAMPLES = r"""
- name: Inspect a save image
  savestate.qemu.save_image_info:
    path: /var/lib/savestate/web01.save
  register: saved

- name: Show what would come back
  ansible.builtin.debug:
    msg: >-
      {{ saved.image.name }} ({{ saved.image.uuid }}), {{ saved.image.memory_kib // 1024 }} MiB,
      {{ 'running' if saved.image.was_running else 'paused' }} after restore,
      written by {{ saved.origin }}

- name: Refuse to go on with an unfinished image
  ansible.builtin.assert:
    that: saved.image.complete
    fail_msg: "{{ saved.image.path }} is incomplete; its save was interrupted"

- name: Read an image written by libvirt's managed save
  savestate.qemu.save_image_info:
    path: /var/lib/libvirt/qemu/save/db01.save
"""

RETURN = r"""
authenticated:
  description:
    - Whether the image carries a valid MAC of this host's image key (see docs/image-format.md),
      and its file is one only root or its owner can change.
    - V(false) for libvirt's images, images of another fleet (another key), images saved before
      signing and images changed after the save. M(savestate.qemu.restore) and
      M(savestate.qemu.save_image_define) refuse those unless told otherwise.
  returned: success
  type: bool
  sample: true
authentication_problem:
  description: Why the image is not authenticated; V(null) when it is.
  returned: success
  type: str
  sample: "MAC mismatch: the header or data area changed after signing"
image:
  description: What the image holds. M(savestate.qemu.save) and M(savestate.qemu.restore) return the same dict.
  returned: success
  type: dict
  contains:
    path:
      description: The image file.
      type: str
      sample: /var/lib/savestate/web01.save
    complete:
      description: V(false) when the save that wrote the image never finished (libvirt's partial magic).
      type: bool
      sample: true
    version:
      description: Header version, 2 for every libvirt since 2009 (1 is read as well).
      type: int
      sample: 2
    format:
      description: How the migration stream is stored.
      type: str
      choices: [raw, gzip, bzip2, xz, lzop, zstd, sparse]
      sample: zstd
    was_running:
      description: Whether the guest runs after a restore (V(false) means it stays paused).
      type: bool
      sample: true
    name:
      description: The guest's name.
      type: str
      sample: web01
    uuid:
      description: The guest's UUID (V(null) when the XML has none).
      type: str
      sample: 4c7a1a3e-30b6-4e55-9a55-3d7d2a1b0c11
    memory_kib:
      description: Guest memory in KiB.
      type: int
      sample: 1048576
    vcpus:
      description: Number of virtual CPUs.
      type: int
      sample: 2
    machine:
      description: The versioned machine type the guest ran on.
      type: str
      sample: pc-q35-10.0
    stream_offset:
      description: Byte offset of the QEMU migration stream (92 + the header's data length).
      type: int
      sample: 67100
    size:
      description: Size of the image file in bytes (apparent size; sparse images take less on disk).
      type: int
      sample: 91276872
    origin:
      description: V(savestate) when the image carries this collection's metadata, V(libvirt) otherwise.
      type: str
      choices: [savestate, libvirt]
      sample: savestate
    metadata:
      description: This collection's metadata (same as RV(metadata)), or V(null) for libvirt's images.
      type: dict
      sample: null
xml:
  description: The domain XML stored in the image, as stored.
  returned: success
  type: str
  sample: "<domain type='kvm'>...</domain>"
cookie:
  description: libvirt's save cookie (the guest CPU as it ran), or V(null) when the image has none.
  returned: success
  type: str
  sample: "<cookie>\n  <slirpHelper/>\n</cookie>\n"
origin:
  description: V(savestate) or V(libvirt), as in RV(image.origin).
  returned: success
  type: str
  sample: libvirt
metadata:
  description: What M(savestate.qemu.restore) needs, from this collection's XML namespace; V(null) for libvirt's images.
  returned: success
  type: dict
  sample:
    emulator: /usr/bin/qemu-system-x86_64
    qemu_version: 10.0.2
    machine: pc-q35-10.0
    argv: [/usr/bin/qemu-system-x86_64, -name, guest=web01, "..."]
    qmp: /run/web01/qmp.sock
    disks:
      - path: /var/lib/images/web01.qcow2
        format: qcow2
        size: 2147483648
        mtime_ns: 1764000000000000000
        node: disk0
        target: null
    saved_at: "2026-11-24T13:40:16+00:00"
    cwd: /var/lib/qemu/web01
    credentials: {uid: 0, gid: 0, groups: [], user: root}
  contains:
    emulator:
      description: Path of the QEMU binary that ran the guest.
      type: str
    qemu_version:
      description: Its version.
      type: str
    machine:
      description: The versioned machine type.
      type: str
    argv:
      description: The exact command line of the saved QEMU process.
      type: list
      elements: str
    qmp:
      description: The QMP endpoint the guest had (socket path or host:port).
      type: str
    disks:
      description: The guest's disks, with size and modification time at save time.
      type: list
      elements: dict
    saved_at:
      description: When the image was written (ISO 8601, UTC).
      type: str
    cwd:
      description: The saved QEMU's working directory; relative paths in RV(metadata.argv) resolve from it.
      type: str
    credentials:
      description:
        - Who the saved QEMU process ran as; M(savestate.qemu.restore) starts QEMU with these credentials.
        - V(null) when the image does not record them (saved by an older version).
      type: dict
      contains:
        uid:
          description: User id.
          type: int
        gid:
          description: Group id.
          type: int
        groups:
          description: Supplementary group ids.
          type: list
          elements: int
        user:
          description: The user's name at save time (informative; the ids count).
          type: str
"""

from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._image_auth import open_image
from ansible_collections.savestate.qemu.plugins.module_utils._image_info import describe_image
from ansible_collections.savestate.qemu.plugins.module_utils._image_key import ImageKey, ImageKeyError, load_key
from ansible_collections.savestate.qemu.plugins.module_utils._module import IMAGE_PATH_ARGS, LXML, SaveStateModule


def _host_key() -> tuple[Optional[ImageKey], Optional[str]]:
    """The host key if there is one (reading an image never creates it), else why not."""
    try:
        return load_key(create=False), None
    except ImageKeyError as error:
        return None, f"the host key cannot be used: {error}"


def read(path: str) -> dict[str, Any]:
    """The module's result for the image at ``path``."""
    key, key_problem = _host_key()
    # Reporting only: a file others could write reads as unauthenticated instead of failing.
    with open_image(path, key, allow_incomplete=True, check_file=False) as opened:
        image, record = opened.image, opened.record
        problem = opened.auth_problem
        if problem and key_problem and key is None:
            problem = key_problem
    return dict(changed=False, image=describe_image(image, record), xml=image.xml, cookie=image.cookie,
                origin=record.origin, metadata=record.metadata(), authenticated=problem is None,
                authentication_problem=problem)


def main() -> None:
    module = SaveStateModule(IMAGE_PATH_ARGS, requires=(LXML,))
    module.exit(**module.run(lambda: read(module.params["path"])))


if __name__ == "__main__":
    main()
