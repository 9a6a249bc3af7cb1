# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""libvirt's QEMU save image, byte for byte: header, data area, formats, validation.

::

    0            92                   92+cookie_offset      92+data_len
    | header     | domain XML + NUL   | cookie + NUL | zeros | QEMU migration stream ...
                 <-------------------- data_len ------------>

This module knows nothing of QEMU or of XML: the domain XML and the cookie are
opaque strings here. It never runs a program; the compressor table is data for
the code that does. docs/image-format.md describes the format and what we check.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import hashlib
import os
import stat
import struct
import sys
from dataclasses import dataclass, replace
from typing import Callable, Optional

from ansible_collections.savestate.qemu.plugins.module_utils._errors import (
    ImageError,
    ImageIncompleteError,
    ImageTooLargeError,
)
from ansible_collections.savestate.qemu.plugins.module_utils._image_key import open_private_dir, state_dir

HEADER_SIZE = 92
MAGIC_COMPLETE = b"LibvirtQemudSave"
MAGIC_PARTIAL = b"LibvirtQemudPart"
SUPPORTED_VERSIONS = (1, 2)
CURRENT_VERSION = 2
# Room left after the XML and cookie so that a later edit can store a longer XML
# without moving the stream (libvirt's own choice, kept for compatibility).
DATA_PADDING = 64 * 1024
# libvirt trusts data_len and allocates whatever it says (up to 4 GiB). A real
# domain XML is a few KiB; virsh itself refuses XML files above 10 MiB. 16 MiB
# holds the largest XML virsh would accept plus cookie and padding, and bounds
# what a corrupt or hostile header can make us allocate.
MAX_DATA_LEN = 16 * 1024 * 1024

_HEADER_LAYOUT = "16s5I56s"  # magic, version, data_len, was_running, format, cookieOffset, unused
_NATIVE_ORDER = "<" if sys.byteorder == "little" else ">"


# --- formats ------------------------------------------------------------------------

class ImageFormat(enum.IntEnum):
    """The ``format`` header field (``compressed`` before libvirt 11.2). Values are ABI."""

    RAW = 0
    GZIP = 1
    BZIP2 = 2
    XZ = 3
    LZOP = 4
    ZSTD = 5
    SPARSE = 6

    @property
    def label(self) -> str:
        """The user-facing name, as libvirt spells it in qemu.conf and virsh."""
        return self.name.lower()

    @classmethod
    def from_name(cls, name: str) -> ImageFormat:
        try:
            return cls[name.upper()]
        except KeyError:
            choices = ", ".join(member.label for member in cls)
            raise ImageError(f"unknown save image format {name!r} (choose from {choices})") from None

    @property
    def compressor(self) -> Optional[Compressor]:
        return COMPRESSORS.get(self)

    @property
    def stream_magic(self) -> bytes:
        return STREAM_MAGIC[self]


@dataclass(frozen=True)
class Compressor:
    """An external program that turns QEMU's stream into a compressed one and back."""

    program: str
    compress_argv: tuple[str, ...]
    decompress_argv: tuple[str, ...]


# The same programs and arguments as libvirt, so that each side reads the other's
# images; zstd additionally runs multi-threaded (its output is the same format).
COMPRESSORS: dict[ImageFormat, Compressor] = {
    ImageFormat.GZIP: Compressor("gzip", ("gzip", "-c"), ("gzip", "-dc")),
    ImageFormat.BZIP2: Compressor("bzip2", ("bzip2", "-c"), ("bzip2", "-dc")),
    ImageFormat.XZ: Compressor("xz", ("xz", "-c", "-3"), ("xz", "-dc")),
    ImageFormat.LZOP: Compressor("lzop", ("lzop", "-c"), ("lzop", "-dc", "--ignore-warn")),
    ImageFormat.ZSTD: Compressor("zstd", ("zstd", "-c", "-T0"), ("zstd", "-dc")),
}

