"""kill -9 mid-cleanup, restart: nothing partial, nothing leaked (a seeded subset of
``sledagent bench crash``; the soak runs 50 points: docs/reliability.md)."""

from __future__ import annotations

import pytest
import trio

from sledagent.bench._crash import CrashParams, leaks, run_crash_point


@pytest.mark.parametrize("seed", [1, 3])
async def test_a_daemon_killed_mid_cleanup_leaves_nothing_partial_after_restart(seed: int) -> None:
    with trio.fail_after(240):
        result = await run_crash_point(seed, CrashParams(vmms=6, log_mb=10.0, max_delay_s=0.6))
    assert leaks(result) == []  # nothing partial or leaked, and every zone has its bundle
