"""guest_info's disk list: local disk paths read from a (hostile) QEMU command line."""

from __future__ import annotations

import json

from ansible_collections.savestate.qemu.plugins.module_utils._host import (
    MAX_DISK_PATH,
    MAX_DISKS,
    GuestDisk,
    guest_disks,
)

QEMU = "/usr/bin/qemu-system-x86_64"


def _paths(argv: list[str], cwd: str | None = None) -> list[tuple[str, bool, str]]:
    return [(d.path, d.read_only, d.option) for d in guest_disks([QEMU] + argv, cwd)]


def test_drive_file_and_read_only_flags():
    argv = ["-drive", "file=/srv/a.qcow2,format=qcow2,if=virtio",
            "-drive", "file=/srv/b.raw,readonly=on,if=virtio",
            "-drive", "file=/srv/c.iso,media=cdrom",
            "-drive", "file.filename=/srv/d.raw,file.driver=file,read-only=on"]
    assert _paths(argv) == [("/srv/a.qcow2", False, "drive"), ("/srv/b.raw", True, "drive"),
                            ("/srv/c.iso", True, "drive"), ("/srv/d.raw", True, "drive")]


def test_escaped_commas_stay_in_the_path():
    assert _paths(["-drive", "file=/srv/a,,b.raw,format=raw"]) == [("/srv/a,b.raw", False, "drive")]


def test_blockdev_key_value_names_the_file_not_the_child_node():
    argv = ["-blockdev", "driver=file,node-name=proto0,filename=/srv/disk.qcow2",
            "-blockdev", "driver=qcow2,node-name=fmt0,file=proto0,read-only=on"]
    assert _paths(argv) == [("/srv/disk.qcow2", False, "blockdev")]


def test_blockdev_json_nested_and_read_only_inherited():
    node = {"driver": "qcow2", "node-name": "fmt", "read-only": True,
            "file": {"driver": "file", "filename": "/srv/base.qcow2"}}
    writable = {"driver": "raw", "file": {"driver": "host_device", "filename": "/dev/vg/lv"}}
    argv = ["-blockdev", json.dumps(node), "-blockdev", json.dumps(writable)]
    assert _paths(argv) == [("/srv/base.qcow2", True, "blockdev"), ("/dev/vg/lv", False, "blockdev")]


def test_shorthand_options():
    assert _paths(["-hda", "/srv/h.raw", "-cdrom", "/srv/i.iso"]) == [
        ("/srv/h.raw", False, "hda"), ("/srv/i.iso", True, "cdrom")]


def test_relative_paths_resolve_against_qemu_cwd():
    assert _paths(["-drive", "file=disks/a.raw"], cwd="/var/lib/qemu") == [("/var/lib/qemu/disks/a.raw", False, "drive")]


def test_protocols_descriptors_and_junk_are_not_local_disks():
    argv = ["-drive", "file=nbd:localhost:10809", "-drive", "file=json:{\"driver\":\"nbd\"}",
            "-drive", "file=/dev/fd/3", "-drive", "file=iscsi://t/iqn/0",
            "-blockdev", "{not json", "-blockdev", "driver=nbd,server.host=h",
            "-drive", "file=/srv/" + "x" * MAX_DISK_PATH, "-drive", "if=none,id=empty",
            "-name", "file=/srv/not-a-disk"]
    assert _paths(argv) == []


def test_a_path_opened_writable_anywhere_counts_as_writable():
    argv = ["-drive", "file=/srv/a.raw,readonly=on", "-drive", "file=/srv/a.raw"]
    assert _paths(argv) == [("/srv/a.raw", False, "drive")]


def test_the_list_is_bounded():
    argv = [arg for n in range(MAX_DISKS + 50) for arg in ("-drive", f"file=/srv/{n}.raw")]
    assert len(guest_disks([QEMU] + argv)) == MAX_DISKS


def test_deep_json_is_not_followed_forever():
    node: dict = {"filename": "/srv/deep.raw"}
    for _level in range(200):
        node = {"driver": "raw", "file": node}
    assert guest_disks([QEMU, "-blockdev", json.dumps(node)]) == []


def test_option_values_are_not_mistaken_for_options():
    # "-drive" as the value of -name is not an option.
    assert _paths(["-name", "-drive", "-drive", "file=/srv/a.raw"]) == [("/srv/a.raw", False, "drive")]


def test_report_shape():
    assert GuestDisk("/srv/a.raw", True, "drive").report() == {"path": "/srv/a.raw", "read_only": True, "option": "drive"}


def test_json_nested_beyond_the_parser_is_skipped_not_raised():
    hostile = '{"file":' * 100000 + '{}' + '}' * 100000
    assert guest_disks([QEMU, "-blockdev", hostile, "-drive", "file=/srv/a.raw"]) == [GuestDisk("/srv/a.raw", False, "drive")]
