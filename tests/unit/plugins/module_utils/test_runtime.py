"""Locks, save journals, logs and cleanup of _runtime, on real files and real processes.

The runtime directory is private (0700, ours) and every file in it is opened
relative to it without following symlinks: the hostile cases plant symlinks,
FIFOs and garbage where our files go, and check that nothing outside the
directory changes and that nothing blocks or crashes.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ansible_collections.savestate.qemu.plugins.module_utils import _runtime
from ansible_collections.savestate.qemu.plugins.module_utils._errors import PreconditionError
from ansible_collections.savestate.qemu.plugins.module_utils._runtime import (
    FILE_NAME,
    GuestLock,
    JournalStore,
    SaveJournal,
    claim_qemu_log,
    create_qemu_log,
    guest_key,
    process_start_time,
    remove_stale_files,
)
from ansible_collections.savestate.qemu.plugins.module_utils._stream import SchemaFactsCache

UUID = "9a4a1c4e-7f3b-4c1e-9d55-1b0f3f3c2e11"
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the runtime directory at a fresh one (the code under test is not mocked)."""
    directory = tmp_path / "run"
    monkeypatch.setattr(_runtime, "ROOT_RUNTIME_DIR", str(directory))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return Path(_runtime.runtime_path())


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file outside the runtime directory that a planted symlink points at."""
    target = tmp_path / "elsewhere" / "precious"
    target.parent.mkdir()
    target.write_text("precious\n")
    return target


def unchanged(target: Path) -> bool:
    return target.read_text() == "precious\n" and sorted(p.name for p in target.parent.iterdir()) == ["precious"]


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- the directory ---------------------------------------------------------------------------

def test_runtime_directory_is_private() -> None:
    path = _runtime.runtime_dir()
    assert os.stat(path).st_mode & 0o777 == 0o700


def test_runtime_directory_open_to_others_is_refused_with_what_to_do() -> None:
    path = _runtime.runtime_dir()
    os.chmod(path, 0o777)
    with pytest.raises(PreconditionError, match=rf"{path} has mode 0777; it must be .* mode 0700.*chmod 0700 {path}"):
        _runtime.runtime_dir()


def test_a_symlink_in_place_of_the_runtime_directory_is_refused(private_runtime_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "decoy").mkdir(mode=0o700)
    private_runtime_dir.symlink_to(tmp_path / "decoy")
    with pytest.raises(PreconditionError, match="is a symbolic link"):
        GuestLock("g", 1, "save").acquire()
    assert files(tmp_path / "decoy") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chowns the directory")
def test_a_runtime_directory_of_another_owner_is_refused(private_runtime_dir: Path) -> None:
    private_runtime_dir.mkdir(mode=0o700)
    os.chown(private_runtime_dir, 4321, 4321)
    with pytest.raises(PreconditionError, match="is owned by uid 4321"):
        JournalStore("g").load()


def test_a_file_in_place_of_the_runtime_directory_is_refused(private_runtime_dir: Path) -> None:
    private_runtime_dir.write_text("")
    with pytest.raises(PreconditionError, match="is not a directory"):
        _runtime.runtime_dir()


# --- keys ------------------------------------------------------------------------------------

NAME_HASH = "name-" + __import__("hashlib").sha256(b"web 1/x").hexdigest()[:32]


@pytest.mark.parametrize("uuid, name, pid, key", [
    (UUID.upper(), "web", 1, UUID),
    (UUID, None, 1, UUID),
    ("00000000-0000-0000-0000-000000000000", "web 1/x", 1, NAME_HASH),   # nil: no identity
    ("/home/u/k", "web 1/x", 1, NAME_HASH),                               # the attack: a path
    ("../../../../etc/shadow", "web 1/x", 1, NAME_HASH),
    ("{" + UUID + "}", "web 1/x", 1, NAME_HASH),                          # uuid.UUID would take these,
    ("urn:uuid:" + UUID, "web 1/x", 1, NAME_HASH),                        # QEMU would not
    (UUID.replace("-", ""), "web 1/x", 1, NAME_HASH),
    (UUID[:-1] + "\n", "web 1/x", 1, NAME_HASH),
    (None, None, 42, "pid-42"),
    ("/x", "", 42, "pid-42"),
])
def test_guest_keys(uuid, name, pid, key) -> None:
    assert guest_key(uuid, name, pid) == key


@given(st.one_of(st.none(), st.text()), st.one_of(st.none(), st.text()), st.integers(1, 2 ** 22))
def test_every_key_is_a_plain_file_name_and_stable(uuid, name, pid) -> None:
    key = guest_key(uuid, name, pid)
    assert FILE_NAME.fullmatch(f"{key}.save-journal.json")
    assert guest_key(uuid, name, pid) == key  # a save and a restore of the same guest meet


def test_names_that_differ_get_different_keys() -> None:
    assert guest_key(None, "a", 1) != guest_key(None, "b", 1)
    assert guest_key(None, "\udcff", 1) != guest_key(None, "\udcfe", 1)  # undecodable bytes, as fsdecode gives them


# --- locks -----------------------------------------------------------------------------------

def test_a_second_lock_waits_and_gives_up_naming_the_holder() -> None:
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from ansible_collections.savestate.qemu.plugins.module_utils._runtime import GuestLock\n"
        "from ansible_collections.savestate.qemu.plugins.module_utils import _runtime\n"
        f"_runtime.ROOT_RUNTIME_DIR = {_runtime.ROOT_RUNTIME_DIR!r}\n"
        "with GuestLock('g', 5, 'save to /x'):\n"
        "    print('locked', flush=True); time.sleep(30)\n")],
        stdout=subprocess.PIPE, text=True, env=CHILD_ENV)
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


def test_the_lock_file_is_removed_on_release(private_runtime_dir: Path) -> None:
    with GuestLock("g", 1, "save") as lock:
        assert files(private_runtime_dir) == ["g.lock"]
        assert Path(lock.path).read_text().startswith("save, pid ")
    assert files(private_runtime_dir) == []


def test_locks_still_serialise_while_their_files_come_and_go(tmp_path: Path) -> None:
    """Processes that each read, bump and write a counter under the lock lose no update."""
    counter = tmp_path / "counter"
    counter.write_text("0")
    rounds, workers = 25, 4
    code = (
        "import sys, time\n"
        "from ansible_collections.savestate.qemu.plugins.module_utils._runtime import GuestLock\n"
        "from ansible_collections.savestate.qemu.plugins.module_utils import _runtime\n"
        f"_runtime.ROOT_RUNTIME_DIR = {_runtime.ROOT_RUNTIME_DIR!r}\n"
        "_runtime.LOCK_POLL_INTERVAL = 0.001\n"
        f"for _ in range({rounds}):\n"
        "    with GuestLock('g', 60, 'count'):\n"
        f"        value = int(open({str(counter)!r}).read())\n"
        "        time.sleep(0.002)\n"
        f"        open({str(counter)!r}, 'w').write(str(value + 1))\n")
    processes = [subprocess.Popen([sys.executable, "-c", code], env=CHILD_ENV) for _worker in range(workers)]
    assert [process.wait(120) for process in processes] == [0] * workers
    assert int(counter.read_text()) == rounds * workers


def test_a_symlink_planted_at_the_lock_is_not_followed(private_runtime_dir: Path, outside: Path) -> None:
    private_runtime_dir.mkdir(mode=0o700)
    (private_runtime_dir / "g.lock").symlink_to(outside)
    with GuestLock("g", 1, "save"):
        assert not (private_runtime_dir / "g.lock").is_symlink()
    assert unchanged(outside)


def test_a_dangling_symlink_at_the_lock_creates_nothing_outside(private_runtime_dir: Path, outside: Path) -> None:
    private_runtime_dir.mkdir(mode=0o700)
    (private_runtime_dir / "g.lock").symlink_to(outside.parent / "new")
    with GuestLock("g", 1, "save"):
        pass
    assert unchanged(outside)


def test_a_fifo_at_the_lock_does_not_block(private_runtime_dir: Path) -> None:
    private_runtime_dir.mkdir(mode=0o700)
    os.mkfifo(private_runtime_dir / "g.lock")
    with GuestLock("g", 1, "save"):
        assert stat.S_ISREG(os.lstat(private_runtime_dir / "g.lock").st_mode)


# --- journals --------------------------------------------------------------------------------

def journal() -> SaveJournal:
    me = os.getpid()
    return SaveJournal(me, process_start_time(me), True, "/d/.x.partial", "/d/x", "raw")


def test_journal_round_trip_and_process_identity() -> None:
    store = JournalStore("guest")
    assert store.load() is None
    store.store(journal())
    loaded = store.load()
    assert loaded == journal() and loaded.matches_process(os.getpid())
    assert not SaveJournal(os.getpid(), 1, True, "", "", "raw").matches_process(os.getpid())
    store.remove()
    assert store.load() is None


def test_unreadable_journal_counts_as_absent() -> None:
    store = JournalStore("guest")
    _runtime.runtime_dir()
    with open(store.path, "w", encoding="utf-8") as handle:
        handle.write("{not json")
    assert store.load() is None
    assert not os.path.exists(store.path)


GOOD = {"pid": 10, "process_start": 5, "was_running": True, "temp_path": "/t", "final_path": "/f",
        "image_format": "raw", "helper_pid": None}


@pytest.mark.parametrize("content", [
    [1, 2],
    "a string",
    {**GOOD, "pid": "10"},
    {**GOOD, "pid": True},
    {**GOOD, "pid": 0},
    {**GOOD, "pid": -1},
    {**GOOD, "pid": 10.0},
    {**GOOD, "pid": 2 ** 70},
    {**GOOD, "was_running": 1},
    {**GOOD, "temp_path": None},
    {**GOOD, "temp_path": ["/t"]},
    {**GOOD, "final_path": "/f\0/etc/passwd"},
    {**GOOD, "image_format": {"x": 1}},
    {**GOOD, "helper_pid": "7"},
    {**GOOD, "surprise": 1},
    {k: v for k, v in GOOD.items() if k != "final_path"},
])
def test_a_journal_with_wrong_types_is_discarded(content) -> None:
    store = JournalStore("guest")
    Path(store.path).parent.mkdir(mode=0o700, exist_ok=True)
    Path(store.path).write_text(json.dumps(content))
    assert store.load() is None
    assert not os.path.exists(store.path)


def test_a_journal_without_helper_pid_is_complete() -> None:
    store = JournalStore("guest")
    Path(store.path).parent.mkdir(mode=0o700, exist_ok=True)
    Path(store.path).write_text(json.dumps({k: v for k, v in GOOD.items() if k != "helper_pid"}))
    assert store.load() == SaveJournal(10, 5, True, "/t", "/f", "raw")


def test_a_journal_is_read_only_up_to_a_bound() -> None:
    store = JournalStore("guest")
    Path(store.path).parent.mkdir(mode=0o700, exist_ok=True)
    Path(store.path).write_text(json.dumps({**GOOD, "temp_path": "/" + "x" * 100_000}))
    assert store.load() is None


def test_a_symlink_at_the_journal_is_neither_read_nor_written_through(private_runtime_dir: Path, outside: Path) -> None:
    store = JournalStore("guest")
    private_runtime_dir.mkdir(mode=0o700)
    outside.write_text(json.dumps(GOOD))  # a journal that would be believed if the link were followed
    outside.rename(outside.parent / "precious.json")
    (private_runtime_dir / store.name).symlink_to(outside.parent / "precious.json")
    assert store.load() is None
    assert not (private_runtime_dir / store.name).exists()
    (private_runtime_dir / store.name).symlink_to(outside.parent / "precious.json")
    store.store(journal())
    assert json.loads((outside.parent / "precious.json").read_text()) == GOOD
    assert store.load() == journal()


def test_a_fifo_at_the_journal_does_not_block(private_runtime_dir: Path) -> None:
    store = JournalStore("guest")
    private_runtime_dir.mkdir(mode=0o700)
    os.mkfifo(private_runtime_dir / store.name)
    started = time.monotonic()
    assert store.load() is None
    assert time.monotonic() - started < 1
    assert not (private_runtime_dir / store.name).exists()


# --- QEMU logs and cleanup -------------------------------------------------------------------

def test_a_log_names_the_qemu_writing_it_and_goes_once_that_qemu_is_gone(private_runtime_dir: Path) -> None:
    path, fd = create_qemu_log(UUID)
    try:
        process = subprocess.Popen(["sh", "-c", "echo started; read x"], stdin=subprocess.PIPE,
                                   stdout=fd, stderr=fd)
    finally:
        os.close(fd)
    path = claim_qemu_log(path, process.pid)
    assert files(private_runtime_dir) == [f"{UUID}.qemu-{process.pid}.log"]
    remove_stale_files()
    assert files(private_runtime_dir) == [f"{UUID}.qemu-{process.pid}.log"]  # still running
    process.communicate(b"\n")
    assert Path(path).read_text() == "started\n"
    remove_stale_files()
    assert files(private_runtime_dir) == []


def test_a_log_of_a_reused_pid_goes(private_runtime_dir: Path) -> None:
    _runtime.runtime_dir()
    (private_runtime_dir / f"{UUID}.qemu-{os.getpid()}.log").write_text("old")  # our pid, not our stdout
    remove_stale_files()
    assert files(private_runtime_dir) == []


def test_cleanup_keeps_what_a_run_in_progress_uses(private_runtime_dir: Path) -> None:
    with GuestLock(UUID, 1, "restore"):
        path, fd = create_qemu_log(UUID)  # a restore starting its QEMU: create_qemu_log sweeps
        os.close(fd)
        (private_runtime_dir / f"{UUID}.qemu-999999.log").write_text("")
        remove_stale_files()
        assert files(private_runtime_dir) == sorted([f"{UUID}.lock", f"{UUID}.qemu-999999.log",
                                                     os.path.basename(path)])
    remove_stale_files()
    assert files(private_runtime_dir) == []


def test_a_restore_cleans_up_after_the_earlier_qemu_of_its_own_guest(private_runtime_dir: Path) -> None:
    with GuestLock(UUID, 1, "restore"):
        (private_runtime_dir / f"{UUID}.qemu-999999.log").write_text("")  # that QEMU was killed
        path, fd = create_qemu_log(UUID)
        os.close(fd)
        assert files(private_runtime_dir) == sorted([f"{UUID}.lock", os.path.basename(path)])


def test_cleanup_removes_sockets_nothing_listens_on(private_runtime_dir: Path) -> None:
    _runtime.runtime_dir()
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(private_runtime_dir / "live.qmp"))
    live.listen()
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(private_runtime_dir / "dead.qmp"))
    dead.listen()
    dead.close()  # a killed QEMU leaves its socket file behind
    (private_runtime_dir / "junk.qmp").write_text("")
    try:
        remove_stale_files()
        assert files(private_runtime_dir) == ["live.qmp"]
    finally:
        live.close()


def test_cleanup_removes_locks_journals_and_temporary_files_of_the_gone(private_runtime_dir: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    JournalStore("alive").store(journal())
    JournalStore("dead").store(SaveJournal(dead.pid, 1, True, "/t", "/f", "raw"))
    for name in ("old.lock", f"x.save-journal.json.{dead.pid}.tmp", f"schema-facts-ab.json.{dead.pid}.tmp",
                 "qemu-schema-facts.json", "x.starting.log", "someone-elses-file"):
        (private_runtime_dir / name).write_text("")
    remove_stale_files()
    assert files(private_runtime_dir) == ["alive.save-journal.json", "someone-elses-file"]


# --- the schema cache ------------------------------------------------------------------------

def test_the_schema_cache_is_named_by_a_hash_and_checks_what_it_reads(private_runtime_dir: Path) -> None:
    binary = "/usr/bin/env"
    assert SchemaFactsCache.lookup(binary, (10, 0, 2)) is None
    SchemaFactsCache.store(binary, (10, 0, 2), {"file_transport": True, "exit_on_error": False})
    assert SchemaFactsCache.lookup(binary, (10, 0, 2)) == {"file_transport": True, "exit_on_error": False}
    assert SchemaFactsCache.lookup(binary, (10, 0, 3)) is None  # another build
    [name] = files(private_runtime_dir)
    assert FILE_NAME.fullmatch(name) and name.startswith("schema-facts-") and "env" not in name
    record = json.loads((private_runtime_dir / name).read_text())
    record["facts"]["file_transport"] = "yes"
    (private_runtime_dir / name).write_text(json.dumps(record))
    assert SchemaFactsCache.lookup(binary, (10, 0, 2)) is None


def test_a_symlink_at_the_schema_cache_is_not_followed(private_runtime_dir: Path, outside: Path) -> None:
    SchemaFactsCache.store("/usr/bin/env", (1, 0, 0), {"file_transport": True, "exit_on_error": True})
    [name] = files(private_runtime_dir)
    (private_runtime_dir / name).unlink()
    (private_runtime_dir / name).symlink_to(outside)
    assert SchemaFactsCache.lookup("/usr/bin/env", (1, 0, 0)) is None
    SchemaFactsCache.store("/usr/bin/env", (1, 0, 0), {"file_transport": True, "exit_on_error": True})
    assert unchanged(outside)
