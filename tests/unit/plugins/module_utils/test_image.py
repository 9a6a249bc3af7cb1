"""The save image byte layout: header, data area, reader, writer, in-place rewrite and its journal."""

from __future__ import annotations

import os
import stat
import struct
import sys
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.savestate.qemu.plugins.module_utils import _image
from ansible_collections.savestate.qemu.plugins.module_utils._errors import (
    ImageError,
    ImageIncompleteError,
    ImageTooLargeError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image import (
    COMPRESSORS,
    DATA_PADDING,
    HEADER_SIZE,
    MAX_DATA_LEN,
    ImageFormat,
    SaveHeader,
    finalize_image,
    journal_path,
    open_for_rewrite,
    read_image,
    read_image_as_recovered,
    read_image_fd,
    recover_interrupted_rewrite,
    rewrite_data_area,
    write_new_image,
)

from ansible_collections.savestate.qemu.plugins.module_utils._image_info import describe_image, load_image

from ansible_collections.savestate.qemu.tests.unit.image_helpers import (
    FAKE_STREAMS,
    LIBVIRT_UUID,
    SIMPLE_COOKIE,
    SIMPLE_XML,
    libvirt_image_bytes,
    make_image,
    make_savestate_image,
    raw_header,
    write_libvirt_fixture,
)

NATIVE = "<" if sys.byteorder == "little" else ">"
FOREIGN = ">" if NATIVE == "<" else "<"


# --- formats ------------------------------------------------------------------------

def test_formats_have_libvirts_numbers_and_names():
    assert [(f.value, f.label) for f in ImageFormat] == [
        (0, "raw"), (1, "gzip"), (2, "bzip2"), (3, "xz"), (4, "lzop"), (5, "zstd"), (6, "sparse")]
    assert ImageFormat.from_name("zstd") is ImageFormat.ZSTD
    assert ImageFormat.from_name("XZ") is ImageFormat.XZ


def test_unknown_format_name_lists_the_choices():
    with pytest.raises(ImageError, match=r"unknown save image format 'lzma' \(choose from raw, gzip, bzip2, xz, "
                                         r"lzop, zstd, sparse\)"):
        ImageFormat.from_name("lzma")


def test_compressors_are_libvirts_programs():
    assert {f.label: (c.compress_argv, c.decompress_argv) for f, c in COMPRESSORS.items()} == {
        "gzip": (("gzip", "-c"), ("gzip", "-dc")),
        "bzip2": (("bzip2", "-c"), ("bzip2", "-dc")),
        "xz": (("xz", "-c", "-3"), ("xz", "-dc")),
        "lzop": (("lzop", "-c"), ("lzop", "-dc", "--ignore-warn")),
        "zstd": (("zstd", "-c", "-T0"), ("zstd", "-dc")),
    }
    assert ImageFormat.RAW.compressor is None and ImageFormat.SPARSE.compressor is None
    assert ImageFormat.ZSTD.compressor.program == "zstd"


# --- header ---------------------------------------------------------------------------

headers = st.builds(
    SaveHeader,
    complete=st.booleans(),
    version=st.sampled_from([1, 2]),
    data_len=st.integers(1, MAX_DATA_LEN),
    was_running=st.booleans(),
    format=st.sampled_from(list(ImageFormat)),
    cookie_offset=st.just(0),
    byte_order=st.sampled_from(["<", ">"]),
).flatmap(lambda h: st.integers(0, h.data_len).map(lambda offset: SaveHeader(
    h.complete, h.version, h.data_len, h.was_running, h.format, offset, h.byte_order)))


@given(headers)
def test_header_round_trips_in_both_byte_orders(header):
    packed = header.pack()
    assert len(packed) == HEADER_SIZE
    assert packed[:16] == (b"LibvirtQemudSave" if header.complete else b"LibvirtQemudPart")
    assert packed[36:] == bytes(56)
    assert SaveHeader.unpack(packed, allow_incomplete=True) == header


@given(st.binary(min_size=0, max_size=HEADER_SIZE + 8))
def test_any_bytes_give_a_header_or_an_image_error(data):
    try:
        SaveHeader.unpack(data, allow_incomplete=True)
    except ImageError:
        pass


@given(st.tuples(*[st.integers(0, 2 ** 32 - 1)] * 5), st.sampled_from([b"LibvirtQemudSave", b"LibvirtQemudPart"]))
def test_any_field_values_give_a_header_or_an_image_error(fields, magic):
    data = struct.pack("<16s5I56s", magic, *fields, bytes(56))
    try:
        header = SaveHeader.unpack(data, allow_incomplete=True)
    except ImageError:
        return
    assert header.version in (1, 2)
    assert 0 < header.data_len <= MAX_DATA_LEN
    assert header.cookie_offset <= header.data_len


def test_header_writes_host_byte_order():
    header = SaveHeader(complete=True, version=2, data_len=66843, was_running=True, format=ImageFormat.RAW,
                        cookie_offset=1071)
    assert header.byte_order == NATIVE
    assert header.pack()[16:36] == struct.pack(NATIVE + "5I", 2, 66843, 1, 0, 1071)


def test_header_matches_libvirts_bytes():
    # The worked example of the reference (libvirt 11.3.0, x86_64).
    expected = bytes.fromhex("4c69627669727451656d756453617665 02000000 1b050100 01000000 00000000 2f040000")
    expected += bytes(56)
    header = SaveHeader(complete=True, version=2, data_len=66843, was_running=True, format=ImageFormat.RAW,
                        cookie_offset=1071, byte_order="<")
    assert header.pack() == expected
    assert header.stream_offset == 0x10577


@pytest.mark.parametrize("data, message, error", [
    (b"", "failed to read qemu header", ImageError),
    (raw_header()[:91], "failed to read qemu header", ImageError),
    (raw_header(magic=b"LibvirtQemudPart"), "save image is incomplete", ImageIncompleteError),
    (raw_header(magic=b"LibvirtQemudXXXX"), "image magic is incorrect", ImageError),
    (raw_header(magic=b"TestGuestMagic\0\0"), "image magic is incorrect", ImageError),
    # A native version 3 looks byte-swapped to libvirt: it complains about the swapped value.
    (raw_header(version=3), "image version is not supported (50331648 > 2)", ImageError),
    (raw_header(version=0xFFFFFFFF), "image version is not supported (-1 > 2)", ImageError),
    (raw_header(version=0), "image version is not supported (0; expected 1 or 2)", ImageError),
    (raw_header(fmt=7), "unsupported save image format: 7", ImageError),
    (raw_header(version=1, fmt=7), "unsupported save image format: 7", ImageError),
    (raw_header(fmt=0xFFFFFFFF), "unsupported save image format: -1", ImageError),
    (raw_header(data_len=0), "invalid header data length: 0", ImageError),
    (raw_header(data_len=0xFFFFFFFF), "invalid header data length: 4294967295 (more than", ImageError),
    (raw_header(data_len=MAX_DATA_LEN + 1), f"invalid header data length: {MAX_DATA_LEN + 1} (", ImageError),
    (raw_header(data_len=100, cookie_offset=101), "invalid header cookie offset: 101 lies beyond the data area",
     ImageError),
])
def test_header_errors_are_libvirts(data, message, error):
    with pytest.raises(error) as caught:
        SaveHeader.unpack(data)
    assert str(caught.value).startswith(message)


def test_partial_header_is_returned_when_allowed():
    header = SaveHeader.unpack(raw_header(magic=b"LibvirtQemudPart"), allow_incomplete=True)
    assert not header.complete


def test_byte_swapped_header_is_read_like_libvirt_does():
    header = SaveHeader.unpack(raw_header(order=FOREIGN, data_len=70000, cookie_offset=1200, fmt=5))
    assert (header.version, header.data_len, header.cookie_offset, header.format, header.byte_order) == (
        2, 70000, 1200, ImageFormat.ZSTD, FOREIGN)
    assert header.pack() == raw_header(order=FOREIGN, data_len=70000, cookie_offset=1200, fmt=5)


def test_version_1_streams_are_raw_whatever_the_format_word():
    header = SaveHeader.unpack(raw_header(version=1, fmt=5))
    assert header.format is ImageFormat.ZSTD
    assert header.stream_format is ImageFormat.RAW


def test_unused_words_are_ignored_on_read():
    header = SaveHeader.unpack(raw_header(unused=b"\xff" * 56))
    assert header.pack()[36:] == bytes(56)


# --- writer and reader ----------------------------------------------------------------

def test_writer_lays_out_the_data_area_like_libvirt(tmp_path):
    path = tmp_path / "image.save"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        header = write_new_image(fd, SIMPLE_XML, SIMPLE_COOKIE, True, ImageFormat.ZSTD)
        assert os.lseek(fd, 0, os.SEEK_CUR) == header.stream_offset
    finally:
        os.close(fd)
    data = path.read_bytes()
    xml_len, cookie_len = len(SIMPLE_XML) + 1, len(SIMPLE_COOKIE) + 1
    assert data[:16] == b"LibvirtQemudPart"
    assert header.data_len == xml_len + cookie_len + DATA_PADDING
    assert header.cookie_offset == xml_len
    assert data[92:92 + xml_len] == SIMPLE_XML.encode() + b"\0"
    assert data[92 + xml_len:92 + xml_len + cookie_len] == SIMPLE_COOKIE.encode() + b"\0"
    assert data[92 + xml_len + cookie_len:] == bytes(DATA_PADDING)
    assert len(data) == 92 + header.data_len


def test_without_cookie_the_offset_is_zero(tmp_path):
    image = read_image(str(make_image(tmp_path / "x.save", cookie=None)))
    assert image.header.cookie_offset == 0
    assert image.cookie is None
    assert image.header.data_len == len(SIMPLE_XML) + 1 + DATA_PADDING


def test_finalize_writes_the_complete_magic_and_nothing_else(tmp_path):
    path = make_image(tmp_path / "x.save", finalize=False)
    before = path.read_bytes()
    fd = os.open(path, os.O_RDWR)
    try:
        header = SaveHeader.unpack(before[:92], allow_incomplete=True)
        final = finalize_image(fd, header)
    finally:
        os.close(fd)
    after = path.read_bytes()
    assert final.complete and after[:16] == b"LibvirtQemudSave"
    assert after[16:] == before[16:]


@pytest.mark.parametrize("fmt", list(ImageFormat))
def test_round_trip_in_every_format(tmp_path, fmt):
    path = make_image(tmp_path / "x.save", fmt=fmt, was_running=False)
    image = read_image(str(path))
    assert (image.xml, image.cookie, image.format, image.was_running, image.complete) == (
        SIMPLE_XML, SIMPLE_COOKIE, fmt, False, True)
    assert image.size == path.stat().st_size
    assert image.stream_offset == 92 + image.header.data_len
    assert image.stream_length == len(FAKE_STREAMS[fmt])


def test_xml_with_nul_is_refused_by_the_writer(tmp_path):
    fd = os.open(tmp_path / "x", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(ImageError, match="domain XML contains a NUL"):
            write_new_image(fd, "<domain>\0</domain>", None, True, ImageFormat.RAW)
        with pytest.raises(ImageTooLargeError, match="a save image holds at most"):
            write_new_image(fd, "x" * MAX_DATA_LEN, None, True, ImageFormat.RAW)
    finally:
        os.close(fd)


def test_libvirt_images_are_read(tmp_path):
    for fmt, expected in (("raw", ImageFormat.RAW), ("zstd", ImageFormat.ZSTD)):
        image = read_image(str(write_libvirt_fixture(tmp_path, fmt)))
        assert image.format is expected and image.complete and image.was_running
        assert image.header.cookie_offset == len(image.xml.encode()) + 1
        assert f"<uuid>{LIBVIRT_UUID}</uuid>" in image.xml
        assert image.cookie.startswith("<cookie>") and image.cookie.endswith("</cookie>\n")
        assert image.xml.endswith("</domain>\n")


def test_incomplete_image_is_refused_or_reported(tmp_path):
    path = str(make_image(tmp_path / "x.save", finalize=False, stream=b""))
    with pytest.raises(ImageIncompleteError, match=f"^{path}: save image is incomplete$"):
        read_image(path)
    image = read_image(path, allow_incomplete=True)
    assert not image.complete and image.xml == SIMPLE_XML


def test_stream_that_does_not_match_the_format_is_refused(tmp_path):
    path = make_image(tmp_path / "x.save", fmt=ImageFormat.GZIP, stream=FAKE_STREAMS[ImageFormat.RAW])
    with pytest.raises(ImageError, match=r"does not start like a gzip stream \(expected 1f 8b, found 51 45\)"):
        read_image(str(path))


def test_messages_name_the_file(tmp_path):
    path = tmp_path / "bad.save"
    path.write_bytes(b"hello")
    with pytest.raises(ImageError, match=f"^{path}: failed to read qemu header$"):
        read_image(str(path))


def test_missing_directory_and_fifo_are_refused(tmp_path):
    with pytest.raises(ImageError, match="cannot open the save image: No such file or directory"):
        read_image(str(tmp_path / "nothing"))
    with pytest.raises(ImageError, match="it is not a regular file"):
        read_image(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="it is not a regular file"):
        read_image(str(fifo))  # must not block waiting for a writer


def test_bad_utf8_is_a_clean_error(tmp_path):
    path = make_image(tmp_path / "x.save")
    data = bytearray(path.read_bytes())
    data[92 + 3] = 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=r"the domain XML is not valid UTF-8 \(byte 3 of it\)"):
        read_image(str(path))


def test_read_image_fd_leaves_the_offset_alone(tmp_path):
    path = make_image(tmp_path / "x.save")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 17, os.SEEK_SET)
        read_image_fd(fd, str(path))
        assert os.lseek(fd, 0, os.SEEK_CUR) == 17
    finally:
        os.close(fd)


