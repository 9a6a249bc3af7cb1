"""guest_move's stream helper (roles/guest_move/files/move_stream.py): on the source it sends
a save image, finished or while the save writes it; on the destination it writes the copy; both
ends hash what they move.

A writer thread does what the save does, with the save's own image code: mkstemp
``.<name>.XXXXXXXX.partial`` beside the image, the partial-magic header and XML, the stream
appended in pieces, then fsync, the final magic at offset 0, fsync, rename (or, when the save
fails, unlink). The follower runs for real on real files and writes into a real pipe.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Optional

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._image import (
    MAGIC_COMPLETE,
    MAGIC_PARTIAL,
    ImageFormat,
    finalize_image,
    write_new_image,
)

SCRIPT = Path(__file__).resolve().parents[2] / "roles" / "guest_move" / "files" / "move_stream.py"
XML = "<domain type='kvm'><name>ssq-follow</name></domain>"
PIECE = 256 * 1024


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("move_stream", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mf = _load()


class Save(threading.Thread):
    """A save of ``path``: ``pieces`` pieces of the stream, ``pause`` seconds apart.

    ``outcome``: ``done`` (final magic, rename), ``failed`` (unlink after ``pieces``),
    ``stalled`` (stops after ``pieces``, keeps the file until ``release`` is set),
    ``unsealed`` (renamed without the final magic)."""

    def __init__(self, path: Path, pieces: int = 8, pause: float = 0.02, outcome: str = "done") -> None:
        super().__init__(daemon=True)
        self.path, self.pieces, self.pause, self.outcome = path, pieces, pause, outcome
        self.temp: Optional[Path] = None
        self.created = threading.Event()
        self.release = threading.Event()
        self.renamed_at = 0.0

    def run(self) -> None:
        fd, temp = tempfile.mkstemp(dir=self.path.parent, suffix=".partial", prefix=f".{self.path.name}.")
        self.temp = Path(temp)
        try:
            header = write_new_image(fd, XML, None, True, ImageFormat.RAW)
            self.created.set()
            os.write(fd, b"QEVM\x00\x00\x00\x03")
            for number in range(self.pieces):
                time.sleep(self.pause)
                os.write(fd, bytes([number % 251]) * PIECE)
            if self.outcome == "failed":
                os.unlink(temp)
                return
            if self.outcome == "stalled":
                self.release.wait(30)
                os.unlink(temp)
                return
            if self.outcome == "done":
                finalize_image(fd, header)
            os.rename(temp, self.path)
            self.renamed_at = time.time()
        finally:
            os.close(fd)


class Reader(threading.Thread):
    """The other end of the follower's pipe: collects everything (the images here are small)."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.data = bytearray()

    def run(self) -> None:
        while True:
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                break
            self.data += chunk
        os.close(self.fd)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    directory = tmp_path / "move"
    directory.mkdir(mode=0o700)
    return directory / "ssq-follow.save"


def _follow(image: Path, since_ns: int, timeout: float = 10.0) -> tuple[Optional[object], bytes, Optional[Exception]]:
    """Run the follower into a pipe; its report (or the error it raised) and what came out."""
    read_end, write_end = os.pipe()
    reader = Reader(read_end)
    reader.start()
    report, error = None, None
    pump = mf.Pump(hashlib.sha256())
    try:
        report = mf.follow(str(image), since_ns, timeout, pump, write_end)
    except mf.FollowError as raised:
        error = raised
    finally:
        os.close(write_end)
        reader.join(10)
    # Whatever went out, the digest is of exactly that.
    assert pump.digest.hexdigest() == hashlib.sha256(reader.data).hexdigest()
    return report, bytes(reader.data), error


def _as_streamed(final: bytes) -> bytes:
    """The image as the follower sends it: the partial magic it read before the save ended."""
    return MAGIC_PARTIAL + final[len(MAGIC_PARTIAL):]


@pytest.fixture
def now_ns() -> Iterator[int]:
    yield time.time_ns()


