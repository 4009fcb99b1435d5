"""An agent restart costs no guest: every live VMM is taken back (the table in
``_readopt`` and docs/design.md), on fakes that outlive the agent (zones, Propolis,
Nexus), with the journal on disk."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from sledagent import AgentConfig, VmmPhase, VmmState
from sledagent._agent import SledAgent, open_sled_agent
from sledagent._errors import Terminating, Unavailable
from sledagent._host import ZoneSpec, zone_name_for
from sledagent._journal import JournalError
from sledagent._wire import InstanceState, VmmStateRequested, VmmStateRequestedType, ZoneBundleCause
from sledagent.testing import AgentHarness, FakeHost, ensure_body, fast_config

RUN = VmmStateRequested(VmmStateRequestedType.RUNNING)
STOP = VmmStateRequested(VmmStateRequestedType.STOPPED)


@asynccontextmanager
async def agent_on(fakes: FakeHost, config: AgentConfig | None = None) -> AsyncIterator[SledAgent]:
    async with open_sled_agent(config or fast_config(shutdown_drain_s=0.5), fakes.host()) as a:
        yield a


def published(fakes: FakeHost, pid: uuid.UUID) -> list[tuple[int, VmmState]]:
    return [(s.gen, s.vmm_state.state) for s in fakes.nexus.states_for(pid)]


async def test_running_vmms_are_taken_back_untouched_and_nexus_hears_nothing(
    tmp_path: Path,
) -> None:
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    with trio.fail_after(30):
        async with agent_on(fakes) as agent:
            pids = [await AgentHarness(agent, fakes).start_vmm() for _ in range(5)]
            for pid in pids:
                await fakes.nexus.wait_for(pid, VmmState.RUNNING)
            await agent.notifier.wait_idle()
            before = {pid: agent.manager.registry.get(pid).state for pid in pids}
            heard = {pid: published(fakes, pid) for pid in pids}
        # The agent is gone; the guests are not (the fakes outlive it).
        async with agent_on(fakes) as agent:
            for pid in pids:  # the first read answers the journaled state
                assert await agent.manager.get_state(pid) == before[pid]
            for pid in pids:
                runner = agent.manager.registry.get(pid).runner
                await runner.adopted.wait()
                assert agent.manager.registry.get(pid).state == before[pid]
            assert agent.manager.readopting() == 0  # the metric an operator watches
            await agent.notifier.wait_idle()
            assert {pid: published(fakes, pid) for pid in pids} == heard  # nothing new
            assert all(fakes.propolis[pid].ensured is not None for pid in pids)
            assert len(fakes.zones.zones) == 5  # no zone was swept
            # They are driven as before: a stop reaches Propolis and ends in destroyed.
            await agent.manager.put_state(pids[0], STOP)
            await fakes.nexus.wait_for(pids[0], VmmState.DESTROYED)
            await agent.drain()
            assert fakes.propolis[pids[0]].requests[-1].value == "Stop"
            assert zone_name_for(pids[0]) not in fakes.zones.zones
            assert len(fakes.zones.zones) == 4


async def test_a_vmm_whose_guest_halted_while_the_agent_was_down_ends_and_is_bundled(
    tmp_path: Path,
) -> None:
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    with trio.fail_after(30):
        async with agent_on(fakes) as agent:
            pid = await AgentHarness(agent, fakes).start_vmm()
            await fakes.nexus.wait_for(pid, VmmState.RUNNING)
            await agent.notifier.wait_idle()
            running = agent.manager.registry.get(pid).state
        fakes.propolis[pid].halt()  # the guest powers off while no agent runs
        async with agent_on(fakes) as agent:
            await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
            await agent.drain()
    final = fakes.nexus.latest(pid)
    assert final is not None and final.gen == running.gen + 1
    assert zone_name_for(pid) not in fakes.zones.zones
    bundles = await fakes.store.list_zone(zone_name_for(pid))
    assert [b.metadata.cause for b in bundles] == [ZoneBundleCause.TERMINATED_INSTANCE]


async def test_a_vmm_whose_propolis_lost_its_vm_while_the_agent_was_down_fails(
    tmp_path: Path,
) -> None:
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    with trio.fail_after(30):
        async with agent_on(fakes) as agent:
            pid = await AgentHarness(agent, fakes).start_vmm()
            await agent.notifier.wait_idle()
            running = agent.manager.registry.get(pid).state
        fakes.propolis[pid].vanish()  # Propolis restarted: NoInstance
        async with agent_on(fakes) as agent:
            await fakes.nexus.wait_for(pid, VmmState.FAILED)
            await agent.drain()
    final = fakes.nexus.latest(pid)
    assert final is not None and (final.gen, final.vmm_state.state) == (
        running.gen + 1,
        VmmState.FAILED,
    )
    assert fakes.zones.zones == {}


async def test_a_vmm_whose_zone_vanished_while_the_agent_was_down_fails(tmp_path: Path) -> None:
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    with trio.fail_after(30):
        async with agent_on(fakes) as agent:
            pid = await AgentHarness(agent, fakes).start_vmm()
            await agent.notifier.wait_idle()
        del fakes.zones.zones[zone_name_for(pid)]
        async with agent_on(fakes) as agent:
            await fakes.nexus.wait_for(pid, VmmState.FAILED)
            await agent.drain()


async def test_a_vmm_registered_but_never_run_is_taken_back_and_runs_when_asked(
    tmp_path: Path,
) -> None:
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    pid = uuid.uuid4()
    with trio.fail_after(30):
        async with agent_on(fakes) as agent:
            registered = await agent.manager.register_durably(pid, ensure_body())
        async with agent_on(fakes) as agent:
            assert await agent.manager.get_state(pid) == registered
            await agent.manager.put_state(pid, RUN)
            await fakes.nexus.wait_for(pid, VmmState.RUNNING)
            assert zone_name_for(pid) in fakes.zones.zones


async def test_a_zone_installed_but_never_given_its_vm_is_reused_when_run(
    tmp_path: Path,
) -> None:
    """The agent died between installing the zone and creating the VM: Propolis says
    NoInstance, but the VM was never created, so that is no failure."""
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    pid = uuid.uuid4()
    with trio.fail_after(30):
        async with agent_on(fakes) as agent:
            await agent.manager.register_durably(pid, ensure_body())
        # The zone, as the dead agent had installed it; its Propolis has no VM yet.
        zone = await fakes.zones.install(ZoneSpec(pid, uuid.uuid4(), "127.0.0.1:12400"))
        installed_at = fakes.zones.timeline[zone.name].installed_at
        fakes.propolis.client_for(zone)
        async with agent_on(fakes) as agent:
            runner = agent.manager.registry.get(pid).runner
            await runner.adopted.wait()
            assert agent.manager.registry.get(pid).phase is VmmPhase.ACTIVE
            await agent.manager.put_state(pid, RUN)
            await fakes.nexus.wait_for(pid, VmmState.RUNNING)
            # The same zone, never installed again.
            assert fakes.zones.timeline[zone.name].installed_at == installed_at


async def test_a_vmm_whose_propolis_never_answers_fails_after_the_unreachable_bound(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    config = fast_config(shutdown_drain_s=0.5, propolis_unreachable_s=30.0, readopt_probe_s=2.0)
    async with agent_on(fakes, config) as agent:
        pid = await AgentHarness(agent, fakes).start_vmm()
        await agent.notifier.wait_idle()
    fakes.propolis[pid].disconnect()  # its process died: every call is refused
    async with agent_on(fakes, config) as agent:
        t0, entry = trio.current_time(), agent.manager.registry.get(pid)
        await fakes.nexus.wait_for(pid, VmmState.FAILED)
        # (The journal's fsync runs in a thread, where virtual time jumps: measure the
        # halt itself, not its arrival.)
        assert entry.halted_at is not None and 30.0 <= entry.halted_at - t0 <= 32.0
        await agent.drain()


async def test_a_state_change_waits_for_the_readoption_and_gets_503_past_its_bound(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    config = fast_config(shutdown_drain_s=0.5, readopt_probe_s=60.0, readopt_wait_s=5.0)
    async with agent_on(fakes, config) as agent:
        pid = await AgentHarness(agent, fakes).start_vmm()
        await agent.notifier.wait_idle()
        running = agent.manager.registry.get(pid).state
    fakes.propolis[pid].hang()  # Propolis does not answer the monitor
    async with agent_on(fakes, config) as agent:
        assert await agent.manager.get_state(pid) == running  # reads answer at once
        t0 = trio.current_time()
        with pytest.raises(Unavailable, match="re-adopted"):
            await agent.manager.put_state(pid, STOP)
        assert trio.current_time() - t0 == pytest.approx(5.0)
        fakes.propolis[pid].hang(False)  # it answers now: the next request is served
        await agent.manager.registry.get(pid).runner.adopted.wait()
        await agent.manager.put_state(pid, STOP)
        await fakes.nexus.wait_for(pid, VmmState.DESTROYED)


async def test_an_unregister_during_readoption_ends_the_vmm_and_reaps_its_zone(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    config = fast_config(shutdown_drain_s=0.5, readopt_probe_s=60.0)
    async with agent_on(fakes, config) as agent:
        pid = await AgentHarness(agent, fakes).start_vmm()
        await agent.notifier.wait_idle()
    fakes.propolis[pid].hang()
    async with agent_on(fakes, config) as agent:
        answer = await agent.manager.unregister(pid)
        assert answer.updated_runtime is not None
        assert answer.updated_runtime.vmm_state.state is VmmState.DESTROYED
        with pytest.raises(Terminating):
            await agent.manager.put_state(pid, RUN)
        await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        await agent.drain()
    assert fakes.zones.zones == {}


async def test_a_stop_asked_before_the_restart_keeps_its_grace_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    config = fast_config(shutdown_drain_s=0.5, stop_grace_s=100.0)
    async with agent_on(fakes, config) as agent:
        pid = await AgentHarness(agent, fakes).start_vmm()
        fakes.propolis[pid].auto = False  # the guest ignores the stop
        await agent.manager.put_state(pid, STOP)
        await agent.notifier.wait_idle()
    async with agent_on(fakes, config) as agent:
        await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        await agent.drain()
    assert fakes.zones.zones == {}


async def test_zones_nobody_promised_are_still_bundled_as_unexpected(tmp_path: Path) -> None:
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    with trio.fail_after(30):
        async with agent_on(fakes) as agent:  # the journal exists from here on
            await agent.drain()
        stray = uuid.uuid4()
        await fakes.zones.install(ZoneSpec(stray, uuid.uuid4(), "127.0.0.1:1"))
        async with agent_on(fakes) as agent:
            await agent.drain()
    bundles = await fakes.store.list_zone(zone_name_for(stray))
    assert [b.metadata.cause for b in bundles] == [ZoneBundleCause.UNEXPECTED_ZONE]
    assert fakes.zones.zones == {}


@pytest.mark.parametrize("loss", ["deleted", "emptied"])
async def test_a_lost_journal_beside_zones_of_vmms_stops_the_start_and_keeps_the_guests(
    loss: str, tmp_path: Path
) -> None:
    """A journal deleted or emptied while VMMs run: starting would take every guest for
    unknown and tear it down (a QA drill: 6 guests killed, Nexus never told)."""
    path = tmp_path / "journal.sqlite3"
    fakes = FakeHost(journal_path=path)
    with trio.fail_after(30):
        async with agent_on(fakes) as agent:
            pid = await AgentHarness(agent, fakes).start_vmm()
    for f in tmp_path.glob("journal.sqlite3*"):
        f.unlink()
    if loss == "emptied":
        path.write_bytes(b"")
    with trio.fail_after(30), pytest.raises(JournalError, match="zones of VMMs") as caught:
        async with agent_on(fakes):
            pass
    assert zone_name_for(pid) in str(caught.value)
    assert zone_name_for(pid) in {z.name for z in fakes.zones.zones.values()}  # untouched


async def test_an_unreadable_journal_row_stops_the_start_naming_the_vmm(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    fakes = FakeHost(journal_path=path)
    with trio.fail_after(30):
        async with agent_on(fakes) as agent:
            pid = await AgentHarness(agent, fakes).start_vmm()
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE vmm SET state = '{\"garbled' WHERE propolis_id = ?", (str(pid),))
    db.close()
    with trio.fail_after(30), pytest.raises(JournalError, match=str(pid)):
        async with agent_on(fakes):
            pass
    assert zone_name_for(pid) in {z.name for z in fakes.zones.zones.values()}


async def test_generations_never_repeat_or_go_back_across_many_restarts(tmp_path: Path) -> None:
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    with trio.fail_after(60):
        async with agent_on(fakes) as agent:
            pids = [await AgentHarness(agent, fakes).start_vmm() for _ in range(3)]
        for round_ in range(4):
            async with agent_on(fakes) as agent:
                for pid in pids:
                    entry = agent.manager.registry.find(pid)
                    if entry is not None:
                        await entry.runner.adopted.wait()
                if round_ == 1:
                    fakes.propolis[pids[0]].push(InstanceState.REBOOTING)
                    await fakes.nexus.wait_for(pids[0], VmmState.REBOOTING)
                if round_ == 2:
                    await agent.manager.put_state(pids[1], STOP)
                    await fakes.nexus.wait_for(pids[1], VmmState.DESTROYED)
                await agent.notifier.wait_idle()
    for pid in pids:
        seen: dict[int, object] = {}
        last = -1
        for state in fakes.nexus.states_for(pid):
            assert state.gen >= last  # never back
            assert seen.setdefault(state.gen, state) == state  # a repeat is the same content
            last = state.gen


async def test_after_a_host_reboot_every_live_vmm_is_failed_at_once(tmp_path: Path) -> None:
    """No guest survives a host reboot: the start tells Nexus right away, without waiting
    for each Propolis to stay unreachable, and reaps the zones."""
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    with trio.fail_after(30):
        async with agent_on(fakes) as agent:
            pids = [await AgentHarness(agent, fakes).start_vmm() for _ in range(3)]
            await agent.notifier.wait_idle()
            gens = {pid: agent.manager.registry.get(pid).state.gen for pid in pids}
        host = fakes.host()
        async with open_sled_agent(fast_config(), host, host_rebooted=True) as agent:
            for pid in pids:
                await fakes.nexus.wait_for(pid, VmmState.FAILED)
            await agent.drain()
    for pid in pids:
        final = fakes.nexus.latest(pid)
        assert final is not None and final.gen == gens[pid] + 1
    assert fakes.zones.zones == {}


def test_a_changed_boot_id_is_a_host_reboot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sledagent import _datadir

    boot = tmp_path / "boot_id"
    monkeypatch.setattr(_datadir, "_BOOT_ID", boot)
    boot.write_text("aaaa\n")
    assert not _datadir.host_rebooted(tmp_path)  # first start: nothing to compare
    assert not _datadir.host_rebooted(tmp_path)  # same boot
    boot.write_text("bbbb\n")
    assert _datadir.host_rebooted(tmp_path)
    assert not _datadir.host_rebooted(tmp_path)


async def test_a_readopted_vmm_holds_its_nics_again(tmp_path: Path) -> None:
    """A new incarnation of the same instance still waits for the old zone's NICs."""
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    nic = uuid.uuid4()
    with trio.fail_after(30):
        async with agent_on(fakes) as agent:
            pid = await AgentHarness(agent, fakes).start_vmm(nic_ids=[nic])
        async with agent_on(fakes) as agent:
            await agent.manager.registry.get(pid).runner.adopted.wait()
            assert agent.nics.holder(nic) == zone_name_for(pid)


async def test_a_propolis_at_the_address_running_another_instance_is_not_ours(
    tmp_path: Path,
) -> None:
    """The address answers, but for another VM (the port was taken by another zone):
    our guest is gone, so the VMM fails rather than adopt a stranger's VM."""
    import attrs as _attrs

    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    with trio.fail_after(30):
        async with agent_on(fakes) as agent:
            pid = await AgentHarness(agent, fakes).start_vmm()
            await agent.notifier.wait_idle()
        vm = fakes.propolis[pid]
        assert vm.ensured is not None
        stranger = _attrs.evolve(vm.ensured.properties, id=uuid.uuid4())
        vm.ensured = _attrs.evolve(vm.ensured, properties=stranger)
        async with agent_on(fakes) as agent:
            await fakes.nexus.wait_for(pid, VmmState.FAILED)
            await agent.drain()
