"""Authenticated images: the MAC detects every change, the image is opened once and checked on that fd."""

from __future__ import annotations

import os
import stat
import struct
import threading

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils import _image
from ansible_collections.savestate.qemu.plugins.module_utils._errors import ImageError, PreconditionError
from ansible_collections.savestate.qemu.plugins.module_utils._image import HEADER_SIZE, SaveHeader, journal_path
from ansible_collections.savestate.qemu.plugins.module_utils._image_auth import (
    NO_MAC,
    TAMPERED,
    open_image,
    verify,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image_define import DefineRequest, define_image
from ansible_collections.savestate.qemu.plugins.module_utils._image_key import ImageKey, load_key
from ansible_collections.savestate.qemu.plugins.module_utils._restore import RestoreRequest, restore_guest

from ansible_collections.savestate.qemu.tests.unit.image_helpers import make_savestate_image, savestate_record, write_libvirt_fixture

NOBODY = 65534


@pytest.fixture
def key() -> ImageKey:
    return load_key()


@pytest.fixture
def signed(tmp_path):
    return make_savestate_image(tmp_path / "web01.save")


def _regions(raw: bytes) -> tuple[bytes, bytes]:
    header = SaveHeader.unpack(raw[:HEADER_SIZE])
    return raw[:HEADER_SIZE], raw[HEADER_SIZE:header.stream_offset]


def _xml_of(data: bytes) -> str:
    return data[:data.index(b"\0")].decode("utf-8", "replace")


def test_a_signed_image_is_authenticated(signed, key):
    with open_image(str(signed), key) as opened:
        assert opened.authenticated and opened.auth_problem is None
        assert opened.record.name == "web01" and opened.file_uid == os.geteuid()
        assert os.fstat(opened.fd).st_ino == os.stat(signed).st_ino
        fd = opened.fd
    with pytest.raises(OSError):
        os.fstat(fd)  # the context manager closed it


def test_every_header_byte_but_the_magic_is_covered(signed, key):
    header, data = _regions(signed.read_bytes())
    xml = _xml_of(data)
    assert verify(key, xml, header, data) is None
    for offset in range(16, HEADER_SIZE):
        tampered = header[:offset] + bytes([header[offset] ^ 0x01]) + header[offset + 1:]
        assert verify(key, xml, tampered, data) == TAMPERED, f"header byte {offset}"
    final_to_partial = b"LibvirtQemudPart" + header[16:]
    assert verify(key, xml, final_to_partial, data) is None  # finalize changes only the magic


def test_every_data_area_byte_is_covered(signed, key):
    header, data = _regions(signed.read_bytes())
    xml_end = data.index(b"\0")
    # Every byte of the XML, then a stride through the NUL and the padding.
    offsets = list(range(xml_end)) + list(range(xml_end, len(data), 97)) + [len(data) - 1]
    for offset in offsets:
        tampered = data[:offset] + bytes([data[offset] ^ 0x20 or 0x01]) + data[offset + 1:]
        assert verify(key, _xml_of(tampered) if offset < xml_end else _xml_of(data), header, tampered) is not None, \
            f"data area byte {offset}"


def test_a_rewritten_command_line_is_a_mac_mismatch(signed, key):
    raw = signed.read_bytes()
    forged = raw.replace(b"<savestate:arg>-m</savestate:arg>", b"<savestate:arg>-M</savestate:arg>")
    assert forged != raw
    signed.write_bytes(forged)
    with open_image(str(signed), key) as opened:
        assert not opened.authenticated and opened.auth_problem == TAMPERED


def test_another_fleets_key_is_told_apart(signed):
    other = ImageKey.from_secret(b"\x07" * 32)
    with open_image(str(signed), other) as opened:
        assert not opened.authenticated
        assert opened.auth_problem == f"signed with another key (id {load_key().key_id})"


def test_libvirts_image_has_no_mac(tmp_path, key):
    with open_image(str(write_libvirt_fixture(tmp_path)), key) as opened:
        assert not opened.authenticated and opened.auth_problem == NO_MAC
    unsigned = make_savestate_image(tmp_path / "old.save", sign=False)
    with open_image(str(unsigned), key) as opened:
        assert opened.auth_problem == NO_MAC


def test_nul_bytes_hidden_in_the_xml_are_refused(signed, key):
    raw = bytearray(signed.read_bytes())
    xml_end = raw.index(b"\0", HEADER_SIZE)
    raw[xml_end + 1:xml_end + 7] = b"-S -x "  # text behind the XML's NUL, inside its region
    signed.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match="NUL byte followed by more data"):
        open_image(str(signed), key)