# How the stream at 92 + data_len starts, per format: QEMU's own file magic for
# raw and mapped-ram streams, the compressor's magic otherwise.
STREAM_MAGIC: dict[ImageFormat, bytes] = {
    ImageFormat.RAW: b"QEVM",
    ImageFormat.GZIP: b"\x1f\x8b",
    ImageFormat.BZIP2: b"BZh",
    ImageFormat.XZ: b"\xfd7zXZ\x00",
    ImageFormat.LZOP: b"\x89LZO",
    ImageFormat.ZSTD: b"\x28\xb5\x2f\xfd",
    ImageFormat.SPARSE: b"QEVM",
}


# --- the header ---------------------------------------------------------------------

def _as_c_int(value: int) -> int:
    """libvirt prints these uint32 fields with %d: reproduce its text exactly."""
    return value - (1 << 32) if value >= (1 << 31) else value


def _swap32(value: int) -> int:
    return int.from_bytes(value.to_bytes(4, "little"), "big")


@dataclass(frozen=True)
class SaveHeader:
    """The 92-byte ``virQEMUSaveHeader``.

    ``byte_order`` is the order the file uses (``<`` or ``>``): images are written
    in the writer's host order, and we rewrite an image in the order it came in.
    """

    complete: bool
    version: int
    data_len: int
    was_running: bool
    format: ImageFormat
    cookie_offset: int = 0
    byte_order: str = _NATIVE_ORDER

    @property
    def magic(self) -> bytes:
        return MAGIC_COMPLETE if self.complete else MAGIC_PARTIAL

    @property
    def stream_offset(self) -> int:
        return HEADER_SIZE + self.data_len

    @property
    def stream_format(self) -> ImageFormat:
        """What the stream really is: libvirt decompresses only version-2 images."""
        return self.format if self.version == CURRENT_VERSION else ImageFormat.RAW

    @property
    def xml_len(self) -> int:
        """Bytes of the data area holding the XML (with its NUL and, without a cookie, the padding)."""
        return self.cookie_offset or self.data_len

    @property
    def cookie_len(self) -> int:
        return self.data_len - self.xml_len

    def pack(self) -> bytes:
        return struct.pack(self.byte_order + _HEADER_LAYOUT, self.magic, self.version, self.data_len,
                           1 if self.was_running else 0, int(self.format), self.cookie_offset, bytes(56))

    @classmethod
    def unpack(cls, data: bytes, allow_incomplete: bool = False) -> SaveHeader:
        """Parse and validate a header, in libvirt's order and with libvirt's messages.

        Raises :class:`ImageError` (without the file name; the reader adds it).
        ``allow_incomplete`` returns a partial-magic header instead of failing.
        """
        if len(data) < HEADER_SIZE:
            raise ImageError("failed to read qemu header")
        magic = data[:16]
        if magic == MAGIC_PARTIAL:
            if not allow_incomplete:
                raise ImageIncompleteError("save image is incomplete")
        elif magic != MAGIC_COMPLETE:
            raise ImageError("image magic is incorrect")
        order = _NATIVE_ORDER
        version, data_len, was_running, fmt, cookie_offset = struct.unpack(order + "5I", data[16:36])
        if version > CURRENT_VERSION:
            # libvirt's only endianness test: a version above ours means "foreign order".
            order = ">" if order == "<" else "<"
            version, data_len, was_running, fmt, cookie_offset = (
                _swap32(v) for v in (version, data_len, was_running, fmt, cookie_offset))
            if version > CURRENT_VERSION:
                raise ImageError(f"image version is not supported ({_as_c_int(version)} > {CURRENT_VERSION})")
        if version not in SUPPORTED_VERSIONS:
            # libvirt lets version 0 through; no libvirt ever wrote one.
            raise ImageError(f"image version is not supported ({version}; expected 1 or 2)")
        if fmt >= len(ImageFormat):
            raise ImageError(f"unsupported save image format: {_as_c_int(fmt)}")
        if data_len == 0:
            raise ImageError("invalid header data length: 0")
        # From here on: what libvirt does not check.
        if data_len > MAX_DATA_LEN:
            raise ImageError(f"invalid header data length: {data_len} (more than the {MAX_DATA_LEN} bytes a "
                             "domain XML, cookie and padding can reasonably take; the header is corrupt)")
        if cookie_offset > data_len:
            raise ImageError(f"invalid header cookie offset: {cookie_offset} lies beyond the data area "
                             f"({data_len} bytes); the header is corrupt")
        return cls(complete=magic == MAGIC_COMPLETE, version=version, data_len=data_len,
                   was_running=was_running != 0, format=ImageFormat(fmt),
                   cookie_offset=cookie_offset, byte_order=order)