def test_follows_a_growing_save_to_its_rename(image: Path, now_ns: int) -> None:
    save = Save(image, pieces=12, pause=0.03)
    save.start()
    report, sent, error = _follow(image, now_ns)
    save.join()
    assert error is None
    final = image.read_bytes()
    assert final.startswith(MAGIC_COMPLETE)
    assert sent == _as_streamed(final) and report.size == len(final)
    # It sent while the save was writing: the overlap (all of it, when it kept up).
    assert 0 < report.before_final <= report.size
    assert report.first_byte < save.renamed_at <= report.final_seen + 0.01


def test_a_save_that_started_before_the_follower_is_followed_from_its_first_byte(image: Path, now_ns: int) -> None:
    save = Save(image, pieces=6, pause=0.05)
    save.start()
    assert save.created.wait(5)
    time.sleep(0.12)  # a few pieces are written already
    report, sent, error = _follow(image, now_ns)
    save.join()
    assert error is None and sent == _as_streamed(image.read_bytes()) and report.before_final > 0


def test_a_save_that_ended_before_the_follower_looked_is_sent_whole(image: Path, now_ns: int) -> None:
    save = Save(image, pieces=2, pause=0)
    save.start()
    save.join()
    report, sent, error = _follow(image, now_ns)
    assert error is None and sent == image.read_bytes() and report.before_final == 0


def test_a_failed_save_fails_the_follower(image: Path, now_ns: int) -> None:
    save = Save(image, pieces=4, outcome="failed")
    save.start()
    _report, _sent, error = _follow(image, now_ns)
    save.join()
    assert error is not None and "removed its file: the save failed" in str(error)
    assert not image.exists()


def test_a_save_that_stops_writing_fails_the_follower_after_the_timeout(image: Path, now_ns: int) -> None:
    save = Save(image, pieces=2, outcome="stalled")
    save.start()
    started = time.monotonic()
    try:
        _report, sent, error = _follow(image, now_ns, timeout=0.5)
    finally:
        save.release.set()
        save.join()
    assert error is not None and "wrote nothing for 0.5 s" in str(error)
    assert time.monotonic() - started < 5
    assert sent.startswith(MAGIC_PARTIAL)  # what it sent is marked unfinished


def test_no_save_fails_after_the_timeout(image: Path, now_ns: int) -> None:
    image.parent.joinpath("unrelated.partial").write_bytes(MAGIC_PARTIAL + bytes(200))
    _report, sent, error = _follow(image, now_ns, timeout=0.3)
    assert error is not None and "no save of ssq-follow.save started within 0.3 s" in str(error)
    assert sent == b""


def test_a_file_renamed_into_place_without_the_final_magic_is_refused(image: Path, now_ns: int) -> None:
    save = Save(image, pieces=3, outcome="unsealed")
    save.start()
    _report, _sent, error = _follow(image, now_ns)
    save.join()
    assert error is not None and "not marked complete" in str(error)


# -- what the follower must not send ------------------------------------------------------------


def _secret(tmp_path: Path) -> Path:
    """Root's file that looks like a save in progress (so that only the other checks stop it)."""
    secret = tmp_path / "secret"
    secret.write_bytes(MAGIC_PARTIAL + b"SECRET" * 1000)
    return secret


def test_a_symlink_named_like_the_saves_file_is_not_followed(image: Path, tmp_path: Path, now_ns: int) -> None:
    (image.parent / f".{image.name}.abcd1234.partial").symlink_to(_secret(tmp_path))
    _report, sent, error = _follow(image, now_ns, timeout=0.3)
    assert error is not None and b"SECRET" not in sent
    # ... and the real save beside it is followed.
    save = Save(image)
    save.start()
    _report, sent, error = _follow(image, now_ns)
    save.join()
    assert error is None and sent == _as_streamed(image.read_bytes())


def test_a_hard_link_named_like_the_saves_file_is_not_followed(image: Path, tmp_path: Path, now_ns: int) -> None:
    os.link(_secret(tmp_path), image.parent / f".{image.name}.abcd1234.partial")
    _report, sent, error = _follow(image, now_ns, timeout=0.3)
    assert error is not None and b"SECRET" not in sent


def test_a_fifo_named_like_the_saves_file_does_not_hang_the_follower(image: Path, now_ns: int) -> None:
    os.mkfifo(image.parent / f".{image.name}.abcd1234.partial")
    started = time.monotonic()
    _report, _sent, error = _follow(image, now_ns, timeout=0.3)
    assert error is not None and time.monotonic() - started < 5


