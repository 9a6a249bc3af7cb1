# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Editing the XML and restore state inside a finished image (``virsh save-image-define``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import (
    GuestRecord,
    ORIGIN_SAVESTATE,
    check_abi_stability,
    parse_domain_xml,
    remap_disk_paths,
    set_emulator,
)
from ansible_collections.savestate.qemu.plugins.module_utils._errors import (
    DomainXMLError,
    ImageError,
    PreconditionError,
    SaveStateError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image import (
    HEADER_SIZE,
    SaveImage,
    _pread_exact,
    has_pending_journal_fd,
    _sealed,
    new_data_area_header,
    parse_data_area,
    read_image_fd,
    rewrite_data_area,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image_auth import (
    OpenedImage,
    open_image,
    signing_xml,
    verify,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image_info import describe_image, parse_image_xml
from ansible_collections.savestate.qemu.plugins.module_utils._image_key import ImageKey, load_key

RESTORE_STATES = ("running", "paused")


@dataclass(frozen=True)
class DefineRequest:
    """What to change; None leaves that part as it is."""

    xml: Optional[str] = None
    disk_paths: Optional[dict[str, str]] = None
    emulator: Optional[str] = None
    restore_state: Optional[str] = None
    # Edit an image without a valid MAC (it stays unauthenticated: an edit never signs it).
    allow_unauthenticated: bool = False

    def was_running(self) -> Optional[bool]:
        return None if self.restore_state is None else self.restore_state == "running"


@dataclass(frozen=True)
class DefineOutcome:
    changed: bool
    recovered: bool       # an interrupted earlier edit was (or, in check mode, would be) rolled back
    before: SaveImage
    after: SaveImage      # in check mode: the image as it would be
    record: GuestRecord   # of ``after``
    authenticated: bool = False          # ``after`` carries a valid MAC of this host's key
    auth_problem: Optional[str] = None   # why not


def _edited_xml(image: SaveImage, request: DefineRequest) -> str:
    xml = request.xml if request.xml is not None else image.xml
    if request.disk_paths:
        xml = remap_disk_paths(xml, request.disk_paths)
    if request.emulator is not None:
        xml = set_emulator(xml, request.emulator)
    return xml


def _checked_record(image: SaveImage, old: GuestRecord, xml: str) -> GuestRecord:
    try:
        new = parse_domain_xml(xml)
    except DomainXMLError as error:
        raise type(error)(f"{image.path}: new XML: {error}") from None
    try:
        check_abi_stability(old, new)
    except DomainXMLError as error:
        raise type(error)(f"{image.path}: {error}") from None
    if old.origin == ORIGIN_SAVESTATE and new.origin != ORIGIN_SAVESTATE:
        raise DomainXMLError(
            f"{image.path}: the new XML lacks the savestate metadata (<metadata><savestate:qemu-save>) that "
            "restore needs; start from the xml that save_image_info returns and keep that element")
    return new


def _planned(image: SaveImage, request: DefineRequest) -> tuple[SaveImage, GuestRecord]:
    """The image as the edit leaves it (header and XML; the stream is never touched)."""
    old = parse_image_xml(image)
    xml = _edited_xml(image, request)
    record = _checked_record(image, old, xml) if xml != image.xml else old
    try:
        header = new_data_area_header(image.header, xml, image.cookie, request.was_running())[0]
    except ImageError as error:
        raise type(error)(f"{image.path}: {error}") from None
    return replace(image, header=header, xml=xml), record


def _as_signed(planned: SaveImage, key: ImageKey) -> SaveImage:
    """What signing the planned edit stores (the MAC is deterministic): check mode shows the real XML."""
    xml, seal = signing_xml(planned.xml, key)
    if seal is None:
        return planned
    header, data = new_data_area_header(planned.header, xml, planned.cookie)
    return replace(planned, xml=parse_data_area(header, _sealed(seal, header, data))[0])


def _differs(before: SaveImage, after: SaveImage) -> bool:
    return before.xml != after.xml or before.header != after.header


def _require_trust(opened: OpenedImage, request: DefineRequest) -> None:
    if opened.authenticated or request.allow_unauthenticated:
        return
    raise PreconditionError(
        f"refusing to edit {opened.path}: the image is not authenticated ({opened.auth_problem}). Restore "
        "runs the command line it records, so only images this host (or its fleet) signed are edited and "
        "signed again. To edit it anyway, set allow_unauthenticated: true; it then stays unauthenticated")


def _signed_plan(opened: OpenedImage, request: DefineRequest, key: Optional[ImageKey]) -> tuple[SaveImage, GuestRecord]:
    """The image as the edit leaves it, with its new MAC when it is authenticated and changes.

    Compared with the image as it is, so that an edit repeated (an XML without the
    MAC element, say) finds nothing to do.
    """
    planned, record = _planned(opened.image, request)
    if key is not None and opened.authenticated and _differs(opened.image, planned):
        planned = _as_signed(planned, key)
    return planned, record


def _add_image_context(error: SaveStateError, image: SaveImage) -> None:
    """Give ``error`` the image it concerns as the failure's context, when its XML can be read."""
    try:
        error.add_context(image=describe_image(image))
    except SaveStateError:
        pass  # the XML itself is what failed: the message says so


def define_image(path: str, request: DefineRequest, check_mode: bool = False,
                 key: Optional[ImageKey] = None) -> DefineOutcome:
    """Apply ``request`` to the image at ``path`` (or, in check mode, predict it).

    The image is opened once; an authenticated image is signed again after the
    edit, an unauthenticated one (only with ``allow_unauthenticated``) is not.
    A refusal after the image was read carries it (``image``) for the module's failure.
    """
    key = key if key is not None else load_key(create=not check_mode)
    with open_image(path, key, as_recovered=check_mode, writable=not check_mode, recover=not check_mode) as opened:
        try:
            return _define_opened(opened, path, request, check_mode, key)
        except SaveStateError as error:
            _add_image_context(error, opened.image)
            raise


def _define_opened(opened: OpenedImage, path: str, request: DefineRequest, check_mode: bool,
                   key: Optional[ImageKey]) -> DefineOutcome:
    _require_trust(opened, request)
    before = opened.image
    planned, record = _signed_plan(opened, request, key)
    if check_mode:
        pending = has_pending_journal_fd(opened.fd)
        return DefineOutcome(pending or _differs(before, planned), pending, before, planned, record,
                             opened.authenticated, opened.auth_problem)
    if not _differs(before, planned):
        return DefineOutcome(opened.recovered, opened.recovered, before, before, record,
                             opened.authenticated, opened.auth_problem)
    # The planned XML already holds its MAC (deterministic): written as is, it verifies.
    rewrite_data_area(opened.fd, before.header, planned.xml, before.cookie, request.was_running(), path=path)
    after = read_image_fd(opened.fd, path)
    problem = verify(key, after.xml, _pread_exact(opened.fd, HEADER_SIZE, 0),
                     _pread_exact(opened.fd, after.header.data_len, HEADER_SIZE))
    return DefineOutcome(True, opened.recovered, before, after, parse_image_xml(after), problem is None, problem)
