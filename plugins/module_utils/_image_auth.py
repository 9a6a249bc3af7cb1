# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Authenticated save images: the MAC, and an image opened once and checked on that descriptor.

The MAC is HMAC-SHA256, keyed by the host key (_image_key.py), over

    "savestate-qemu image mac v1\\0" + header[16:92] + data area

where the data area holds our ``<savestate:mac key-id="…">`` element with 64
ASCII zeros in place of the MAC's hex digits (the same length, so that the MAC's
own value takes no part in it and ``data_len`` is the same before and after). The
magic is left out: the save turns the partial magic into the final one after
the stream is written, without signing again. Everything else in the header
(version, data_len, was_running, format, cookie offset, the unused bytes) and
everything in the data area (XML, cookie, padding) is covered.

The migration stream is not: QEMU parses it, and the restored QEMU runs with the
credentials the saved one had, so a forged stream gives nobody more than what the
QEMU that wrote it could already do.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import (
    GuestRecord,
    parse_domain_xml,
    read_mac,
    with_mac,
)
from ansible_collections.savestate.qemu.plugins.module_utils._errors import (
    DomainXMLError,
    ImageError,
    PreconditionError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image import (
    HEADER_SIZE,
    SaveImage,
    Sealer,
    check_no_pending_journal,
    journal_pread,
    read_image_fd,
    recover_interrupted_rewrite_fd,
    _lock,
    _pread_exact,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image_key import ImageKey

MAC_HEX_LEN = 64
_PLACEHOLDER = b"0" * MAC_HEX_LEN
_DOMAIN = b"savestate-qemu image mac v1\0"
_MAGIC_LEN = 16

NO_MAC = "no MAC (libvirt's image or saved before signing)"
TAMPERED = "MAC mismatch: the header or data area changed after signing"
NO_KEY = "this host has no image key yet, so no image can be verified"


def _another_key(key_id: str) -> str:
    return f"signed with another key (id {key_id})"


def compute_mac(key: ImageKey, header_bytes: bytes, data_with_placeholder: bytes) -> str:
    message = _DOMAIN + header_bytes[_MAGIC_LEN:HEADER_SIZE] + data_with_placeholder
    return hmac.new(key.secret, message, hashlib.sha256).hexdigest()


# --- signing ------------------------------------------------------------------------

def signing_xml(xml: str, key: Optional[ImageKey]) -> tuple[str, Optional[Sealer]]:
    """``xml`` ready to be signed, and the sealer that signs it (None: cannot sign, e.g. libvirt's XML).

    The MAC element first holds a random marker of the MAC's length, so that the
    sealer finds exactly where the MAC goes in the encoded data area.
    """
    if key is None:
        return xml, None
    marker = secrets.token_hex(MAC_HEX_LEN // 2)
    marked = with_mac(xml, key.key_id, marker)
    if marked is None:
        return xml, None
    return marked, _sealer(key, marker.encode("ascii"))


def _sealer(key: ImageKey, marker: bytes) -> Sealer:
    def seal(header_bytes: bytes, data: bytes) -> bytes:
        position = data.find(marker)
        if position < 0 or data.find(marker, position + 1) >= 0:
            raise ImageError("cannot sign the image: the MAC's place in the data area is not unique")
        blank = data[:position] + _PLACEHOLDER + data[position + MAC_HEX_LEN:]
        mac = compute_mac(key, header_bytes, blank).encode("ascii")
        return data[:position] + mac + data[position + MAC_HEX_LEN:]
    return seal


# --- verifying ----------------------------------------------------------------------

def verify(key: Optional[ImageKey], xml: str, header_bytes: bytes, data: bytes) -> Optional[str]:
    """None if the image is authentic; otherwise why not (one of the messages above)."""
    try:
        found = read_mac(xml)
    except DomainXMLError:
        return NO_MAC
    if found is None:
        return NO_MAC
    key_id, value = found
    if key is None:
        return NO_KEY
    if key_id != key.key_id:
        return _another_key(key_id or "(none)")
    encoded = value.encode("ascii", "replace")
    if len(value) != MAC_HEX_LEN or data.count(encoded) != 1:
        return TAMPERED
    position = data.find(encoded)
    blank = data[:position] + _PLACEHOLDER + data[position + MAC_HEX_LEN:]
    if not hmac.compare_digest(compute_mac(key, header_bytes, blank), value):
        return TAMPERED
    return None


# --- an image opened once ---------------------------------------------------------------

def file_trust_problem(info: os.stat_result) -> Optional[str]:
    """Why users other than root and the effective user could change (or swap in) this file."""
    if not stat.S_ISREG(info.st_mode):
        return "it is not a regular file"
    if info.st_nlink != 1:
        return f"it has {info.st_nlink} hard links (another name could be a different owner's way in)"
    if info.st_uid not in (0, os.geteuid()):
        return f"it is owned by uid {info.st_uid}"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"it is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


@dataclass
class OpenedImage:
    """An image read, parsed and verified from one descriptor, which stays open for streaming.

    ``authenticated`` is true only with a valid MAC under this host's key and (when
    checked) a file only root or its owner could write. ``auth_problem`` says why
    not. ``recovered`` is true if an interrupted edit was rolled back on open.
    """

    fd: int
    path: str
    image: SaveImage
    record: GuestRecord
    authenticated: bool
    auth_problem: Optional[str]
    file_uid: int
    file_gid: int
    recovered: bool = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OpenedImage:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()


def _open_fd(path: str, writable: bool) -> int:
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        return os.open(path, flags)
    except OSError as error:
        if error.errno == 40:  # ELOOP: the last component is a symbolic link
            raise ImageError(f"{path}: refusing a symbolic link as save image; give the real path") from None
        raise ImageError(f"{path}: cannot open the save image: {error.strerror or error}") from None


def _parsed(image: SaveImage) -> GuestRecord:
    try:
        return parse_domain_xml(image.xml)
    except DomainXMLError as error:
        raise type(error)(f"{image.path}: {error}") from None


def open_image(path: str, key: Optional[ImageKey], allow_incomplete: bool = False, *,
               writable: bool = False, recover: bool = False, as_recovered: bool = False,
               check_file: bool = True) -> OpenedImage:
    """Open, check, read, parse and verify the image at ``path`` through one descriptor.

    ``check_file`` refuses (PreconditionError) a file that is not regular, has other
    hard links, belongs to someone else than root or us, or that group or others
    may write; without it (save_image_info) such a file reads as unauthenticated.
    ``writable`` opens read-write and takes the edit lock; ``recover`` then rolls
    back an interrupted edit first. ``as_recovered`` reads as a rollback would
    leave the image, without writing (check mode). Otherwise a pending journal is
    refused.
    """
    fd = _open_fd(path, writable)
    try:
        info = os.fstat(fd)
        problem = file_trust_problem(info)
        readable = stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)  # libvirt can save to a device
        if problem and (check_file or not readable):
            raise PreconditionError(
                f"refusing the save image {path}: {problem}. Its command line decides what QEMU runs, so only "
                "root and its owner may be able to change it (chmod go-w; one name per image)")
        os.set_blocking(fd, True)
        if writable:
            _lock(fd, path)
        recovered = recover_interrupted_rewrite_fd(fd, path) if recover else False
        pread = journal_pread(fd) if as_recovered else None
        if not recover and not as_recovered:
            check_no_pending_journal(path, fd)
        image = read_image_fd(fd, path, allow_incomplete, pread)
        record = _parsed(image)
        read = pread or (lambda size, offset: _pread_exact(fd, size, offset))
        head = read(HEADER_SIZE, 0)
        auth_problem = verify(key, image.xml, head, read(image.header.data_len, HEADER_SIZE))
        if auth_problem is None and problem:
            auth_problem = f"the file is not protected: {problem}"
        return OpenedImage(fd, path, image, record, auth_problem is None, auth_problem,
                           info.st_uid, info.st_gid, recovered)
    except OSError as error:
        os.close(fd)
        raise ImageError(f"{path}: cannot read the save image: {error.strerror or error}") from None
    except BaseException:
        os.close(fd)
        raise
