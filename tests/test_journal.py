"""Terminal states Nexus never acknowledged survive a crash and are delivered after it."""

from __future__ import annotations

import uuid
from pathlib import Path

import attrs
import trio

from sledagent import VmmPhase, VmmState
from sledagent._agent import open_sled_agent
from sledagent._journal import StateJournal
from sledagent._vmm_state import initial_state
from sledagent._wire import VmmRuntimeState, utcnow
from sledagent.testing import AgentHarness, FakeHost, fast_config


async def test_a_terminal_state_nexus_never_acknowledged_is_delivered_after_a_restart(
    tmp_path: Path,
) -> None:
    journal_path = tmp_path / "terminal-states.jsonl"
    fakes = FakeHost()
    host = attrs.evolve(fakes.host(), journal=StateJournal(journal_path))
    with trio.fail_after(30):
        async with open_sled_agent(fast_config(shutdown_drain_s=0.2), host) as agent:
            h = AgentHarness(agent, fakes)
            pid = await h.start_vmm()
            fakes.nexus.fail_for(3600.0)  # Nexus is down: the halt is never acknowledged
            fakes.propolis[pid].halt()
            entry = agent.manager.registry.get(pid)
            await entry.wait_until(lambda e: e.phase is not VmmPhase.ACTIVE)
            while b'"op":"halt"' not in (await trio.Path(journal_path).read_bytes()):  # noqa: ASYNC110
                await trio.sleep(0.01)
        # The agent is gone (a crash, as far as Nexus knows). Nexus comes back; a new
        # agent starts on the same host and journal.
        assert fakes.nexus.first_time(pid, VmmState.DESTROYED) is None
        fakes.nexus.fail_for(0.0)
        host = attrs.evolve(fakes.host(), journal=StateJournal(journal_path))
        async with open_sled_agent(fast_config(), host) as agent:
            await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
            await agent.drain()
    assert await StateJournal(journal_path).load() == {}  # delivered: nothing left to replay


async def test_a_torn_or_damaged_line_is_skipped_and_the_rest_replayed(tmp_path: Path) -> None:
    journal = StateJournal(tmp_path / "j.jsonl")
    a, b = uuid.uuid4(), uuid.uuid4()
    state = initial_state(
        VmmRuntimeState(gen=5, state=VmmState.DESTROYED, time_updated=utcnow()), None, utcnow()
    )
    journal.record(a, state)
    journal.record(b, state)
    journal.delivered(b, 5)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        nursery.cancel_scope.cancel()  # the last flush is shielded
    with open(tmp_path / "j.jsonl", "ab") as f:
        f.write(b'{"op":"halt","propolis_id":"')  # a crash mid-append
    assert await StateJournal(tmp_path / "j.jsonl").load() == {a: state}
