"""save_image_define, run through real Ansible (ansible localhost -m ...) on images made here."""

from __future__ import annotations

import os

from ansible_collections.savestate.qemu.plugins.module_utils import _image
from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import build_domain_xml, parse_domain_xml
from ansible_collections.savestate.qemu.plugins.module_utils._image import (
    SaveHeader,
    journal_path,
    read_image,
)

from ansible_collections.savestate.qemu.tests.unit.module_runner import run_module
from ansible_collections.savestate.qemu.tests.unit.image_helpers import (
    FAKE_QEVM_STREAM,
    make_image,
    make_savestate_image,
    savestate_record,
    write_libvirt_fixture,
)

OLD_DISK = "/var/lib/images/web01 disk,1.qcow2"
# Spaces, quotes, a newline, commas and non-ASCII: all must reach the recorded command line intact.
NEW_DISK = "/srv/moved images/it's \"web01\"\nnew,disk,,ü.qcow2"
NEW_QEMU = "/opt/qemu 10/bin/qemu-system-x86_64"


def _snapshot(path):
    return path.read_bytes(), path.stat().st_mtime_ns


def _define(path, check=False, diff=False, **args):
    result = run_module("save_image_define", {"path": str(path), **args}, check=check, diff=diff)
    assert not result["failed"], result.get("msg") or result["_stdout"]
    return result


def test_check_mode_and_idempotency_four_steps(tmp_path):
    path = make_savestate_image(tmp_path / "web01.save", record=savestate_record(OLD_DISK))
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    original = _snapshot(path)
    args = {"disk_paths": {OLD_DISK: NEW_DISK}, "emulator": NEW_QEMU, "restore_state": "paused"}

    check = _define(path, check=True, diff=True, **args)
    assert check["changed"] and _snapshot(path) == original
    assert check["image"]["was_running"] is False

    real = _define(path, diff=True, **args)
    assert real["changed"]
    assert real["image"] == check["image"] and real["xml"] == check["xml"]
    changed = _snapshot(path)
    assert changed[0] != original[0]

    again_check = _define(path, check=True, **args)
    again = _define(path, **args)
    assert not again_check["changed"] and not again["changed"]
    assert _snapshot(path) == changed  # byte for byte, and the same mtime

    record = parse_domain_xml(real["xml"])
    argv = list(record.argv)
    assert argv[0] == NEW_QEMU and record.emulator == NEW_QEMU
    assert argv[argv.index("-drive") + 1] == f"file={NEW_DISK.replace(',', ',,')},format=qcow2,if=virtio,id=disk0"
    assert [d.path for d in record.disks] == [NEW_DISK]
    assert real["image"]["metadata"]["disks"][0]["path"] == NEW_DISK

    image = read_image(str(path))
    assert image.complete and not image.was_running
    assert path.read_bytes()[image.stream_offset:] == FAKE_QEVM_STREAM  # the stream is untouched

    xml_diff, state_diff = real["diff"]
    assert xml_diff["before_header"] == xml_diff["after_header"] == str(path)
    assert "/var/lib/images/web01 disk,1.qcow2" in xml_diff["before"] and NEW_QEMU in xml_diff["after"]
    assert (state_diff["before"], state_diff["after"]) == ("running\n", "paused\n")


def test_libvirt_image_full_xml_replacement(tmp_path):
    path = write_libvirt_fixture(tmp_path)
    before = read_image(str(path))
    xml = before.xml.replace("<on_crash>destroy</on_crash>", "<on_crash>restart</on_crash>")
    assert "not authenticated (no MAC" in _refused(path, xml=xml)
    result = _define(path, xml=xml, restore_state="paused", allow_unauthenticated=True)
    assert result["changed"] and result["xml"] == xml and result["authenticated"] is False
    assert result["image"]["origin"] == "libvirt" and result["image"]["was_running"] is False
    after = read_image(str(path))
    assert after.xml == xml and after.cookie == before.cookie and after.header.data_len == before.header.data_len
    assert not _define(path, xml=xml, restore_state="paused", allow_unauthenticated=True)["changed"]


def _refused(path, **args):
    before = _snapshot(path)
    result = run_module("save_image_define", {"path": str(path), **args})
    assert result["failed"], result["_stdout"]
    assert _snapshot(path) == before
    assert not os.path.exists(journal_path(str(path)))
    return result["msg"]


