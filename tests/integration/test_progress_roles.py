"""Progress and estimates of host_drain and host_restore, through ansible-playbook, on real guests.

- Before any save into the drain directory, check mode estimates the drain from the
  guests' RAM and a default bandwidth, and says so ("default assumption").
- A drain prints one line per guest (name, bytes, seconds, MiB/s) whose figures are
  the image's, and a totals line; the save module records its bandwidth on the host.
- A restore prints its lines and totals the same way.
- Check mode then estimates from the recorded bandwidth, labelled "measured on <date>".
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.guest import Guest, GuestSpec
from integration.common import assert_continued
from integration.test_roles import run_role

pytestmark = pytest.mark.integration

NAMES = ("ssq-progress-a", "ssq-progress-b")
MIB = 1048576
RECORD = Path("/var/lib/savestate-qemu/bandwidth.json")
JOB = re.compile(r'"localhost: (?P<name>ssq-progress-[ab]) (?P<verb>saved|restored): (?P<bytes>\d+) bytes '
                 r'\((?P<mib>[\d.]+) MiB\) in (?P<seconds>[\d.]+) s, (?P<rate>[\d.]+) MiB/s"')
TOTAL = re.compile(r'"localhost: (?P<role>drain|restore) total: (?P<ok>\d+) ok, (?P<failed>\d+) failed; '
                   r'(?P<bytes>\d+) bytes \([\d.]+ MiB\) in (?P<wall>[\d.]+) s wall, (?P<rate>[\d.]+) MiB/s aggregate"')
# The wait loop labels each job with its line the moment it is seen finished.
LABEL = re.compile(r"\(item=(?P<name>ssq-progress-[ab]) (?P<verb>saved|restored): (?P<bytes>\d+) bytes ")
ESTIMATE = re.compile(r'"localhost: drain estimate: about (?P<seconds>[\d.]+) s at most, 4 at a time, at '
                      r'(?P<rate>[\d.]+) MiB/s \((?P<basis>[^)]*)\)"')


def job_lines(output: str, verb: str) -> dict[str, dict[str, float]]:
    found = {}
    for match in JOB.finditer(output):
        assert match["verb"] == verb, output
        size, seconds, rate = int(match["bytes"]), float(match["seconds"]), float(match["rate"])
        assert abs(float(match["mib"]) - size / MIB) <= 0.05, match.group(0)
        assert abs(rate - size / MIB / seconds) <= max(0.5, rate * 0.02), match.group(0)  # rounded figures
        found[match["name"]] = {"bytes": size, "seconds": seconds, "rate": rate}
    return found


def labels(output: str, verb: str, lines: dict[str, dict[str, float]]) -> None:
    found = {match["name"]: int(match["bytes"]) for match in LABEL.finditer(output) if match["verb"] == verb}
    assert found == {name: line["bytes"] for name, line in lines.items()}, output


def totals(output: str, role: str, lines: dict[str, dict[str, float]]) -> None:
    match = TOTAL.search(output)
    assert match and match["role"] == role, output
    assert (int(match["ok"]), int(match["failed"])) == (2, 0), match.group(0)
    assert int(match["bytes"]) == sum(line["bytes"] for line in lines.values()), match.group(0)
    assert abs(float(match["rate"]) - int(match["bytes"]) / MIB / float(match["wall"])) <= 0.5, match.group(0)


def estimate(output: str) -> re.Match[str]:
    match = ESTIMATE.search(output)
    assert match, output
    for name in NAMES:
        assert re.search(rf'"localhost: {name}: image up to 128\.0 MiB, about [\d.]+ s"', output), output
    assert "raw images of at most 256.0 MiB in all (the guests' RAM: an upper bound)" in output, output
    assert re.search(r"[\d.]+ MiB free in /", output), output
    return match


def test_drain_and_restore_report_each_guest_and_check_mode_estimates(
        qemu, guest_factory: Callable[..., Guest], workdir: Path) -> None:
    guests = [guest_factory(GuestSpec(name=name, qemu=qemu, memory_mib=128)) for name in NAMES]
    images = workdir / "images"
    drain = {"host_drain_dir": str(images), "host_drain_guests": list(NAMES)}

    dry = run_role(workdir, "host_drain", drain, check=True)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    first = estimate(dry.stdout)
    assert first["basis"].startswith("default assumption: no raw save into"), first.group(0)
    assert float(first["rate"]) == 100.0 and float(first["seconds"]) == 1.3  # 128 MiB at 100 MiB/s, one round
    assert not images.exists() and all(guest.is_alive() for guest in guests)
    assert not JOB.search(dry.stdout) and not TOTAL.search(dry.stdout)  # check mode saves nothing to report

    run = run_role(workdir, "host_drain", drain)
    assert run.returncode == 0, run.stdout + run.stderr
    ticks = {guest.spec.name: guest.last_tick() for guest in guests}
    saved = job_lines(run.stdout, "saved")
    assert set(saved) == set(NAMES), run.stdout
    for name, line in saved.items():
        assert line["bytes"] == (images / f"{name}.save").stat().st_size
    labels(run.stdout, "saved", saved)
    totals(run.stdout, "drain", saved)
    manifest = json.loads((images / "savestate-manifest.json").read_text())
    assert {g["name"]: g["size"] for g in manifest["guests"]} == {n: line["bytes"] for n, line in saved.items()}
    recorded = [entry for entry in json.loads(RECORD.read_text())["saves"]
                if entry["directory"] == str(images.resolve()) and entry["format"] == "raw"]
    assert len(recorded) == 1 and recorded[0]["mib_s"] in {line["rate"] for line in saved.values()}, recorded

    back = run_role(workdir, "host_restore", {"host_restore_dir": str(images)})
    assert back.returncode == 0, back.stdout + back.stderr
    restored = job_lines(back.stdout, "restored")
    assert {name: line["bytes"] for name, line in restored.items()} == {n: line["bytes"] for n, line in saved.items()}
    labels(back.stdout, "restored", restored)
    totals(back.stdout, "restore", restored)
    for guest in guests:
        assert_continued(guest, ticks[guest.spec.name])

    again = run_role(workdir, "host_drain", drain, check=True)
    assert again.returncode == 0, again.stdout + again.stderr
    measured = estimate(again.stdout)
    assert measured["basis"].startswith("measured on 20"), measured.group(0)
    assert f"by the last raw save into {images.resolve()} on this host" in measured["basis"]
    assert float(measured["rate"]) == recorded[0]["mib_s"], measured.group(0)
    assert abs(float(measured["seconds"]) - round(128 / recorded[0]["mib_s"], 1)) <= 0.1, measured.group(0)
    assert all(guest.is_alive() for guest in guests)