# --- truncations and mutations ------------------------------------------------------

def _boundaries(data: bytes) -> dict[str, int]:
    header = SaveHeader.unpack(data[:92])
    xml_nul = data.index(b"\0", 92)
    return {
        "empty": 0, "one byte": 1, "header - 1": 91, "header": 92, "header + 1": 93,
        "within the XML": 92 + 10, "at the XML's NUL": xml_nul, "after the XML's NUL": xml_nul + 1,
        "within the cookie": 92 + header.xml_len + 5 if header.cookie_len else 92 + header.data_len - 5,
        "data_len - 1": 92 + header.data_len - 1, "stream offset": header.stream_offset,
        "stream offset + 1": header.stream_offset + 1,
    }


@pytest.mark.parametrize("source", ["generated", "libvirt"])
def test_truncation_at_every_region_boundary(tmp_path, source):
    data = make_image(tmp_path / "src.save").read_bytes() if source == "generated" else libvirt_image_bytes("raw")
    expected = {
        "empty": "failed to read qemu header", "one byte": "failed to read qemu header",
        "header - 1": "failed to read qemu header", "header": "failed to read domain XML",
        "header + 1": "failed to read domain XML", "within the XML": "failed to read domain XML",
        "at the XML's NUL": "failed to read domain XML", "after the XML's NUL": "failed to read cookie",
        "within the cookie": "failed to read cookie", "data_len - 1": "failed to read cookie",
        "stream offset": "the image is truncated", "stream offset + 1": "does not start like a raw stream",
    }
    for name, cut in _boundaries(data).items():
        path = tmp_path / "cut.save"
        path.write_bytes(data[:cut])
        with pytest.raises(ImageError) as caught:
            read_image(str(path))
        assert expected[name] in str(caught.value), name


