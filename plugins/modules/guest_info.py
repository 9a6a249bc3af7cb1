#!/usr/bin/python
# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: guest_info
short_description: List the QEMU guests running on a host
version_added: 1.0.0
author:
  - savestate.qemu contributors (@savestate)
description:
  - Lists every running QEMU process on the managed host (C(qemu-system-*) and C(qemu-kvm)), the
    guests libvirt manages included, with the identity and monitor details that
    M(savestate.qemu.save) and M(savestate.qemu.restore) work with.
  - Guests are found in C(/proc), from their command lines, so a guest whose monitor is busy is
    still listed. Processes that have exited but are not reaped yet are not active and are left out.
  - A process is a guest only if the binary it runs is a trusted emulator, a root-owned
    C(qemu-system-*) or C(qemu-kvm) that only root can write, in directories that only root can write.
    Processes that look like QEMU but fail this or another check (an invalid C(-uuid), for example) are
    listed in RV(ignored) with the reason, and never make the listing fail.
  - Before querying a monitor, the module checks that the guest's own QEMU process serves the socket
    (C(SO_PEERCRED) for unix sockets, C(/proc/net/tcp) and the process's file descriptors for TCP);
    a monitor served by another process is not queried and the state is V(unknown).
  - For a guest with a QMP monitor it can reach, the module asks QEMU for the run state, the
    resolved machine type and the RAM size. It sends only query commands and never pauses,
    resumes or changes a guest.
  - Guests managed by libvirt are listed with RV(guests[].managed_by=libvirt) and their monitor is
    left alone, because it belongs to libvirt; their state is V(unknown).
extends_documentation_fragment:
  - savestate.qemu._attributes
  - savestate.qemu._attributes.INFO_MODULE
  - savestate.qemu._qmp
options:
  name:
    description:
      - Only list guests with this name (the C(-name) of the QEMU command line).
    type: str
  uuid:
    description:
      - Only list guests with this UUID (the C(-uuid) of the QEMU command line), in any letter case.
    type: str
  timeout:
    description:
      - Seconds to wait for each guest's QMP monitor, for the connection and greeting and then for
        each query.
      - A QMP monitor serves one client at a time. A monitor that another client holds never greets
        us; after this long the guest is listed with RV(guests[].state=unknown) and a
        RV(guests[].state_reason) that names the client holding the monitor where the host tells.
        Keep it short so that one busy monitor cannot stall the listing.
    type: float
    default: 2
notes:
  - Run it as root (C(become=true)) to see every user's QEMU processes and their monitor sockets.
  - The module connects to each monitor on its own, one at a time; it does not wait for a busy
    monitor to become free.
  - A monitor started with C(server=on) but without C(wait=off) makes QEMU wait for its first
    client before it starts the guest; connecting to such a QEMU that has never had a client lets it
    start. Start QEMU with C(wait=off).
requirements:
  - Linux (the module reads C(/proc)).
  - qemu.qmp >= 0.0.4 on the managed host for the run states; without it guests are still listed,
    with RV(guests[].state=unknown).
seealso:
  - name: The guest_info guide
    description: What the module reports, how it probes states, busy monitors and libvirt guests.
    link: https://github.com/savestate/savestate.qemu/blob/main/docs/guest_info.md
"""

EXAMPLES = r"""
- name: List every QEMU guest on the host
  savestate.qemu.guest_info:
  become: true
  register: host_guests

- name: Show name, state and monitor of each guest
  ansible.builtin.debug:
    msg: "{{ item.name }} (pid {{ item.pid }}): {{ item.state }} via {{ item.qmp }}"
  loop: "{{ host_guests.guests }}"
  loop_control:
    label: "{{ item.pid }}"

- name: Find the guest called web1
  savestate.qemu.guest_info:
    name: web1
  become: true
  register: web1

- name: Fail unless web1 runs
  ansible.builtin.assert:
    that:
      - web1.guests | length == 1
      - web1.guests[0].state == 'running'

- name: Guests this collection can save (not managed by libvirt, monitor reachable)
  ansible.builtin.set_fact:
    savable_guests: >-
      {{ host_guests.guests
         | selectattr('managed_by', 'equalto', 'none')
         | rejectattr('state', 'equalto', 'unknown')
         | map(attribute='name') | list }}

- name: Look up a guest by UUID and show the QMP conversation
  savestate.qemu.guest_info:
    uuid: 6f1e9a4c-3b1d-4c61-9a0e-3f5d2f0d6a11
    qmp_trace: true
    timeout: 5
  become: true
  register: by_uuid
"""

RETURN = r"""
guests:
  description: The active guests matching the filters, ordered by process id.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The guest's name (C(-name)), or V(null) when QEMU was started without one.
      type: str
      sample: web1
    uuid:
      description: The guest's UUID (C(-uuid)) in lower case, or V(null) when QEMU was started without one.
      type: str
      sample: 6f1e9a4c-3b1d-4c61-9a0e-3f5d2f0d6a11
    pid:
      description: The QEMU process id.
      type: int
      sample: 4711
    state:
      description:
        - QEMU's run state as its monitor reports it, for example V(running), V(paused),
          V(postmigrate) (paused after a save), V(inmigrate) (waiting for a restore) or V(prelaunch).
        - V(unknown) when the monitor could not be asked; RV(guests[].state_reason) says why.
      type: str
      sample: running
    state_reason:
      description:
        - Why RV(guests[].state) is V(unknown) (busy monitor and who holds it, no reachable monitor,
          libvirt's guest, missing library); V(null) when the state is known.
      type: str
      sample: "The QMP monitor at /run/qemu/web1.qmp is busy: ... another client (pid 901, comm python3) holds it."
    qmp:
      description:
        - The guest's QMP monitor as the other modules take it, a unix socket path or C(host:port);
          V(null) when it has none this host can connect to.
        - For libvirt's guests, the path of the monitor socket libvirt passed to QEMU, when readable.
      type: str
      sample: /run/qemu/web1.qmp
    managed_by:
      description: V(libvirt) when libvirt manages the guest, otherwise V(none).
      type: str
      choices: [libvirt, none]
      sample: none
    machine:
      description:
        - The resolved, versioned machine type as QEMU reports it, for example V(pc-q35-10.0).
        - When the monitor could not be asked, the C(-machine) type from the command line, which may
          be an alias such as V(pc); V(null) if the command line has none.
      type: str
      sample: pc-q35-10.0
    memory_mib:
      description:
        - The guest's base RAM in MiB as QEMU reports it, or from C(-m) when the monitor could not be
          asked; V(null) when neither tells.
      type: int
      sample: 2048
    disks:
      description:
        - The local files and block devices the command line opens as disks, each once, in order, read from
          C(-drive) (C(file=), C(file.filename=)), C(-blockdev) (C(filename), as C(key=value) or JSON) and the
          shorthand options (C(-hda), C(-cdrom), ...).
        - Network protocols (C(nbd:), C(iscsi://), C(json:) pseudo-paths), file descriptors passed by the parent
          and values that cannot be local paths are left out; at most 256 are listed.
        - Relative paths are made absolute from RV(guests[].cwd) when it is known.
        - M(savestate.qemu.save) records the disks with their size and time stamp; this list is what the
          running guest has open now, so that a move can check the destination before the guest is touched.
      type: list
      elements: dict
      contains:
        path:
          description: The path as QEMU opened it (absolute when the working directory is known).
          type: str
          sample: /var/lib/images/web1.qcow2
        read_only:
          description: Whether every option that opens it sets C(readonly)/C(read-only) or is a CD-ROM.
          type: bool
          sample: false
        option:
          description: The option that names it, V(drive), V(blockdev) or a shorthand such as V(hda) or V(cdrom).
          type: str
          sample: drive
      sample:
        - path: /var/lib/images/web1.qcow2
          read_only: false
          option: drive
    argv:
      description:
        - The QEMU command line, one argument per element.
        - Bytes that are not valid UTF-8 are shown as C(\\xNN); RV(guests[].argv_base64) then holds the exact bytes.
      type: list
      elements: str
      sample: [/usr/bin/qemu-system-x86_64, -name, guest=web1, -qmp, "unix:/run/qemu/web1.qmp,server=on,wait=off"]
    cwd:
      description: QEMU's working directory (as RV(guests[].argv), non-UTF-8 bytes as C(\\xNN)); V(null) when unreadable.
      type: str
      sample: /var/lib/qemu
    exe:
      description: The trusted emulator binary the process runs, as a resolved path.
      type: str
      sample: /usr/bin/qemu-system-x86_64
    uid:
      description: The real user id of the QEMU process.
      type: int
      sample: 0
    gid:
      description: The real group id of the QEMU process.
      type: int
      sample: 0
    groups:
      description: The supplementary group ids of the QEMU process.
      type: list
      elements: int
      sample: []
    argv_base64:
      description:
        - V(null) unless an argument or the working directory is not valid UTF-8; then the exact bytes
          of every argument, base64-encoded, in order.
      type: list
      elements: str
      sample: null
    cwd_base64:
      description: V(null) unless RV(guests[].argv_base64) is set; then the working directory's exact bytes, base64-encoded.
      type: str
      sample: null
ignored:
  description:
    - Processes that look like QEMU (named C(qemu-system-*) or C(qemu-kvm)) but are not guests, ordered by
      process id, whatever the O(name) and O(uuid) filters. The other modules ignore them too.
  returned: always
  type: list
  elements: dict
  contains:
    pid:
      description: The process id.
      type: int
      sample: 5120
    program:
      description: Its C(argv[0]).
      type: str
      sample: qemu-system-x86_64
    reason:
      description: Why it is not a guest.
      type: str
      sample: "its executable /home/u/qemu-system-x86_64 is not a trusted emulator: its directory /home/u is owned by uid 1000, not root"
qmp_trace:
  description:
    - Every QMP message exchanged with the guests' monitors, in order, secrets redacted; see O(qmp_trace).
  returned: when O(qmp_trace=true)
  type: list
  elements: dict
  sample:
    - time: "2026-11-24T13:43:57.260+00:00"
      endpoint: /run/qemu/web1.qmp
      direction: sent
      kind: command
      message: {execute: query-status, id: "__qmp#00001"}
"""

from typing import Any

from ansible_collections.savestate.qemu.plugins.module_utils._host import (
    find_guests,
    guest_report,
    ignored_report,
    probe_guest,
    scan_host,
)
from ansible_collections.savestate.qemu.plugins.module_utils._module import (
    GUEST_IDENTITY_ARGS,
    QEMU_QMP,
    QMP_ARGS,
    SaveStateModule,
    argument_spec,
    timeout_args,
)


def list_guests(params: dict[str, Any]) -> dict[str, Any]:
    """The module's result: every matching guest, probed over QMP one at a time (a probe never fails)."""
    scan = scan_host()
    guests, trace = [], []
    for guest in find_guests(name=params["name"], uuid=params["uuid"], guests=scan.guests):
        probe = probe_guest(guest, timeout=params["timeout"], trace=params["qmp_trace"])
        guests.append(guest_report(guest, probe))
        trace.extend(probe.trace)
    result = dict(changed=False, guests=guests, ignored=[ignored_report(process) for process in scan.ignored])
    if params["qmp_trace"]:
        result["qmp_trace"] = trace
    return result


def main() -> None:
    module = SaveStateModule(
        argument_spec(GUEST_IDENTITY_ARGS, timeout_args(2.0), QMP_ARGS),
        # Listing works from /proc; only the run states need the library.
        wants=(QEMU_QMP,), without="Guests are listed with state 'unknown'.",
    )
    module.exit(**module.run(lambda: list_guests(module.params)))


if __name__ == "__main__":
    main()
