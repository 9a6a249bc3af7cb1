"""Locks and save journals of _runtime, on real files and real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils import _runtime
from ansible_collections.savestate.qemu.plugins.module_utils._errors import PreconditionError
from ansible_collections.savestate.qemu.plugins.module_utils._runtime import (
    GuestLock,
    JournalStore,
    SaveJournal,
    guest_key,
    process_start_time,
)


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path, monkeypatch):
    """Point the runtime directory at a fresh one (the code under test is not mocked)."""
    directory = tmp_path / "run"
    monkeypatch.setattr(_runtime, "ROOT_RUNTIME_DIR", str(directory))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return directory


def test_runtime_directory_is_private():
    path = _runtime.runtime_dir()
    assert os.stat(path).st_mode & 0o777 == 0o700


def test_runtime_directory_open_to_others_is_refused():
    path = _runtime.runtime_dir()
    os.chmod(path, 0o777)
    with pytest.raises(PreconditionError, match="mode 0700"):
        _runtime.runtime_dir()


@pytest.mark.parametrize("uuid, name, pid, key", [
    ("9A4A1C4E-7F3B-4C1E-9D55-1B0F3F3C2E11", "web", 1, "9a4a1c4e-7f3b-4c1e-9d55-1b0f3f3c2e11"),
    ("00000000-0000-0000-0000-000000000000", "web 1/x", 1, "name-web_1_x"),
    (None, None, 42, "pid-42"),
])
def test_guest_keys(uuid, name, pid, key):
    assert guest_key(uuid, name, pid) == key


def test_a_second_lock_waits_and_gives_up_naming_the_holder():
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from ansible_collections.savestate.qemu.plugins.module_utils._runtime import GuestLock\n"
        "from ansible_collections.savestate.qemu.plugins.module_utils import _runtime\n"
        f"_runtime.ROOT_RUNTIME_DIR = {_runtime.ROOT_RUNTIME_DIR!r}\n"
        "with GuestLock('g', 5, 'save to /x'):\n"
        "    print('locked', flush=True); time.sleep(30)\n")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(PreconditionError, match=r"still running \(save to /x, pid \d+\)"):
            GuestLock("g", 0.5, "restore").acquire()
        assert 0.5 <= time.monotonic() - started < 3
    finally:
        holder.kill()
        holder.wait()
    with GuestLock("g", 1, "restore"):
        pass  # the holder died: its flock went with it


def test_journal_round_trip_and_process_identity():
    store = JournalStore("guest")
    assert store.load() is None
    me = os.getpid()
    journal = SaveJournal(me, process_start_time(me), True, "/d/.x.partial", "/d/x", "raw")
    store.store(journal)
    loaded = store.load()
    assert loaded == journal and loaded.matches_process(me)
    assert not SaveJournal(me, 1, True, "", "", "raw").matches_process(me)
    store.remove()
    assert store.load() is None


def test_unreadable_journal_counts_as_absent():
    store = JournalStore("guest")
    with open(store.path, "w", encoding="utf-8") as handle:
        handle.write("{not json")
    assert store.load() is None
    assert not os.path.exists(store.path)