def _mutation_positions(data: bytes) -> list[int]:
    header = SaveHeader.unpack(data[:92])
    positions = set(range(0, 92))  # every header byte
    regions = [(92, 92 + header.xml_len), (92 + header.xml_len, 92 + header.data_len),
               (header.stream_offset, header.stream_offset + 16)]
    for start, end in regions:
        step = max((end - start) // 40, 1)
        positions.update(range(start, end, step))
    return sorted(p for p in positions if p < len(data))


def _read_or_clean_error(path) -> None:
    """Read and parse (XML errors are ImageErrors too); anything but an ImageError fails the test."""
    try:
        image, record = load_image(str(path), allow_incomplete=True)
    except ImageError:
        return
    assert describe_image(image, record)["path"] == str(path)


def _source_image(tmp_path, source: str) -> bytes:
    if source == "libvirt":
        return libvirt_image_bytes("raw")
    if source == "savestate":
        return make_savestate_image(tmp_path / "src.save").read_bytes()
    return make_image(tmp_path / "src.save").read_bytes()


@pytest.mark.parametrize("source", ["generated", "savestate", "libvirt"])
def test_bit_flips_end_in_a_read_or_a_clean_error(tmp_path, source):
    data = _source_image(tmp_path, source)
    path = tmp_path / "flipped.save"
    for position in _mutation_positions(data):
        for bit in range(8):
            mutated = bytearray(data)
            mutated[position] ^= 1 << bit
            path.write_bytes(bytes(mutated))
            _read_or_clean_error(path)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("data_len, cookie_offset", [
    (0xFFFFFFFF, 0), (0x7FFFFFFF, 0), (MAX_DATA_LEN, 0), (MAX_DATA_LEN + 1, 0), (1, 0), (1, 1),
    (1000, 0xFFFFFFFF), (1000, 1001), (1000, 1000), (100000, 99999), (3, 2),
])
def test_absurd_lengths_end_in_a_clean_error(tmp_path, order, data_len, cookie_offset):
    source = libvirt_image_bytes("raw")
    path = tmp_path / "absurd.save"
    path.write_bytes(raw_header(data_len=data_len, cookie_offset=cookie_offset, order=order) + source[92:])
    with pytest.raises(ImageError):
        read_image(str(path))


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(st.binary(max_size=2048), st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 32 - 1))
def test_random_data_areas_end_in_a_read_or_a_clean_error(tmp_path, area, data_len, cookie_offset):
    path = tmp_path / "random.save"
    path.write_bytes(raw_header(data_len=data_len, cookie_offset=cookie_offset) + area + b"QEVM")
    _read_or_clean_error(path)


