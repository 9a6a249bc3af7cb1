# Copyright: savestate.qemu contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""The host key that authenticates save images, and the private directories we keep state in.

The key is 32 random bytes, stored as 64 hex digits (plus an optional newline) in
``/etc/savestate-qemu/image.key`` for root, ``$XDG_CONFIG_HOME/savestate-qemu/image.key``
(default ``~/.config``) for other users. It is created on first use; a fleet that
moves images between hosts installs one shared key (the ``image_key`` role).

Every directory we create here is ours alone: owned by the effective user, mode
0700, never a symbolic link. Anything else is refused, never repaired: whoever
could write there could plant a key or a journal.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from dataclasses import dataclass, field
from typing import Optional

from ansible_collections.savestate.qemu.plugins.module_utils._errors import ImageError

KEY_NAME = "image.key"
KEY_BYTES = 32
KEY_ID_HEX = 16
ROOT_CONFIG_DIR = "/etc/savestate-qemu"
ROOT_STATE_DIR = "/var/lib/savestate-qemu"
_APP = "savestate-qemu"
# A key file is 64 hex digits and a newline; anything much bigger is not ours.
_KEY_FILE_MAX = 256


class ImageKeyError(ImageError):
    """The host key is missing, unsafe or malformed (a subclass so modules report it as usual)."""


@dataclass(frozen=True)
class ImageKey:
    """A MAC key and its public id (a hash: tells "another key" from "tampered")."""

    secret: bytes = field(repr=False)
    key_id: str = ""

    @classmethod
    def from_secret(cls, secret: bytes) -> ImageKey:
        if len(secret) != KEY_BYTES:
            raise ImageKeyError(f"an image key is {KEY_BYTES} bytes, not {len(secret)}")
        return cls(secret, key_id_of(secret))


def key_id_of(secret: bytes) -> str:
    return hashlib.sha256(b"savestate-qemu image key id\0" + secret).hexdigest()[:KEY_ID_HEX]


# --- private directories -------------------------------------------------------------

def config_dir() -> str:
    """Where the key lives for the effective user."""
    if os.geteuid() == 0:
        return ROOT_CONFIG_DIR
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, _APP)


def state_dir() -> str:
    """Where edit journals live for the effective user."""
    if os.geteuid() == 0:
        return ROOT_STATE_DIR
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, _APP)


def file_problem(info: os.stat_result, what: str, directory: bool = False) -> Optional[str]:
    """Why a private file or directory is not ours alone, if it is not."""
    kind_ok = stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)
    if not kind_ok:
        return f"{what} is not a {'directory' if directory else 'regular file'}"
    if info.st_uid != os.geteuid():
        return f"{what} is owned by uid {info.st_uid}, not {os.geteuid()}"
    if info.st_mode & 0o077:
        return f"{what} has mode {stat.S_IMODE(info.st_mode):04o}; group and others must have no access"
    return None


def open_private_dir(path: str, create: bool = True) -> Optional[int]:
    """An fd on ``path``, a directory only we can use; created 0700 if missing (None if not and not ``create``).

    The last component is opened with O_NOFOLLOW and checked with fstat, so what
    we check is what we use. Its parents are created with the usual mode.
    """
    if create:
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as error:
            raise ImageKeyError(f"cannot create the private directory {path}: {error.strerror or error}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if create:
            raise ImageKeyError(f"the private directory {path} vanished while being created") from None
        return None
    except OSError as error:
        raise ImageKeyError(f"refusing the private directory {path}: it is a symbolic link or not a directory "
                            f"({error.strerror or error})") from None
    problem = file_problem(os.fstat(fd), path, directory=True)
    if problem:
        os.close(fd)
        raise ImageKeyError(f"refusing {problem}; it holds secrets and state only its owner may touch "
                            "(fix with chown and chmod 0700, or remove it)")
    return fd


# --- the key -----------------------------------------------------------------------

def _parse_key_file(raw: bytes, path: str) -> ImageKey:
    text = raw.strip()
    try:
        secret = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        secret = b""
    if len(secret) != KEY_BYTES:
        raise ImageKeyError(f"{path} is not an image key: it must hold {KEY_BYTES * 2} hex digits "
                            "(create one with: openssl rand -hex 32)")
    return ImageKey.from_secret(secret)


def _read_key(dir_fd: int, path: str) -> Optional[ImageKey]:
    try:
        fd = os.open(KEY_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ImageKeyError(f"refusing the image key {path}: {error.strerror or error} (a symbolic link is "
                            "never followed)") from None
    try:
        info = os.fstat(fd)
        problem = file_problem(info, f"the image key {path}")
        if problem:
            raise ImageKeyError(f"refusing {problem} (fix with chown and chmod 0600, or install it again)")
        raw = os.read(fd, _KEY_FILE_MAX + 1)
    finally:
        os.close(fd)
    return _parse_key_file(raw, path)


def _create_key(dir_fd: int, path: str) -> None:
    """Write a new key under a unique name and link it in: of concurrent creators, the first link wins."""
    temp = f".{KEY_NAME}.{os.getpid()}.{secrets.token_hex(8)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES).hex().encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, KEY_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except FileExistsError:
            pass  # another first use won; everyone reads its key
        os.fsync(dir_fd)
    except OSError as error:
        raise ImageKeyError(f"cannot create the image key {path}: {error.strerror or error}") from None
    finally:
        try:
            os.unlink(temp, dir_fd=dir_fd)
        except OSError:
            pass


def load_key(directory: Optional[str] = None, create: bool = True) -> Optional[ImageKey]:
    """The host key (created on first use); None only if it does not exist and ``create`` is false."""
    directory = directory or config_dir()
    path = os.path.join(directory, KEY_NAME)
    dir_fd = open_private_dir(directory, create=create)
    if dir_fd is None:
        return None
    try:
        key = _read_key(dir_fd, path)
        if key is None and create:
            _create_key(dir_fd, path)
            key = _read_key(dir_fd, path)
        return key
    finally:
        os.close(dir_fd)
