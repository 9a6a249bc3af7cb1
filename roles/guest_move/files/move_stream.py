# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Stream a save image from a move's source to its destination, hashing it on both ends.

guest_move's SSH key runs this on the source (its forced command, as the key's user,
root by default): it sends the finished image, or the image while the save still
writes it (``guest_move_overlap``). It only ever reads one image: the path the role
wrote into the forced command, or the temporary file the save writes it under
(``.<name>.XXXXXXXX.partial`` beside it, as ``mkstemp`` names it). Nothing it is
given over SSH chooses a file. On the destination it writes what arrives into the
copy. Each end hashes the bytes in the same pass that moves them (one process, one
buffer: no ``tee`` and no hashing process beside it, which cost a third of the
copy's time on a 2-core host); the sending modes end their stderr with the line
``<hex digest> <algorithm>``.

Modes (the first argument):

``probe``
    Say ``savestate-move-ready`` if the image's directory can be opened.
``send``
    Copy the finished image (a regular file that starts with the final magic) to
    stdout.
``follow``
    Wait (up to ``--timeout`` seconds) for the save of the image to start after
    ``--since`` (nanoseconds since the epoch), then copy its file to stdout as it
    grows (one bounded buffer: memory stays flat), until the save
    renamed it over the image and all of it went out. The first bytes carry the
    partial magic: the save rewrites the magic (and may rewrite the XML) at the end,
    so the destination takes the header from ``head`` once the save is over. On
    success the last line on stderr is ``savestate-move-stream: complete ...``.
    Fails if the save removed its file (it failed) or stopped writing for longer
    than ``--timeout``.
``head``
    Copy the finished image's header and XML (up to where the migration stream
    starts) to stdout; on success the last line on stderr is
    ``savestate-move-stream: head complete length=N``.
``receive``
    On the destination: write stdin into ``--output``, a new file (created
    exclusively, never through a link, mode 0600), and print ``<hex digest> <size>``
    on stdout.

A candidate temporary file must be a regular file (opened without following links,
never blocking on a FIFO), with one link, owned by root or the directory's owner,
modified after ``--since``, and start with the save's partial magic; a finished
image must be a regular file that starts with the final magic.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import stat
import struct
import sys
import time
from typing import NamedTuple, Optional, Protocol

MAGIC_COMPLETE = b"LibvirtQemudSave"
MAGIC_PARTIAL = b"LibvirtQemudPart"
HEADER_SIZE = 92
# As the collection's image reader: more is a corrupt header, not a domain XML.
MAX_DATA_LEN = 16 * 1024 * 1024
SUPPORTED_VERSIONS = (1, 2)
# One read, hash and write at a time: large enough that system calls cost little, small
# enough to stay in the CPU's cache between the hash and the write.
CHUNK = 1024 * 1024
# Between looks at a file that did not grow (the save writes about 1 GB/s: 5 ms is 5 MB behind).
POLL_S = 0.005
PREFIX = "savestate-move-stream"
# guest_move_checksum_algorithm's choices.
ALGORITHMS = ["md5", "sha1", "sha224", "sha256", "sha384", "sha512"]
# mkstemp's random part: 8 characters of [a-z0-9_].
RANDOM_PART = "[a-z0-9_]{8}"
# File times come from the kernel's coarse clock, a tick or so behind time.time(): a file
# written just after --since may carry a time just before it.
CLOCK_SLACK_NS = 100 * 1000 * 1000


class FollowError(Exception):
    """What went wrong, for the destination's error message."""


class Digest(Protocol):
    """What the stream needs of a ``hashlib`` object."""

    def update(self, data: bytes | memoryview, /) -> None:
        """Add ``data`` to the digest."""

    def hexdigest(self) -> str:
        """The digest so far, in hex."""


class Pump:
    """Moves bytes from a file or pipe to another through one reused buffer, hashing them."""

    def __init__(self, digest: Digest) -> None:
        self.digest = digest
        self._buffer = bytearray(CHUNK)
        self._view = memoryview(self._buffer)

    def copy(self, fd: int, out_fd: int, offset: int, end: int) -> int:
        """Copy bytes [offset, end) of the file ``fd`` to ``out_fd``; the new offset."""
        while offset < end:
            count = os.preadv(fd, [self._view[:min(end - offset, CHUNK)]], offset)
            if count == 0:
                break  # the file is shorter than it was (it cannot be: the save only appends)
            self._emit(out_fd, count)
            offset += count
        return offset

    def drain(self, fd: int, out_fd: int) -> int:
        """Copy the stream ``fd`` to its end into ``out_fd``; the bytes copied."""
        total = 0
        while True:
            count = os.readv(fd, [self._view])
            if count == 0:
                return total
            self._emit(out_fd, count)
            total += count

    def _emit(self, out_fd: int, count: int) -> None:
        chunk = self._view[:count]
        self.digest.update(chunk)
        while chunk:
            chunk = chunk[os.write(out_fd, chunk):]