@pytest.fixture(scope="module")
def savestate_image_bytes(tmp_path_factory) -> bytes:
    return make_savestate_image(tmp_path_factory.mktemp("src") / "src.save").read_bytes()


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), min_size=1, max_size=6))
def test_random_xml_edits_end_in_a_read_or_a_clean_error(tmp_path, savestate_image_bytes, edits):
    mutated = bytearray(savestate_image_bytes)
    xml_end = mutated.index(b"\0", 92)
    for offset, value in edits:
        mutated[92 + offset % (xml_end - 92)] = value
    path = tmp_path / "edited.save"
    path.write_bytes(bytes(mutated))
    _read_or_clean_error(path)


# --- in-place rewrite -------------------------------------------------------------------

NEW_XML = SIMPLE_XML.replace("<os>", "<description>edited</description>\n  <os>")


def _rewrite(path, xml, cookie=SIMPLE_COOKIE, was_running=None):
    fd, image = open_for_rewrite(str(path))
    try:
        return image, rewrite_data_area(fd, image.header, xml, cookie, was_running, path=str(path))
    finally:
        os.close(fd)


def test_rewrite_changes_only_the_data_area(tmp_path):
    path = make_image(tmp_path / "x.save")
    before = path.read_bytes()
    old, new_header = _rewrite(path, NEW_XML, was_running=False)
    after = path.read_bytes()
    image = read_image(str(path))
    assert (image.xml, image.cookie, image.was_running) == (NEW_XML, SIMPLE_COOKIE, False)
    assert new_header.data_len == old.header.data_len
    assert new_header.cookie_offset == len(NEW_XML) + 1
    assert after[old.stream_offset:] == before[old.stream_offset:]
    assert after[:16] == before[:16] and len(after) == len(before)
    assert not os.path.exists(journal_path(str(path)))


