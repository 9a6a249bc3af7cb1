"""Our save images and libvirt's, both ways, with a real libvirt (embedded QEMU driver).

One libvirt guest boots for the whole module and is saved in raw, gzip, zstd and
sparse in turn (restored in between; the sparse save is taken ``--paused``).
Images of our own are made with our writer and the stream of libvirt's raw
save, so that their stream is a real one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import (
    DiskRecord,
    GuestRecord,
    build_domain_xml,
    check_abi_stability,
    parse_domain_xml,
)
from ansible_collections.savestate.qemu.plugins.module_utils._errors import SaveStateError
from ansible_collections.savestate.qemu.plugins.module_utils._image import (
    ImageFormat,
    finalize_image,
    read_image,
    write_new_image,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image_auth import signing_xml
from ansible_collections.savestate.qemu.plugins.module_utils._image_info import describe_image, load_image
from ansible_collections.savestate.qemu.plugins.module_utils._image_key import load_key

from harness.libvirt import EmbeddedLibvirt, LibvirtError
from harness.qemu import SYSTEM_QEMU
from integration.ansible_runner import run_module

pytestmark = pytest.mark.integration

GUEST = "interop"
GUEST_UUID = str(uuid.UUID("0badc0de-1234-4abc-8def-0123456789ab"))
MEMORY_KIB = 128 * 1024
FORMATS = ("raw", "gzip", "zstd", "sparse")
ODD_DISK = "/srv/vm images/it's \"odd\"\nnew,line ünï.qcow2"


@pytest.fixture(scope="module")
def libvirt_images() -> Iterator[tuple[EmbeddedLibvirt, dict[str, Path]]]:
    """One guest, saved in every format we test (sparse needs QEMU >= 9.0: the system QEMU)."""
    root = Path(tempfile.mkdtemp(prefix="ssq-interop-"))
    host = EmbeddedLibvirt(root / "libvirt")
    try:
        host.define_guest(GUEST, GUEST_UUID, memory_mib=128, qemu=SYSTEM_QEMU)
        host.start(GUEST)
        images: dict[str, Path] = {}
        for fmt in FORMATS:
            if images:
                host.restore(images[FORMATS[FORMATS.index(fmt) - 1]])
            images[fmt] = root / f"{GUEST}-{fmt}.save"
            host.save(GUEST, images[fmt], fmt, *(["--paused"] if fmt == "sparse" else []))
        yield host, images
    finally:
        host.close()
        shutil.rmtree(root, ignore_errors=True)


def _error_line(error: str) -> str:
    """virsh's own message, without its 'error: ' prefixes and the 'Failed to update' line."""
    lines = [line.removeprefix("error: ") for line in error.splitlines() if line.startswith("error: ")]
    return next(line for line in lines if not line.startswith("Failed to update"))


def _our_record() -> GuestRecord:
    qemu = str(SYSTEM_QEMU.binary)
    return GuestRecord(
        name=GUEST, uuid=GUEST_UUID, memory_kib=MEMORY_KIB, vcpus=1, arch="x86_64", machine="pc-i440fx-10.0",
        domain_type="qemu", emulator=qemu, qemu_version="10.0.2",
        argv=(qemu, "-name", f"guest={GUEST}", "-m", "128", "-drive",
              f"file={ODD_DISK.replace(',', ',,')},format=qcow2,if=virtio", "\x01control", "", " ", "a\rb",
              os.fsdecode(b"\xff\xfe not utf-8"), "tab\tand\nnewline"),
        qmp="/run/interop/qmp.sock", disks=(DiskRecord(ODD_DISK, "qcow2", 1 << 20, 1764000000000000000, "disk0"),),
        saved_at="2026-11-24T13:40:16Z")


def _our_image(directory: Path, libvirt_raw: Path, record: GuestRecord, was_running: bool = True) -> Path:
    """Our header and XML, followed by the real stream of libvirt's raw save."""
    source = read_image(str(libvirt_raw))
    path = directory / "ours.save"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        xml, seal = signing_xml(build_domain_xml(record), load_key())  # signed, as a save signs it
        header = write_new_image(fd, xml, None, was_running, ImageFormat.RAW, seal=seal)
        with open(libvirt_raw, "rb") as stream:
            stream.seek(source.stream_offset)
            while chunk := stream.read(1 << 20):
                os.write(fd, chunk)
        finalize_image(fd, header)
    finally:
        os.close(fd)
    return path


# --- libvirt's images, read by us ---------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_we_read_libvirts_images(libvirt_images, fmt):
    _host, images = libvirt_images
    image, record = load_image(str(images[fmt]))
    described = describe_image(image, record)
    assert (described["complete"], described["version"], described["format"], described["origin"]) == (
        True, 2, fmt, "libvirt")
    assert (record.name, record.uuid, record.memory_kib, record.machine) == (
        GUEST, GUEST_UUID, MEMORY_KIB, "pc-i440fx-10.0")
    assert described["was_running"] is (fmt != "sparse")
    assert image.cookie.startswith("<cookie>")
    assert image.stream_offset == 92 + image.header.data_len


def test_save_image_info_on_libvirts_images(libvirt_images):
    _host, images = libvirt_images
    for fmt in FORMATS:
        result = run_module("save_image_info", {"path": str(images[fmt])})
        assert not result["failed"], result.get("msg")
        image = result["image"]
        assert (image["format"], image["origin"], image["name"], image["uuid"], image["memory_kib"],
                image["was_running"], image["complete"]) == (fmt, "libvirt", GUEST, GUEST_UUID, MEMORY_KIB,
                                                             fmt != "sparse", True), fmt
        assert image["size"] == images[fmt].stat().st_size