class Report(NamedTuple):
    """What ``follow`` sent: the stream's size, how much went out before the save was done, and when."""

    size: int
    before_final: int
    first_byte: float
    final_seen: float


class Image(NamedTuple):
    """The image's directory (an open descriptor) and file name."""

    dir_fd: int
    name: str
    owners: frozenset[int]


def open_image_dir(path: str) -> Image:
    directory, name = os.path.split(os.path.abspath(path))
    if not name:
        raise FollowError(f"{path} names no file")
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise FollowError(f"cannot open the image directory {directory}: {error.strerror}") from None
    return Image(dir_fd, name, frozenset({0, os.fstat(dir_fd).st_uid}))


def partial_name(image: Image) -> re.Pattern[str]:
    return re.compile(re.escape(f".{image.name}.") + RANDOM_PART + re.escape(".partial"))


def _open_regular(image: Image, name: str) -> Optional[int]:
    """A descriptor on the regular file ``name`` in the image's directory, or None.

    Never follows a symbolic link, never opens a FIFO or a device (lstat first, then
    the open file must be the file looked at)."""
    try:
        seen = os.stat(name, dir_fd=image.dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(seen.st_mode):
            return None
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                     dir_fd=image.dir_fd)
    except OSError:
        return None
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (seen.st_dev, seen.st_ino):
        os.close(fd)
        return None
    return fd


def _starts_with(fd: int, magic: bytes) -> bool:
    return os.pread(fd, len(magic), 0) == magic


def _fresh_partial(image: Image, name: str, since_ns: int) -> Optional[int]:
    """The save's temporary file, if ``name`` is one written after ``since_ns``."""
    fd = _open_regular(image, name)
    if fd is None:
        return None
    info = os.fstat(fd)
    if info.st_nlink == 1 and info.st_uid in image.owners and info.st_mtime_ns >= since_ns \
            and _starts_with(fd, MAGIC_PARTIAL):
        return fd
    os.close(fd)
    return None


def _fresh_final(image: Image, since_ns: int) -> Optional[int]:
    """The finished image, if the save renamed it into place after ``since_ns``."""
    fd = _open_regular(image, image.name)
    if fd is None:
        return None
    info = os.fstat(fd)
    if info.st_uid in image.owners and info.st_mtime_ns >= since_ns and _starts_with(fd, MAGIC_COMPLETE):
        return fd
    os.close(fd)
    return None


def wait_for_save(image: Image, since_ns: int, timeout: float) -> tuple[int, bool]:
    """The file the save writes (and False), or the image it already finished (and True).

    Files from before ``since_ns`` are ignored (a killed run's leftovers, an older image)."""
    pattern = partial_name(image)
    since_ns -= CLOCK_SLACK_NS
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for name in sorted(os.listdir(image.dir_fd)):
            if pattern.fullmatch(name):
                fd = _fresh_partial(image, name, since_ns)
                if fd is not None:
                    found.append(fd)
        if len(found) > 1:
            for fd in found:
                os.close(fd)
            raise FollowError(f"several saves of {image.name} are being written at once; refusing to guess")
        if found:
            return found[0], False
        final = _fresh_final(image, since_ns)
        if final is not None:
            return final, True
        if time.monotonic() > deadline:
            raise FollowError(f"no save of {image.name} started within {timeout:g} s")
        time.sleep(POLL_S)


def _is_final(image: Image, fd: int) -> bool:
    """Whether the save renamed this very file over the image."""
    try:
        final = os.stat(image.name, dir_fd=image.dir_fd, follow_symlinks=False)
    except OSError:
        return False
    info = os.fstat(fd)
    return (final.st_dev, final.st_ino) == (info.st_dev, info.st_ino)


def follow(path: str, since_ns: int, timeout: float, pump: Pump, out_fd: int = 1) -> Report:
    """Send the image the save is writing (see the module docstring); what was sent."""
    image = open_image_dir(path)
    try:
        fd, final = wait_for_save(image, since_ns, timeout)
        try:
            return _follow_file(image, fd, final, timeout, pump, out_fd)
        finally:
            os.close(fd)
    finally:
        os.close(image.dir_fd)