def test_abi_changes_are_refused_with_libvirts_words(tmp_path):
    path = make_savestate_image(tmp_path / "web01.save")
    xml = build_domain_xml(savestate_record())
    assert _refused(path, xml=xml.replace("<name>web01</name>", "<name>other</name>")) == (
        f"{path}: unsupported configuration: Target domain name 'other' does not match source 'web01'")
    assert _refused(path, xml=xml.replace(">131072<", ">262144<")) == (
        f"{path}: unsupported configuration: Target domain max memory 262144 does not match source 131072")
    assert _refused(path, xml=xml.replace("machine=\"pc-i440fx-10.0\"", "machine=\"pc-i440fx-9.2\"")) == (
        f"{path}: unsupported configuration: Target domain machine type pc-i440fx-9.2 does not match source "
        "pc-i440fx-10.0")


def test_other_refusals(tmp_path):
    path = make_savestate_image(tmp_path / "web01.save")
    xml = build_domain_xml(savestate_record())
    too_large = xml.replace("</domain>", "<description>" + "x" * 70000 + "</description></domain>")
    assert _refused(path, xml=too_large).startswith(f"{path}: new xml too large to fit in file (")
    without_metadata = xml[:xml.index("<metadata>")] + xml[xml.index("</metadata>") + len("</metadata>"):]
    assert "lacks the savestate metadata" in _refused(path, xml=without_metadata)
    hostile = "<!DOCTYPE d [<!ENTITY x SYSTEM 'file:///etc/passwd'>]><domain><name>&x;</name></domain>"
    assert "DTDs and entities are refused" in _refused(path, xml=hostile)
    assert "both non-empty strings" in _refused(path, disk_paths={"/a": 5})
    partial = make_image(tmp_path / "partial.save", finalize=False)
    assert _refused(partial, restore_state="paused") == f"{partial}: save image is incomplete"


def _interrupted_edit(path):
    """The state a crash in the middle of the data-area rewrite leaves."""
    original = path.read_bytes()
    data_len = SaveHeader.unpack(original[:92]).data_len
    fd = os.open(path, os.O_RDWR)
    try:
        _image._write_journal(str(path), fd, original[:92 + data_len])
        os.pwrite(fd, b"<half written>" * 20, 92)
    finally:
        os.close(fd)
    return original


def test_rerun_rolls_back_an_interrupted_edit(tmp_path):
    path = make_savestate_image(tmp_path / "web01.save")
    original = _interrupted_edit(path)
    broken = path.read_bytes()

    check = _define(path, check=True)
    assert check["changed"] and check["recovered"] and path.read_bytes() == broken
    assert check["image"]["name"] == "web01"

    result = _define(path)
    assert result["changed"] and result["recovered"]
    assert path.read_bytes() == original
    assert not os.path.exists(journal_path(str(path)))
    assert not _define(path)["changed"]


def test_rollback_then_edit_in_one_run(tmp_path):
    path = make_savestate_image(tmp_path / "web01.save")
    _interrupted_edit(path)
    result = _define(path, restore_state="paused")
    assert result["changed"] and result["recovered"] and result["image"]["was_running"] is False
    assert parse_domain_xml(read_image(str(path)).xml) == savestate_record()
    assert result["authenticated"] is True


def test_a_refusal_names_the_image_it_read(tmp_path):
    """A failure after the image was read returns it (``image``), as save and restore failures do."""
    path = make_savestate_image(tmp_path / "web01.save")
    xml = build_domain_xml(savestate_record())
    result = run_module("save_image_define", {"path": str(path), "xml": xml.replace(">131072<", ">262144<")})
    assert result["failed"] and "max memory" in result["msg"], result["_stdout"]
    assert result["image"]["path"] == str(path) and result["image"]["name"] == "web01"
    assert result["image"]["memory_kib"] == 131072  # the image as it is: nothing was changed
    garbage = tmp_path / "garbage.save"
    garbage.write_bytes(b"not an image" * 10)
    garbage.chmod(0o600)
    unreadable = run_module("save_image_define", {"path": str(garbage), "restore_state": "paused"})
    assert unreadable["failed"] and "image" not in unreadable, unreadable["_stdout"]
