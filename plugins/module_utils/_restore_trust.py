# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Whether an image may be restored here: everything a restore checks before QEMU runs.

The image decides what QEMU runs and as whom, so it must be authenticated (or the
operator opted in), be of the guest the operator expects, say the same thing in its
XML and on its command line, and name a trusted QEMU system emulator. The host must
be ready for it: the decompressor installed, the guest's disks as they were saved, and
an active guest with the image's identity must run as the saved guest's user.
(Finding guests and trusting emulators live in ``_host`` and ``_emulator``.)
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

from ansible_collections.savestate.qemu.plugins.module_utils._credentials import recorded_credentials
from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import DiskRecord, GuestRecord
from ansible_collections.savestate.qemu.plugins.module_utils._emulator import check_trusted_emulator
from ansible_collections.savestate.qemu.plugins.module_utils._errors import (
    GuestConflictError,
    ImageError,
    PreconditionError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._host import ActiveGuest, guest_name, guest_uuid
from ansible_collections.savestate.qemu.plugins.module_utils._image import SaveImage
from ansible_collections.savestate.qemu.plugins.module_utils._image_auth import OpenedImage
from ansible_collections.savestate.qemu.plugins.module_utils._uuid_compare import same_uuid

DISK_CHECK_CHOICES = ("strict", "warn", "ignore")
QEMU_PROGRAM_PREFIXES = ("qemu-system-", "qemu-kvm")


# --- the image ---------------------------------------------------------------------------

def check_authenticated(opened: OpenedImage, path: str, allow_unauthenticated: bool) -> None:
    """Refuse an image without a valid MAC of this host's key, unless the operator opted in.

    The image's command line decides what QEMU runs and as whom; only images this
    host (or its fleet, sharing the key) wrote are trusted to say so.
    """
    if opened.authenticated or allow_unauthenticated:
        return
    raise PreconditionError(
        f"refusing to restore {path}: the image is not authenticated ({opened.auth_problem}). Its "
        "command line decides what QEMU runs, so restore only trusts images signed with this host's key "
        "(a fleet shares one key: the savestate.qemu.image_key role). If you know where this image comes "
        "from, set allow_unauthenticated: true")


def check_expected_identity(path: str, record: GuestRecord, name: Optional[str], uuid: Optional[str]) -> None:
    """The image is ours, consistent, and of the guest ``name``/``uuid`` (when given) expect."""
    if record.origin != "savestate":
        raise PreconditionError(
            f"{path} is a libvirt save image: it records no QEMU command line, only libvirt can "
            f"restore it (virsh restore {path})")
    check_command_line_identity(path, record)
    if name is not None and record.name != name:
        raise PreconditionError(f"{path} is a save image of guest '{record.name}', not '{name}'")
    if uuid is not None and not same_uuid(record.uuid, uuid):
        raise PreconditionError(f"{path} is a save image of uuid {record.uuid}, not {uuid}")


def check_command_line_identity(path: str, record: GuestRecord) -> None:
    """The identity checks go by the XML, QEMU runs the command line: they must agree.

    A save writes both from the same guest; a disagreement means a damaged or edited
    image, and restoring it could start a guest under a name or UUID no check saw.
    """
    argv = record.argv or ()
    name, uuid = guest_name(argv), guest_uuid(argv)
    if name != record.name:
        raise ImageError(f"{path}: the image's domain XML names the guest {record.name!r}, but its recorded "
                         f"command line runs {name!r}; the image is damaged or was edited by hand")
    if uuid is not None and not same_uuid(uuid, record.uuid):
        raise ImageError(f"{path}: the image's domain XML has UUID {record.uuid}, but its recorded command "
                         f"line runs {uuid}; the image is damaged or was edited by hand")


# --- the emulator ------------------------------------------------------------------------

def _qemu_program_name(path: str) -> bool:
    return os.path.basename(path).startswith(QEMU_PROGRAM_PREFIXES)


def check_emulator(emulator: str) -> str:
    """The emulator must be a trusted QEMU system emulator: a root-owned binary only root can replace.

    Returns the resolved real path to run. The name is checked before anything else: the image
    (or the user) could otherwise make a restore run any program.
    """
    if not _qemu_program_name(emulator):
        raise PreconditionError(
            f"refusing to run {emulator!r}: the emulator must be a QEMU system emulator "
            "(qemu-system-* or qemu-kvm)")
    resolved = shutil.which(emulator) if os.sep not in emulator else emulator
    if not resolved or not os.path.isfile(resolved) or not os.access(resolved, os.X_OK):
        raise PreconditionError(f"the emulator {emulator} does not exist or is not executable on this host; "
                                "give the right path with the emulator option")
    real = os.path.realpath(resolved)
    if not _qemu_program_name(real):
        raise PreconditionError(
            f"refusing to run {emulator!r}: it is a link to {real}, which is not a QEMU system emulator "
            "(qemu-system-* or qemu-kvm)")
    # Resolved once: every directory on the real path is checked, and that path is what runs.
    return check_trusted_emulator(resolved)


# --- the host ----------------------------------------------------------------------------

def check_decompressor(image: SaveImage) -> None:
    compressor = image.format.compressor
    if compressor is not None and shutil.which(compressor.program) is None:
        raise PreconditionError(f"the image is {image.format.label}-compressed and {compressor.program} "
                                "is not installed on this host")


def disk_changes(disks: tuple[DiskRecord, ...]) -> list[str]:
    """What differs between the recorded disk fingerprints and the files now."""
    changes = []
    for disk in disks:
        if disk.size is None and disk.mtime_ns is None:
            continue  # not a local file when saved (block device, network): nothing to compare
        try:
            info = os.stat(disk.path)
        except FileNotFoundError:
            changes.append(f"{disk.path} is gone")
            continue
        except OSError as error:
            changes.append(f"{disk.path} cannot be read ({error.strerror})")
            continue
        if disk.size is not None and info.st_size != disk.size:
            changes.append(f"{disk.path} changed size ({disk.size} -> {info.st_size} bytes)")
        elif disk.mtime_ns is not None and info.st_mtime_ns != disk.mtime_ns:
            changes.append(f"{disk.path} was modified after the save")
    return changes


def check_disks(disks: tuple[DiskRecord, ...], disk_check: str) -> Optional[str]:
    """Refuse (``strict``) or warn about (``warn``, the warning is returned) disks changed since the save."""
    if disk_check == "ignore":
        return None
    changes = disk_changes(disks)
    if not changes:
        return None
    summary = "; ".join(changes)
    if disk_check == "strict":
        raise PreconditionError(
            f"the guest's disks changed since the save ({summary}). Restoring RAM over changed disks "
            "corrupts the guest's file systems; if you know the change is harmless, use "
            "disk_check: warn or ignore")
    return f"the guest's disks changed since the save: {summary}"


def holder(guest: ActiveGuest) -> str:
    """The active guest holding an identity, for conflict messages."""
    return guest.describe() + (", managed by libvirt," if guest.libvirt_managed else "")


def check_same_owner(record: GuestRecord, guest: ActiveGuest) -> None:
    """An active guest with the image's name and UUID is the guest itself only if it runs as its user.

    Anyone can start a QEMU with any name and UUID; taking another user's for the
    saved guest would report a restore that did not happen.
    """
    recorded = recorded_credentials(record)
    if recorded is None or guest.uid == recorded.uid:
        return
    raise GuestConflictError(
        f"domain '{record.name}' is held by {holder(guest)}, which runs as uid {guest.uid}, but the "
        f"saved guest ran as {recorded.describe()}: another user's QEMU holds the guest's name and UUID; "
        "refusing to restore over it or to report it as the restored guest")
