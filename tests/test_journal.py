"""Terminal states Nexus never acknowledged survive a crash and are delivered after it."""

from __future__ import annotations

import uuid
from pathlib import Path

import attrs
import trio
import trio.lowlevel

from sledagent import VmmPhase, VmmState
from sledagent._agent import open_sled_agent
from sledagent._journal import StateJournal
from sledagent._vmm_state import initial_state
from sledagent._wire import VmmRuntimeState, utcnow
from sledagent.testing import AgentHarness, FakeHost, ensure_body, fast_config


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
            while b'"destroyed"' not in (await trio.Path(journal_path).read_bytes()):  # noqa: ASYNC110
                await trio.sleep(0.01)
        # The agent is gone (a crash, as far as Nexus knows). Nexus comes back; a new
        # agent starts on the same host and journal.
        assert fakes.nexus.first_time(pid, VmmState.DESTROYED) is None
        fakes.nexus.fail_for(0.0)
        host = attrs.evolve(fakes.host(), journal=StateJournal(journal_path))
        async with open_sled_agent(fast_config(), host) as agent:
            await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
            await agent.notifier.wait_idle()  # Nexus's answer reached the agent
            await agent.drain()
    assert await StateJournal(journal_path).load() == {}  # delivered: nothing left


async def test_a_vmm_live_when_the_agent_died_is_published_failed_one_generation_on(
    tmp_path: Path,
) -> None:
    journal_path = tmp_path / "terminal-states.jsonl"
    fakes = FakeHost()
    host = attrs.evolve(fakes.host(), journal=StateJournal(journal_path))
    with trio.fail_after(30):
        async with open_sled_agent(fast_config(shutdown_drain_s=0.2), host) as agent:
            pid = await AgentHarness(agent, fakes).start_vmm()
            running = await fakes.nexus.wait_for(pid, VmmState.RUNNING)
            last = fakes.nexus.latest(pid)
            assert running is not None and last is not None
        # The agent died with the VMM running. The next start sweeps its zone away, so
        # the VMM is gone: Nexus must hear it, newer than anything it heard before.
        host = attrs.evolve(fakes.host(), journal=StateJournal(journal_path))
        async with open_sled_agent(fast_config(), host) as agent:
            await fakes.nexus.wait_for(pid, VmmState.FAILED)
            await agent.notifier.wait_idle()
            await agent.drain()
    final = fakes.nexus.latest(pid)
    assert final is not None and final.vmm_state.state is VmmState.FAILED
    assert final.gen == last.gen + 1
    assert fakes.zones.zones == {}  # bundled as unexpected and torn down
    assert await StateJournal(journal_path).load() == {}


async def test_the_api_answers_a_registration_only_once_it_is_journaled(tmp_path: Path) -> None:
    journal_path = tmp_path / "terminal-states.jsonl"
    fakes = FakeHost()
    host = attrs.evolve(fakes.host(), journal=StateJournal(journal_path))
    pid = uuid.uuid4()
    with trio.fail_after(30):
        async with open_sled_agent(fast_config(shutdown_drain_s=0.2), host) as agent:
            await agent.manager.register_durably(pid, ensure_body())
            # On disk before the answer: a crash right now still leaves a trace.
            assert str(pid).encode() in await trio.Path(journal_path).read_bytes()
    replay = await StateJournal(journal_path).load()
    assert replay[pid].vmm_state.state is VmmState.FAILED


async def test_the_journal_stays_small_however_many_states_pass_through(tmp_path: Path) -> None:
    journal = StateJournal(tmp_path / "j.jsonl")
    live = initial_state(
        VmmRuntimeState(gen=1, state=VmmState.RUNNING, time_updated=utcnow()), None, utcnow()
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        keep = uuid.uuid4()
        await journal.durable(journal.record(keep, live))
        for _ in range(3000):  # VMMs that come and go
            pid = uuid.uuid4()
            journal.record(pid, live)
            journal.delivered(pid, live.gen)
            await trio.lowlevel.checkpoint()
        await journal.durable(journal.record(keep, live))
        nursery.cancel_scope.cancel()
    lines = (tmp_path / "j.jsonl").read_bytes().count(b"\n")
    assert lines <= 2 + 2 * 1 + 1000 + 100  # compacted: not 6000 lines
    assert set(await StateJournal(tmp_path / "j.jsonl").load()) == {keep}


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