# --- the file, checked on the open descriptor ----------------------------------------------

def test_a_symlink_is_refused_not_followed(signed, key, tmp_path):
    (tmp_path / "link.save").symlink_to(signed)
    with pytest.raises(ImageError, match="refusing a symbolic link"):
        open_image(str(tmp_path / "link.save"), key)


def test_a_hard_linked_image_is_refused(signed, key, tmp_path):
    os.link(signed, tmp_path / "second-name.save")
    with pytest.raises(PreconditionError, match="2 hard links"):
        open_image(str(signed), key)


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_an_image_others_can_write_is_refused(signed, key, mode):
    signed.chmod(mode)
    with pytest.raises(PreconditionError, match="writable by group or others"):
        open_image(str(signed), key)


def test_an_image_of_another_user_is_refused(signed, key):
    os.chown(signed, NOBODY, -1)
    with pytest.raises(PreconditionError, match=f"owned by uid {NOBODY}"):
        open_image(str(signed), key)
    with open_image(str(signed), key, check_file=False) as opened:  # save_image_info: reported, not refused
        assert not opened.authenticated and f"owned by uid {NOBODY}" in opened.auth_problem


def test_a_fifo_is_refused_without_hanging(tmp_path, key):
    fifo = tmp_path / "fifo.save"
    os.mkfifo(fifo, 0o600)
    outcome: list[BaseException] = []
    worker = threading.Thread(target=lambda: outcome.append(pytest.raises(PreconditionError, open_image,
                                                                          str(fifo), key).value))
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "open_image hung on a FIFO"
    assert "not a regular file" in str(outcome[0])


# --- restore and save_image_define act on verified images only ------------------------------

def test_restore_refuses_an_unauthenticated_image(tmp_path):
    unsigned = make_savestate_image(tmp_path / "web01.save", sign=False)
    with pytest.raises(PreconditionError, match=r"refusing to restore .*not authenticated \(no MAC.*"
                                                "allow_unauthenticated"):
        restore_guest(RestoreRequest(path=str(unsigned)), check_mode=True)


def test_define_resigns_and_never_launders(tmp_path, key):
    signed = make_savestate_image(tmp_path / "web01.save")
    outcome = define_image(str(signed), DefineRequest(restore_state="paused"))
    assert outcome.changed and outcome.authenticated
    with open_image(str(signed), key) as opened:
        assert opened.authenticated and not opened.image.was_running

    unsigned = make_savestate_image(tmp_path / "other.save", sign=False)
    before = unsigned.read_bytes()
    with pytest.raises(PreconditionError, match="not authenticated"):
        define_image(str(unsigned), DefineRequest(restore_state="paused"))
    assert unsigned.read_bytes() == before
    outcome = define_image(str(unsigned), DefineRequest(restore_state="paused", allow_unauthenticated=True))
    assert outcome.changed and not outcome.authenticated
    with open_image(str(unsigned), key) as opened:
        assert not opened.authenticated and not opened.image.was_running


def test_define_keeps_a_tampered_image_unauthenticated(signed, key):
    raw = signed.read_bytes()
    signed.write_bytes(raw.replace(b"<savestate:arg>128</savestate:arg>", b"<savestate:arg>256</savestate:arg>"))
    define_image(str(signed), DefineRequest(restore_state="paused", allow_unauthenticated=True))
    with open_image(str(signed), key) as opened:
        assert opened.auth_problem == TAMPERED


def test_check_mode_predicts_the_signed_xml(signed):
    predicted = define_image(str(signed), DefineRequest(emulator="/usr/bin/qemu-system-x86_64"), check_mode=True)
    real = define_image(str(signed), DefineRequest(emulator="/usr/bin/qemu-system-x86_64"))
    assert predicted.after.xml == real.after.xml and real.authenticated


# --- journals: private, keyed by device and inode, never followed --------------------------

def _forged_journal(path) -> bytes:
    """An intact journal for ``path`` whose "old" bytes carry a rewritten command line."""
    raw = path.read_bytes()
    data_len = SaveHeader.unpack(raw[:HEADER_SIZE]).data_len
    old = raw[:HEADER_SIZE + data_len].replace(b"<savestate:arg>-m</savestate:arg>", b"<savestate:arg>-M</savestate:arg>")
    assert old != raw[:HEADER_SIZE + data_len]
    fd = os.open(path, os.O_RDONLY)
    try:
        identity = _image._journal_identity(fd, os.fstat(fd), len(old))
    finally:
        os.close(fd)
    return _image._encode_journal(identity, old)


