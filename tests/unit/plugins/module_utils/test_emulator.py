"""What a trusted emulator is: name, owner, mode, and every directory from / down."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._emulator import (
    check_trusted_emulator,
    emulator_problem,
    process_emulator,
)
from ansible_collections.savestate.qemu.plugins.module_utils._errors import PreconditionError

SYSTEM_QEMU = "/usr/bin/qemu-system-x86_64"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create root-owned files")


@pytest.fixture
def root_dir() -> Iterator[Path]:
    """A directory only root can write, in a chain only root can write (/run)."""
    path = Path(tempfile.mkdtemp(prefix="ssq-emu-", dir="/run"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _binary(path: Path, mode: int = 0o755, uid: int = 0) -> Path:
    path.write_bytes(b"")
    path.chmod(mode)
    os.chown(path, uid, -1)
    return path


def test_the_system_qemu_is_trusted():
    assert emulator_problem(SYSTEM_QEMU) is None
    assert check_trusted_emulator(SYSTEM_QEMU) == os.path.realpath(SYSTEM_QEMU)


def test_names(root_dir):
    assert emulator_problem(str(_binary(root_dir / "qemu-kvm"))) is None
    assert "not named" in emulator_problem(str(_binary(root_dir / "qemu-img")))
    assert "not named" in emulator_problem(str(_binary(root_dir / "qemu-system-")))
    assert "not named" in emulator_problem(str(_binary(root_dir / "sleep")))


def test_owner_mode_and_type(root_dir):
    assert "owned by uid 65534" in emulator_problem(str(_binary(root_dir / "qemu-system-a", uid=65534)))
    assert "writable by group or others" in emulator_problem(str(_binary(root_dir / "qemu-system-b", mode=0o775)))
    assert "writable by group or others" in emulator_problem(str(_binary(root_dir / "qemu-system-c", mode=0o757)))
    (root_dir / "qemu-system-d").mkdir()
    assert "not a regular file" in emulator_problem(str(root_dir / "qemu-system-d"))
    assert "cannot be examined" in emulator_problem(str(root_dir / "qemu-system-missing"))
    assert "not an absolute path" in emulator_problem("qemu-system-x86_64")


def test_every_directory_on_the_real_path(root_dir):
    user_dir = root_dir / "u"
    user_dir.mkdir(mode=0o755)
    binary = _binary(user_dir / "qemu-system-x86_64")
    assert emulator_problem(str(binary)) is None
    os.chown(user_dir, 65534, 65534)
    assert f"its directory {user_dir} is owned by uid 65534" in emulator_problem(str(binary))
    os.chown(user_dir, 0, 0)
    user_dir.chmod(0o1777)  # sticky world-writable, like /tmp
    assert "is writable by group or others" in emulator_problem(str(binary))
    # A trusted-looking symlink to it does not help: the real path is checked.
    (root_dir / "qemu-system-link").symlink_to(binary)
    assert str(user_dir) in emulator_problem(str(root_dir / "qemu-system-link"))
    with pytest.raises(PreconditionError, match="not a trusted QEMU emulator"):
        check_trusted_emulator(str(root_dir / "qemu-system-link"))
    # /tmp itself is world-writable: nothing under it is trusted.
    assert "writable by group or others" in emulator_problem(str(_binary(Path(tempfile.mkdtemp()) / "qemu-kvm")))


def test_a_process_is_judged_by_the_file_it_runs(root_dir, tmp_path):
    proc = tmp_path / "proc"
    (proc / "5").mkdir(parents=True)
    (proc / "5" / "exe").symlink_to(SYSTEM_QEMU)
    assert process_emulator(5, str(proc)) == (os.path.realpath(SYSTEM_QEMU), None, None)
    # Replaced by an upgrade: the still-open inode is judged.
    deleted = _binary(root_dir / "qemu-system-x86_64 (deleted)")
    (proc / "6").mkdir()
    (proc / "6" / "exe").symlink_to(deleted)
    path, problem, note = process_emulator(6, str(proc))
    assert (path, problem) == (str(root_dir / "qemu-system-x86_64"), None) and "replaced" in note
    os.chown(deleted, 65534, -1)
    path, problem, _note = process_emulator(6, str(proc))
    assert path is None and "owned by uid 65534" in problem
    (proc / "7").mkdir()
    assert process_emulator(7, str(proc))[1] == "its executable cannot be read (/proc/PID/exe)"
