"""Nexus and Propolis faults against the daemon as a process (``sledagent bench faults``
runs them at full length: Nexus down 30 s, 50 VMMs). Each run: a ``sledagent sim``
process and the daemon on local zones with real bundles."""

from __future__ import annotations

import pytest
import trio

from sledagent.bench._faults import FaultParams, nexus_outage, problems, propolis_faults


@pytest.mark.deadline_s(180)  # processes; its own fail_after bounds it first
@pytest.mark.parametrize("mode", ["down", "503"])
async def test_a_nexus_outage_loses_no_terminal_state_and_the_api_keeps_answering(
    mode: str,
) -> None:
    with trio.fail_after(120):
        result = await nexus_outage(
            FaultParams(vmms=6, down_s=3.0, mode=mode, nexus_backoff_max_s=0.5)
        )
    assert problems(result, latency_bounds=False) == [], result
    # All 6 halted VMMs and the one driven during the outage reached Nexus as destroyed,
    # with generations only rising; every read during the outage was answered (200, or
    # 404 once Nexus had acknowledged) and the VMM driven during it was registered, run
    # and stopped. How fast is the benchmark's business (`sledagent bench faults`).
    assert result["terminal_states_delivered"] == 7
    assert result["get_state_failures"] == 0 and result["get_state_answered"] >= 6
    assert len(result["register_run_stop_during_fault_s"]) == 3
    assert result["zones_bundled"] == 7


@pytest.mark.deadline_s(180)  # processes; its own fail_after bounds it first
async def test_propolis_faults_each_end_in_their_terminal_state_and_nothing_waits_forever() -> None:
    with trio.fail_after(120):
        # The 503s last a quarter of the bound (a drop is ridden out only if its end
        # reaches Propolis before the monitor's retries span the bound).
        params = FaultParams(propolis_unreachable_s=2.0, stop_grace_s=2.0, drop_s=0.5)
        result = await propolis_faults(params)
    assert problems(result, latency_bounds=False) == [], result
    assert result["terminal_state"] == {
        "vanish": "failed",
        "fail": "failed",
        "drop": "destroyed",
        "die": "failed",
        "hang_then_stop": "destroyed",
    }
    took = result["seconds_from_fault_to_terminal_state"]
    assert took["die"] >= 2.0 and took["hang_then_stop"] >= 2.0  # the bounds, not sooner
