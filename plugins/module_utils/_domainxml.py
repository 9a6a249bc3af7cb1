# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""The domain XML inside a save image, ours and libvirt's, and our metadata namespace.

We write a libvirt-valid ``<domain>`` (so that ``virsh save-image-dumpxml``
accepts our images) with a ``<metadata>`` child in our own namespace holding what
a restore needs and libvirt's XML does not: the emulator, the exact QEMU argv,
the QMP endpoint, the disks with their size and mtime, when it was saved. Both
kinds parse into one :class:`GuestRecord`. docs/image-format.md documents every
element.

XML comes from image files and from users, so the parser is hardened: no DTD, no
entities, no network, bounded size.
"""

from __future__ import annotations

import base64
import binascii
import re
import traceback
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._errors import (
    ABIStabilityError,
    DomainXMLError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._qemu_argv import replace_disk_paths
from ansible_collections.savestate.qemu.plugins.module_utils._systemd import UnitRecord

try:
    from lxml import etree
except ImportError:
    HAS_LXML = False
    LXML_IMPORT_ERROR: Optional[str] = traceback.format_exc()
else:
    HAS_LXML = True
    LXML_IMPORT_ERROR = None

NAMESPACE = "https://savestate.github.io/xmlns/qemu-save/1.0"
PREFIX = "savestate"
# virsh refuses XML files above 10 MiB (VSH_MAX_XML_FILE); so do we.
MAX_XML_BYTES = 10 * 1024 * 1024

ORIGIN_SAVESTATE = "savestate"
ORIGIN_LIBVIRT = "libvirt"
BASE64 = "base64"


def _tag(name: str) -> str:
    return f"{{{NAMESPACE}}}{name}"


# --- the record ---------------------------------------------------------------------

@dataclass(frozen=True)
class DiskRecord:
    """A disk of the saved guest. ``size``/``mtime_ns`` let a restore notice a changed disk."""

    path: str
    format: Optional[str] = None
    size: Optional[int] = None
    mtime_ns: Optional[int] = None
    node: Optional[str] = None          # QEMU's device id or block node name
    target: Optional[str] = None        # libvirt's <target dev>, e.g. vda
    bus: str = "virtio"
    source_type: str = "file"           # file or block (libvirt's <disk type>)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "size": self.size, "mtime_ns": self.mtime_ns,
                "node": self.node, "target": self.target}


@dataclass(frozen=True)
class GuestRecord:
    """What an image says about its guest. ``origin`` tells whether our metadata was there."""

    name: str
    uuid: Optional[str]
    memory_kib: Optional[int]
    vcpus: int = 1
    arch: Optional[str] = "x86_64"
    machine: Optional[str] = None
    domain_type: str = "kvm"
    emulator: Optional[str] = None
    qemu_version: Optional[str] = None
    argv: Optional[tuple[str, ...]] = None
    qmp: Optional[str] = None
    disks: tuple[DiskRecord, ...] = field(default_factory=tuple)
    saved_at: Optional[str] = None
    cwd: Optional[str] = None           # QEMU's working directory: relative paths in argv resolve from it
    unit: Optional[UnitRecord] = None   # the systemd unit QEMU ran in (issue 15)
    origin: str = ORIGIN_SAVESTATE
    # Who the saved QEMU ran as (restore starts it with these credentials, never more).
    owner_uid: Optional[int] = None
    owner_gid: Optional[int] = None
    owner_groups: tuple[int, ...] = field(default_factory=tuple)
    owner_user: Optional[str] = None    # the user's name at save time

    def metadata(self) -> Optional[dict[str, Any]]:
        """Our metadata as a plain dict (None for libvirt's images, which have none)."""
        if self.origin != ORIGIN_SAVESTATE:
            return None
        return {
            "emulator": self.emulator,
            "qemu_version": self.qemu_version,
            "machine": self.machine,
            "argv": list(self.argv) if self.argv is not None else None,
            "qmp": self.qmp,
            "disks": [disk.to_dict() for disk in self.disks],
            "saved_at": self.saved_at,
            "cwd": self.cwd,
            "credentials": self.credentials(),
            "unit": self.unit.to_dict() if self.unit is not None else None,
        }

    def credentials(self) -> Optional[dict[str, Any]]:
        """The saved QEMU's uid, gid, groups and user name; None if the save did not record them."""
        if self.owner_uid is None and self.owner_gid is None and not self.owner_groups and self.owner_user is None:
            return None
        return {"uid": self.owner_uid, "gid": self.owner_gid, "groups": list(self.owner_groups),
                "user": self.owner_user}


# --- text that XML cannot carry -----------------------------------------------------

# XML 1.0 characters, minus \r (parsers turn it into \n). Anything else (control
# characters, lone surrogates from undecodable bytes) goes in base64.
_XML_UNSAFE = re.compile("[^\t\n\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_safe(text: str) -> bool:
    return not _XML_UNSAFE.search(text)


def _needs_encoding(text: str) -> bool:
    # Whitespace-only text is also encoded: XML tools (libvirt among them) may drop it.
    return not _xml_safe(text) or (text != "" and text.strip() == "")


def _sanitized(text: str) -> str:
    """A stand-in for libvirt's view when the real text cannot appear there."""
    return _XML_UNSAFE.sub("_", text)


def _to_bytes(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as error:
        raise DomainXMLError(f"{text!r} cannot be stored: it is not text nor bytes decoded by the OS "
                             f"({error.reason})") from None


def _set_text(element: Any, text: str) -> None:
    """Store ``text`` exactly: as element text when XML keeps it intact, else base64."""
    if "\0" in text:
        raise DomainXMLError(f"{_sanitized(text)!r} holds a NUL byte, which no argument, path or name can carry")
    if _needs_encoding(text):
        element.set("encoding", BASE64)
        element.text = base64.b64encode(_to_bytes(text)).decode("ascii")
    else:
        element.attrib.pop("encoding", None)
        element.text = text


def _get_text(element: Any) -> str:
    text = element.text or ""
    encoding = element.get("encoding")
    if encoding is None:
        return text
    if encoding != BASE64:
        raise DomainXMLError(f"unknown encoding {encoding!r} on <{PREFIX}:{etree.QName(element).localname}>")
    try:
        decoded = base64.b64decode(text.strip(), validate=True).decode("utf-8", "surrogateescape")
    except (binascii.Error, ValueError):
        raise DomainXMLError(f"<{PREFIX}:{etree.QName(element).localname}> holds invalid base64") from None
    if "\0" in decoded:
        # No command-line argument, path or name can hold one: it would cut the value short
        # where the kernel reads it, so that QEMU would see something else than every check.
        raise DomainXMLError(f"<{PREFIX}:{etree.QName(element).localname}> holds a NUL byte; the image is "
                             "damaged or forged")
    return decoded


# --- parsing, hardened --------------------------------------------------------------

def _require_lxml() -> None:
    if not HAS_LXML:
        raise DomainXMLError("the lxml Python library is required to read and write domain XML")


def _parse(xml: str) -> Any:
    """Parse untrusted XML: no DTD, no entities, no network, bounded size."""
    _require_lxml()
    try:
        data = xml.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DomainXMLError(f"the domain XML cannot be encoded as UTF-8 ({error.reason})") from None
    if len(data) > MAX_XML_BYTES:
        raise DomainXMLError(f"the domain XML is {len(data)} bytes long; more than {MAX_XML_BYTES} is refused")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise DomainXMLError("the domain XML has a DOCTYPE or entity declaration; DTDs and entities are "
                             "refused (they can expand to huge documents or read local files)")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
                             huge_tree=False, collect_ids=False)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as error:
        raise DomainXMLError(f"the domain XML is not well-formed: {error}") from None
    if root.getroottree().docinfo.doctype:
        raise DomainXMLError("the domain XML has a DOCTYPE; DTDs are refused")
    if root.tag != "domain":
        raise DomainXMLError(f"XML error: expecting root element of 'domain', not '{root.tag}'")
    return root


def _serialize(root: Any, like: str) -> str:
    text: str = etree.tostring(root, encoding="unicode")
    return text + "\n" if like.endswith("\n") else text


def normalized(xml: str) -> str:
    """``xml`` as our serializer writes it (for diffs that show only real changes)."""
    try:
        return _serialize(_parse(xml), "\n")
    except DomainXMLError:
        return xml


# libvirt's unit suffixes (virScaleInteger): case-insensitive; "KB" is 1000, "K"/"KiB" 1024.
_UNIT_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def _unit_scale(unit: str) -> int:
    lowered = unit.lower()
    if lowered in ("b", "byte", "bytes"):
        return 1
    power = _UNIT_POWERS.get(lowered[:1])
    if power is None:
        raise DomainXMLError(f"unknown memory unit {unit!r}")
    rest = lowered[1:]
    if rest in ("", "ib"):
        return int(1024 ** power)
    if rest == "b":
        return int(1000 ** power)
    raise DomainXMLError(f"unknown memory unit {unit!r}")


def _memory_kib(element: Any) -> Optional[int]:
    if element is None:
        return None
    text = (element.text or "").strip()
    try:
        value = int(text)
    except ValueError:
        raise DomainXMLError(f"invalid value {text!r} for <{element.tag}>") from None
    if value < 0:
        raise DomainXMLError(f"invalid value {text!r} for <{element.tag}>")
    scaled = value * _unit_scale(element.get("unit", "KiB"))
    return -(-scaled // 1024)  # libvirt rounds up to whole KiB


def _int_attr(element: Any, name: str) -> Optional[int]:
    raw = element.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise DomainXMLError(f"invalid {name}={raw!r} on <{PREFIX}:{etree.QName(element).localname}>") from None


def _canonical_uuid(text: Optional[str]) -> Optional[str]:
    if text is None:
        return None
    try:
        return str(uuidlib.UUID(text.strip()))
    except ValueError:
        raise DomainXMLError("malformed uuid element") from None


def _metadata_element(root: Any) -> Optional[Any]:
    metadata = root.find("metadata")
    return metadata.find(_tag("qemu-save")) if metadata is not None else None


def _child_text(parent: Any, name: str) -> Optional[str]:
    child = parent.find(_tag(name))
    return _get_text(child) if child is not None else None


def _domain_disks(root: Any) -> tuple[DiskRecord, ...]:
    disks = []
    for disk in root.iterfind("devices/disk"):
        source = disk.find("source")
        path = None
        if source is not None:
            path = source.get("file") or source.get("dev") or source.get("dir") or source.get("name")
        if path is None:
            continue
        driver, target = disk.find("driver"), disk.find("target")
        disks.append(DiskRecord(
            path=path, format=driver.get("type") if driver is not None else None,
            target=target.get("dev") if target is not None else None,
            bus=target.get("bus", "virtio") if target is not None else "virtio",
            source_type=disk.get("type", "file")))
    return tuple(disks)


def _metadata_disks(meta: Any) -> tuple[DiskRecord, ...]:
    disks = []
    for disk in meta.iterfind(f"{_tag('disks')}/{_tag('disk')}"):
        path = _child_text(disk, "path")
        if path is None:
            raise DomainXMLError(f"<{PREFIX}:disk> without <{PREFIX}:path>")
        disks.append(DiskRecord(
            path=path, format=disk.get("format"), size=_int_attr(disk, "size"),
            mtime_ns=_int_attr(disk, "mtime-ns"), node=disk.get("node"), target=disk.get("target"),
            bus=disk.get("bus", "virtio"), source_type=disk.get("type", "file")))
    return tuple(disks)


def _metadata_argv(meta: Any) -> Optional[tuple[str, ...]]:
    argv = meta.find(_tag("argv"))
    if argv is None:
        return None
    return tuple(_get_text(arg) for arg in argv.iterfind(_tag("arg")))


def _int_list(element: Any, name: str) -> tuple[int, ...]:
    raw = (element.get(name) or "").strip()
    if not raw:
        return ()
    try:
        values = tuple(int(item) for item in raw.split(","))
    except ValueError:
        raise DomainXMLError(f"invalid {name}={raw!r} on <{PREFIX}:credentials>") from None
    if any(value < 0 for value in values):
        raise DomainXMLError(f"invalid {name}={raw!r} on <{PREFIX}:credentials>")
    return values


def _metadata_credentials(meta: Any) -> dict[str, Any]:
    element = meta.find(_tag("credentials"))
    if element is None:
        return {}
    uid, gid = _int_attr(element, "uid"), _int_attr(element, "gid")
    if (uid is not None and uid < 0) or (gid is not None and gid < 0):
        raise DomainXMLError(f"negative uid or gid on <{PREFIX}:credentials>")
    return {"owner_uid": uid, "owner_gid": gid, "owner_groups": _int_list(element, "groups"),
            "owner_user": element.get("user")}


def _record_from_tree(root: Any) -> GuestRecord:
    name_element = root.find("name")
    if name_element is None or not (name_element.text or "").strip():
        raise DomainXMLError("missing name information")
    os_type = root.find("os/type")
    vcpu_text = (root.findtext("vcpu") or "1").strip()
    try:
        vcpus = int(vcpu_text)
    except ValueError:
        raise DomainXMLError(f"invalid value {vcpu_text!r} for <vcpu>") from None
    common: dict[str, Any] = {
        "name": name_element.text,
        "uuid": _canonical_uuid(root.findtext("uuid")),
        "memory_kib": _memory_kib(root.find("memory")),
        "vcpus": vcpus,
        "arch": os_type.get("arch") if os_type is not None else None,
        "machine": os_type.get("machine") if os_type is not None else None,
        "domain_type": root.get("type", ""),
    }
    meta = _metadata_element(root)
    if meta is None:
        return GuestRecord(emulator=root.findtext("devices/emulator"), disks=_domain_disks(root),
                           origin=ORIGIN_LIBVIRT, **common)
    exact_name = _child_text(meta, "name")
    if exact_name is not None:
        common["name"] = exact_name
    return GuestRecord(
        emulator=_child_text(meta, "emulator"), qemu_version=_child_text(meta, "qemu-version"),
        argv=_metadata_argv(meta), qmp=_child_text(meta, "qmp"), disks=_metadata_disks(meta),
        saved_at=_child_text(meta, "saved-at"), cwd=_child_text(meta, "cwd"), unit=_metadata_unit(meta),
        origin=ORIGIN_SAVESTATE, **_metadata_credentials(meta), **common)


# --- systemd unit (issue 15): <ss:unit name="qemu@g1.service" kind="persistent"><ss:property name=K>V ---

def _metadata_unit(meta: Any) -> Optional[UnitRecord]:
    element = meta.find(_tag("unit"))
    if element is None:
        return None
    name, kind = element.get("name"), element.get("kind")
    if not name or kind not in ("persistent", "transient"):
        raise DomainXMLError(f"<{PREFIX}:unit> needs a name and a kind (persistent or transient)")
    properties = tuple((prop.get("name") or "", _get_text(prop)) for prop in element.iterfind(_tag("property")))
    return UnitRecord(name, kind, properties)


def _build_unit(meta: Any, unit: Optional[UnitRecord]) -> None:
    if unit is None or not _xml_safe(unit.name):
        return
    element = etree.SubElement(meta, _tag("unit"), name=unit.name, kind=unit.kind)
    for key, value in unit.properties:
        if _xml_safe(key):
            prop = etree.SubElement(element, _tag("property"), name=key)
            _set_text(prop, value)


def parse_domain_xml(xml: str) -> GuestRecord:
    """Parse a domain XML, ours (with metadata) or libvirt's, into a :class:`GuestRecord`."""
    return _record_from_tree(_parse(xml))


def has_savestate_metadata(xml: str) -> bool:
    return _metadata_element(_parse(xml)) is not None


# --- the MAC element ----------------------------------------------------------------
#
# <savestate:mac key-id="...">64 hex digits</savestate:mac> in our metadata. This
# module only stores and finds it; _image_auth.py computes and checks the value.

def read_mac(xml: str) -> Optional[tuple[str, str]]:
    """(key id, MAC hex) of the image's MAC element, or None if it has none (or no metadata)."""
    meta = _metadata_element(_parse(xml))
    element = meta.find(_tag("mac")) if meta is not None else None
    if element is None:
        return None
    return element.get("key-id") or "", (element.text or "").strip()


def with_mac(xml: str, key_id: str, value: str) -> Optional[str]:
    """``xml`` with one MAC element holding ``value``; None for an XML without our metadata."""
    root = _parse(xml)
    meta = _metadata_element(root)
    if meta is None:
        return None
    for old in meta.findall(_tag("mac")):
        meta.remove(old)
    element = etree.SubElement(meta, _tag("mac"))
    element.set("key-id", key_id)
    element.text = value
    return _serialize(root, xml)


# --- writing ------------------------------------------------------------------------

_TARGET_PREFIX = {"virtio": "vd", "scsi": "sd", "sata": "sd", "usb": "sd", "ide": "hd", "fdc": "fd"}


def _target_name(bus: str, index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        letters = chr(ord("a") + remainder) + letters
    return _TARGET_PREFIX.get(bus, "vd") + letters


def _sub(parent: Any, tag: str, text: Optional[str] = None, **attributes: str) -> Any:
    element = etree.SubElement(parent, tag, attributes)
    if text is not None:
        element.text = text
    return element


def _meta_text(parent: Any, name: str, text: Optional[str]) -> None:
    if text is not None:
        _set_text(etree.SubElement(parent, _tag(name)), text)


def _check_buildable(record: GuestRecord) -> None:
    if not record.name:
        raise DomainXMLError("the guest has no name; libvirt requires one")
    if not record.uuid:
        raise DomainXMLError(f"guest {record.name!r} has no UUID; the image needs one (libvirt invents a "
                             "random UUID on every read otherwise)")
    if record.memory_kib is None or not record.machine:
        raise DomainXMLError(f"guest {record.name!r}: memory size and machine type are required")


def _build_credentials(meta: Any, record: GuestRecord) -> None:
    if record.credentials() is None:
        return
    element = etree.SubElement(meta, _tag("credentials"))
    if record.owner_uid is not None:
        element.set("uid", str(record.owner_uid))
    if record.owner_gid is not None:
        element.set("gid", str(record.owner_gid))
    if record.owner_groups:
        element.set("groups", ",".join(str(group) for group in record.owner_groups))
    if record.owner_user is not None and _xml_safe(record.owner_user):
        element.set("user", record.owner_user)


def _build_metadata(metadata: Any, record: GuestRecord, domain_name: str) -> None:
    meta = etree.SubElement(metadata, _tag("qemu-save"), nsmap={PREFIX: NAMESPACE})
    if domain_name != record.name:
        _meta_text(meta, "name", record.name)
    _meta_text(meta, "emulator", record.emulator)
    _meta_text(meta, "qemu-version", record.qemu_version)
    _meta_text(meta, "machine", record.machine)
    _meta_text(meta, "qmp", record.qmp)
    _meta_text(meta, "saved-at", record.saved_at)
    _meta_text(meta, "cwd", record.cwd)
    _build_credentials(meta, record)
    _build_unit(meta, record.unit)
    if record.argv is not None:
        argv = etree.SubElement(meta, _tag("argv"))
        for arg in record.argv:
            _set_text(etree.SubElement(argv, _tag("arg")), arg)
    disks = etree.SubElement(meta, _tag("disks"))
    for disk in record.disks:
        element = etree.SubElement(disks, _tag("disk"))
        for attribute, value in (("format", disk.format), ("size", disk.size), ("mtime-ns", disk.mtime_ns),
                                 ("node", disk.node), ("target", disk.target), ("bus", disk.bus),
                                 ("type", disk.source_type)):
            if value is not None and _xml_safe(str(value)):
                element.set(attribute, str(value))
        _set_text(etree.SubElement(element, _tag("path")), disk.path)


def _build_disk(devices: Any, disk: DiskRecord, index: int) -> None:
    block = disk.source_type == "block"
    element = _sub(devices, "disk", type="block" if block else "file", device="disk")
    if disk.format and _xml_safe(disk.format):
        _sub(element, "driver", name="qemu", type=disk.format)
    # libvirt's schema puts the path in an attribute; the exact path is in our metadata.
    _sub(element, "source", **{"dev" if block else "file": _sanitized(disk.path)})
    target = disk.target if disk.target and _xml_safe(disk.target) else _target_name(disk.bus, index)
    _sub(element, "target", dev=target, bus=disk.bus if _xml_safe(disk.bus) else "virtio")


def build_domain_xml(record: GuestRecord) -> str:
    """The ``<domain>`` we store: libvirt-valid, no ``<emulator>`` outside our metadata."""
    _require_lxml()
    _check_buildable(record)
    domain_name = _sanitized(record.name).replace("/", "_")  # libvirt refuses '/' in names
    root = etree.Element("domain", type=record.domain_type)
    _sub(root, "name", domain_name)
    _sub(root, "uuid", str(uuidlib.UUID(record.uuid)))
    _build_metadata(_sub(root, "metadata"), record, domain_name)
    _sub(root, "memory", str(record.memory_kib), unit="KiB")
    _sub(root, "currentMemory", str(record.memory_kib), unit="KiB")
    _sub(root, "vcpu", str(record.vcpus), placement="static")
    os_element = _sub(root, "os")
    _sub(os_element, "type", "hvm", arch=record.arch or "x86_64", machine=record.machine or "")
    devices = _sub(root, "devices")
    for index, disk in enumerate(record.disks):
        _build_disk(devices, disk, index)
    _sub(devices, "memballoon", model="none")
    etree.indent(root, space="  ")
    text: str = etree.tostring(root, encoding="unicode")
    return text + "\n"


# --- ABI stability ------------------------------------------------------------------

def _shown(value: Any) -> str:
    return "(none)" if value is None or value == "" else str(value)


# (what, old, new, libvirt's message) in the order virDomainDefCheckABIStabilityFlags checks.
def _abi_comparisons(old: GuestRecord, new: GuestRecord) -> list[tuple[Any, Any, str]]:
    return [
        (old.domain_type, new.domain_type, "Target domain virt type {new} does not match source {old}"),
        (old.uuid, new.uuid, "Target domain uuid {new} does not match source {old}"),
        (old.name, new.name, "Target domain name '{new}' does not match source '{old}'"),
        (old.memory_kib, new.memory_kib, "Target domain max memory {new} does not match source {old}"),
        (old.vcpus, new.vcpus, "Target domain vCPU max {new} does not match source {old}"),
        (old.arch, new.arch, "Target domain architecture {new} does not match source {old}"),
        (old.machine, new.machine, "Target domain machine type {new} does not match source {old}"),
        (len(old.disks), len(new.disks), "Target domain disk count {new} does not match source {old}"),
    ]


def check_abi_stability(old: GuestRecord, new: GuestRecord) -> None:
    """Refuse a new XML that describes another guest, in libvirt's order and words.

    The saved RAM and device state only fit the machine they came from, so only
    host-side details (disk paths, emulator) may change.
    """
    for before, after, message in _abi_comparisons(old, new):
        if before != after:
            detail = message.format(new=_shown(after), old=_shown(before))
            raise ABIStabilityError(f"unsupported configuration: {detail}")


# --- targeted edits -----------------------------------------------------------------

def _remap_domain_disks(root: Any, mapping: dict[str, str]) -> bool:
    sanitized = {_sanitized(old): new for old, new in mapping.items()}
    changed = False
    sources = list(root.iterfind("devices/disk/source")) + list(root.iterfind("devices/disk/backingStore//source"))
    for source in sources:
        for attribute in ("file", "dev"):
            value = source.get(attribute)
            new = mapping.get(value) if value is not None else None
            if new is None and value is not None:
                new = sanitized.get(value)
            if new is not None and _sanitized(new) != value:
                source.set(attribute, _sanitized(new))
                changed = True
    return changed


def _remap_metadata_disks(meta: Any, mapping: dict[str, str]) -> bool:
    changed = False
    for path in meta.iterfind(f"{_tag('disks')}/{_tag('disk')}/{_tag('path')}"):
        old = _get_text(path)
        if old in mapping and mapping[old] != old:
            _set_text(path, mapping[old])
            changed = True
    return changed


def _rewrite_argv(meta: Any, edit: Callable[[list[str]], list[str]]) -> bool:
    argv = meta.find(_tag("argv"))
    if argv is None:
        return False
    args = list(argv.iterfind(_tag("arg")))
    old = [_get_text(arg) for arg in args]
    new = edit(old)
    changed = False
    for element, before, after in zip(args, old, new):
        if before != after:
            _set_text(element, after)
            changed = True
    return changed


def remap_disk_paths(xml: str, mapping: dict[str, str]) -> str:
    """Point the image at moved disks: domain ``<disk>`` sources, our metadata and the argv.

    Restore launches the recorded argv, so the paths inside it change too.
    Returns ``xml`` itself when no path matches.
    """
    mapping = {old: new for old, new in mapping.items() if old != new}
    if not mapping:
        return xml
    root = _parse(xml)
    changed = _remap_domain_disks(root, mapping)
    meta = _metadata_element(root)
    if meta is not None:
        changed = _remap_metadata_disks(meta, mapping) | changed
        changed = _rewrite_argv(meta, lambda argv: replace_disk_paths(argv, mapping)) | changed
    return _serialize(root, xml) if changed else xml


def _replace_argv0(argv: list[str], emulator: str) -> list[str]:
    return [emulator] + argv[1:] if argv else argv


def set_emulator(xml: str, emulator: str) -> str:
    """Use another QEMU binary: our metadata and argv[0], or libvirt's ``<emulator>``.

    Returns ``xml`` itself when nothing changes.
    """
    root = _parse(xml)
    changed = False
    meta = _metadata_element(root)
    if meta is not None:
        element = meta.find(_tag("emulator"))
        if element is None or _get_text(element) != emulator:
            if element is None:
                element = etree.SubElement(meta, _tag("emulator"))
            _set_text(element, emulator)
            changed = True
        changed = _rewrite_argv(meta, lambda argv: _replace_argv0(argv, emulator)) | changed
    libvirt_emulator = root.find("devices/emulator")
    if libvirt_emulator is not None and libvirt_emulator.text != _sanitized(emulator):
        libvirt_emulator.text = _sanitized(emulator)
        changed = True
    return _serialize(root, xml) if changed else xml
