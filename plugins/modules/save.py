#!/usr/bin/python
# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: save
short_description: Save a running QEMU guest's RAM and device state to a file
version_added: 1.0.0
author:
  - savestate.qemu contributors (@savestate)
description:
  - Pauses a QEMU guest, writes its RAM and device state to a save image, and then, by default,
    ends the QEMU process, like C(virsh save). M(savestate.qemu.restore) brings the guest back from
    the image in the state it had.
  - The image is libvirt's QEMU save image, byte for byte (a 92-byte header, the domain XML, then
    QEMU's migration stream), so libvirt's tools read it. The domain XML carries, in its own XML
    namespace, what a restore needs that libvirt does not record, such as the emulator, the exact
    command line, the resolved machine type and fingerprints of the guest's disks.
  - Talks to QEMU over QMP; needs no libvirt. Guests that libvirt manages are refused (save them with
    C(virsh save)).
  - Before it touches the guest, the module checks QEMU's migration blockers, that this QEMU supports
    the chosen O(format), the compressor program, the target directory and its free space, and that
    O(path) does not hold an image of another guest.
  - The image is written under a temporary name in the target directory with libvirt's partial
    magic, and renamed into place only after QEMU has finished and the data is on disk. A failed save
    resumes a guest that was running, removes the temporary file and leaves an earlier image at
    O(path) untouched.
  - The migration stream never passes through Python. Raw and sparse images are written by QEMU
    directly into the file; compressed images go from QEMU through the compressor into the file.
extends_documentation_fragment:
  - savestate.qemu._attributes
  - savestate.qemu._qmp
  - ansible.builtin.files
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - The diff shows the guest's state and the image at O(path) before and after.
  idempotent:
    support: partial
    details:
      - With O(after_save=stop) (the default), a guest that is no longer active and a complete image
        of that guest at O(path) mean there is nothing to do.
      - With O(after_save=paused), a guest that QEMU already saved (state C(postmigrate)) to a complete
        image at O(path) is left alone.
      - With O(after_save=running) every run saves the guest again.
