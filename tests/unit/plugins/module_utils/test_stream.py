"""Route planning and the exec: command of _stream (the rest runs against real QEMU)."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._errors import MigrationError, PreconditionError
from ansible_collections.savestate.qemu.plugins.module_utils._image import ImageFormat
from ansible_collections.savestate.qemu.plugins.module_utils._stream import (
    SPARSE_CHANNELS_CAP,
    UNLIMITED_BANDWIDTH,
    Features,
    HelperProcess,
    default_channels,
    exec_command,
    plan_restore,
    plan_save,
)

QEMU_10 = Features(can_pass_fds=True, file_transport=True, mapped_ram=True, multifd=True,
                   direct_io=True, file_offset_truncates=False)
QEMU_72 = Features(can_pass_fds=True, file_transport=False, mapped_ram=False, multifd=True,
                   direct_io=False, file_offset_truncates=False)
QEMU_90 = Features(can_pass_fds=True, file_transport=True, mapped_ram=True, multifd=True,
                   direct_io=False, file_offset_truncates=True)


def tcp(features: Features) -> Features:
    return Features(**{**features.__dict__, "can_pass_fds": False})


@pytest.mark.parametrize("features, image_format, route", [
    (QEMU_10, ImageFormat.RAW, "fdset"),
    (QEMU_10, ImageFormat.SPARSE, "fdset"),
    (QEMU_10, ImageFormat.ZSTD, "socket"),
    (QEMU_72, ImageFormat.RAW, "fd"),
    (QEMU_72, ImageFormat.GZIP, "socket"),
    (QEMU_90, ImageFormat.RAW, "fd"),          # file: with offset wiped the header before 9.0.2
    (tcp(QEMU_10), ImageFormat.RAW, "path"),
    (tcp(QEMU_10), ImageFormat.SPARSE, "path"),
    (tcp(QEMU_10), ImageFormat.XZ, "exec"),
    (tcp(QEMU_72), ImageFormat.RAW, "exec"),
    (tcp(QEMU_72), ImageFormat.LZOP, "exec"),
])
def test_save_routes(features, image_format, route):
    plan = plan_save(image_format, features)
    assert plan.route == route
    assert plan.parameters["max-bandwidth"] == UNLIMITED_BANDWIDTH


def test_sparse_save_settings():
    plan = plan_save(ImageFormat.SPARSE, QEMU_10, parallel_channels=4, bypass_cache=True)
    assert plan.capabilities == {"mapped-ram": True, "multifd": True}
    assert plan.parameters["multifd-channels"] == 4 and plan.parameters["direct-io"] is True


def test_sparse_channels_default_to_the_cores_capped():
    expected = max(1, min(len(os.sched_getaffinity(0)), SPARSE_CHANNELS_CAP))
    assert default_channels(ImageFormat.SPARSE) == expected
    assert plan_save(ImageFormat.SPARSE, QEMU_10).parameters["multifd-channels"] == expected
    assert plan_restore(ImageFormat.SPARSE, QEMU_10).parameters["multifd-channels"] == 1  # loads keep 1


def test_an_explicit_channel_count_wins_over_the_default():
    assert plan_save(ImageFormat.SPARSE, QEMU_10, parallel_channels=1).parameters["multifd-channels"] == 1


@pytest.mark.parametrize("image_format", [ImageFormat.RAW, ImageFormat.ZSTD])
def test_stream_formats_default_to_one_channel(image_format):
    assert default_channels(image_format) == 1
    plan_save(image_format, QEMU_10)  # no "only supported with sparse" refusal for the default
    plan_restore(image_format, QEMU_10)


def test_stream_formats_switch_mapped_ram_and_multifd_off():
    plan = plan_save(ImageFormat.RAW, QEMU_10)
    assert plan.capabilities == {"mapped-ram": False, "multifd": False}


@pytest.mark.parametrize("features, image_format, options, message", [
    (QEMU_72, ImageFormat.SPARSE, {}, "sparse is not supported by this QEMU binary"),
    (QEMU_90, ImageFormat.SPARSE, {"bypass_cache": True}, "direct-io"),
    (QEMU_10, ImageFormat.RAW, {"parallel_channels": 2}, "only supported with the 'sparse'"),
    (QEMU_10, ImageFormat.ZSTD, {"bypass_cache": True}, "only supported with the 'sparse'"),
    (QEMU_10, ImageFormat.SPARSE, {"parallel_channels": 0}, "cannot be less than 1"),
])
def test_impossible_saves_are_refused(features, image_format, options, message):
    with pytest.raises(PreconditionError, match=message):
        plan_save(image_format, features, **options)


@pytest.mark.parametrize("features, image_format, route", [
    (QEMU_10, ImageFormat.RAW, "fdset"),
    (QEMU_10, ImageFormat.SPARSE, "fdset"),
    (QEMU_10, ImageFormat.BZIP2, "socket"),
    (QEMU_72, ImageFormat.RAW, "fd"),
    (QEMU_72, ImageFormat.ZSTD, "socket"),
])
def test_restore_routes(features, image_format, route):
    plan = plan_restore(image_format, features)
    assert plan.route == route
    assert "max-bandwidth" not in plan.parameters


def test_restore_needs_a_unix_monitor():
    with pytest.raises(PreconditionError, match="unix-socket monitor"):
        plan_restore(ImageFormat.RAW, tcp(QEMU_10))


@pytest.mark.parametrize("name", ["plain.save", "it's.save", 'say "hi".save', "new\nline.save",
                                  "$(touch pwned).save", "`id`;rm -rf x.save", "naïve ü.save"])
def test_exec_command_appends_to_exactly_that_file(tmp_path, name):
    """Run the command through a real shell: the bytes land in the named file, nothing else runs."""
    target = tmp_path / name
    target.write_bytes(b"HEADER")
    plan = plan_save(ImageFormat.RAW, tcp(QEMU_72))
    subprocess.run(["/bin/sh", "-c", exec_command(plan, str(target))], input=b"STREAM", check=True,
                   cwd=tmp_path)
    assert target.read_bytes() == b"HEADERSTREAM"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_exec_command_compresses(tmp_path):
    target = tmp_path / "image"
    plan = plan_save(ImageFormat.GZIP, tcp(QEMU_72))
    subprocess.run(["/bin/sh", "-c", exec_command(plan, str(target))], input=b"x" * 10000, check=True)
    assert target.read_bytes()[:2] == b"\x1f\x8b"


def test_helper_process_failure_carries_its_message(tmp_path):
    reader, writer = socket.socketpair()
    with reader, writer, open(tmp_path / "out", "wb") as out:
        helper = HelperProcess(("gzip", "-dc"), reader.fileno(), out.fileno())
        writer.sendall(b"not gzip data")
        writer.shutdown(socket.SHUT_WR)
        with pytest.raises(MigrationError, match="gzip exited with status 1: .*not in gzip format"):
            helper.wait(10)
        helper.close()


def test_missing_helper_program():
    with pytest.raises(MigrationError, match="cannot run no-such-compressor"):
        HelperProcess(("no-such-compressor",), 0, 1)
