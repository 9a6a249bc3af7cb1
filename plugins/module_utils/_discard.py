# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Discard a drained guest on purpose: remove its save image and its manifest entry, and record it.

An operator who will rebuild a guest, or boot it fresh, must not find it brought back
later from a stale image (whose disks no longer match). The discard:

1. reads the drain manifest (the same validation a restore applies) and finds the guest's
   entry; the image is the entry's path, or ``<dir>/<name>.save`` when there is no entry
   (a discard interrupted after the manifest was written);
2. judges the image before anything changes, as root deletes it: opened once without
   following a symbolic link, a regular file with one name that only root (or we) can
   change, with a save image's header magic, of this guest (name and UUID, when the
   image tells them), and with no interrupted save_image_define journal;
3. under the guest's lock (the one restores and saves hold), refuses an image another
   process has open (a restore loading it, a copy) or that save_image_define is editing;
4. writes the manifest first, atomically: the entry gone, a ``discarded`` record (name,
   UUID, when, by whom, why) added, everything else as it was; then removes the image
   and empties the removed file through the descriptor it was judged by, so that a
   restore which opened it just before cannot load it either.

Interrupted after step 4's manifest write, a run again removes the image (no entry,
the record kept). Nothing left to do (no entry, no image) is ``changed=False``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
from dataclasses import dataclass, field
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import GuestRecord, parse_domain_xml
from ansible_collections.savestate.qemu.plugins.module_utils._errors import ImageError, PreconditionError, SaveStateError
from ansible_collections.savestate.qemu.plugins.module_utils._image import (
    HEADER_SIZE,
    MAGIC_COMPLETE,
    MAGIC_PARTIAL,
    check_no_pending_journal,
    read_image_fd,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image_auth import file_trust_problem
from ansible_collections.savestate.qemu.plugins.module_utils._manifest import (
    SAFE_NAME,
    UUID,
    Manifest,
    current_text,
    discard_for,
    discard_record,
    dump_discard,
    read_manifest,
    write_manifest,
)
from ansible_collections.savestate.qemu.plugins.module_utils._proc import PROC, fd_numbers, fd_stat, pids, process_comm
from ansible_collections.savestate.qemu.plugins.module_utils._runtime import GuestLock, guest_key
from ansible_collections.savestate.qemu.plugins.module_utils._timestamps import utc_text

DEFAULT_MANIFEST = "/var/lib/savestate/drain/savestate-manifest.json"
# Read-only: what is opened before it is judged must not be a device that opening for writing disturbs.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


class DiscardError(PreconditionError):
    """The image or the entry must not be discarded (nothing was changed)."""


@dataclass(frozen=True)
class DiscardRequest:
    """What the user asked for (the discard module's options)."""

    name: str
    manifest: str = DEFAULT_MANIFEST
    uuid: Optional[str] = None
    reason: Optional[str] = None
    discarded_by: Optional[str] = None
    timeout: float = 30.0


@dataclass
class DiscardOutcome:
    """What a discard did (or, in check mode, would do)."""

    changed: bool
    msg: str
    image: dict[str, Any]
    entry: Optional[dict[str, Any]]
    record: Optional[dict[str, Any]]
    manifest_before: Optional[str] = None
    manifest_after: Optional[str] = None
    warnings: list[str] = field(default_factory=list)


# --- who and when -------------------------------------------------------------------------

def operator_name() -> str:
    """Who runs the discard: the user who became root through sudo, else the effective user."""
    for variable in ("SUDO_USER", "DOAS_USER"):
        value = os.environ.get(variable)
        if value and SAFE_NAME.match(value):
            return value
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


# --- the image, judged before anything changes ---------------------------------------------

@dataclass
class _Image:
    path: str
    fd: int
    info: os.stat_result
    record: Optional[GuestRecord]

    def close(self) -> None:
        os.close(self.fd)


def _open(path: str) -> Optional[int]:
    """The image's descriptor (never through a symbolic link), or None when there is no file."""
    try:
        return os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise DiscardError(f"refusing to discard {path}: it is a symbolic link, not a save image the drain "
                               "wrote; nothing was changed") from None
        raise DiscardError(f"cannot open {path}: {error.strerror or error}; nothing was changed") from None


def _header_magic(fd: int) -> bytes:
    try:
        return os.pread(fd, HEADER_SIZE, 0)[:16]
    except OSError:
        return b""


def _identity(fd: int, path: str) -> Optional[GuestRecord]:
    """The guest the image records, or None when its data area cannot be read (a damaged image)."""
    try:
        return parse_domain_xml(read_image_fd(fd, path, allow_incomplete=True).xml)
    except SaveStateError:
        return None


def _check_identity(path: str, record: Optional[GuestRecord], name: str, uuid: Optional[str]) -> None:
    if record is None:
        return
    if record.name != name:
        raise DiscardError(f"refusing to discard {path}: it is the save image of guest {record.name!r}, "
                           f"not {name!r}; nothing was changed")
    if uuid and record.uuid and record.uuid.lower() != uuid.lower():
        raise DiscardError(f"refusing to discard {path}: it is the save image of the guest with UUID {record.uuid}, "
                           f"not {uuid}; nothing was changed")


def judge_image(path: str, name: str, uuid: Optional[str]) -> Optional[_Image]:
    """The image at ``path``, open, once it is known to be this guest's save image; None when absent."""
    fd = _open(path)
    if fd is None:
        return None
    try:
        info = os.fstat(fd)
        problem = file_trust_problem(info)
        if problem:
            raise DiscardError(f"refusing to discard {path}: {problem}. Only a save image the drain wrote (a "
                               "regular file with one name, of root) is removed; nothing was changed")
        if _header_magic(fd) not in (MAGIC_COMPLETE, MAGIC_PARTIAL):
            raise DiscardError(f"refusing to discard {path}: it has no save image header (magic "
                               f"{MAGIC_COMPLETE.decode()}); it is not a save image; nothing was changed")
        try:
            check_no_pending_journal(path, fd)
        except ImageError as error:
            raise DiscardError(f"refusing to discard: {error}") from None
        record = _identity(fd, path)
        _check_identity(path, record, name, uuid)
        return _Image(path, fd, info, record)
    except BaseException:
        os.close(fd)
        raise


def holders(info: os.stat_result, proc_root: str = PROC) -> list[str]:
    """The processes (other than this one) that have the file ``info`` describes open, as "comm (pid N)"."""
    found = []
    for pid in pids(proc_root):
        if pid == os.getpid():
            continue
        for fd in fd_numbers(pid, proc_root):
            other = fd_stat(pid, int(fd), proc_root)
            if other is not None and (other.st_dev, other.st_ino) == (info.st_dev, info.st_ino):
                found.append(f"{process_comm(pid, proc_root) or '?'} (pid {pid})")
                break
    return found


def _check_unused(image: _Image) -> None:
    """Refuse an image a restore is loading, a copy is reading, or save_image_define is editing."""
    using = holders(image.info)
    if using:
        raise DiscardError(f"refusing to discard {image.path}: it is open in {', '.join(using)} (a restore "
                           "loading it, or a copy); nothing was changed. Try again when it is done")
    try:
        fcntl.flock(image.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise DiscardError(f"refusing to discard {image.path}: another process is editing it "
                           "(save_image_define); nothing was changed. Try again later") from None
    try:
        now = os.lstat(image.path)
    except OSError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != (image.info.st_dev, image.info.st_ino):
        raise DiscardError(f"refusing to discard {image.path}: the file was replaced while it was checked; "
                           "nothing was changed")


# --- the discard -----------------------------------------------------------------------------

def _check_request(request: DiscardRequest) -> None:
    if not SAFE_NAME.match(request.name) or len(request.name) > 255:
        raise DiscardError(f"name must be a guest name as the drain saves it (letters, digits, '.', '_', '+', '-'), "
                           f"not {request.name!r}")
    if not os.path.isabs(request.manifest) or os.path.basename(request.manifest) in ("", ".", ".."):
        raise DiscardError(f"manifest must be the absolute path of a drain manifest, not {request.manifest!r}")
    if request.uuid is not None and not UUID.match(request.uuid):
        raise DiscardError(f"uuid must be a UUID (8-4-4-4-12 hexadecimal digits), not {request.uuid!r}")


def _entry(manifest: Optional[Manifest], request: DiscardRequest) -> Optional[dict[str, Any]]:
    entry = next((dict(entry) for entry in (manifest.guests if manifest else ()) if entry["name"] == request.name), None)
    if entry and request.uuid and entry.get("uuid") and entry["uuid"].lower() != request.uuid.lower():
        raise DiscardError(f"the manifest's guest {request.name!r} has UUID {entry['uuid']}, not {request.uuid}: "
                           "nothing was discarded")
    return entry


def _lock_key(request: DiscardRequest, entry: Optional[dict[str, Any]], image: _Image) -> str:
    """The key restores of this image lock (theirs comes from the image's record, as here when it reads)."""
    if image.record is not None:
        return guest_key(image.record.uuid, image.record.name, 0)
    return guest_key((entry or {}).get("uuid") or request.uuid, request.name, 0)


def _message(request: DiscardRequest, entry: Optional[dict[str, Any]], image: Optional[_Image], recorded: bool,
             check_mode: bool) -> str:
    done = []
    if image is not None:
        done.append(f"its image {image.path} ({image.info.st_size} bytes)")
    if entry is not None:
        done.append("its manifest entry")
    verb = "would remove" if check_mode else "removed"
    where = f"; recorded as discarded in {request.manifest}" if recorded else \
        f"; there is no manifest at {request.manifest} to record it in"
    return f"guest {request.name!r} discarded: {verb} {' and '.join(done)}{where}"


def discard_guest(request: DiscardRequest, check_mode: bool = False) -> DiscardOutcome:
    """Discard the guest the request names (see the module docstring for the order)."""
    _check_request(request)
    manifest = read_manifest(request.manifest)
    directory = os.path.dirname(request.manifest)
    entry = _entry(manifest, request)
    path = entry["path"] if entry else os.path.join(directory, f"{request.name}.save")
    earlier = discard_for(manifest, request.name)
    image = judge_image(path, request.name, request.uuid or (entry or {}).get("uuid"))
    try:
        if image is None and entry is None:
            said = (f" (discarded on {earlier.get('discarded_at')} by {earlier.get('discarded_by')})"
                    if earlier else "")
            return DiscardOutcome(False, f"guest {request.name!r} has no image {path} and no manifest entry: "
                                  f"nothing to discard{said}", {"path": path, "existed": False, "removed": False},
                                  None, earlier)
        record = earlier if entry is None and earlier else discard_record(
            request.name, entry, utc_text(), request.discarded_by or operator_name(), request.reason, request.uuid)
        before = current_text(request.manifest)
        after = dump_discard(manifest, record, directory) if manifest is not None else before
        size = image.info.st_size if image else None
        outcome = DiscardOutcome(True, _message(request, entry, image, manifest is not None, check_mode),
                                 {"path": path, "existed": image is not None, "removed": image is not None,
                                  "size": size}, entry, record if manifest is not None else None, before, after)
        if not check_mode:
            _apply(request, entry, image, before, after)
        return outcome
    finally:
        if image is not None:
            image.close()


def _apply(request: DiscardRequest, entry: Optional[dict[str, Any]], image: Optional[_Image],
           before: Optional[str], after: Optional[str]) -> None:
    """Under the guest's lock: the manifest first, then the image (see the module docstring)."""
    if image is None:
        if after is not None and after != before:
            write_manifest(request.manifest, after)
        return
    with GuestLock(_lock_key(request, entry, image), request.timeout, f"discard of {image.path}"):
        _check_unused(image)
        if after is not None and after != before:
            write_manifest(request.manifest, after)
        _remove(image)


def _remove(image: _Image) -> None:
    try:
        os.unlink(image.path)
    except OSError as error:
        raise SaveStateError(f"the manifest records the discard, but {image.path} could not be removed: "
                             f"{error.strerror or error}. Run the discard again") from None
    try:
        # The inode lives on while a descriptor holds it: empty it, so that a restore which opened it
        # between the check and the removal cannot load it either. Reopened through our descriptor:
        # the same inode, judged a regular file, whatever the path names now.
        writable = os.open(f"/proc/self/fd/{image.fd}", os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            os.ftruncate(writable, 0)
        finally:
            os.close(writable)
    except OSError:
        pass  # removed is what was asked; emptying only closes a race
