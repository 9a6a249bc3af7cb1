"""Progress and estimates of the roles: the per-guest lines, the totals line, the check-mode estimate."""

from __future__ import annotations

import re
from typing import Any

from ansible_collections.savestate.qemu.plugins.filter.fleet import (
    drain_estimate,
    drain_rows,
    estimate_lines,
    fleet_totals,
    job_lines,
    restore_rows,
)

MIB = 1048576
LINE = re.compile(r"^(?P<host>\S+): (?P<name>\S+) (?P<verb>saved|restored): (?P<bytes>\d+) bytes "
                  r"\((?P<mib>[\d.]+) MiB\) in (?P<seconds>[\d.]+) s, (?P<rate>[\d.]+) MiB/s$")


def guest(name: str, memory_mib: int = 128) -> dict[str, Any]:
    return {"name": name, "uuid": f"uuid-{name}", "state": "running", "memory_mib": memory_mib}


def job(item: dict[str, Any], **result: Any) -> dict[str, Any]:
    return {"finished": 1, "item": {"ansible_job_id": "j", "item": item}, **result}


def done(item: dict[str, Any], size: int, seconds: float) -> dict[str, Any]:
    return job(item, changed=True, guest={"name": item["name"], "state": "stopped"},
               image={"path": f"/d/{item['name']}.save", "size": size},
               stats={"bytes": size, "duration_s": seconds, "throughput_mib_s": round(size / MIB / seconds, 1)})


def test_one_line_per_guest_with_the_module_figures() -> None:
    results = [done(guest("web1"), 96 * MIB + 12345, 0.4), job(guest("db1"), failed=True, msg="QMP\n busy " + "x" * 300),
               {"finished": 0, "failed": True, "item": {"item": guest("slow")}},
               job(guest("idem"), changed=False, guest={"name": "idem", "state": "stopped"}, msg="already saved")]
    lines = job_lines(results, "hv1.example.com", "drain")
    match = LINE.match(lines[0])
    assert match, lines[0]
    assert match["host"] == "hv1.example.com" and match["name"] == "web1" and match["verb"] == "saved"
    assert int(match["bytes"]) == 96 * MIB + 12345 and match["seconds"] == "0.400"
    assert abs(float(match["rate"]) - int(match["bytes"]) / MIB / 0.4) < 0.1
    assert lines[1].startswith("hv1.example.com: db1 failed: QMP busy x") and len(lines[1]) < 220
    assert lines[2] == "hv1.example.com: slow failed: the job did not finish within its timeout"
    assert lines[3] == "hv1.example.com: idem: already saved"
    assert len(lines) == 4 and all("\n" not in line for line in lines)
    assert LINE.match(job_lines([done(guest("web1"), MIB, 0.01)], "h", "restore")[0])["verb"] == "restored"
    assert job_lines([], "h", "drain") == []


def test_without_a_host_a_line_starts_with_the_guest() -> None:
    # The roles' wait loops label each finished job with its line; Ansible prints the host itself.
    line = job_lines([done(guest("web1"), MIB, 0.5)], "", "drain")[0]
    assert line == "web1 saved: 1048576 bytes (1.0 MiB) in 0.500 s, 2.0 MiB/s"
    assert job_lines([job(guest("db1"), failed=True, msg="boom")], "", "restore") == ["db1 failed: boom"]


def test_the_totals_count_what_this_run_did_over_the_wall_time() -> None:
    a, b, c = guest("a"), guest("b"), guest("c")
    rows = drain_rows([done(a, 100 * MIB, 1.0), done(b, 50 * MIB, 0.5), job(c, failed=True, msg="no")], [],
                      [{"name": "old", "path": "/d/old.save", "size": 10 * MIB}], [], [a, b, c], [], "/d")
    line = fleet_totals(rows, "hv1", "drain", "3.0")
    assert line == f"hv1: drain total: 2 ok, 1 failed; {150 * MIB} bytes (150.0 MiB) in 3.0 s wall, 50.0 MiB/s aggregate"
    restored = restore_rows([done({"name": "a", "path": "/d/a.save", "state": "running"}, 20 * MIB, 0.2)], {}, [], [],
                            [])
    assert fleet_totals(restored, "hv2", "restore", 0) == f"hv2: restore total: 1 ok, 0 failed; {20 * MIB} bytes " \
        "(20.0 MiB) in 0.0 s wall"
    assert fleet_totals([], "hv3", "drain") == "hv3: drain total: 0 ok, 0 failed; 0 bytes (0.0 MiB)"


def test_the_estimate_uses_the_measured_bandwidth_and_says_so() -> None:
    guests = [guest("a", 1024), guest("b", 2048), guest("c", 512)]
    bandwidth = {"raw": {"mib_s": 512.0, "measured_at": "2026-11-30T12:00:00+00:00"}}
    estimate = drain_estimate(guests, "1000 4096", bandwidth, "raw", 2, "/d", 256)
    assert [row["image_bytes_max"] for row in estimate["guests"]] == [1024 * MIB, 2048 * MIB, 512 * MIB]
    assert [row["seconds"] for row in estimate["guests"]] == [2.0, 4.0, 1.0]
    assert estimate["seconds"] == 5.0  # rounds [a, b] then [c]: 4 s + 1 s
    assert estimate["measured"] and estimate["mib_s"] == 512.0 and estimate["free_bytes"] == 4096000
    assert estimate["fits"] is False and estimate["image_bytes_max"] == 3584 * MIB
    lines = estimate_lines(estimate, "hv1")
    assert "measured on 2026-11-30T12:00:00+00:00" in lines[1] and "about 5.0 s at most" in lines[1]
    assert "upper bound" in lines[0] and "NOT ENOUGH" in lines[0]
    assert lines[2:] == ["hv1: a: image up to 1024.0 MiB, about 2.0 s", "hv1: b: image up to 2048.0 MiB, about 4.0 s",
                         "hv1: c: image up to 512.0 MiB, about 1.0 s"]
    assert all(line.startswith("hv1: ") for line in lines)


def test_without_a_measurement_the_estimate_is_a_labelled_default() -> None:
    for bandwidth in ({}, {"zstd": {"mib_s": 900.0}}, {"raw": {"mib_s": "fast"}}, {"raw": {"mib_s": -1}}, None,
                      {"raw": {"mib_s": True}}, "junk"):
        estimate = drain_estimate([guest("a", 1000)], "", bandwidth, "raw", 1, "/d", default_mib_s=100)
        assert not estimate["measured"] and estimate["mib_s"] == 100.0 and estimate["seconds"] == 10.0
        assert estimate["free_bytes"] is None and estimate["fits"] is None
        lines = estimate_lines(estimate, "h")
        assert "default assumption" in lines[1] and "free space in /d unknown" in lines[0]
    empty = drain_estimate([], "10 4096", {}, "raw", 2, "/d")
    assert empty["seconds"] == 0 and empty["fits"] is True
    assert estimate_lines(empty, "h")[0].startswith("h: drain estimate: 0 guest(s)")