options:
  name:
    description:
      - The guest's name (QEMU's C(-name)).
      - At least one of O(name), O(uuid) and O(socket) is required. All of those given must point at
        the same guest.
    type: str
  uuid:
    description:
      - The guest's UUID (QEMU's C(-uuid)), in any letter case.
    type: str
  socket:
    description:
      - The guest's QMP monitor, a unix socket path or V(host:port) for a TCP monitor.
      - Without it, the module uses the monitor on the guest's command line (C(-qmp), C(-qmp-pretty),
        or C(-chardev socket) with C(-mon mode=control)).
      - Over a TCP monitor no file descriptor can reach QEMU, so QEMU opens O(path) itself (QEMU 8.2 and
        newer) or runs a shell command that appends to it (older QEMU, and compressed formats); the
        path is single-quoted for the shell.
    type: str
  path:
    description:
      - The save image to write. Its directory must exist.
      - An existing complete image of another guest is not replaced unless O(force=true).
    type: path
    required: true
  format:
    description:
      - How the migration stream is stored, libvirt's save image formats.
      - V(raw) is the fastest and the largest.
      - V(gzip), V(bzip2), V(xz), V(lzop) and V(zstd) compress the stream with that program, which must
        be installed on the host (and on the host that restores). V(zstd) runs multi-threaded and is
        the best compromise of the compressed formats.
      - V(sparse) uses QEMU's mapped-ram layout (QEMU 9.0 and newer). Every RAM page has a fixed place
        in the file, zero pages are holes, and QEMU can write with several threads
        (O(parallel_channels)) and bypass the page cache (O(bypass_cache)). libvirt 11.2 and newer read
        it.
    type: str
    default: raw
    choices: [raw, gzip, bzip2, xz, lzop, zstd, sparse]
  parallel_channels:
    description:
      - The number of threads QEMU writes a V(sparse) image with (multifd channels).
      - Only with O(format=sparse).
      - When not given, one per CPU core of the host, at most 4, for O(format=sparse) (1 for the other
        formats). On a 2-core host two channels saved a sparse image 1.2-1.3 times faster than one (the
        collection's C(docs/performance.md) has the measurements).
    type: int
  bypass_cache:
    description:
      - Write the image with O_DIRECT, around the host's page cache (QEMU 9.1 and newer, O(format=sparse)
        only). Keeps a large save from evicting the host's cache; the file system must support O_DIRECT
        (tmpfs does not).
    type: bool
    default: false
  restore_state:
    description:
      - The state M(savestate.qemu.restore) brings the guest back in, recorded in the image header.
      - By default, the state the guest had when the save began.
    type: str
    choices: [running, paused]
  after_save:
    description:
      - What happens to the guest once the image is complete.
      - V(stop) ends the QEMU process and waits for it to exit, then records the disks' final
        fingerprints in the image. This is what makes a later restore safe, and it is C(virsh save)'s
        behaviour.
      - V(running) resumes the guest. Its disks then move on from the saved RAM, and a restore with
        O(savestate.qemu.restore#module:disk_check=strict) refuses the image.
      - V(paused) leaves the guest paused (QEMU state C(postmigrate)).
    type: str
    default: stop
    choices: [stop, running, paused]
  force:
    description:
      - Replace a file at O(path) that is a complete image of another guest, or no save image at all.
    type: bool
    default: false
  timeout:
    description:
      - Seconds the migration may take before it is cancelled and the guest put back.
      - Also how long to wait for another save or restore of the same guest to finish.
    type: float
    default: 600
  mode:
    description:
      - The permissions of the image, as for M(ansible.builtin.file).
      - Images hold the guest's memory, passwords and keys included. Without O(mode) they are created
        V(0600).
notes:
  - Run it as root (C(become=true)) unless you own the QEMU process and its monitor.
  - Only one save or restore of a guest runs at a time; a second waits for the first (up to
    O(timeout)).
  - If the module itself is killed during a save, the guest stays paused. Run the task again; it
    finishes the save, or starts it over, and still restores the state the guest had before the first
    attempt.
  - The image holds RAM, not disk contents. Do not boot the guest from its disks between a save and the
    restore; M(savestate.qemu.restore) refuses an image whose disks changed.
  - After a save that wrote an image, the module records its bandwidth (RV(stats)) for the image's directory and
    format in C(bandwidth.json) of its private state directory (C(/var/lib/savestate-qemu) for root), where
    M(savestate.qemu.drain_manifest) finds it for the estimate of P(savestate.qemu.host_drain#role) in check mode.
    A record that cannot be written only gives a warning; the save still succeeds.
requirements:
  - qemu.qmp >= 0.0.4 and lxml on the managed host.
  - For compressed formats, the compressor program (gzip, bzip2, xz, lzop or zstd) on the managed host.
seealso:
  - module: savestate.qemu.restore
  - module: savestate.qemu.save_image_info
  - name: The save guide
    description: Formats, QEMU versions, what after_save does, failures and how they are handled.
    link: https://github.com/savestate/savestate.qemu/blob/main/docs/save.md
"""

EXAMPLES = r"""
- name: Save guest web1 before a host reboot (the QEMU process ends)
  savestate.qemu.save:
    name: web1
    path: /var/lib/qemu/save/web1.save
  become: true

- name: Save a guest by its monitor, compressed, and keep it running
  savestate.qemu.save:
    socket: /run/qemu/db1.qmp
    path: /srv/images/db1.save.zst
    format: zstd
    after_save: running
  become: true

- name: Save a large guest fast, four threads, around the page cache
  savestate.qemu.save:
    name: big1
    path: /var/lib/qemu/save/big1.save
    format: sparse
    parallel_channels: 4
    bypass_cache: true
    timeout: 1800
  become: true

- name: Save a paused guest so that it comes back running
  savestate.qemu.save:
    uuid: 9a4a1c4e-7f3b-4c1e-9d55-1b0f3f3c2e11
    path: /var/lib/qemu/save/batch.save
    restore_state: running
  become: true
"""

RETURN = r"""
image:
  description:
    - The image written (or found, when nothing had to change).
    - The same dict as M(savestate.qemu.save_image_info) returns, see there for its keys (V(path),
      V(complete), V(version), V(format), V(was_running), V(name), V(uuid), V(memory_kib), V(vcpus),
      V(machine), V(stream_offset), V(size), V(origin), V(metadata)).
  returned: when an image is at O(path) after the run
  type: dict
  sample:
    path: /var/lib/qemu/save/web1.save
    complete: true
    format: raw
    was_running: true
    name: web1
    machine: pc-i440fx-10.0
guest:
  description:
    - The guest after the run.
    - When the save fails once the guest was found, the guest it concerned, with RV(guest.state=null)
      (the failure message says what became of it).
  returned: always, on failure once the guest was found
  type: dict
  contains:
    name:
      description: The guest's name.
      type: str
      sample: web1
    uuid:
      description: The guest's UUID.
      type: str
      sample: 9a4a1c4e-7f3b-4c1e-9d55-1b0f3f3c2e11
    pid:
      description: The QEMU process id; with O(after_save=stop), of the process that ended.
      type: int
      sample: 4242
    state:
      description: V(stopped) when the QEMU process ended, else V(paused) or V(running); V(null) on failure.
      type: str
      sample: stopped
    qmp:
      description: The monitor the module used.
      type: str
      sample: /run/qemu/web1.qmp
    managed_by:
      description: Always V(none); guests libvirt manages are refused.
      type: str
      sample: none
stats:
  description: How long QEMU took to write the image, and how fast.
  returned: when an image was written
  type: dict
  contains:
    duration_s:
      description: Seconds from the start of the migration until the image was on disk.
      type: float
      sample: 1.84
    bytes:
      description: The image's size in bytes.
      type: int
      sample: 2147549184
    throughput_mib_s:
      description: Image MiB written per second.
      type: float
      sample: 1112.5
qmp_trace:
  description:
    - The QMP conversation, when O(qmp_trace=true).
    - On failure too, up to the failure; that is what a bug report needs.
  returned: when O(qmp_trace=true), on failure too
  type: list
  elements: dict
"""

from typing import Any

from ansible_collections.savestate.qemu.plugins.module_utils._bandwidth import record_save
from ansible_collections.savestate.qemu.plugins.module_utils._image import ImageFormat
from ansible_collections.savestate.qemu.plugins.module_utils._module import (
    GUEST_IDENTITY_ARGS,
    LXML,
    QEMU_QMP,
    QMP_ARGS,
    SaveStateModule,
    argument_spec,
    timeout_args,
)
from ansible_collections.savestate.qemu.plugins.module_utils._save import (
    AFTER_SAVE_CHOICES,
    RESTORE_STATE_CHOICES,
    SaveRequest,
    save_guest,
)

DEFAULT_MODE = "0600"


def build_request(params: dict[str, Any]) -> SaveRequest:
    return SaveRequest(
        path=params["path"],
        name=params["name"],
        uuid=params["uuid"],
        socket=params["socket"],
        image_format=ImageFormat.from_name(params["format"]),
        parallel_channels=params["parallel_channels"],
        bypass_cache=params["bypass_cache"],
        restore_state=params["restore_state"],
        after_save=params["after_save"],
        force=params["force"],
        timeout=params["timeout"],
        trace=params["qmp_trace"],
    )


def main() -> None:
    module = SaveStateModule(
        argument_spec(
            GUEST_IDENTITY_ARGS, timeout_args(600.0), QMP_ARGS,
            socket=dict(type="str"),
            path=dict(type="path", required=True),
            format=dict(type="str", default="raw", choices=[f.label for f in ImageFormat]),
            parallel_channels=dict(type="int"),
            bypass_cache=dict(type="bool", default=False),
            restore_state=dict(type="str", choices=list(RESTORE_STATE_CHOICES)),
            after_save=dict(type="str", default="stop", choices=list(AFTER_SAVE_CHOICES)),
            force=dict(type="bool", default=False),
        ),
        requires=(QEMU_QMP, LXML),
        required_one_of=[("name", "uuid", "socket")],
        add_file_common_args=True,
    )
    params = module.params
    outcome = module.run(lambda: save_guest(build_request(params), check_mode=module.check_mode))
    changed = outcome.changed
    if outcome.image is not None and not module.check_mode:
        file_args = module.ansible.load_file_common_arguments(params, path=outcome.image["path"])
        if file_args["mode"] is None:
            file_args["mode"] = DEFAULT_MODE
        changed = module.ansible.set_fs_attributes_if_different(file_args, changed)
    if outcome.stats is not None and not module.check_mode:
        # For the next drain's estimate (host_drain check mode); never fails the save.
        problem = record_save(params["path"], params["format"], outcome.stats)
        if problem:
            module.ansible.warn(problem)
    module.exit_outcome(outcome, diff_header=params["path"], changed=changed)


if __name__ == "__main__":
    main()
