"""kill -9 mid-cleanup, restart: nothing partial, nothing leaked (a seeded subset of
``sledagent bench crash``; the soak runs 50 points: docs/reliability.md)."""

from __future__ import annotations

import pytest
import trio

from sledagent.bench._crash import CrashParams, leaks, run_crash_point


@pytest.mark.deadline_s(300)  # daemon processes, killed and restarted
@pytest.mark.parametrize("seed", [1, 3])
async def test_a_daemon_killed_mid_cleanup_leaves_nothing_partial_after_restart(seed: int) -> None:
    with trio.fail_after(240):
        result = await run_crash_point(seed, CrashParams(vmms=6, log_mb=10.0, max_delay_s=0.6))
    assert leaks(result) == []  # nothing partial or leaked, and every zone has its bundle


@pytest.mark.deadline_s(300)  # daemon processes, killed and restarted
async def test_sigterm_mid_cleanup_drains_exits_0_and_the_next_start_finishes_the_rest() -> None:
    params = CrashParams(vmms=8, log_mb=20.0, max_delay_s=0.2, signal="SIGTERM", drain_s=0.1)
    with trio.fail_after(240):
        result = await run_crash_point(7, params)
    assert result["exit_status"] == 0
    assert leaks(result) == []  # what the drain left, the next start finished


async def test_a_kill_during_mixed_work_loses_no_running_guest_and_no_state() -> None:
    """Registrations, runs, stops and a mass halt at once, then kill -9 and a restart:
    running guests untouched, every end told, generations never back at Nexus."""
    from sledagent.bench._crash_mixed import MixedParams, mixed_leaks, run_mixed_point

    with trio.fail_after(240):
        result = await run_mixed_point(2, MixedParams(per_group=3, log_mb=2.0, max_delay_s=0.5))
    assert mixed_leaks(result) == []
    assert result["running_guests_lost"] == [] and result["terminal_states_lost"] == 0