def test_a_symlink_at_the_images_name_is_not_sent(image: Path, tmp_path: Path, now_ns: int) -> None:
    secret = tmp_path / "secret-final"
    secret.write_bytes(MAGIC_COMPLETE + b"SECRET" * 1000)
    image.symlink_to(secret)
    _report, sent, error = _follow(image, now_ns, timeout=0.3)
    assert error is not None and b"SECRET" not in sent
    with pytest.raises(mf.FollowError, match="not a regular file"):
        mf.head(str(image), mf.Pump(hashlib.sha256()), os.open(os.devnull, os.O_WRONLY))


def test_a_stale_partial_is_ignored_and_the_new_save_followed(image: Path, now_ns: int) -> None:
    # A killed run's leftover (and an older image at the path), both from before the follower's start.
    stale = image.parent / f".{image.name}.stale123.partial"
    stale.write_bytes(MAGIC_PARTIAL + b"STALE" * 1000)
    image.write_bytes(MAGIC_COMPLETE + b"OLDIMAGE" * 1000)
    for old in (stale, image):
        os.utime(old, ns=(now_ns - 60 * 10**9, now_ns - 60 * 10**9))
    _report, sent, error = _follow(image, now_ns, timeout=0.3)
    assert error is not None and "no save" in str(error) and sent == b""
    save = Save(image)
    save.start()
    _report, sent, error = _follow(image, now_ns)
    save.join()
    assert error is None and sent == _as_streamed(image.read_bytes()) and b"STALE" not in sent


def test_two_saves_at_once_are_refused(image: Path, now_ns: int) -> None:
    for name in ("aaaaaaaa", "bbbbbbbb"):
        (image.parent / f".{image.name}.{name}.partial").write_bytes(MAGIC_PARTIAL + bytes(500))
    _report, sent, error = _follow(image, now_ns, timeout=0.3)
    assert error is not None and "several saves" in str(error) and sent == b""


def test_a_partial_of_another_image_is_not_followed(image: Path, now_ns: int) -> None:
    other = Save(image.parent / "other.save", pieces=30, pause=0.01)
    other.start()
    _report, sent, error = _follow(image, now_ns, timeout=0.3)
    other.join()
    assert error is not None and sent == b""


# -- head ---------------------------------------------------------------------------------------


def test_head_sends_the_finished_header_and_xml(image: Path, now_ns: int) -> None:
    save = Save(image, pieces=2)
    save.start()
    save.join()
    read_end, write_end = os.pipe()
    reader = Reader(read_end)
    reader.start()
    length = mf.head(str(image), mf.Pump(hashlib.sha256()), write_end)
    os.close(write_end)
    reader.join(5)
    final = image.read_bytes()
    assert bytes(reader.data) == final[:length] and final[length:length + 4] == b"QEVM"


def test_head_refuses_an_unfinished_image(image: Path) -> None:
    fd = os.open(image, os.O_RDWR | os.O_CREAT, 0o600)
    write_new_image(fd, XML, None, True, ImageFormat.RAW)
    os.close(fd)
    with pytest.raises(mf.FollowError, match="not a complete save image"):
        mf.head(str(image), mf.Pump(hashlib.sha256()), os.open(os.devnull, os.O_WRONLY))


# -- as the forced command runs it ----------------------------------------------------------------


def _run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, timeout=60, check=False)


def test_the_command_line_streams_and_reports(image: Path, now_ns: int) -> None:
    save = Save(image, pieces=10, pause=0.03)
    save.start()
    run = _run("follow", "--image", str(image), "--since", str(now_ns), "--timeout", "10")
    save.join()
    assert run.returncode == 0, run.stderr
    assert hashlib.sha256(run.stdout).digest() == hashlib.sha256(_as_streamed(image.read_bytes())).digest()
    report, digest_line = run.stderr.decode().splitlines()
    assert report.startswith("savestate-move-stream: complete size=")
    assert digest_line == f"{hashlib.sha256(run.stdout).hexdigest()} sha256"


def _finished(image: Path) -> bytes:
    save = Save(image, pieces=6, pause=0)
    save.start()
    save.join()
    return image.read_bytes()


