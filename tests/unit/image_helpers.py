"""Images for the tests: made with the writer under test, or real ones libvirt 11.3 wrote.

The fixtures in tests/unit/fixtures are the first bytes of images that
``virsh save`` (libvirt 11.3.0, QEMU 10.0.2) wrote of a 128 MiB TCG guest named
``savetest``: the header, the data area and the first 4 KiB of the stream,
gzip-compressed. The stream is cut short; the header and data area are whole.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

from ansible_collections.savestate.qemu.plugins.module_utils._image import (
    ImageFormat,
    finalize_image,
    write_new_image,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LIBVIRT_UUID = "11111111-2222-3333-4444-555555555555"

# A stream as QEMU starts one: the file magic, version 3, then a section. The rest is filler.
FAKE_QEVM_STREAM = b"QEVM\x00\x00\x00\x03" + b"\x07\x00\x00\x00\x0epc-i440fx-10.0" + bytes(range(256)) * 4
FAKE_STREAMS = {
    ImageFormat.RAW: FAKE_QEVM_STREAM,
    ImageFormat.SPARSE: FAKE_QEVM_STREAM,
    ImageFormat.GZIP: b"\x1f\x8b\x08\x00" + bytes(64),
    ImageFormat.BZIP2: b"BZh9" + bytes(64),
    ImageFormat.XZ: b"\xfd7zXZ\x00" + bytes(64),
    ImageFormat.LZOP: b"\x89LZO\x00\r\n\x1a\n" + bytes(64),
    ImageFormat.ZSTD: b"\x28\xb5\x2f\xfd" + bytes(64),
}

SIMPLE_XML = """<domain type='kvm'>
  <name>simple</name>
  <uuid>6f1e0b5a-0d6c-4f0e-9d7c-0a1b2c3d4e5f</uuid>
  <memory unit='KiB'>65536</memory>
  <os><type arch='x86_64' machine='pc-i440fx-10.0'>hvm</type></os>
</domain>
"""
SIMPLE_COOKIE = "<cookie>\n  <slirpHelper/>\n</cookie>\n"


def libvirt_image_bytes(fmt: str = "raw") -> bytes:
    return gzip.decompress((FIXTURES / f"libvirt-11.3-{fmt}-head.img.gz").read_bytes())


def write_libvirt_fixture(directory: Path, fmt: str = "raw") -> Path:
    path = directory / f"libvirt-{fmt}.save"
    path.write_bytes(libvirt_image_bytes(fmt))
    return path


def make_image(path: Path, xml: str = SIMPLE_XML, cookie: str | None = SIMPLE_COOKIE, was_running: bool = True,
               fmt: ImageFormat = ImageFormat.RAW, stream: bytes | None = None, finalize: bool = True,
               sign: bool = False) -> Path:
    """A whole image written by the writer under test, with a fake stream of the right kind.

    ``sign`` signs it with this host's image key, as a save does (our XML only).
    """
    from ansible_collections.savestate.qemu.plugins.module_utils._image_auth import signing_xml
    from ansible_collections.savestate.qemu.plugins.module_utils._image_key import load_key

    seal = None
    if sign:
        xml, seal = signing_xml(xml, load_key())
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        header = write_new_image(fd, xml, cookie, was_running, fmt, seal=seal)
        os.write(fd, FAKE_STREAMS[fmt] if stream is None else stream)
        if finalize:
            finalize_image(fd, header)
    finally:
        os.close(fd)
    return path


def raw_header(magic: bytes = b"LibvirtQemudSave", version: int = 2, data_len: int = 1000, was_running: int = 1,
               fmt: int = 0, cookie_offset: int = 0, order: str = "<", unused: bytes = bytes(56)) -> bytes:
    return struct.pack(order + "16s5I56s", magic, version, data_len, was_running, fmt, cookie_offset, unused)


def savestate_record(disk_path: str = "/var/lib/images/web01.qcow2", name: str = "web01"):
    """A guest as the save module records it, with one disk on the command line."""
    from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import DiskRecord, GuestRecord

    qemu = "/usr/bin/qemu-system-x86_64"
    escaped = disk_path.replace(",", ",,")
    return GuestRecord(
        name=name, uuid="4c7a1a3e-30b6-4e55-9a55-3d7d2a1b0c11", memory_kib=131072, vcpus=1, arch="x86_64",
        machine="pc-i440fx-10.0", domain_type="qemu", emulator=qemu, qemu_version="10.0.2",
        argv=(qemu, "-name", f"guest={name}", "-machine", "pc", "-m", "128",
              "-drive", f"file={escaped},format=qcow2,if=virtio,id=disk0", "-qmp", "unix:/run/q.sock,server=on"),
        qmp="/run/q.sock",
        disks=(DiskRecord(disk_path, "qcow2", 1048576, 1764000000000000000, "disk0"),),
        saved_at="2026-11-24T13:40:16Z")


def make_savestate_image(path: Path, record=None, sign: bool = True, **kwargs) -> Path:
    """An image as a save writes it: our XML, signed with this host's key (unless ``sign=False``)."""
    from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import build_domain_xml

    return make_image(path, xml=build_domain_xml(record or savestate_record()), cookie=None, sign=sign, **kwargs)
