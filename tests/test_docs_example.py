"""The example of docs/testing.md, run as written."""

import trio

from sledagent import VmmState
from sledagent.testing import AgentHarness


async def test_a_halted_vmm_is_reported_and_its_zone_reaped(
    fake_agent: AgentHarness, autojump_clock: trio.abc.Clock
) -> None:
    pid = await fake_agent.start_vmm()
    fake_agent.fakes.propolis[pid].halt()
    await fake_agent.fakes.nexus.wait_for(pid, VmmState.DESTROYED)
    await fake_agent.agent.drain()
    assert fake_agent.fakes.zones.zones == {}
