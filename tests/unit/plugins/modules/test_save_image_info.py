"""save_image_info, run through real Ansible (ansible localhost -m ...) on images made here."""

from __future__ import annotations

import os

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._image import journal_path

from ansible_collections.savestate.qemu.tests.unit.module_runner import run_module
from ansible_collections.savestate.qemu.tests.unit.image_helpers import (
    LIBVIRT_UUID,
    SIMPLE_XML,
    libvirt_image_bytes,
    make_image,
    make_savestate_image,
    savestate_record,
    write_libvirt_fixture,
)

IMAGE_KEYS = {"path", "complete", "version", "format", "was_running", "name", "uuid", "memory_kib", "vcpus",
              "machine", "stream_offset", "size", "origin", "metadata"}


def test_our_image_with_metadata(tmp_path):
    path = make_savestate_image(tmp_path / "web01.save", was_running=False)
    result = run_module("save_image_info", {"path": str(path)}, check=True)
    assert not result["failed"] and not result["changed"], result["_stdout"]
    image = result["image"]
    assert set(image) == IMAGE_KEYS
    assert image == {
        "path": str(path), "complete": True, "version": 2, "format": "raw", "was_running": False, "name": "web01",
        "uuid": "4c7a1a3e-30b6-4e55-9a55-3d7d2a1b0c11", "memory_kib": 131072, "vcpus": 1,
        "machine": "pc-i440fx-10.0", "stream_offset": image["stream_offset"], "size": path.stat().st_size,
        "origin": "savestate", "metadata": result["metadata"]}
    assert image["stream_offset"] == 92 + len(result["xml"].encode()) + 1 + 65536
    assert result["origin"] == "savestate" and result["cookie"] is None
    assert result["metadata"]["argv"] == list(savestate_record().argv)
    assert result["metadata"]["disks"][0]["path"] == "/var/lib/images/web01.qcow2"
    assert result["authenticated"] is True and result["authentication_problem"] is None
    assert result["metadata"]["qemu_version"] == "10.0.2"


def test_libvirt_image(tmp_path):
    path = write_libvirt_fixture(tmp_path, "zstd")
    result = run_module("save_image_info", {"path": str(path)})
    assert not result["failed"], result["_stdout"]
    image = result["image"]
    seen = (image["origin"], image["format"], image["name"], image["uuid"], image["memory_kib"],
            image["was_running"], image["metadata"])
    assert seen == ("libvirt", "zstd", "savetest", LIBVIRT_UUID, 131072, True, None)
    assert result["cookie"].startswith("<cookie>") and result["metadata"] is None


def test_incomplete_image_is_reported_not_failed(tmp_path):
    path = make_image(tmp_path / "partial.save", finalize=False, stream=b"")
    result = run_module("save_image_info", {"path": str(path)})
    assert not result["failed"], result["_stdout"]
    assert result["image"]["complete"] is False and result["image"]["name"] == "simple"
    assert result["xml"] == SIMPLE_XML


def _corrupt(tmp_path, kind):
    path = tmp_path / f"{kind}.save"
    data = libvirt_image_bytes("raw")
    if kind == "magic":
        path.write_bytes(b"X" + data[1:])
    elif kind == "truncated":
        path.write_bytes(data[:500])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "journal":
        path.write_bytes(data)
        with open(journal_path(str(path)), "wb") as journal:
            journal.write(b"damaged")
    elif kind == "bad xml":
        make_image(path, xml="<domain><name>x</name>")
    return path


@pytest.mark.parametrize("kind, message", [
    ("magic", "{path}: image magic is incorrect"),
    ("truncated", "{path}: failed to read domain XML"),
    ("empty", "{path}: failed to read qemu header"),
    ("missing", "{path}: cannot open the save image: No such file or directory"),
    ("journal", "{path}: an interrupted save_image_define left a journal"),
    ("bad xml", "{path}: the domain XML is not well-formed: Premature end of data in tag domain"),
])
def test_unreadable_images_fail_with_the_readers_message(tmp_path, kind, message):
    path = _corrupt(tmp_path, kind)
    result = run_module("save_image_info", {"path": str(path)})
    assert result["failed"]
    assert result["msg"].startswith(message.format(path=path)), result["msg"]
    assert "Traceback" not in result["_stdout"] + result["_stderr"]
    if kind == "journal":
        assert os.path.exists(journal_path(str(path)))  # reading never repairs


def test_authentication_is_reported_not_required(tmp_path):
    """Unauthenticated images are read all the same; the problem says why (restore would refuse them)."""
    libvirt = run_module("save_image_info", {"path": str(write_libvirt_fixture(tmp_path))})
    assert not libvirt["failed"] and libvirt["authenticated"] is False, libvirt.get("msg")
    assert libvirt["authentication_problem"] == "no MAC (libvirt's image or saved before signing)"
    shared = make_savestate_image(tmp_path / "shared.save")
    shared.chmod(0o666)
    result = run_module("save_image_info", {"path": str(shared)})
    assert not result["failed"] and result["authenticated"] is False
    assert result["authentication_problem"].startswith("the file is not protected: it is writable by group or others")
