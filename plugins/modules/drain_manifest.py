#!/usr/bin/python
# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: drain_manifest
short_description: Read, validate and write the manifest of a drained host
version_added: 1.0.0
description:
  - Reads and writes the drain manifest, the versioned JSON file in which P(savestate.qemu.host_drain#role)
    lists the guests it saved and from which P(savestate.qemu.host_restore#role) brings them back.
    The format and its version policy are described in docs/drain-manifest.md of the collection.
  - With O(state=read), validates the manifest field by field and returns it converted to the current format
    version, with what it found about each image. A manifest of a version this module does not know (written by
    a newer savestate.qemu) is refused with a message saying what to do; a manifest without a version (written
    before the format was versioned) reads as version 1, with a warning.
  - With O(state=present), writes the manifest with the guests given, sorted by name, atomically and with mode
    C(0600), after the same validation a reader applies. Images just saved are described and fingerprinted
    (size, modification time and optionally a checksum) on the host.
  - An image path must name a file directly inside the manifest's directory, so that an edited manifest cannot
    make a restore read a file elsewhere. The manifest itself must be a regular file only root or its owner can
    change.
author:
  - savestate.qemu contributors (@savestate)
extends_documentation_fragment:
  - savestate.qemu._attributes
attributes:
  check_mode:
    support: full
    details:
      - O(state=read) changes nothing. O(state=present) reports whether it would change the manifest and writes nothing.
  diff_mode:
    support: full
    details:
      - O(state=present) returns the manifest's text before and after.
  idempotent:
    support: full
options:
  path:
    description:
      - The manifest file. Its directory holds the images it lists.
    type: path
    required: true
  state:
    description:
      - V(read) reads and validates the manifest; V(present) writes it.
    type: str
    choices: [read, present]
    default: read
  missing_ok:
    description:
      - With O(state=read), return an empty manifest (RV(exists=false)) when there is none, instead of failing.
    type: bool
    default: false
  check_images:
    description:
      - With O(state=read), what to find out about each listed image, in RV(images).
      - V(exists) whether it is there; V(fingerprint) also compares it with its fingerprint in the manifest (size,
        then checksum if recorded, else modification time) and says in RV(images[].problem) why it may not be
        restored; V(none) looks at nothing.
    type: str
    choices: [none, exists, fingerprint]
    default: exists
  guests:
    description:
      - With O(state=present), entries to keep as they are, usually entries of the manifest read before (images
        saved by an earlier run). Their fingerprints are kept, never taken again, so that an image changed since
        its save is still found out.
    type: list
    elements: dict
    default: []
  saved:
    description:
      - With O(state=present), images just saved, as M(savestate.qemu.save) returns them (its RV(savestate.qemu.save#module:image)),
        to describe and fingerprint now. An entry of the same name in O(guests) is replaced.
    type: list
    elements: dict
    default: []
  checksum_algorithm:
    description:
      - With O(state=present), also record a checksum of each image of O(saved) with this algorithm. The restore
        then compares checksums instead of modification times, which is slower as it reads every image.
    type: str
    choices: [md5, sha1, sha224, sha256, sha384, sha512]
seealso:
  - name: The drain manifest
    description: Fields, version policy and compatibility (docs/drain-manifest.md in the collection).
    link: https://github.com/savestate/savestate.qemu/blob/main/docs/drain-manifest.md
"""

EXAMPLES = r"""
- name: Read the manifest and compare each image with its fingerprint
  savestate.qemu.drain_manifest:
    path: /var/lib/savestate/drain/savestate-manifest.json
    check_images: fingerprint
  register: manifest

- name: List the guests whose image changed since the drain
  ansible.builtin.debug:
    msg: "{{ manifest.images | selectattr('problem') | map(attribute='name') | list }}"

- name: Write a manifest of the images just saved, keeping the earlier entries
  savestate.qemu.drain_manifest:
    path: /var/lib/savestate/drain/savestate-manifest.json
    state: present
    guests: "{{ manifest.manifest.guests }}"
    saved: "{{ saves.results | map(attribute='image') | list }}"
"""

RETURN = r"""
exists:
  description: Whether the manifest file existed before the task.
  returned: success
  type: bool
  sample: true
version:
  description:
    - With O(state=read), the format version of the file as read (V(1) for a manifest without a version); with
      O(state=present), the version written. V(null) when O(missing_ok=true) and there is no manifest.
  returned: success
  type: int
  sample: 1
notes:
  description:
    - What the module had to assume to read the manifest, for example that a manifest without a version is of
      version 1. Each note is also given as a warning.
  returned: success
  type: list
  elements: str
  sample: ["the manifest has no 'version' field (written before the format was versioned): read as version 1"]
manifest:
  description: The manifest in the current format version (empty when there is none).
  returned: success
  type: dict
  contains:
    version:
      description: The current format version.
      type: int
      sample: 1
    guests:
      description: One entry per saved guest, sorted by name; docs/drain-manifest.md describes the fields.
      type: list
      elements: dict
      sample:
        - name: web1
          uuid: 5a5a0001-0000-4000-8000-00000000000a
          path: /var/lib/savestate/drain/web1.save
          state: running
          format: raw
          size: 2150760448
          memory_mib: 2048
          machine: pc-q35-10.0
          saved_at: "2026-11-24T13:40:16+00:00"
          fingerprint: {size: 2150760448, mtime: 1764000016.25}
added:
  description: With O(state=present), the entries made for the images of O(saved), as written.
  returned: success
  type: list
  elements: dict
images:
  description: With O(state=read) and O(check_images) other than V(none), one item per entry.
  returned: success
  type: list
  elements: dict
  contains:
    name:
      description: The guest's name.
      type: str
    path:
      description: The image file.
      type: str
    exists:
      description: Whether the image is there (a regular file).
      type: bool
    problem:
      description: With O(check_images=fingerprint), why the image may not be restored; V(null) when it may.
      type: str
  sample:
    - {name: web1, path: /var/lib/savestate/drain/web1.save, exists: true, problem: null}
    - {name: db1, path: /var/lib/savestate/drain/db1.save, exists: true,
       problem: "the image changed size since the drain (4301258752 -> 4301258240 bytes)"}
bandwidth:
  description:
    - With O(state=read), the save bandwidth measured on this host for images in the manifest's directory, per image
      format, from the last successful M(savestate.qemu.save) into it (which records it in its private state
      directory). Empty when none was recorded, or the record is unreadable or malformed (it is then ignored).
    - P(savestate.qemu.host_drain#role) estimates a drain's duration from it in check mode.
  returned: with O(state=read)
  type: dict
  sample:
    raw: {directory: /var/lib/savestate/drain, format: raw, bytes: 2147549184, seconds: 1.84, mib_s: 1112.5,
          measured_at: "2026-11-30T12:00:00+00:00"}
"""

import json
import os
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._bandwidth import lookup as recorded_bandwidth
from ansible_collections.savestate.qemu.plugins.module_utils._module import SaveStateModule
from ansible_collections.savestate.qemu.plugins.module_utils._manifest import (
    CHECKSUM_ALGORITHMS,
    FORMAT_VERSION,
    ManifestError,
    current_text,
    dump_manifest,
    entry_from_image,
    image_problem,
    kept_discards,
    read_manifest,
    write_manifest,
)


def _digest(module: SaveStateModule) -> Any:
    def digest(path: str, algorithm: str) -> Optional[str]:
        value: Optional[str] = module.ansible.digest_from_file(path, algorithm)
        if value is None:
            raise ManifestError(f"cannot compute the {algorithm} checksum of {path}")
        return value
    return digest


def _read(module: SaveStateModule) -> dict[str, Any]:
    params = module.params
    manifest = read_manifest(params["path"])
    if manifest is None:
        if not params["missing_ok"]:
            raise ManifestError(f"there is no drain manifest at {params['path']}: nothing was drained into "
                                "this directory, or the manifest was moved; nothing was changed")
        return dict(exists=False, version=None, manifest={"version": FORMAT_VERSION, "guests": []}, images=[], notes=[],
                    bandwidth=recorded_bandwidth(os.path.dirname(params["path"])))
    for note in manifest.notes:
        module.ansible.warn(f"{params['path']}: {note}")
    images = []
    if params["check_images"] != "none":
        verify = params["check_images"] == "fingerprint"
        for entry in manifest.guests:
            exists, problem = image_problem(entry, verify, _digest(module))
            images.append({"name": entry["name"], "path": entry["path"], "exists": exists, "problem": problem})
    return dict(exists=True, version=manifest.version, manifest=manifest.as_dict(), images=images,
                notes=list(manifest.notes), bandwidth=recorded_bandwidth(os.path.dirname(params["path"])))


def _write(module: SaveStateModule) -> dict[str, Any]:
    params = module.params
    path = params["path"]
    directory = os.path.dirname(path)
    saved = [entry_from_image(image, params["checksum_algorithm"], _digest(module)) for image in params["saved"]]
    replaced = {entry["name"] for entry in saved}
    kept = [entry for entry in params["guests"] if entry.get("name") not in replaced]
    try:
        # Guests discarded on purpose stay recorded as such, unless saved again.
        text = dump_manifest(kept + saved, directory, kept_discards(path, kept + saved))
    except ManifestError as error:
        raise ManifestError(f"refusing to write the drain manifest {path}: {error}") from None
    before = current_text(path)
    changed = before != text
    if changed and not module.check_mode:
        write_manifest(path, text)
    written = json.loads(text)
    added = [entry for entry in written["guests"] if entry["name"] in replaced]
    result = dict(changed=changed, exists=before is not None, version=FORMAT_VERSION,
                  manifest=written, added=added, images=[], notes=[])
    if module.diff:
        result["diff"] = dict(before=before or "", after=text, before_header=path, after_header=path)
    return result


def main() -> None:
    module = SaveStateModule(dict(
        path=dict(type="path", required=True),
        state=dict(type="str", default="read", choices=["read", "present"]),
        missing_ok=dict(type="bool", default=False),
        check_images=dict(type="str", default="exists", choices=["none", "exists", "fingerprint"]),
        guests=dict(type="list", elements="dict", default=[]),
        saved=dict(type="list", elements="dict", default=[]),
        checksum_algorithm=dict(type="str", choices=list(CHECKSUM_ALGORITHMS)),
    ))
    if not os.path.isabs(module.params["path"]):
        module.fail(f"path must be absolute, not {module.params['path']!r}")
    result = module.run(lambda: _read(module) if module.params["state"] == "read" else _write(module))
    result.setdefault("changed", False)
    module.exit(**result)


if __name__ == "__main__":
    main()