# --- the data area ------------------------------------------------------------------

def _encode_text(what: str, text: str) -> bytes:
    if "\0" in text:
        raise ImageError(f"the {what} contains a NUL character, which the save image format cannot store")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ImageError(f"the {what} cannot be encoded as UTF-8: {error.reason} at position {error.start}") from None


def encode_data(xml: str, cookie: Optional[str]) -> tuple[bytes, bytes]:
    """The XML and the cookie as stored: UTF-8, each followed by its NUL (no cookie: empty)."""
    xml_bytes = _encode_text("domain XML", xml) + b"\0"
    cookie_bytes = _encode_text("save cookie", cookie) + b"\0" if cookie is not None else b""
    return xml_bytes, cookie_bytes


def _data_area(xml_bytes: bytes, cookie_bytes: bytes, data_len: int) -> bytes:
    used = xml_bytes + cookie_bytes
    return used + bytes(data_len - len(used))


def _decode_text(what: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ImageError(f"the {what} is not valid UTF-8 (byte {error.start} of it)") from None


def parse_data_area(header: SaveHeader, data: bytes) -> tuple[str, Optional[str]]:
    """Split ``data_len`` bytes into XML and cookie, libvirt's way (all after a NUL is ignored)."""
    xml_region = data[:header.xml_len]
    xml_end = xml_region.find(b"\0")
    if xml_end < 0:
        raise ImageError("the domain XML is not NUL-terminated within its region of the data area; "
                         "the header or the data area is corrupt")
    if xml_end == 0:
        raise ImageError("the image holds no domain XML (the data area starts with NUL)")
    _check_only_zeros("domain XML", xml_region[xml_end:])
    xml = _decode_text("domain XML", xml_region[:xml_end])
    if header.cookie_len == 0:
        return xml, None
    cookie_region = data[header.xml_len:header.data_len]
    cookie_end = cookie_region.find(b"\0")
    if cookie_end < 0:
        raise ImageError("the save cookie is not NUL-terminated within the data area; the image is corrupt")
    _check_only_zeros("save cookie", cookie_region[cookie_end:])
    return xml, _decode_text("save cookie", cookie_region[:cookie_end])


def _check_only_zeros(what: str, rest: bytes) -> None:
    """After the terminating NUL comes padding: zeros (libvirt and we write nothing else).

    Text hidden behind a NUL is ignored by libvirt's reader but not necessarily by
    every tool; an image carrying some is damaged or forged.
    """
    if rest.count(0) != len(rest):
        raise ImageError(f"the {what} has a NUL byte followed by more data; the image is damaged or forged "
                         "(NUL bytes are not allowed inside the XML or the cookie)")


# --- low-level I/O ------------------------------------------------------------------

def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes at ``offset``; fewer only at the end of the file."""
    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _file_size(fd: int) -> int:
    """Apparent size; block devices (libvirt can save to one) report theirs by seeking."""
    info = os.fstat(fd)
    if stat.S_ISBLK(info.st_mode):
        position = os.lseek(fd, 0, os.SEEK_CUR)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.lseek(fd, position, os.SEEK_SET)
    return info.st_size


# --- the reader ---------------------------------------------------------------------

@dataclass(frozen=True)
class SaveImage:
    """A validated save image. ``xml`` and ``cookie`` are the stored strings, unparsed."""

    path: str
    header: SaveHeader
    xml: str
    cookie: Optional[str]
    size: int
    allocated: int

    @property
    def complete(self) -> bool:
        return self.header.complete

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def format(self) -> ImageFormat:
        """The stream's real format (a version-1 image is raw whatever its format word says)."""
        return self.header.stream_format

    @property
    def was_running(self) -> bool:
        return self.header.was_running

    @property
    def stream_offset(self) -> int:
        return self.header.stream_offset

    @property
    def stream_length(self) -> int:
        return max(self.size - self.stream_offset, 0)


# pread(size, offset) -> bytes: lets the reader look at a file as a journal would restore it.
_Pread = Callable[[int, int], bytes]


def _validate(path: str, pread: _Pread, size: int, allocated: int, allow_incomplete: bool) -> SaveImage:
    header_bytes = pread(HEADER_SIZE, 0)
    header = SaveHeader.unpack(header_bytes, allow_incomplete=allow_incomplete)
    data = pread(header.data_len, HEADER_SIZE)
    if len(data) < header.xml_len:
        raise ImageError("failed to read domain XML")
    if len(data) < header.data_len:
        raise ImageError("failed to read cookie")
    xml, cookie = parse_data_area(header, data)
    image = SaveImage(path=path, header=header, xml=xml, cookie=cookie, size=size, allocated=allocated)
    if header.complete:
        _validate_stream(image, pread)
    return image


def _validate_stream(image: SaveImage, pread: _Pread) -> None:
    if image.size <= image.stream_offset:
        raise ImageError(f"the image is truncated: it is {image.size} bytes long, but its migration stream "
                         f"should start at byte {image.stream_offset}")
    fmt = image.format
    expected = fmt.stream_magic
    found = pread(len(expected), image.stream_offset)
    if found != expected:
        raise ImageError(f"the migration stream at byte {image.stream_offset} does not start like a "
                         f"{fmt.label} stream (expected {expected.hex(' ')}, found {found.hex(' ') or 'nothing'}); "
                         "the image is corrupt or its format field is wrong")


def _prefixed(path: str, error: ImageError) -> ImageError:
    return type(error)(f"{path}: {error}")


def read_image_fd(fd: int, path: str, allow_incomplete: bool = False,
                  pread: Optional[_Pread] = None) -> SaveImage:
    """Read and validate the image open at ``fd`` (``path`` names it in messages).

    Uses positioned reads: the fd's offset is left as it was. ``pread`` replaces
    the file's own reads (see :func:`journal_pread`).
    """
    try:
        info = os.fstat(fd)
        size = _file_size(fd)
        return _validate(path, pread or (lambda n, off: _pread_exact(fd, n, off)), size,
                         info.st_blocks * 512, allow_incomplete)
    except ImageError as error:
        raise _prefixed(path, error) from None
    except OSError as error:
        raise ImageError(f"{path}: cannot read the save image: {error.strerror or error}") from None


def read_image(path: str, allow_incomplete: bool = False) -> SaveImage:
    """Read and validate the image at ``path`` (no trust checks: see _image_auth.open_image).

    Fails if an interrupted :func:`rewrite_data_area` left a journal: the image may
    be half rewritten until :func:`recover_interrupted_rewrite_fd` rolls it back.
    ``allow_incomplete`` returns images with the partial magic (for reporting);
    their stream is not checked.
    """
    fd = _open_image(path, os.O_RDONLY)
    try:
        check_no_pending_journal(path, fd)
        return read_image_fd(fd, path, allow_incomplete)
    finally:
        os.close(fd)


def _open_image(path: str, flags: int) -> int:
    """Open a regular file or block device; never block on a FIFO someone points us at."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as error:
        raise ImageError(f"{path}: cannot open the save image: {error.strerror or error}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise ImageError(f"{path}: not a save image: it is not a regular file (nor a block device)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


# --- the writer ---------------------------------------------------------------------

# seal(header bytes, data area) -> the data area with its MAC filled in, the same
# length (_image_auth.py provides it; this module knows nothing of keys or XML).
Sealer = Callable[[bytes, bytes], bytes]


def _sealed(seal: Sealer, header: SaveHeader, data: bytes) -> bytes:
    sealed = seal(header.pack(), data)
    if len(sealed) != len(data):
        raise ImageError("signing the image changed the size of its data area")
    return sealed


def write_new_image(fd: int, xml: str, cookie: Optional[str], was_running: bool,
                    fmt: ImageFormat, seal: Optional[Sealer] = None) -> SaveHeader:
    """Write the partial-magic header and the data area at offset 0 of an empty file.

    Leaves ``fd`` positioned at the stream offset, where the stream goes. The
    caller owns the file (temporary name, mode 0600, rename into place).
    """
    xml_bytes, cookie_bytes = encode_data(xml, cookie)
    data_len = len(xml_bytes) + len(cookie_bytes) + DATA_PADDING
    if data_len > MAX_DATA_LEN:
        raise ImageTooLargeError(f"the domain XML and cookie take {data_len - DATA_PADDING} bytes; "
                                 f"a save image holds at most {MAX_DATA_LEN - DATA_PADDING}")
    header = SaveHeader(complete=False, version=CURRENT_VERSION, data_len=data_len,
                        was_running=was_running, format=fmt,
                        cookie_offset=len(xml_bytes) if cookie is not None else 0)
    data = _data_area(xml_bytes, cookie_bytes, data_len)
    if seal is not None:
        data = _sealed(seal, header, data)
    _pwrite_all(fd, header.pack() + data, 0)
    os.lseek(fd, header.stream_offset, os.SEEK_SET)
    return header


def finalize_image(fd: int, header: SaveHeader) -> SaveHeader:
    """Mark the image complete: stream on disk first, then the final magic, on disk too."""
    final = replace(header, complete=True)
    os.fsync(fd)
    _pwrite_all(fd, final.pack(), 0)
    os.fsync(fd)
    return final


# --- in-place rewrite and its journal -----------------------------------------------
#
# An edit rewrites the header and the data area of a finished image. A crash in the
# middle could leave a header that does not match the data area, so the old bytes
# go to a journal first (synced with its directory). The journal is removed only
# once the new bytes are on disk; while it exists the image is suspect, readers
# refuse it, and recover_interrupted_rewrite() puts the old bytes back. The stream
# is never touched, so the old header and data area are all there is to restore.
#
# Journals live in our private state directory (_image_key.state_dir()/journals,
# 0700, ours alone), named after the image's device and inode, never next to the
# image: whoever can write the image's directory must not be able to plant a
# journal that rolls an image back, nor a FIFO that hangs us. An entry there that is
# not a regular file of ours (a FIFO, a symbolic link, another owner's file) is
# ignored and removed; it is never opened in a way that can block or follow a link.

JOURNAL_DIR = "journals"
_JOURNAL_MAGIC = b"SSQJRNL3"
# magic, device, inode, size of the image, sha256 of the stream's first bytes, length of the
# saved bytes, sha256 of the rest
_JOURNAL_HEAD = struct.Struct("<8sQQQ32sI32s")
_JOURNAL_IDENTITY = struct.Struct("<QQQ32sI")
# A journal names its image by device, inode and size, and by the first bytes of its stream
# (which an edit never touches): another image that got the same inode after the first was
# deleted is told apart by its content, so a stale journal is never rolled into it.
_STREAM_SAMPLE = 64 * 1024
_JOURNAL_MAX = _JOURNAL_HEAD.size + HEADER_SIZE + MAX_DATA_LEN


def journal_directory() -> str:
    return os.path.join(state_dir(), JOURNAL_DIR)


def _journal_name(info: os.stat_result) -> str:
    return f"{info.st_dev:x}-{info.st_ino:x}.journal"


def journal_path_for(info: os.stat_result) -> str:
    """Where the journal of the image with this fstat lives."""
    return os.path.join(journal_directory(), _journal_name(info))


def _open_journal_dir(create: bool) -> Optional[int]:
    base = open_private_dir(state_dir(), create=create)
    if base is None:
        return None
    os.close(base)
    return open_private_dir(journal_directory(), create=create)


_Identity = tuple[int, int, int, bytes]


def _journal_identity(fd: int, info: os.stat_result, stream_offset: int) -> _Identity:
    # An in-place rewrite never changes the size nor the stream: a journal for another is stale.
    sample = os.pread(fd, _STREAM_SAMPLE, stream_offset)
    return info.st_dev, info.st_ino, info.st_size, hashlib.sha256(sample).digest()


def _encode_journal(identity: _Identity, old_bytes: bytes) -> bytes:
    digest = hashlib.sha256(_JOURNAL_IDENTITY.pack(*identity, len(old_bytes)) + old_bytes).digest()
    return _JOURNAL_HEAD.pack(_JOURNAL_MAGIC, *identity, len(old_bytes), digest) + old_bytes


@dataclass(frozen=True)
class _Journal:
    identity: _Identity
    old_bytes: bytes


def _decode_journal(raw: bytes) -> Optional[_Journal]:
    """The journal, or None if it is not a whole, intact one (a crash while writing it)."""
    if len(raw) < _JOURNAL_HEAD.size:
        return None
    magic, dev, ino, size, stream_digest, length, digest = _JOURNAL_HEAD.unpack(raw[:_JOURNAL_HEAD.size])
    old_bytes = raw[_JOURNAL_HEAD.size:]
    if magic != _JOURNAL_MAGIC or len(old_bytes) != length or length < HEADER_SIZE:
        return None
    if hashlib.sha256(_JOURNAL_IDENTITY.pack(dev, ino, size, stream_digest, length) + old_bytes).digest() != digest:
        return None
    old_header = _header_or_none(old_bytes)
    if old_header is None or old_header.stream_offset != length:
        return None  # it must hold exactly a header and its data area
    return _Journal((dev, ino, size, stream_digest), old_bytes)


@dataclass(frozen=True)
class _JournalEntry:
    """What the journal directory holds for one image.

    ``kind``: "none"; "foreign" (not a regular file of ours: ignored, removed when we
    need the name); "damaged" (ours, but not whole: a crash while writing it, before
    the image was touched); "intact".
    """

    kind: str
    path: str
    journal: Optional[_Journal] = None


def _read_journal_entry(dir_fd: int, name: str, path: str) -> _JournalEntry:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return _JournalEntry("none", path)
    except OSError:
        return _JournalEntry("foreign", path)  # a symbolic link (ELOOP), a FIFO without writer (ENXIO), ...
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022 \
                or info.st_nlink != 1 or info.st_size > _JOURNAL_MAX:
            return _JournalEntry("foreign", path)
        raw = _pread_exact(fd, _JOURNAL_MAX + 1, 0)
    finally:
        os.close(fd)
    journal = _decode_journal(raw)
    return _JournalEntry("damaged" if journal is None else "intact", path, journal)


def _find_journal(info: os.stat_result) -> _JournalEntry:
    path = journal_path_for(info)
    dir_fd = _open_journal_dir(create=False)
    if dir_fd is None:
        return _JournalEntry("none", path)
    try:
        return _read_journal_entry(dir_fd, _journal_name(info), path)
    finally:
        os.close(dir_fd)


def _journal_applies(entry: _JournalEntry, fd: int, info: os.stat_result) -> bool:
    """A damaged journal of ours counts as applying: we cannot tell, so we keep the image suspect."""
    if entry.kind == "damaged":
        return True
    return _intact_for(entry, fd, info) is not None


def _intact_for(entry: _JournalEntry, fd: int, info: os.stat_result) -> Optional[_Journal]:
    """The entry's journal if it is intact and was written for the image open at ``fd``."""
    journal = entry.journal
    if entry.kind != "intact" or journal is None:
        return None
    return journal if journal.identity == _journal_identity(fd, info, len(journal.old_bytes)) else None


def check_no_pending_journal(path: str, fd: int) -> None:
    """Refuse an image that an interrupted rewrite may have left half written."""
    try:
        info = os.fstat(fd)
    except OSError as error:
        raise ImageError(f"{path}: cannot read the save image: {error.strerror or error}") from None
    entry = _find_journal(info)
    if _journal_applies(entry, fd, info):
        raise ImageError(
            f"{path}: an interrupted save_image_define left a journal ({entry.path}); the image may be "
            "half rewritten. Run savestate.qemu.save_image_define on this path again (any options) to roll "
            "the image back to its state before that edit, then repeat the edit if you still want it.")


def has_pending_journal_fd(fd: int) -> bool:
    info = os.fstat(fd)
    return _journal_applies(_find_journal(info), fd, info)


def _remove_journal_entry(info: os.stat_result) -> None:
    dir_fd = _open_journal_dir(create=False)
    if dir_fd is None:
        return
    try:
        os.unlink(_journal_name(info), dir_fd=dir_fd)
        os.fsync(dir_fd)
    except FileNotFoundError:
        pass
    finally:
        os.close(dir_fd)


def recover_interrupted_rewrite_fd(fd: int, path: str) -> bool:
    """Roll back an interrupted rewrite of the image open read-write (and locked) at ``fd``.

    True if a journal of ours was found and dealt with. An intact journal for this
    file puts the old header and data area back. A damaged journal means the crash
    came while writing the journal, before the image was touched, and a journal for
    another file (same inode number, since replaced) is stale: both are removed, as
    is anything foreign under the journal's name (never read, never followed).
    """
    info = os.fstat(fd)
    entry = _find_journal(info)
    if entry.kind == "none":
        return False
    try:
        journal = _intact_for(entry, fd, info)
        if journal is not None:
            _pwrite_all(fd, journal.old_bytes, 0)
            os.fsync(fd)
    except OSError as error:
        raise ImageError(f"{path}: cannot roll back the interrupted edit from {entry.path}: "
                         f"{error.strerror or error}") from None
    _remove_journal_entry(info)
    return entry.kind != "foreign"


def _write_journal(path: str, fd: int, old_bytes: bytes) -> None:
    info = os.fstat(fd)
    name = _journal_name(info)
    record = _encode_journal(_journal_identity(fd, info, len(old_bytes)), old_bytes)
    dir_fd = _open_journal_dir(create=True)
    if dir_fd is None:  # created if missing: only a race with its removal gets here
        raise ImageError(f"{path}: the journal directory {journal_directory()} could not be created")
    try:
        entry = _read_journal_entry(dir_fd, name, journal_path_for(info))
        # A journal of ours for another file that had this device and inode (deleted since,
        # so another size or stream) is stale: it must not block this image's edits for ever.
        if entry.kind == "foreign" or (entry.kind == "intact" and not _journal_applies(entry, fd, info)):
            os.unlink(name, dir_fd=dir_fd)
        try:
            journal_fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                                 dir_fd=dir_fd)
        except FileExistsError:
            raise ImageError(f"{path}: a journal of an earlier, interrupted edit exists ({entry.path}); "
                             "run save_image_define again to roll it back first") from None
        try:
            _pwrite_all(journal_fd, record, 0)
            os.fsync(journal_fd)
        finally:
            os.close(journal_fd)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _lock(fd: int, path: str) -> None:
    """One editor at a time (advisory: our own modules honour it)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ImageError(f"{path}: another process is editing this save image; try again later") from None
        raise


def _header_or_none(data: bytes) -> Optional[SaveHeader]:
    try:
        return SaveHeader.unpack(data[:HEADER_SIZE], allow_incomplete=True)
    except ImageError:
        return None


def new_data_area_header(header: SaveHeader, xml: str, cookie: Optional[str],
                         was_running: Optional[bool] = None) -> tuple[SaveHeader, bytes]:
    """The header and data-area bytes a rewrite would store (within the old ``data_len``)."""
    xml_bytes, cookie_bytes = encode_data(xml, cookie)
    needed = len(xml_bytes) + len(cookie_bytes)
    if needed > header.data_len:
        raise ImageTooLargeError(f"new xml too large to fit in file ({needed} bytes of XML and cookie, "
                                 f"the data area holds {header.data_len})")
    new = replace(header,
                  cookie_offset=len(xml_bytes) if cookie is not None else 0,
                  was_running=header.was_running if was_running is None else was_running)
    return new, _data_area(xml_bytes, cookie_bytes, header.data_len)


def rewrite_data_area(fd: int, header: SaveHeader, xml: str, cookie: Optional[str],
                      was_running: Optional[bool] = None, *, path: str, seal: Optional[Sealer] = None) -> SaveHeader:
    """Replace the XML and cookie (and optionally the restore state) of the image at ``fd``.

    ``fd`` is open read-write on ``path`` and ``header`` is what it holds now. The
    magic, version, format, byte order and ``data_len`` stay as they were; the
    stream is not touched. Nothing is written when nothing changes. Crash-safe
    through a journal (see above). ``seal`` fills in the MAC (see :data:`Sealer`).
    """
    try:
        new, data = new_data_area_header(header, xml, cookie, was_running)
        if seal is not None:
            data = _sealed(seal, new, data)
    except ImageError as error:
        raise _prefixed(path, error) from None
    new_bytes = new.pack() + data
    try:
        _lock(fd, path)
        old_bytes = _pread_exact(fd, len(new_bytes), 0)
        if old_bytes == new_bytes:
            return new
        if _header_or_none(old_bytes) != header:
            raise ImageError(f"{path}: the image changed since it was read; read it again before editing")
        _write_journal(path, fd, old_bytes)
        _pwrite_all(fd, data, HEADER_SIZE)
        os.fsync(fd)
        _pwrite_all(fd, new.pack(), 0)
        os.fsync(fd)
        _remove_journal_entry(os.fstat(fd))
    except OSError as error:
        raise ImageError(f"{path}: cannot rewrite the save image: {error.strerror or error}") from None
    return new


def journal_pread(fd: int) -> Optional[_Pread]:
    """A pread that sees the image as :func:`recover_interrupted_rewrite_fd` would leave it.

    None when there is no intact journal for this file (the file reads as it is).
    With one, the old header and data area come from the journal, the stream from
    the file. For check mode: nothing is written.
    """
    info = os.fstat(fd)
    entry = _find_journal(info)
    journal = _intact_for(entry, fd, info)
    if journal is None:
        return None
    saved = journal.old_bytes

    def pread(size: int, offset: int) -> bytes:
        head = saved[offset:offset + size] if offset < len(saved) else b""
        rest = size - len(head)
        if rest <= 0:
            return head
        return head + _pread_exact(fd, rest, offset + len(head))

    return pread


# --- by path (tests, tools): the modules go through _image_auth.open_image ----------

def _open_by_path(path: str, flags: int) -> int:
    return _open_image(path, flags | os.O_NOFOLLOW)


def journal_path(path: str) -> str:
    """Where the journal of the image at ``path`` is (or would be)."""
    return journal_path_for(os.stat(path))


def has_pending_journal(path: str) -> bool:
    fd = _open_by_path(path, os.O_RDONLY)
    try:
        return has_pending_journal_fd(fd)
    finally:
        os.close(fd)


def recover_interrupted_rewrite(path: str) -> bool:
    """:func:`recover_interrupted_rewrite_fd` on the image at ``path``."""
    fd = _open_by_path(path, os.O_RDWR)
    try:
        _lock(fd, path)
        return recover_interrupted_rewrite_fd(fd, path)
    finally:
        os.close(fd)


def open_for_rewrite(path: str) -> tuple[int, SaveImage]:
    """Open a complete image read-write, locked, after rolling back any interrupted edit."""
    fd = _open_by_path(path, os.O_RDWR)
    try:
        _lock(fd, path)
        recover_interrupted_rewrite_fd(fd, path)
        return fd, read_image_fd(fd, path)
    except BaseException:
        os.close(fd)
        raise


def read_image_as_recovered(path: str, allow_incomplete: bool = False) -> SaveImage:
    """The image as :func:`recover_interrupted_rewrite` would leave it, without writing anything."""
    fd = _open_by_path(path, os.O_RDONLY)
    try:
        return read_image_fd(fd, path, allow_incomplete, journal_pread(fd))
    finally:
        os.close(fd)