# --- our images, read by libvirt ----------------------------------------------------

def test_virsh_reads_our_image(libvirt_images, tmp_path):
    host, images = libvirt_images
    record = _our_record()
    path = _our_image(tmp_path, images["raw"], record)
    dumped = host.virsh("save-image-dumpxml", str(path)).stdout
    assert "<savestate:qemu-save" in dumped and "<savestate:mac key-id=" in dumped  # libvirt reads a signed image
    parsed = parse_domain_xml(dumped)
    assert parsed.argv == record.argv and parsed.disks == record.disks and parsed.origin == "savestate"
    assert (parsed.name, parsed.uuid, parsed.memory_kib, parsed.machine) == (
        GUEST, GUEST_UUID, MEMORY_KIB, "pc-i440fx-10.0")


def test_virsh_define_on_our_image_keeps_our_metadata(libvirt_images, tmp_path):
    host, images = libvirt_images
    record = _our_record()
    path = _our_image(tmp_path, images["raw"], record)
    xml_file = tmp_path / "dumped.xml"
    xml_file.write_text(host.virsh("save-image-dumpxml", str(path)).stdout)
    host.virsh("save-image-define", str(path), str(xml_file), "--paused")
    image, parsed = load_image(str(path))
    assert image.complete and not image.was_running
    assert parsed.origin == "savestate"
    assert (parsed.argv, parsed.disks, parsed.emulator, parsed.qmp, parsed.saved_at) == (
        record.argv, record.disks, record.emulator, record.qmp, record.saved_at)


def test_abi_and_size_refusals_match_libvirts_words(libvirt_images, tmp_path):
    host, images = libvirt_images
    record = _our_record()
    path = _our_image(tmp_path, images["raw"], record)
    dumped = host.virsh("save-image-dumpxml", str(path)).stdout
    edits = {
        "name": dumped.replace(f"<name>{GUEST}</name>", "<name>other</name>"),
        "memory": dumped.replace(f"<memory unit='KiB'>{MEMORY_KIB}</memory>", "<memory unit='KiB'>262144</memory>")
                        .replace(f">{MEMORY_KIB}</currentMemory>", ">262144</currentMemory>"),
        "uuid": dumped.replace(GUEST_UUID, "11111111-2222-3333-4444-555555555555"),
        "machine": dumped.replace("machine='pc-i440fx-10.0'", "machine='pc-i440fx-9.2'"),
    }
    for what, xml in edits.items():
        xml_file = tmp_path / f"{what}.xml"
        xml_file.write_text(xml)
        refused = host.virsh("save-image-define", str(path), str(xml_file), check=False)
        assert refused.returncode != 0, what
        with pytest.raises(SaveStateError) as ours:
            check_abi_stability(record, parse_domain_xml(xml))
        assert str(ours.value) == _error_line(refused.stderr), what

    too_large = tmp_path / "large.xml"
    too_large.write_text(dumped.replace("</domain>", f"<description>{'x' * 70000}</description></domain>"))
    refused = host.virsh("save-image-define", str(path), str(too_large), check=False)
    ours = run_module("save_image_define", {"path": str(path), "xml": too_large.read_text()})
    assert _error_line(refused.stderr) == "operation failed: new xml too large to fit in file"
    assert ours["failed"] and ours["msg"].startswith(f"{path}: new xml too large to fit in file (")


# --- libvirt's image edited by us, used by libvirt ----------------------------------

def test_save_image_define_on_libvirts_image_keeps_virsh_working(libvirt_images, tmp_path):
    host, images = libvirt_images
    path = tmp_path / "edited.save"
    shutil.copyfile(images["raw"], path)
    xml = read_image(str(path)).xml.replace("<on_crash>destroy</on_crash>", "<on_crash>restart</on_crash>")
    result = run_module("save_image_define", {"path": str(path), "xml": xml, "restore_state": "paused",
                                              "allow_unauthenticated": True})
    assert not result["failed"] and result["changed"], result.get("msg")
    assert result["authenticated"] is False
    assert "<on_crash>restart</on_crash>" in host.virsh("save-image-dumpxml", str(path)).stdout
    try:
        host.restore(path)
        assert host.domain_state(GUEST) == "paused"
    finally:
        try:
            host.virsh("destroy", GUEST)
        except LibvirtError:
            pass


# --- the reader's messages are libvirt's ------------------------------------------------

def _corruptions(data: bytes) -> dict[str, bytes]:
    xml_end = 92 + int.from_bytes(data[32:36], "little")  # cookieOffset: libvirt writes a cookie
    return {
        "short": data[:50],
        "partial": b"LibvirtQemudPart" + data[16:],
        "magic": b"LibvirtQemudXXXX" + data[16:],
        "version 3": data[:16] + (3).to_bytes(4, "little") + data[20:],
        "format 7": data[:28] + (7).to_bytes(4, "little") + data[32:],
        "data_len 0": data[:20] + bytes(4) + data[24:],
        "truncated XML": data[:xml_end - 10],
        "truncated cookie": data[:xml_end + 10],
    }


def test_reader_errors_are_libvirts(libvirt_images, tmp_path):
    host, images = libvirt_images
    with open(images["raw"], "rb") as source:
        data = source.read(200_000)
    for what, corrupt in _corruptions(data).items():
        path = tmp_path / f"{what.replace(' ', '-')}.save"
        path.write_bytes(corrupt)
        refused = host.virsh("save-image-dumpxml", str(path), check=False)
        with pytest.raises(SaveStateError) as ours:
            read_image(str(path))
        assert _error_line(refused.stderr) == "operation failed: " + str(ours.value).removeprefix(f"{path}: "), what
