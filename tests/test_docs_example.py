"""The examples of docs/testing.md, run as written."""

import trio

from sledagent import VmmState
from sledagent.testing import AgentHarness, TwoSleds


async def test_a_halted_vmm_is_reported_and_its_zone_reaped(
    fake_agent: AgentHarness, autojump_clock: trio.abc.Clock
) -> None:
    pid = await fake_agent.start_vmm()
    fake_agent.fakes.propolis[pid].halt()
    await fake_agent.fakes.nexus.wait_for(pid, VmmState.DESTROYED)
    await fake_agent.agent.drain()
    assert fake_agent.fakes.zones.zones == {}


async def test_a_guest_moves_to_the_other_sled(
    two_sleds: TwoSleds, autojump_clock: trio.abc.Clock
) -> None:
    pid = await two_sleds.start_vmm("a")
    m = await two_sleds.migrate(pid)
    record = await two_sleds.wait(m)
    assert record.outcome == "completed"
    await two_sleds.nexus.wait_for(pid, VmmState.DESTROYED)  # the source ends
    await two_sleds.drain()
    assert two_sleds.nexus.ledger.problems == []
    assert two_sleds.a.fakes.zones.zones == {}  # its zone reaped
