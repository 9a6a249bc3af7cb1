"""benchmarks/report.py: the through-ansible overhead, in seconds and in CPU time, per row."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

from report import (  # noqa: E402
    ANSIBLE,
    ANSIBLE_FIXED,
    OURS,
    HostSample,
    Sample,
    _host_verdicts,
    ansible_cpu_excess,
    ansible_excess,
    load_note,
    medians,
    render,
    role_mode,
)

GIB = 1024 ** 3


def samples() -> list[Sample]:
    return [
        Sample(1, OURS, "raw", "save", 0.8, GIB, 34 * 1024, 0.6, cpu_s=0.2, load1=2.0),
        Sample(1, OURS, "raw", "save", 0.9, GIB, 34 * 1024, 0.7, cpu_s=0.3, load1=3.0),
        Sample(1, ANSIBLE, "raw", "save", 1.9, GIB, None, 0.6, cpu_s=1.1, load1=2.5),
        Sample(1, ANSIBLE_FIXED, "-", "task", 0.8, 0, cpu_s=0.7, load1=1.5),
    ]


def test_overhead_in_seconds_and_cpu_is_the_row_minus_module_utils_minus_the_ping() -> None:
    table = medians(samples())
    assert ansible_excess(table, 1, "raw", "save") == 1.9 - 0.85 - 0.8
    assert abs(ansible_cpu_excess(table, 1, "raw", "save") - (1.1 - 0.25 - 0.7)) < 1e-9


def test_no_cpu_figure_without_the_ping_of_the_run() -> None:
    table = medians([s for s in samples() if s.contender != ANSIBLE_FIXED])
    assert ansible_cpu_excess(table, 1, "raw", "save") is None


def test_the_report_shows_the_cpu_columns_and_the_load() -> None:
    report = render(samples(), [], [1], ["raw"], 2, "Machine: test.", "make bench", 1.0, True, "drop_caches")
    row = next(line for line in report.splitlines() if line.startswith(f"| 1 GiB | {ANSIBLE} | raw | save"))
    assert row.split(" | ")[10:12] == ["1.10", "+0.15 s"]
    assert "median 2.2, 1.5–3.0" in report


def test_no_load_note_without_load_figures() -> None:
    assert load_note([Sample(1, OURS, "raw", "save", 1.0, GIB)]) == ""


def test_the_module_cpu_is_read_from_bash_times_children_line() -> None:
    from run import bash_children_seconds

    assert bash_children_seconds("0m0.002s 0m0.000s\n1m0.250s 0m0.030s\n") == 60.28
    assert bash_children_seconds("") is None


def test_controller_cpu_is_the_tree_minus_the_module() -> None:
    table = medians([Sample(1, ANSIBLE_FIXED, "-", "task", 0.8, 0, cpu_s=0.7, module_cpu_s=0.16)])
    assert abs(table[(1, ANSIBLE_FIXED, "-", "task")]["controller_cpu_s"] - 0.54) < 1e-9


def test_the_excess_counts_the_module_utils_process_from_outside_when_measured() -> None:
    rows = samples() + [Sample(1, OURS, "raw", "save", 0.85, GIB, process_s=1.1)]
    table = medians(rows)
    assert table[(1, OURS, "raw", "save")]["process_s"] == 1.1
    assert abs(ansible_excess(table, 1, "raw", "save") - (1.9 - 1.1 - 0.8)) < 1e-9
    report = render(rows, [], [1], ["raw"], 1, "Machine: test.", "make bench", 1.0, True, "drop_caches")
    assert f"| 1 GiB | {OURS} | raw | save | 0.85 (process 1.10) |" in report


def test_the_roles_are_judged_at_each_concurrency_above_one_against_one_at_a_time() -> None:
    host = [HostSample("dd", "write", 4, 2.0, 4 * GIB), HostSample("dd", "read", 4, 4.0, 4 * GIB)]
    for concurrency, seconds in ((1, 12.0), (2, 10.0), (4, 6.0)):
        host.append(HostSample(role_mode(concurrency), "drain", 4, seconds, 4 * GIB, concurrency))
    found = {verdict.name: verdict.measured for verdict in _host_verdicts(host)}
    assert found["4 guests through host_drain: concurrency 1 / concurrency 2 (wall)"] == 1.2
    assert found["4 guests through host_drain: concurrency 1 / concurrency 4 (wall)"] == 2.0
    assert found["4 guests through host_drain, concurrency 4: aggregate / dd write bandwidth"] == 2.0 / 6.0
    assert not any("concurrency 1:" in name or "concurrency 1," in name for name in found)
