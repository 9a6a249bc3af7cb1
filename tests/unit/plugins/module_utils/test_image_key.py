"""The host image key: created once, atomically, private; anything unsafe is refused, never followed."""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._image_key import (
    KEY_NAME,
    ImageKeyError,
    key_id_of,
    load_key,
)

OTHER_UID = 4321


def test_first_use_creates_a_private_key_and_later_uses_read_it(tmp_path):
    directory = tmp_path / "etc" / "savestate-qemu"
    key = load_key(str(directory))
    assert len(key.secret) == 32 and key.key_id == key_id_of(key.secret) and len(key.key_id) == 16
    info = os.stat(directory / KEY_NAME)
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert os.listdir(directory) == [KEY_NAME]  # no temporary file left behind
    assert load_key(str(directory)) == key
    assert key.secret.hex() not in repr(key)


def test_without_create_a_missing_key_is_none(tmp_path):
    assert load_key(str(tmp_path / "none"), create=False) is None
    assert not (tmp_path / "none").exists()


def test_a_distributed_key_is_read_as_hex(tmp_path):
    directory = tmp_path / "conf"
    directory.mkdir(mode=0o700)
    (directory / KEY_NAME).write_text("ab" * 32 + "\n")
    (directory / KEY_NAME).chmod(0o600)
    assert load_key(str(directory)).secret == bytes.fromhex("ab" * 32)


def _load_in_child(directory: str, queue) -> None:
    try:
        queue.put(load_key(directory).key_id)
    except Exception as error:  # reported to the parent, which fails the test
        queue.put(f"error: {error}")


def test_concurrent_first_uses_agree_on_one_key(tmp_path):
    directory = str(tmp_path / "race")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_load_in_child, args=(directory, queue)) for index in range(8)]
    for child in children:
        child.start()
    ids = {queue.get(timeout=30) for child in children}
    for child in children:
        child.join(30)
    assert len(ids) == 1 and not next(iter(ids)).startswith("error")
    assert ids == {load_key(directory).key_id}
    assert os.listdir(directory) == [KEY_NAME]


@pytest.fixture
def key_dir(tmp_path) -> Path:
    directory = tmp_path / "conf"
    load_key(str(directory))
    return directory


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_key_others_can_read_is_refused(key_dir, mode):
    (key_dir / KEY_NAME).chmod(mode)
    with pytest.raises(ImageKeyError, match="group and others must have no access"):
        load_key(str(key_dir))


def test_a_key_of_another_owner_is_refused(key_dir):
    os.chown(key_dir / KEY_NAME, OTHER_UID, -1)
    with pytest.raises(ImageKeyError, match=f"owned by uid {OTHER_UID}"):
        load_key(str(key_dir))


def test_a_symlinked_key_is_refused_not_followed(key_dir, tmp_path):
    target = tmp_path / "elsewhere.key"
    os.rename(key_dir / KEY_NAME, target)
    (key_dir / KEY_NAME).symlink_to(target)
    with pytest.raises(ImageKeyError, match="symbolic link is never followed"):
        load_key(str(key_dir))


def test_a_fifo_key_is_refused_without_hanging(key_dir):
    (key_dir / KEY_NAME).unlink()
    os.mkfifo(key_dir / KEY_NAME, 0o600)
    failure: list[BaseException] = []
    worker = threading.Thread(target=lambda: failure.append(pytest.raises(ImageKeyError, load_key, str(key_dir))))
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "load_key hung on a FIFO"
    assert "not a regular file" in str(failure[0].value)


def test_a_malformed_key_is_refused(key_dir):
    (key_dir / KEY_NAME).write_text("not hex")
    with pytest.raises(ImageKeyError, match="must hold 64 hex digits"):
        load_key(str(key_dir))


@pytest.mark.parametrize("mode, owner, problem", [(0o750, None, "mode 0750"), (0o700, OTHER_UID, "owned by uid"),
                                                  (0o777, None, "mode 0777")])
def test_a_key_directory_others_can_use_is_refused(key_dir, mode, owner, problem):
    key_dir.chmod(mode)
    if owner is not None:
        os.chown(key_dir, owner, -1)
    with pytest.raises(ImageKeyError, match=problem):
        load_key(str(key_dir))


def test_a_symlinked_key_directory_is_refused(key_dir, tmp_path):
    (tmp_path / "link").symlink_to(key_dir)
    with pytest.raises(ImageKeyError, match="symbolic link or not a directory"):
        load_key(str(tmp_path / "link"))
