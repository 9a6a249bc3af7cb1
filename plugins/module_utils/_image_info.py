# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""The ``image`` dict every module of the collection returns, built in one place."""

from __future__ import annotations

from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import GuestRecord, parse_domain_xml
from ansible_collections.savestate.qemu.plugins.module_utils._errors import DomainXMLError
from ansible_collections.savestate.qemu.plugins.module_utils._image import SaveImage, read_image


def parse_image_xml(image: SaveImage) -> GuestRecord:
    """The image's domain XML as a record; errors name the image file."""
    try:
        return parse_domain_xml(image.xml)
    except DomainXMLError as error:
        raise type(error)(f"{image.path}: {error}") from None


def load_image(path: str, allow_incomplete: bool = False) -> tuple[SaveImage, GuestRecord]:
    """Read, validate and parse the image at ``path``."""
    image = read_image(path, allow_incomplete=allow_incomplete)
    return image, parse_image_xml(image)


def describe_image(image: SaveImage, record: Optional[GuestRecord] = None) -> dict[str, Any]:
    """The ``image`` return value (DESIGN.md): the same keys from every module."""
    if record is None:
        record = parse_image_xml(image)
    return {
        "path": image.path,
        "complete": image.complete,
        "version": image.version,
        "format": image.format.label,
        "was_running": image.was_running,
        "name": record.name,
        "uuid": record.uuid,
        "memory_kib": record.memory_kib,
        "vcpus": record.vcpus,
        "machine": record.machine,
        "stream_offset": image.stream_offset,
        "size": image.size,
        "origin": record.origin,
        "metadata": record.metadata(),
    }
