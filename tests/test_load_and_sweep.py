"""``bench load`` and ``bench sweep`` at a small size: what they check and write."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from sledagent.bench._load import LoadParams, problems, run_load_bench
from sledagent.bench._sweep import SweepParams, plot_sweep, run_sweep

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.deadline_s(240)  # processes; its own fail_after bounds it
async def test_every_request_under_load_is_answered_while_zones_are_reaped() -> None:
    with trio.fail_after(180):
        result = await run_load_bench(
            LoadParams(vmms=40, halting=10, concurrency=40, min_waves=2, log_mb=0.25)
        )
    assert problems(result) == [], result
    assert result["requests"] == result["waves"] * 40 >= 80
    assert sum(result["answered"].values()) == result["requests"]
    assert result["answered"].get("200", 0) > 0
    assert result["terminal_states_delivered"] == result["zones_bundled"] == 10
    assert result["latency"]["p99"] > 0


@pytest.mark.deadline_s(240)  # processes; its own fail_after bounds it
async def test_a_sweep_writes_its_report_and_its_plots_at_each_read_rate(tmp_path: Path) -> None:
    params = SweepParams(
        vmms=(2,), log_mb=(0.25,), inline_max_mb=0, omicron_max_mb=0,
        archive_slots=(1,), rate_log_mb=0.5, read_rates=(0.0, 40.0),
    )  # fmt: skip
    lines: list[str] = []
    with trio.fail_after(180):
        report = await run_sweep(params, tmp_path, progress=lines.append)
    quiet, point = report["points"]  # one per read rate, the reference (highest) last
    assert (quiet["reads_per_s"], point["reads_per_s"]) == (0.0, 40.0)
    assert quiet["reaper"]["get_state_reads"] == quiet["floor"]["get_state_reads"] == 0
    assert point["reaper"]["get_state_reads"] > 0 and point["reaper"]["get_state_timeouts"] == 0
    assert point["reaper"]["bundles"] == 2 and point["floor"]["bundles"] == 0
    assert "inline" not in point  # over its budget: not run
    assert point["drain_predicted_s"] > 0 and point["reaper_p99_over_floor_p99_plus_50ms"] > 0
    assert "1" in report["bundle_mb_per_s_by_slots"]
    archive = point["reaper"]["archive"]
    assert archive["input_mb"] == pytest.approx(0.5, abs=0.05)  # 2 x 0.25 MB of logs
    assert 0 < archive["occupancy"] <= 1 and archive["mb_per_s_in_run"] > 0
    assert point["drain_over_predicted_in_run"] > 0
    assert (tmp_path / "sweep.json").exists()
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == [
        "bundle-rate-vs-slots.png", "drain-vs-volume.png", "get-state-p99.png",
        "halt-to-publish-p99.png", "halt-to-publish-vs-read-rate.png",
        "reads-vs-read-rate.png", "zone-held-p99.png",
    ]  # fmt: skip
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert any("floor" in line for line in lines)


def test_plots_survive_a_point_with_no_samples(tmp_path: Path) -> None:
    # A floor run at tiny N reads nothing (p99 0): log axes must not choke on it.
    empty = {"halt_to_publish_p99_s": 0.1, "get_state_p99_s": 0.0, "get_state_timeouts": 0,
             "zone_held_p99_s": 0.0, "drain_s": 0.0, "bundles": 0}  # fmt: skip
    report = {
        "cores": 2, "bundle_mb_per_s_by_slots": {"1": 100.0, "2": 190.0},
        "bundle_mb_per_s_all_slots_busy": 190.0,
        "points": [{"vmms": 2, "log_mb": 0.25, "total_mb": 0.5, "floor": empty, "reaper": empty}],
    }  # fmt: skip
    assert len(plot_sweep(report, tmp_path)) == 7