def test_rewrite_keeps_the_partial_magic_and_byte_order(tmp_path):
    path = tmp_path / "x.save"
    data = make_image(path).read_bytes()
    swapped = SaveHeader.unpack(data[:92])
    swapped = SaveHeader(False, 2, swapped.data_len, True, ImageFormat.RAW, swapped.cookie_offset, FOREIGN)
    path.write_bytes(swapped.pack() + data[92:])
    fd = os.open(path, os.O_RDWR)
    try:
        header = rewrite_data_area(fd, swapped, NEW_XML, None, False, path=str(path))
    finally:
        os.close(fd)
    assert header.byte_order == FOREIGN and not header.complete
    assert path.read_bytes()[:16] == b"LibvirtQemudPart"
    image = read_image(str(path), allow_incomplete=True)
    assert (image.xml, image.cookie, image.was_running) == (NEW_XML, None, False)


def test_rewrite_that_changes_nothing_does_not_write(tmp_path):
    path = make_image(tmp_path / "x.save")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = path.read_bytes()
    _rewrite(path, SIMPLE_XML, was_running=True)
    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == 1_000_000_000


def test_rewrite_that_does_not_fit_uses_libvirts_words(tmp_path):
    path = make_image(tmp_path / "x.save")
    before = path.read_bytes()
    with pytest.raises(ImageTooLargeError, match=f"^{path}: new xml too large to fit in file "):
        _rewrite(path, SIMPLE_XML + " " * (DATA_PADDING + 1))
    assert path.read_bytes() == before
    # Exactly filling the data area is fine.
    image = read_image(str(path))
    room = image.header.data_len - len(SIMPLE_COOKIE) - 1 - len(SIMPLE_XML) - 1
    _rewrite(path, SIMPLE_XML + " " * room)
    assert read_image(str(path)).xml == SIMPLE_XML + " " * room