def test_send_streams_the_finished_image_and_its_digest(image: Path) -> None:
    final = _finished(image)
    run = _run("send", "--image", str(image), "--algorithm", "sha512")
    assert run.returncode == 0, run.stderr
    assert run.stdout == final
    assert run.stderr.decode() == f"{hashlib.sha512(final).hexdigest()} sha512\n"


def test_send_refuses_an_unfinished_image_and_a_symlink(image: Path, tmp_path: Path) -> None:
    fd = os.open(image, os.O_RDWR | os.O_CREAT, 0o600)
    write_new_image(fd, XML, None, True, ImageFormat.RAW)
    os.close(fd)
    unfinished = _run("send", "--image", str(image))
    assert unfinished.returncode == 1 and unfinished.stdout == b""
    assert b"is not a complete save image" in unfinished.stderr
    secret = tmp_path / "secret"
    secret.write_bytes(MAGIC_COMPLETE + b"root's secret")
    image.unlink()
    image.symlink_to(secret)
    linked = _run("send", "--image", str(image))
    assert linked.returncode == 1 and linked.stdout == b""


def test_head_prints_the_digest_of_what_it_sent(image: Path) -> None:
    _finished(image)
    run = _run("head", "--image", str(image))
    assert run.returncode == 0, run.stderr
    assert run.stderr.decode().splitlines() == [
        f"savestate-move-stream: head complete length={len(run.stdout)}", f"{hashlib.sha256(run.stdout).hexdigest()} sha256"]


def test_receive_writes_a_private_copy_and_prints_digest_and_size(image: Path, tmp_path: Path) -> None:
    final = _finished(image)
    copy = tmp_path / "copy.partial"
    sender = subprocess.Popen([sys.executable, str(SCRIPT), "send", "--image", str(image)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    received = subprocess.run([sys.executable, str(SCRIPT), "receive", "--output", str(copy)],
                              stdin=sender.stdout, capture_output=True, timeout=60, check=False)
    sent_errors = sender.communicate(timeout=30)[1]
    assert received.returncode == 0 and sender.returncode == 0, (received.stderr, sent_errors)
    digest = hashlib.sha256(final).hexdigest()
    assert received.stdout.decode() == f"{digest} {len(final)}\n"
    assert sent_errors.decode() == f"{digest} sha256\n"
    assert copy.read_bytes() == final and (copy.stat().st_mode & 0o777) == 0o600


def test_receive_never_writes_through_a_link_or_over_a_file(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = tmp_path / "copy.partial"
    link.symlink_to(victim)
    for output in (link, victim):
        run = subprocess.run([sys.executable, str(SCRIPT), "receive", "--output", str(output)],
                             input=b"attacker's bytes", capture_output=True, timeout=60, check=False)
        assert run.returncode == 1 and run.stdout == b"" and b"cannot create" in run.stderr
    assert victim.read_bytes() == b"keep"


def test_the_command_line_fails_with_a_message_not_a_traceback(image: Path, now_ns: int) -> None:
    run = _run("follow", "--image", str(image), "--since", str(now_ns), "--timeout", "0.2")
    assert run.returncode == 1 and run.stdout == b""
    assert run.stderr.decode() == "savestate-move-stream: no save of ssq-follow.save started within 0.2 s\n"
    missing = _run("probe", "--image", "/nonexistent/dir/x.save")
    assert missing.returncode == 1 and b"cannot open the image directory /nonexistent/dir" in missing.stderr
    assert b"Traceback" not in missing.stderr
    ready = _run("probe", "--image", str(image))
    assert ready.returncode == 0 and ready.stdout == b"savestate-move-ready\n"


def test_a_destination_that_stops_reading_ends_the_follower(image: Path, now_ns: int) -> None:
    save = Save(image, pieces=40, pause=0.02)
    save.start()
    process = subprocess.Popen([sys.executable, str(SCRIPT), "follow", "--image", str(image), "--since", str(now_ns)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    process.stdout.read(4096)
    process.stdout.close()  # the destination went away mid-transfer
    errors = process.communicate(timeout=30)[1]
    save.join()
    assert process.returncode == 1 and errors == b"savestate-move-stream: the destination stopped reading\n"
    assert image.read_bytes().startswith(MAGIC_COMPLETE)  # the save was not disturbed
