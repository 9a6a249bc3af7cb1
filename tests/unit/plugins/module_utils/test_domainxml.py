"""The domain XML we write and read, our metadata namespace, ABI checks and targeted edits."""

from __future__ import annotations

import base64
import json
import os
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import (
    MAX_XML_BYTES,
    NAMESPACE,
    DiskRecord,
    GuestRecord,
    build_domain_xml,
    check_abi_stability,
    normalized,
    parse_domain_xml,
    remap_disk_paths,
    set_emulator,
)
from ansible_collections.savestate.qemu.plugins.module_utils._errors import ABIStabilityError, DomainXMLError
from ansible_collections.savestate.qemu.plugins.module_utils._image import SaveHeader

from ansible_collections.savestate.qemu.tests.unit.image_helpers import LIBVIRT_UUID, libvirt_image_bytes

ODD_PATH = "/srv/vm images/it's \"quoted\"\nnew,line,,comma/ünï.qcow2"


def record(**changes) -> GuestRecord:
    base = dict(
        name="web01", uuid="4c7a1a3e-30b6-4e55-9a55-3d7d2a1b0c11", memory_kib=131072, vcpus=2, arch="x86_64",
        machine="pc-q35-10.0", domain_type="kvm", emulator="/usr/bin/qemu-system-x86_64", qemu_version="10.0.2",
        argv=("/usr/bin/qemu-system-x86_64", "-name", "guest=web01", "-machine", "q35", "-m", "128",
              "-drive", "file=/var/lib/images/web01.qcow2,format=qcow2,if=virtio,id=disk0",
              "-blockdev", '{"driver":"file","filename":"/var/lib/images/data.raw","node-name":"data0"}',
              "-blockdev", "driver=file,filename=/var/lib/images/kv.raw,node-name=kv0",
              "-hdb", "/var/lib/images/old.img"),
        qmp="/run/web01/qmp.sock",
        disks=(DiskRecord("/var/lib/images/web01.qcow2", "qcow2", 2 ** 31, 1764000000123456789, "disk0"),
               DiskRecord("/var/lib/images/data.raw", "raw", 4096, 1, "data0", target="vdb")),
        saved_at="2026-11-24T13:40:16Z",
    )
    base.update(changes)
    return GuestRecord(**base)


def libvirt_xml() -> str:
    data = libvirt_image_bytes("raw")
    header = SaveHeader.unpack(data[:92])
    return data[92:92 + header.xml_len].split(b"\0")[0].decode()


# --- round trips ------------------------------------------------------------------------

def test_round_trip():
    original = record()
    xml = build_domain_xml(original)
    assert parse_domain_xml(xml) == original


def test_working_directory_round_trips_and_is_optional():
    """QEMU's working directory (relative paths in argv resolve from it), any characters."""
    guest = record(cwd="/srv/vm dir/it's\nü")
    xml = build_domain_xml(guest)
    assert "<savestate:cwd" in xml
    parsed = parse_domain_xml(xml)
    assert parsed.cwd == guest.cwd and parsed.metadata()["cwd"] == guest.cwd
    assert parse_domain_xml(build_domain_xml(record())).cwd is None
    assert "savestate:cwd" not in build_domain_xml(record())


def test_written_xml_is_what_libvirt_needs():
    root = etree.fromstring(build_domain_xml(record()).encode())
    assert root.tag == "domain" and root.get("type") == "kvm"
    assert root.findtext("uuid") == "4c7a1a3e-30b6-4e55-9a55-3d7d2a1b0c11"
    assert root.find("memory").get("unit") == "KiB" and root.findtext("currentMemory") == "131072"
    assert root.find("os/type").attrib == {"arch": "x86_64", "machine": "pc-q35-10.0"}
    assert root.find("devices/emulator") is None  # libvirt would check that the binary exists
    assert root.find("devices/memballoon").get("model") == "none"
    disks = root.findall("devices/disk")
    sources = [d.find("source").get("file") for d in disks]
    assert sources == ["/var/lib/images/web01.qcow2", "/var/lib/images/data.raw"]
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb"]
    meta = root.find("metadata")[0]
    assert meta.tag == f"{{{NAMESPACE}}}qemu-save" and meta.prefix == "savestate"
    # Paths are element text, never attributes.
    assert all("/" not in value for element in meta.iter() for value in element.attrib.values())


@pytest.mark.parametrize("name", ["with space", "quote'\"", "new\nline", "ünïcödé", "tab\there", "a/b", "ctl\x01\x1f",
                                  "cr\rhere"])