def test_rewrite_of_libvirt_image(tmp_path):
    path = write_libvirt_fixture(tmp_path)
    image = read_image(str(path))
    _rewrite(path, image.xml.replace("destroy</on_crash>", "restart</on_crash>"), image.cookie, was_running=False)
    after = read_image(str(path))
    assert "restart</on_crash>" in after.xml and after.cookie == image.cookie and not after.was_running


def test_concurrent_editors_are_refused(tmp_path):
    path = make_image(tmp_path / "x.save")
    fd, _image_held = open_for_rewrite(str(path))
    try:
        failure = []
        worker = threading.Thread(target=lambda: failure.append(_catch(lambda: open_for_rewrite(str(path)))))
        worker.start()
        worker.join()
        assert "another process is editing this save image" in str(failure[0])
    finally:
        os.close(fd)


def _catch(action):
    try:
        fd, _unused = action()
        os.close(fd)
    except ImageError as error:
        return error
    return None


# --- the journal ----------------------------------------------------------------------

def _interrupt_rewrite(path, monkeypatch, fsync_calls_before_crash):
    """Run a rewrite whose fsync fails at some point, as a crash would leave it."""
    calls = []
    real_fsync = os.fsync

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) > fsync_calls_before_crash:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(_image.os, "fsync", failing_fsync)
    with pytest.raises(ImageError, match="Input/output error"):
        _rewrite(path, NEW_XML, was_running=False)
    monkeypatch.setattr(_image.os, "fsync", real_fsync)


@pytest.mark.parametrize("crash_after", [2, 3])  # journal + its directory synced; then after the data area
def test_interrupted_rewrite_is_detected_and_rolled_back(tmp_path, monkeypatch, crash_after):
    path = make_image(tmp_path / "x.save")
    original = path.read_bytes()
    _interrupt_rewrite(path, monkeypatch, crash_after)
    journal = journal_path(str(path))
    assert os.path.exists(journal)
    assert stat.S_IMODE(os.stat(journal).st_mode) == 0o600
    with pytest.raises(ImageError, match="an interrupted save_image_define left a journal .* Run "
                                         "savestate.qemu.save_image_define on this path again"):
        read_image(str(path))
    # Check mode sees the image as the roll-back would leave it.
    assert read_image_as_recovered(str(path)).xml == SIMPLE_XML
    assert recover_interrupted_rewrite(str(path))
    assert path.read_bytes() == original
    assert not os.path.exists(journal)
    assert read_image(str(path)).xml == SIMPLE_XML