def _plant(path, kind, tmp_path):
    journal = journal_path(str(path))
    os.makedirs(os.path.dirname(journal), mode=0o700, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(journal, 0o600)
    elif kind == "symlink":
        decoy = tmp_path / "decoy"
        decoy.write_bytes(_forged_journal(path))
        os.symlink(decoy, journal)
    else:  # an intact journal, but a file of another owner
        with open(journal, "wb") as handle:
            handle.write(_forged_journal(path))
        os.chown(journal, NOBODY, -1)
    return journal


@pytest.mark.parametrize("kind", ["fifo", "symlink", "foreign"])
def test_a_planted_journal_never_hangs_nor_rolls_back(signed, key, tmp_path, kind):
    journal = _plant(signed, kind, tmp_path)
    try:
        done: list[object] = []

        def edit() -> None:
            with open_image(str(signed), key) as opened:  # a reader is not blocked
                done.append(opened.authenticated)
            done.append(define_image(str(signed), DefineRequest(restore_state="paused")))

        worker = threading.Thread(target=edit)
        worker.start()
        worker.join(20)
        assert not worker.is_alive(), f"hung on a planted {kind} journal"
        assert done[0] is True and done[1].changed and not done[1].recovered
        with open_image(str(signed), key) as opened:
            assert opened.authenticated and not opened.image.was_running  # the edit, nothing rolled back
        assert not os.path.lexists(journal)  # removed when the edit needed the name
    finally:
        if os.path.lexists(journal):
            os.unlink(journal)


def test_the_old_sidecar_journal_is_ignored(signed, key):
    sidecar = signed.with_name(signed.name + ".savestate-journal")
    os.mkfifo(sidecar)
    with open_image(str(signed), key) as opened:
        assert opened.authenticated
    assert define_image(str(signed), DefineRequest(restore_state="paused")).changed


def test_the_journal_directory_is_private(signed):
    define_image(str(signed), DefineRequest(restore_state="paused"))
    directory = os.path.dirname(journal_path(str(signed)))
    info = os.stat(directory)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(os.path.dirname(directory)).st_mode) == 0o700


def test_header_fields_are_in_the_mac_even_in_foreign_byte_order(tmp_path, key):
    path = make_savestate_image(tmp_path / "web01.save", record=savestate_record())
    raw = path.read_bytes()
    was_running_offset = 16 + 8
    assert struct.unpack("=I", raw[was_running_offset:was_running_offset + 4])[0] == 1
    path.write_bytes(raw[:was_running_offset] + struct.pack("=I", 0) + raw[was_running_offset + 4:])
    with open_image(str(path), key) as opened:
        assert opened.auth_problem == TAMPERED and not opened.image.was_running


def test_control_a_journal_of_ours_is_rolled_back(signed, key):
    """The same forged bytes as a regular file of ours are applied: the refusals above are the checks."""
    journal = journal_path(str(signed))
    os.makedirs(os.path.dirname(journal), mode=0o700, exist_ok=True)
    fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, _forged_journal(signed))
    os.close(fd)
    with pytest.raises(ImageError, match="interrupted save_image_define left a journal"):
        open_image(str(signed), key)
    with pytest.raises(PreconditionError, match="not authenticated"):
        define_image(str(signed), DefineRequest(restore_state="paused"))  # rolled back, then found forged
    assert not os.path.lexists(journal)
    with open_image(str(signed), key) as opened:
        assert opened.auth_problem == TAMPERED


def test_define_with_the_same_xml_twice_changes_nothing_the_second_time(signed, key):
    """The stored XML carries the MAC, the XML given does not: the repeat must still find nothing to do."""
    from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import build_domain_xml

    xml = build_domain_xml(savestate_record("/srv/new/web01.qcow2"))
    first = define_image(str(signed), DefineRequest(xml=xml))
    assert first.changed and first.authenticated and "<savestate:mac" in first.after.xml
    snapshot = signed.read_bytes(), signed.stat().st_mtime_ns
    assert not define_image(str(signed), DefineRequest(xml=xml), check_mode=True).changed
    assert not define_image(str(signed), DefineRequest(xml=xml)).changed
    assert (signed.read_bytes(), signed.stat().st_mtime_ns) == snapshot
    with open_image(str(signed), key) as opened:
        assert opened.authenticated and opened.record.disks[0].path == "/srv/new/web01.qcow2"
