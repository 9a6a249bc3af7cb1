#!/usr/bin/python
# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: restore
short_description: Bring a QEMU guest back from a save image, in the state it was saved in
version_added: 1.0.0
author:
  - savestate.qemu contributors (@savestate)
description:
  - Starts QEMU from a save image written by M(savestate.qemu.save) and brings the guest back, running
    or paused as it was (or as O(state) says). The guest continues where it stopped; it does not boot.
  - QEMU runs the command line recorded in the image, waiting for the incoming stream (C(-S -incoming
    defer)), on the exact machine type the guest was saved on, in the working directory the saved QEMU
    ran in (so that relative paths on its command line still resolve). The QEMU process is detached from
    the module and outlives the task.
  - Before it runs anything, the module checks that the image is trustworthy (no user but root and the
    image's owner can have written it or its directory), complete and readable; that no active guest on
    the host, libvirt's included, holds the image's name or UUID; that the emulator is a QEMU system
    emulator; that the decompressor is installed; and that the guest's disks are unchanged since the
    save.
  - On any failure (QEMU refuses to start, rejects the stream, a timeout, the decompressor dies) the
    started QEMU is killed and reaped, what the restore created is removed, and the image is left
    untouched. The message quotes QEMU's own reason.
  - A guest holding only the image's name, or only its UUID, is a conflict and the module fails with
    libvirt's words (C(domain 'web1' already exists with uuid ...), C(domain 'web2' is already defined
    with uuid ...)), naming the process that holds it.
  - libvirt's own images record no QEMU command line; restore them with C(virsh restore).
extends_documentation_fragment:
  - savestate.qemu._attributes
  - savestate.qemu._qmp
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - The diff shows the guest's state before and after.
  idempotent:
    support: full
    details:
      - A guest with the image's name and UUID already active is left alone (or only resumed, with
        O(state=running)).