def test_odd_names_round_trip(name):
    xml = build_domain_xml(record(name=name))
    assert parse_domain_xml(xml).name == name
    domain_name = etree.fromstring(xml.encode()).findtext("name")
    assert "/" not in domain_name  # libvirt refuses '/' in names


xml_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)
os_bytes_text = st.binary(max_size=20).filter(lambda b: b"\0" not in b).map(os.fsdecode)  # what /proc/PID/cmdline gives for non-UTF-8 bytes
args = st.one_of(xml_text, os_bytes_text, st.sampled_from(["", " ", "\n", "\r\n", "\t", "a,,b"]))
paths = st.one_of(xml_text.filter(bool), os_bytes_text.filter(bool), st.just(ODD_PATH))
disks = st.builds(DiskRecord, path=paths, format=st.sampled_from(["raw", "qcow2", None]),
                  size=st.one_of(st.none(), st.integers(0, 2 ** 63)), mtime_ns=st.one_of(st.none(), st.integers(0)),
                  node=st.one_of(st.none(), st.text(string.ascii_letters, min_size=1, max_size=8)))
records = st.builds(
    record,
    name=xml_text.filter(lambda n: n.strip()),
    uuid=st.uuids().map(str),
    memory_kib=st.integers(1, 2 ** 40),
    vcpus=st.integers(1, 512),
    argv=st.lists(args, max_size=12).map(tuple),
    qmp=st.one_of(st.none(), paths),
    emulator=paths,
    disks=st.lists(disks, max_size=4).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(records)
def test_any_record_round_trips(guest):
    assert parse_domain_xml(build_domain_xml(guest)) == guest


@settings(max_examples=300, deadline=None)
@given(st.lists(args, max_size=30))
def test_argv_round_trips_exactly(argv):
    guest = record(argv=tuple(argv))
    assert parse_domain_xml(build_domain_xml(guest)).argv == tuple(argv)


def test_nul_bytes_are_refused_when_written_and_when_read():
    """A NUL cuts an argument short where the kernel reads it: QEMU would run something no check saw."""
    with pytest.raises(DomainXMLError, match="NUL byte"):
        build_domain_xml(record(argv=("/bin/qemu", "-name", "a\0b")))
    xml = build_domain_xml(record(argv=("/bin/qemu", "\x01")))
    forged = xml.replace(base64.b64encode(b"\x01").decode(), base64.b64encode(b"-S\0x").decode())
    assert forged != xml
    with pytest.raises(DomainXMLError, match="holds a NUL byte"):
        parse_domain_xml(forged)


def test_credentials_round_trip_and_show_in_metadata():
    guest = record(argv=("/bin/qemu",))
    guest = type(guest)(**{**guest.__dict__, "owner_uid": 1000, "owner_gid": 100, "owner_groups": (100, 27),
                           "owner_user": "alice"})
    xml = build_domain_xml(guest)
    assert 'uid="1000"' in xml and 'groups="100,27"' in xml and 'user="alice"' in xml
    parsed = parse_domain_xml(xml)
    assert parsed == guest
    assert parsed.metadata()["credentials"] == {"uid": 1000, "gid": 100, "groups": [100, 27], "user": "alice"}
    assert parse_domain_xml(build_domain_xml(record())).metadata()["credentials"] is None


def test_text_xml_cannot_hold_is_stored_as_base64():
    xml = build_domain_xml(record(argv=("/bin/qemu", "a\rb", "\x01", " ", os.fsdecode(b"\xff\xfe"))))
    meta_args = etree.fromstring(xml.encode()).findall(f".//{{{NAMESPACE}}}arg")
    assert [a.get("encoding") for a in meta_args] == [None, "base64", "base64", "base64", "base64"]


# --- reading libvirt's XML ------------------------------------------------------------

def test_libvirt_xml_parses_as_origin_libvirt():
    guest = parse_domain_xml(libvirt_xml())
    assert (guest.name, guest.uuid, guest.memory_kib, guest.vcpus, guest.machine, guest.domain_type) == (
        "savetest", LIBVIRT_UUID, 131072, 1, "pc-i440fx-10.0", "qemu")
    assert guest.origin == "libvirt" and guest.argv is None and guest.metadata() is None
    assert guest.emulator == "/usr/bin/qemu-system-x86_64"


@pytest.mark.parametrize("unit, value, kib", [
    (None, "65536", 65536), ("KiB", "65536", 65536), ("k", "1", 1), ("b", "1025", 2), ("bytes", "2048", 2),
    ("KB", "1024", 1000), ("MiB", "128", 131072), ("M", "1", 1024), ("MB", "1", 977), ("GiB", "2", 2097152),
    ("g", "1", 1048576), ("GB", "1", 976563), ("TiB", "1", 2 ** 30), ("PiB", "1", 2 ** 40), ("EiB", "1", 2 ** 50),
])
def test_memory_units_as_libvirt_scales_them(unit, value, kib):
    unit_attr = f" unit='{unit}'" if unit else ""
    xml = f"<domain type='kvm'><name>m</name><memory{unit_attr}>{value}</memory></domain>"
    assert parse_domain_xml(xml).memory_kib == kib


@pytest.mark.parametrize("xml, message", [
    ("<domain type='kvm'><uuid>1</uuid></domain>", "missing name information"),
    ("<domain type='kvm'><name>x</name><uuid>not-a-uuid</uuid></domain>", "malformed uuid element"),
    ("<domain type='kvm'><name>x</name><memory unit='parsec'>1</memory></domain>", "unknown memory unit 'parsec'"),
    ("<domain type='kvm'><name>x</name><memory>lots</memory></domain>", "invalid value 'lots' for <memory>"),
    ("<domain type='kvm'><name>x</name><vcpu>two</vcpu></domain>", "invalid value 'two' for <vcpu>"),
    ("<cookie/>", "XML error: expecting root element of 'domain', not 'cookie'"),
    ("<domain type='kvm'><name>x", "the domain XML is not well-formed: Premature end of data"),
    ("", "the domain XML is not well-formed"),
    ("<domain><name>&undefined;</name></domain>", "the domain XML is not well-formed: Entity 'undefined' not defined"),
])
def test_bad_xml_is_refused_clearly(xml, message):
    with pytest.raises(DomainXMLError) as caught:
        parse_domain_xml(xml)
    assert str(caught.value).startswith(message)


def test_uuid_is_canonicalised():
    xml = "<domain type='kvm'><name>x</name><uuid>4C7A1A3E30B64E559A553D7D2A1B0C11</uuid></domain>"
    assert parse_domain_xml(xml).uuid == "4c7a1a3e-30b6-4e55-9a55-3d7d2a1b0c11"


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<domain><name>&lol3;</name></domain>"""
EXTERNAL_ENTITY = """<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><domain><name>&xxe;</name></domain>"""
EXTERNAL_DTD = """<!DOCTYPE domain SYSTEM "http://example.invalid/domain.dtd"><domain><name>x</name></domain>"""
PARAMETER_ENTITY = """<!DOCTYPE d [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]><domain><name>x</name></domain>"""


@pytest.mark.parametrize("xml", [BILLION_LAUGHS, EXTERNAL_ENTITY, EXTERNAL_DTD, PARAMETER_ENTITY])
def test_hostile_xml_is_refused(xml):
    with pytest.raises(DomainXMLError, match="DOCTYPE or entity declaration; DTDs and entities are refused"):
        parse_domain_xml(xml)


def test_oversized_xml_is_refused():
    xml = "<domain><name>x</name><description>" + "x" * MAX_XML_BYTES + "</description></domain>"
    with pytest.raises(DomainXMLError, match=r"bytes long; more than 10485760 is refused"):
        parse_domain_xml(xml)


def test_encoding_declaration_is_accepted():
    assert parse_domain_xml("<?xml version='1.0' encoding='UTF-8'?><domain><name>é</name></domain>").name == "é"


def test_unknown_metadata_encoding_is_refused():
    xml = build_domain_xml(record()).replace("<savestate:qmp>", "<savestate:qmp encoding='rot13'>")
    with pytest.raises(DomainXMLError, match="unknown encoding 'rot13' on <savestate:qmp>"):
        parse_domain_xml(xml)


def test_invalid_base64_is_refused():
    xml = build_domain_xml(record(qmp="\x01")).replace(">AQ==<", ">!!<")
    with pytest.raises(DomainXMLError, match="<savestate:qmp> holds invalid base64"):
        parse_domain_xml(xml)


def test_building_needs_identity_and_machine():
    with pytest.raises(DomainXMLError, match="has no UUID"):
        build_domain_xml(record(uuid=None))
    with pytest.raises(DomainXMLError, match="memory size and machine type are required"):
        build_domain_xml(record(machine=None))


# --- ABI stability ----------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"domain_type": "qemu"}, "Target domain virt type qemu does not match source kvm"),
    ({"uuid": "00000000-0000-0000-0000-000000000001"},
     "Target domain uuid 00000000-0000-0000-0000-000000000001 does not match source "
     "4c7a1a3e-30b6-4e55-9a55-3d7d2a1b0c11"),
    ({"uuid": None}, "Target domain uuid (none) does not match source 4c7a1a3e-30b6-4e55-9a55-3d7d2a1b0c11"),
    ({"name": "other"}, "Target domain name 'other' does not match source 'web01'"),
    ({"memory_kib": 65536}, "Target domain max memory 65536 does not match source 131072"),
    ({"vcpus": 4}, "Target domain vCPU max 4 does not match source 2"),
    ({"arch": "aarch64"}, "Target domain architecture aarch64 does not match source x86_64"),
    ({"machine": "pc-q35-9.2"}, "Target domain machine type pc-q35-9.2 does not match source pc-q35-10.0"),
    ({"disks": ()}, "Target domain disk count 0 does not match source 2"),
])
def test_abi_changes_are_refused_with_libvirts_words(change, message):
    with pytest.raises(ABIStabilityError) as caught:
        check_abi_stability(record(), record(**change))
    assert str(caught.value) == f"unsupported configuration: {message}"


def test_host_side_changes_pass_the_abi_check():
    moved = record(emulator="/opt/qemu/bin/qemu-system-x86_64", qmp="/run/other.sock",
                   disks=(DiskRecord("/new/a.qcow2", "qcow2"), DiskRecord("/new/b.raw", "raw")))
    check_abi_stability(record(), moved)


# --- targeted edits ---------------------------------------------------------------------

def test_remap_disk_paths_changes_domain_metadata_and_argv():
    xml = build_domain_xml(record())
    mapping = {"/var/lib/images/web01.qcow2": ODD_PATH, "/var/lib/images/data.raw": "/new/data, raw",
               "/var/lib/images/kv.raw": "/new/kv=1,2", "/var/lib/images/old.img": "/new/old.img",
               "/not/there": "/ignored"}
    edited = parse_domain_xml(remap_disk_paths(xml, mapping))
    assert [d.path for d in edited.disks] == [ODD_PATH, "/new/data, raw"]
    argv = list(edited.argv)
    assert argv[argv.index("-drive") + 1] == \
        "file=" + ODD_PATH.replace(",", ",,") + ",format=qcow2,if=virtio,id=disk0"
    blockdevs = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-blockdev"]
    assert json.loads(blockdevs[0]) == {"driver": "file", "filename": "/new/data, raw", "node-name": "data0"}
    assert blockdevs[1] == "driver=file,filename=/new/kv=1,,2,node-name=kv0"
    assert argv[argv.index("-hdb") + 1] == "/new/old.img"
    root = etree.fromstring(remap_disk_paths(xml, mapping).encode())
    assert [s.get("file") for s in root.iterfind("devices/disk/source")] == [ODD_PATH, "/new/data, raw"]


def test_remap_back_restores_the_original():
    xml = build_domain_xml(record())
    there = remap_disk_paths(xml, {"/var/lib/images/web01.qcow2": ODD_PATH})
    back = remap_disk_paths(there, {ODD_PATH: "/var/lib/images/web01.qcow2"})
    assert parse_domain_xml(back) == record()


def test_edits_without_effect_return_the_same_text():
    xml = build_domain_xml(record())
    assert remap_disk_paths(xml, {"/not/there": "/x"}) is xml
    assert remap_disk_paths(xml, {"/var/lib/images/web01.qcow2": "/var/lib/images/web01.qcow2"}) is xml
    assert remap_disk_paths(xml, {}) is xml
    assert set_emulator(xml, "/usr/bin/qemu-system-x86_64") is xml


def test_set_emulator_changes_metadata_and_argv0():
    edited = parse_domain_xml(set_emulator(build_domain_xml(record()), "/opt/qemu 10/bin/qemu"))
    assert edited.emulator == "/opt/qemu 10/bin/qemu" and edited.argv[0] == "/opt/qemu 10/bin/qemu"
    assert edited.argv[1:] == record().argv[1:]


def test_edits_of_libvirt_xml():
    xml = libvirt_xml().replace(
        "<memballoon", "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                       "<source file='/var/lib/libvirt/images/a.qcow2'/><target dev='vda' bus='virtio'/></disk>\n"
                       "    <memballoon")
    remapped = remap_disk_paths(xml, {"/var/lib/libvirt/images/a.qcow2": "/mnt/a.qcow2"})
    assert [d.path for d in parse_domain_xml(remapped).disks] == ["/mnt/a.qcow2"]
    moved = set_emulator(remapped, "/usr/local/bin/qemu-system-x86_64")
    assert parse_domain_xml(moved).emulator == "/usr/local/bin/qemu-system-x86_64"
    assert set_emulator(moved, "/usr/local/bin/qemu-system-x86_64") is moved
    # Everything but the edited values is kept.
    assert normalized(moved) == normalized(xml).replace("/var/lib/libvirt/images/a.qcow2", "/mnt/a.qcow2").replace(
        "<emulator>/usr/bin/", "<emulator>/usr/local/bin/")
