"""QA of issue 18: a SIGTERM (an upgrade) while Nexus's state change waits for its VMM's
re-adoption must not tell Nexus the VMM is gone. ``NO_SUCH_INSTANCE`` (404/410) makes
Nexus mark the VMM Failed (omicron #6455, RFD 486) while its guest keeps running and is
taken back by the next start: the duplicate this issue exists to prevent. The answer is
a 503 (retry)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from sledagent._agent import open_sled_agent
from sledagent._errors import ShuttingDown, Unavailable
from sledagent._manager import InstanceManager
from sledagent._wire import VmmStateRequested, VmmStateRequestedType
from sledagent.testing import AgentHarness, FakeHost, fast_config

STOP = VmmStateRequested(VmmStateRequestedType.STOPPED)
RUN = VmmStateRequested(VmmStateRequestedType.RUNNING)


@pytest.mark.parametrize("requested", [STOP, RUN], ids=["stop", "run"])
async def test_a_state_change_waiting_for_readoption_at_shutdown_is_told_to_retry(
    requested: VmmStateRequested, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    config = fast_config(shutdown_drain_s=0.5, readopt_probe_s=60.0, readopt_wait_s=30.0)
    async with open_sled_agent(config, fakes.host()) as agent:
        pid = await AgentHarness(agent, fakes).start_vmm()
        await agent.notifier.wait_idle()
    fakes.propolis[pid].hang()  # its Propolis does not answer: re-adoption waits
    outcome: list[BaseException | object] = []

    async def nexus_asks(manager: InstanceManager) -> None:
        try:
            outcome.append(await manager.put_state(pid, requested))
        except Exception as exc:
            outcome.append(exc)

    # The agent stops (SIGTERM) with the request still waiting; Nexus's call outlives it.
    async with trio.open_nursery() as nexus, open_sled_agent(config, fakes.host()) as restarted:
        nexus.start_soon(nexus_asks, restarted.manager)
        await trio.testing.wait_all_tasks_blocked()  # it waits for the re-adoption
        assert not outcome
    assert len(outcome) == 1
    assert isinstance(outcome[0], Unavailable), outcome[0]
    assert isinstance(outcome[0], ShuttingDown)
    assert outcome[0].status == 503
    # The guest is untouched for the next start.
    assert fakes.propolis[pid].requests[-1].value == "Run"