options:
  allow_unauthenticated:
    description:
      - Restore an image that carries no valid MAC of this host's image key (libvirt's images never
        do; neither do images of another fleet, images saved before signing, or images changed
        after the save).
      - Such an image's command line, which decides what QEMU runs, is not known to come from a
        save on this host or its fleet. Set this only for images whose origin you trust.
      - Even then QEMU never runs as root, it runs as the image file's owner if that is not root, else as
        the user the image records if that is not root; otherwise the restore is refused.
      - See docs/security.md, docs/image-format.md and the savestate.qemu.image_key role (one key for a fleet).
    type: bool
    default: false
  path:
    description:
      - The save image.
    type: path
    required: true
  state:
    description:
      - The state to bring the guest back in.
      - V(as_saved) is the state recorded in the image header (the guest's state when it was saved,
        unless the save set O(savestate.qemu.save#module:restore_state)).
      - With V(running), a guest of this image that is already active but paused is resumed.
    type: str
    default: as_saved
    choices: [as_saved, running, paused]
  name:
    description:
      - The guest the image must hold. The module fails if the image is of another guest.
    type: str
  uuid:
    description:
      - The UUID the image must hold, in any letter case.
    type: str
  emulator:
    description:
      - The QEMU binary to run instead of the recorded one, for example on another host where QEMU lives
        elsewhere. It must be a QEMU system emulator (C(qemu-system-*) or C(qemu-kvm)).
      - QEMU loads a stream only on the same versioned machine type with the same devices; the machine
        type is pinned from the image.
    type: path
  disk_check:
    description:
      - What to do when a disk the guest was saved with changed since the save (size or modification
        time) or is gone.
      - V(strict) refuses the restore. Restoring RAM over changed disks corrupts the guest's file systems.
      - V(warn) restores and warns. V(ignore) does not compare.
    type: str
    default: strict
    choices: [strict, warn, ignore]
  unit:
    description:
      - The systemd unit the restored QEMU runs in, on a host where systemd is PID 1.
      - V(auto) restores the guest into the unit recorded at the save. A unit with a unit file
        (for example a template instance V(qemu@g1.service)) is started with a runtime drop-in whose
        C(ExecStart=) is the recorded command line waiting for the stream; the drop-in is removed once
        the guest runs, so C(systemctl stop) and C(Restart=) act on the restored guest. A transient unit
        (C(systemd-run)) is recreated under its name with its recorded properties (C(MemoryMax=), C(Slice=), ...).
        A guest saved outside any unit runs in a scope of its own, C(savestate-qemu-NAME.scope) in
        C(machine.slice), so that it outlives the SSH session, logind and the job that ran the restore.
      - V(none) starts QEMU detached in a session of its own, as where systemd is not PID 1.
      - Any other value is a unit name to start the guest in (a unit file's, or a new transient unit).
      - The restore refuses to start when that unit is already active, as it would run a second QEMU on the same disks.
    type: str
    default: auto
  remove_image:
    description:
      - Delete the image once the guest is confirmed in its target state, like libvirt's managed save.
        On failure the image stays.
      - On a re-run the image is gone. Give O(name) or O(uuid) too, and a re-run that finds that guest
        active reports it unchanged. Without them a re-run fails, as nothing tells which guest the image was.
    type: bool
    default: false
  parallel_channels:
    description:
      - The number of threads QEMU reads a V(sparse) image with (multifd channels). Need not match the
        save's.
      - Unlike a save's, the default stays 1. A load from a cold page cache is bound by the disk, and in the
        collection's C(docs/performance.md) measurements two channels did not load faster than one.
    type: int
    default: 1
  sync_time:
    description:
      - Set the restored guest's clock to the host's time through the QEMU guest agent, once the guest runs.
        A restored guest's clock otherwise stands where it was at the save, behind by as long as the guest
        was saved.
      - The guest needs an agent channel on its command line (a C(virtserialport) named
        C(org.qemu.guest_agent.0) whose chardev is a unix socket QEMU listens on) and C(qemu-ga) running
        in the guest. The module sends C(guest-set-time) with the host's time only after the agent
        answered C(guest-sync-delimited) and C(guest-ping), waiting a few seconds at most; the agent
        then writes the guest's hardware clock too.
      - A guest without an agent channel is restored as usual and reports RV(guest.clock_synced=no agent);
        its clock catches up only when something in the guest sets it (NTP, chrony). A guest restored
        paused is not synced.
      - A failed sync (no agent answering, an agent that refuses) never fails the restore; it is a warning.
    type: bool
    default: true
  timeout:
    description:
      - Seconds the load may take before the restore is abandoned (QEMU killed, image untouched).
        QEMU's start-up (up to 60 seconds) does not count.
      - Also how long to wait for another save or restore of the same guest to finish.
    type: float
    default: 600
notes:
  - Run it as root (C(become=true)), as QEMU ran.
  - QEMU's output goes to a log in C(/run/savestate-qemu) (for root), named after the guest's UUID. A
    failed restore removes it, after quoting it in the message.
  - An image may come from another host or another QEMU version. QEMU loads a stream only on the same
    versioned machine type with the same devices; older to newer QEMU works, newer to older does not
    (see the restore guide).
requirements:
  - qemu.qmp >= 0.0.4 and lxml on the managed host.
  - The decompressor of a compressed image (gzip, bzip2, xz, lzop or zstd) on the managed host.
seealso:
  - module: savestate.qemu.save
  - module: savestate.qemu.save_image_define
  - name: The restore guide
    description: States, conflicts, disk checks, trust, moving an image to another host, QEMU's load errors.
    link: https://github.com/savestate/savestate.qemu/blob/main/docs/restore.md
"""

EXAMPLES = r"""
- name: Bring web1 back as it was saved
  savestate.qemu.restore:
    path: /var/lib/qemu/save/web1.save
  become: true

- name: Restore and delete the image afterwards (managed-save style)
  savestate.qemu.restore:
    path: /var/lib/qemu/save/web1.save
    name: web1
    remove_image: true
  become: true

- name: Restore paused, to inspect the guest before it runs
  savestate.qemu.restore:
    path: /var/lib/qemu/save/db1.save.zst
    state: paused
  become: true

- name: Restore on a host where QEMU lives elsewhere
  savestate.qemu.restore:
    path: /srv/images/web1.save
    emulator: /opt/qemu/bin/qemu-system-x86_64
  become: true
"""

RETURN = r"""
guest:
  description: The guest after the run.
  returned: success
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
      description: The QEMU process id (of the process already active, when nothing changed; V(null) in
        check mode when the guest would be started).
      type: int
      sample: 4317
    state:
      description: The QEMU run state, V(running) or V(paused) (another QEMU state when an already active
        guest is in one).
      type: str
      sample: running
    qmp:
      description: The guest's QMP monitor.
      type: str
      sample: /run/qemu/web1.qmp
    managed_by:
      description: Always V(none).
      type: str
      sample: none
    user:
      description:
        - Whose credentials the restored QEMU runs with, the saved QEMU's, never more (the collection's
          C(docs/security.md) explains the trust model).
      type: str
      returned: when the guest was restored
      sample: "user 'qemu' (uid 64055), gid 64055, groups 64055"
    unit:
      description:
        - The systemd unit the restored QEMU runs in, V(null) when none. Its C(name), C(kind)
          (V(persistent), V(transient) or V(scope)) and the C(properties) it was recreated with.
      type: dict
      returned: when the guest was restored
      sample: {"name": "qemu@web1.service", "kind": "persistent", "properties": {}}
    clock_synced:
      description:
        - Whether the guest's clock was set to the host's time through its guest agent (O(sync_time)).
        - V(true) when the agent set it. V(false) when O(sync_time=false), when the guest was restored
          paused, or when the agent did not answer or refused (a warning then says why).
          V(no agent) when the guest's command line has no guest agent channel.
      type: raw
      returned: when the guest was restored
      sample: true
image:
  description:
    - The image, the same dict as M(savestate.qemu.save_image_info) returns (see there for its keys).
    - Also when the restore fails once the image was read, so that the failure names what was restored.
  returned: success, except when O(remove_image=true) and an earlier run already removed the image; on failure
    once the image was read
  type: dict
  sample:
    path: /var/lib/qemu/save/web1.save
    complete: true
    format: raw
    was_running: true
    name: web1
stats:
  description: How long QEMU took to load the image, and how fast.
  returned: when the guest was restored
  type: dict
  contains:
    duration_s:
      description: Seconds from the start of the load to its end.
      type: float
      sample: 0.92
    bytes:
      description: The image's size in bytes.
      type: int
      sample: 2147549184
    throughput_mib_s:
      description: Image MiB read per second.
      type: float
      sample: 2226.1
qmp_trace:
  description:
    - The QMP conversation, when O(qmp_trace=true).
    - On failure too, up to the failure; that is what a bug report needs.
  returned: when O(qmp_trace=true), on failure too
  type: list
  elements: dict
"""

from ansible_collections.savestate.qemu.plugins.module_utils._module import (
    ALLOW_UNAUTHENTICATED_ARGS,
    GUEST_IDENTITY_ARGS,
    IMAGE_PATH_ARGS,
    LXML,
    QEMU_QMP,
    QMP_ARGS,
    SaveStateModule,
    argument_spec,
    timeout_args,
)
from ansible_collections.savestate.qemu.plugins.module_utils._restore import STATE_CHOICES, RestoreRequest, restore_guest
from ansible_collections.savestate.qemu.plugins.module_utils._restore_trust import DISK_CHECK_CHOICES


def main() -> None:
    module = SaveStateModule(
        argument_spec(
            IMAGE_PATH_ARGS, GUEST_IDENTITY_ARGS, timeout_args(600.0), ALLOW_UNAUTHENTICATED_ARGS, QMP_ARGS,
            state=dict(type="str", default="as_saved", choices=list(STATE_CHOICES)),
            emulator=dict(type="path"),
            disk_check=dict(type="str", default="strict", choices=list(DISK_CHECK_CHOICES)),
            remove_image=dict(type="bool", default=False),
            parallel_channels=dict(type="int", default=1),
            unit=dict(type="str", default="auto"),
            sync_time=dict(type="bool", default=True),
        ),
        requires=(QEMU_QMP, LXML),
    )
    params = module.params
    request = RestoreRequest(
        path=params["path"], state=params["state"], name=params["name"], uuid=params["uuid"],
        emulator=params["emulator"], disk_check=params["disk_check"], remove_image=params["remove_image"],
        parallel_channels=params["parallel_channels"], timeout=params["timeout"], trace=params["qmp_trace"],
        allow_unauthenticated=params["allow_unauthenticated"], unit=params["unit"],
        sync_time=params["sync_time"])
    outcome = module.run(lambda: restore_guest(request, check_mode=module.check_mode))
    module.exit_outcome(outcome)


if __name__ == "__main__":
    main()