def test_half_written_data_area_is_rolled_back(tmp_path):
    path = make_image(tmp_path / "x.save")
    original = path.read_bytes()
    fd = os.open(path, os.O_RDWR)
    try:
        _image._write_journal(str(path), fd, original[:92 + SaveHeader.unpack(original[:92]).data_len])
        os.pwrite(fd, b"<garbage" * 50, 92)  # the crash came in the middle of the data area
    finally:
        os.close(fd)
    with pytest.raises(ImageError, match="interrupted save_image_define"):
        read_image(str(path))
    recover_interrupted_rewrite(str(path))
    assert path.read_bytes() == original


def test_damaged_journal_keeps_the_image_suspect_and_is_discarded(tmp_path):
    path = make_image(tmp_path / "x.save")
    original = path.read_bytes()
    with open(journal_path(str(path)), "wb") as journal:
        journal.write(b"SSQJRNL1 truncated")
    with pytest.raises(ImageError, match="interrupted save_image_define"):
        read_image(str(path))
    assert recover_interrupted_rewrite(str(path))
    assert path.read_bytes() == original and not os.path.exists(journal_path(str(path)))


def test_journal_of_a_replaced_image_is_stale(tmp_path):
    """Journals are keyed by device and inode; a journal whose file changed size since is stale."""
    path = make_image(tmp_path / "x.save", was_running=False)
    original = path.read_bytes()
    fd = os.open(path, os.O_RDWR)
    try:
        _image._write_journal(str(path), fd, original[:92 + SaveHeader.unpack(original[:92]).data_len])
    finally:
        os.close(fd)
    with open(path, "ab") as grow:
        grow.write(b"more stream")  # not the file the journal was written for any more
    assert not read_image(str(path)).was_running  # the stale journal does not block readers
    assert recover_interrupted_rewrite(str(path))
    assert not os.path.exists(journal_path(str(path)))
    assert not read_image(str(path)).was_running  # and it was not applied


def test_rewrite_refuses_when_the_image_changed_under_it(tmp_path):
    path = make_image(tmp_path / "x.save")
    fd, image = open_for_rewrite(str(path))
    try:
        os.pwrite(fd, struct.pack(NATIVE + "I", 0), 24)  # someone flipped was_running meanwhile
        with pytest.raises(ImageError, match="the image changed since it was read"):
            rewrite_data_area(fd, image.header, NEW_XML, None, path=str(path))
    finally:
        os.close(fd)


def test_journal_of_another_image_with_the_same_inode_and_size_is_stale(tmp_path):
    """A deleted image's journal meets a new image with its inode and size: the stream tells them apart."""
    earlier = make_image(tmp_path / "earlier.save", stream=b"QEVM" + b"\x01" * 4096, was_running=False)
    later = make_image(tmp_path / "later.save", stream=b"QEVM" + b"\x02" * 4096, was_running=False)
    assert earlier.stat().st_size == later.stat().st_size
    old = earlier.read_bytes()[:92 + SaveHeader.unpack(earlier.read_bytes()[:92]).data_len]
    fd = os.open(earlier, os.O_RDONLY)
    try:
        dev, ino, size, stream_digest = _image._journal_identity(fd, os.fstat(fd), len(old))
    finally:
        os.close(fd)
    info = later.stat()
    # As if `earlier` had been `later`'s inode, interrupted mid-edit, then deleted.
    with open(journal_path(str(later)), "wb") as journal:
        journal.write(_image._encode_journal((info.st_dev, info.st_ino, size, stream_digest), old))
    before = later.read_bytes()
    assert not read_image(str(later)).was_running  # readers are not blocked
    assert recover_interrupted_rewrite(str(later))  # the stale journal is removed ...
    assert later.read_bytes() == before  # ... and never rolled into this image
    assert not os.path.exists(journal_path(str(later)))
