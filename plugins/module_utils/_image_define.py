# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Editing the XML and restore state inside a finished image (``virsh save-image-define``)."""

from __future__ import annotations

import os
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
from ansible_collections.savestate.qemu.plugins.module_utils._errors import DomainXMLError, ImageError
from ansible_collections.savestate.qemu.plugins.module_utils._image import (
    SaveImage,
    has_pending_journal,
    new_data_area_header,
    open_for_rewrite,
    read_image_as_recovered,
    read_image_fd,
    recover_interrupted_rewrite,
    rewrite_data_area,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image_info import parse_image_xml

RESTORE_STATES = ("running", "paused")


@dataclass(frozen=True)
class DefineRequest:
    """What to change; None leaves that part as it is."""

    xml: Optional[str] = None
    disk_paths: Optional[dict[str, str]] = None
    emulator: Optional[str] = None
    restore_state: Optional[str] = None

    def was_running(self) -> Optional[bool]:
        return None if self.restore_state is None else self.restore_state == "running"


@dataclass(frozen=True)
class DefineOutcome:
    changed: bool
    recovered: bool       # an interrupted earlier edit was (or, in check mode, would be) rolled back
    before: SaveImage
    after: SaveImage      # in check mode: the image as it would be
    record: GuestRecord   # of ``after``


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


def _differs(before: SaveImage, after: SaveImage) -> bool:
    return before.xml != after.xml or before.header != after.header


def define_image(path: str, request: DefineRequest, check_mode: bool = False) -> DefineOutcome:
    """Apply ``request`` to the image at ``path`` (or, in check mode, predict it)."""
    if check_mode:
        pending = has_pending_journal(path)
        before = read_image_as_recovered(path)
        after, record = _planned(before, request)
        return DefineOutcome(pending or _differs(before, after), pending, before, after, record)
    recovered = recover_interrupted_rewrite(path)
    fd, before = open_for_rewrite(path)
    try:
        planned, record = _planned(before, request)
        if _differs(before, planned):
            rewrite_data_area(fd, before.header, planned.xml, before.cookie, request.was_running(), path=path)
            after = read_image_fd(fd, path)
        else:
            after = before
    finally:
        os.close(fd)
    return DefineOutcome(recovered or _differs(before, after), recovered, before, after, record)
