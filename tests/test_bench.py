"""The benchmarks run and report what they measured (figures are not asserted: a slow,
noisy CI machine runs these; docs/performance.md has the figures of a quiet run)."""

from __future__ import annotations

import pytest
import trio

from sledagent.bench._api import run_api_bench


async def test_bench_api_answers_every_request_from_the_reader_process() -> None:
    with trio.fail_after(60):
        report = await run_api_bench(requests=200, connections=4)
    assert report["answered"] == 200 and report["errors"] == 0 and report["timeouts"] == 0
    assert report["server_cpu_ms_per_request"] > 0  # type: ignore[operator]
    assert report["latency_s"]["p99"] >= report["latency_s"]["p50"] > 0  # type: ignore[index]


async def test_bench_api_through_the_front_process_reports_the_fronts_cpu_apart() -> None:
    with trio.fail_after(60):
        report = await run_api_bench(requests=200, connections=4, front="process")
    assert report["answered"] == 200 and report["errors"] == 0 and report["timeouts"] == 0
    assert report["params"]["front"] == "process"  # type: ignore[index]
    assert "front_cpu_ms_per_request" in report


@pytest.mark.deadline_s(180)  # a benchmark's processes
async def test_bench_scale_reports_what_each_vmm_costs_and_leaves_nothing_running() -> None:
    from sledagent.bench._scale import run_scale_bench

    with trio.fail_after(120):
        report = await run_scale_bench(vmms=5)
    running, idle = report["running"], report["idle"]
    assert running["tasks"] > idle["tasks"] and running["fds"] > idle["fds"]  # type: ignore[index]
    # after the mass stop no VMM's tasks are left (runners, monitors)
    assert report["after_mass_stop"]["tasks"] < running["tasks"]  # type: ignore[index]


async def test_bench_migrate_moves_every_guest_and_times_it_beside_the_floor() -> None:
    from sledagent.bench._migrate import run_migrate_bench

    with trio.fail_after(240):
        report = await run_migrate_bench(vmms=3, log_mb=0.1)
    assert report["outcomes"] == {"completed": 3}
    assert report["problems"] == []
    assert report["source_bundles"] == 3  # sled A reaped every source's zone
    assert report["migration_s"]["p99"] >= report["migration_s"]["p50"] > 0  # type: ignore[index]
    assert report["floor_s"]["p50"] > 0  # type: ignore[index]
