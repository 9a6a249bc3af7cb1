"""The systemd helpers that need no systemd: cgroup parsing, quoting, properties, the image record.

What systemd does with them (units started, stopped, restored) is tested on a
real systemd host in tests/integration/test_systemd.py.
"""

from __future__ import annotations

import os

import pytest

from ansible_collections.savestate.qemu.plugins.module_utils._domainxml import GuestRecord, build_domain_xml, parse_domain_xml
from ansible_collections.savestate.qemu.plugins.module_utils._errors import DomainXMLError
from ansible_collections.savestate.qemu.plugins.module_utils._systemd import (
    UnitRecord,
    booted_after_save,
    exec_quote,
    guest_unit,
    plan_placement,
    systemd_booted,
    transient_properties,
    unit_escape,
    unit_of_cgroup,
)

CGROUP2 = "0::/system.slice/system-qemu.slice/qemu@g1.service\n"
LEGACY = ("12:memory:/system.slice/qemu@g1.service\n1:name=systemd:/machine.slice/savestate-qemu-g1.scope\n"
          "0::/\n")


def test_unit_of_cgroup_reads_cgroup2_and_legacy_hierarchies():
    assert unit_of_cgroup(CGROUP2) == "qemu@g1.service"
    assert unit_of_cgroup(LEGACY) == "savestate-qemu-g1.scope"
    assert unit_of_cgroup("0::/user.slice/user-0.slice/session-3.scope\n") == "session-3.scope"
    assert unit_of_cgroup("0::/\n") is None
    assert unit_of_cgroup("") is None


def test_exec_quote_escapes_what_systemd_would_expand():
    assert exec_quote(["/usr/bin/qemu", "-name", "guest=a b"]) == '"/usr/bin/qemu" "-name" "guest=a b"'
    assert exec_quote(['50%', '$HOME', 'say "hi"', 'back\\slash', 'two\nlines']) == \
        '"50%%" "$$HOME" "say \\"hi\\"" "back\\\\slash" "two\\nlines"'


def test_unit_escape_is_systemd_escape():
    assert unit_escape("web01") == "web01"
    assert unit_escape("web-01") == "web\\x2d01"
    assert unit_escape("a b/ü") == "a\\x20b-\\xc3\\xbc"
    assert unit_escape(".hidden") == "\\x2ehidden"


def test_transient_properties_keep_what_was_set_and_translate_show_names():
    state = {"Slice": "machine.slice", "MemoryMax": "314572800", "MemoryHigh": "infinity", "TasksMax": "200",
             "CPUQuotaPerSecUSec": "500ms", "Restart": "always", "RestartUSec": "1s", "User": "",
             "TimeoutStopUSec": "1min 30s", "Environment": "A=1 B=2"}
    assert dict(transient_properties(state)) == {
        "Slice": "machine.slice", "MemoryMax": "314572800", "TasksMax": "200", "CPUQuota": "50%",
        "Restart": "always", "RestartSec": "1s", "Environment": "A=1 B=2"}
    assert transient_properties({"Slice": "system.slice", "MemoryMax": "infinity", "Restart": "no"}) == ()


def test_unit_record_round_trips_through_the_image_xml():
    unit = UnitRecord("vm-web.service", "transient", (("MemoryMax", "314572800"), ("Description", "it's\n\"odd\"")))
    guest = GuestRecord(name="web", uuid="4c7a1a3e-30b6-4e55-9a55-3d7d2a1b0c11", memory_kib=131072,
                        machine="pc-i440fx-10.0", argv=("/usr/bin/qemu-system-x86_64",), unit=unit)
    xml = build_domain_xml(guest)
    assert '<savestate:unit name="vm-web.service" kind="transient">' in xml
    parsed = parse_domain_xml(xml)
    assert parsed.unit == unit
    assert parsed.metadata()["unit"] == {"name": "vm-web.service", "kind": "transient",
                                         "properties": {"MemoryMax": "314572800", "Description": "it's\n\"odd\""}}
    no_unit = GuestRecord(name="web", uuid="4c7a1a3e-30b6-4e55-9a55-3d7d2a1b0c11", memory_kib=131072,
                          machine="pc-i440fx-10.0", argv=("/usr/bin/qemu-system-x86_64",))
    assert parse_domain_xml(build_domain_xml(no_unit)).unit is None
    assert "savestate:unit" not in build_domain_xml(no_unit)


def test_a_unit_record_without_a_kind_is_refused():
    unit = UnitRecord("qemu@g1.service", "persistent")
    guest = GuestRecord(name="web", uuid="4c7a1a3e-30b6-4e55-9a55-3d7d2a1b0c11", memory_kib=131072,
                        machine="pc-i440fx-10.0", argv=("/usr/bin/qemu-system-x86_64",), unit=unit)
    xml = build_domain_xml(guest).replace('kind="persistent"', 'kind="other"')
    with pytest.raises(DomainXMLError, match="kind"):
        parse_domain_xml(xml)


@pytest.mark.skipif(os.path.isdir("/run/systemd/system"), reason="this host runs systemd")
def test_without_systemd_the_guest_runs_as_today():
    assert not systemd_booted()
    assert guest_unit(os.getpid()) is None
    recorded = UnitRecord("qemu@g1.service", "persistent")
    placement = plan_placement(recorded, "auto", "g1")
    assert placement.kind is None and "systemd is not running" in (placement.note or "")
    assert plan_placement(None, "auto", "g1").kind is None and plan_placement(None, "auto", "g1").note is None
    assert plan_placement(recorded, "none", "g1").kind is None


def test_a_process_started_after_the_save_is_reported():
    assert booted_after_save("2000-01-01T00:00:00+00:00", os.getpid()).startswith(" and was booted afresh")
    assert booted_after_save("2999-01-01T00:00:00+00:00", os.getpid()) == ""
    assert booted_after_save(None, os.getpid()) == ""
    assert booted_after_save("not a date", os.getpid()) == ""