def _follow_file(image: Image, fd: int, final: bool, timeout: float, pump: Pump, out_fd: int) -> Report:
    offset, before_final = 0, 0
    # A file found finished: the save was over before the first byte (its end is not known).
    first_byte = final_seen = time.time()
    last_growth = time.monotonic()
    while True:
        size = os.fstat(fd).st_size
        if offset < size:
            if offset == 0:
                first_byte = time.time()
            offset = pump.copy(fd, out_fd, offset, size)
            last_growth = time.monotonic()
            continue
        if final:
            break
        # Caught up with the save: is it over, did it fail, or is it still writing?
        if _is_final(image, fd):
            final, before_final, final_seen = True, offset, time.time()
            continue  # copy what it wrote before the rename
        if os.fstat(fd).st_nlink == 0:
            raise FollowError(f"the save of {image.name} removed its file: the save failed")
        if time.monotonic() - last_growth > timeout:
            raise FollowError(f"the save of {image.name} wrote nothing for {timeout:g} s")
        time.sleep(POLL_S)
    if not _starts_with(fd, MAGIC_COMPLETE):
        raise FollowError(f"{image.name} is in place but not marked complete")
    if offset < HEADER_SIZE:
        raise FollowError(f"{image.name} is too short to be a save image ({offset} bytes)")
    return Report(offset, before_final, first_byte, final_seen)


def head_length(header: bytes) -> int:
    """Bytes from the start of an image to its migration stream (header, XML, cookie, padding)."""
    if len(header) < HEADER_SIZE:
        raise FollowError("the image is too short to hold a save header")
    for order in ("<", ">"):
        version, data_len = (int(field) for field in struct.unpack(order + "2I", header[16:24]))
        if version in SUPPORTED_VERSIONS:
            if not 0 < data_len <= MAX_DATA_LEN:
                raise FollowError(f"the image's header is corrupt (data length {data_len})")
            return HEADER_SIZE + data_len
    raise FollowError("the image's header has an unknown version")


def _open_finished(path: str) -> int:
    """A descriptor on the finished image at ``path`` (a regular file with the final magic)."""
    image = open_image_dir(path)
    try:
        fd = _open_regular(image, image.name)
    finally:
        os.close(image.dir_fd)
    if fd is None:
        raise FollowError(f"{path} is not a regular file")
    if not _starts_with(fd, MAGIC_COMPLETE):
        os.close(fd)
        raise FollowError(f"{path} is not a complete save image")
    return fd


def head(path: str, pump: Pump, out_fd: int = 1) -> int:
    """Send the finished image's header and data area; their length."""
    fd = _open_finished(path)
    try:
        length = head_length(os.pread(fd, HEADER_SIZE, 0))
        if pump.copy(fd, out_fd, 0, length) != length:
            raise FollowError(f"{path} ends inside its header")
        return length
    finally:
        os.close(fd)


def send(path: str, pump: Pump, out_fd: int = 1) -> int:
    """Send the whole finished image; its size."""
    fd = _open_finished(path)
    try:
        return pump.copy(fd, out_fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def receive(output: str, pump: Pump, in_fd: int = 0) -> int:
    """Write the stream on ``in_fd`` into the new file ``output``; the bytes written."""
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise FollowError(f"cannot create {output}: {error.strerror}") from None
    try:
        return pump.drain(in_fd, fd)
    finally:
        os.close(fd)


def probe(path: str) -> None:
    os.close(open_image_dir(path).dir_fd)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="move_stream.py", description=__doc__.split("\n", 1)[0])
    parser.add_argument("mode", choices=["probe", "send", "follow", "head", "receive"])
    parser.add_argument("--image", help="the image on the source (every mode but receive)")
    parser.add_argument("--output", help="the copy on the destination (receive)")
    parser.add_argument("--algorithm", default="sha256", choices=ALGORITHMS)
    parser.add_argument("--since", type=int, default=0, help="nanoseconds since the epoch")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    if (args.output if args.mode == "receive" else args.image) is None:
        parser.error(f"{args.mode} needs {'--output' if args.mode == 'receive' else '--image'}")
    return args


def _send_mode(args: argparse.Namespace, pump: Pump) -> None:
    """``send``, ``head`` or ``follow``, with the line the destination checks for (the digest follows)."""
    if args.mode == "send":
        send(args.image, pump)
    elif args.mode == "head":
        length = head(args.image, pump)
        print(f"{PREFIX}: head complete length={length}", file=sys.stderr, flush=True)
    else:
        report = follow(args.image, args.since, args.timeout, pump)
        print(f"{PREFIX}: complete size={report.size} before_final={report.before_final} "
              f"first_byte={report.first_byte:.3f} final_seen={report.final_seen:.3f}", file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    pump = Pump(hashlib.new(args.algorithm))
    try:
        if args.mode == "probe":
            probe(args.image)
            print("savestate-move-ready", flush=True)
        elif args.mode == "receive":
            size = receive(args.output, pump)
            print(f"{pump.digest.hexdigest()} {size}", flush=True)
        else:
            _send_mode(args, pump)
            print(f"{pump.digest.hexdigest()} {args.algorithm}", file=sys.stderr, flush=True)
    except FollowError as error:
        print(f"{PREFIX}: {error}", file=sys.stderr, flush=True)
        return 1
    except BrokenPipeError:
        print(f"{PREFIX}: the destination stopped reading", file=sys.stderr, flush=True)
        return 1
    except OSError as error:
        print(f"{PREFIX}: {error.strerror or error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
