"""What an operator relies on at the edges of a VMM's life: the host's zone bound counts
zones still being reaped; a shutting-down agent refuses registrations; a Propolis that
refuses the VM, refuses the state monitor, or whose zone vanished fails the VMM at once
and its zone is reaped; a reboot and a repeated ``running`` leave a running VMM running.
All on the fakes and a virtual clock."""

from __future__ import annotations

import uuid

import pytest
import trio

from sledagent import AgentError, HostFull, VmmPhase, VmmState
from sledagent._errors import ShuttingDown
from sledagent._wire import InstanceStateRequested
from sledagent._wire import VmmStateRequestedType as Req
from sledagent.testing import FakeHost, FakePropolis, FakeZones, ensure_body, fast_config
from sledagent.testing import open_fake_agent as agent_on


async def test_max_zones_counts_zones_the_reaper_still_holds(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost(zones=FakeZones(command_s=30.0))  # each bundle holds its zone 30 s
    async with agent_on(fast_config(max_zones=2), fakes) as h:
        halted = await h.start_vmm()
        await h.start_vmm()
        fakes.propolis[halted].halt()
        await fakes.nexus.wait_for(halted, VmmState.DESTROYED)
        await h.agent.notifier.wait_idle()
        # The halted VMM is gone from the registry; its zone is still on the host.
        assert h.agent.manager.registry.find(halted) is None
        assert h.agent.reaper.backlog == 1 and len(fakes.zones.zones) == 2
        with pytest.raises(HostFull) as info:
            h.agent.manager.register(uuid.uuid4(), ensure_body())
        assert (info.value.status, info.value.error_code) == (503, "INSUFFICIENT_CAPACITY")
        assert "this sled holds 2 zones (max_zones = 2)" in str(info.value)
        await h.agent.reaper.wait_idle()  # the zone is torn down: room again
        assert len(fakes.zones.zones) == 1
        await h.start_vmm()


async def test_registrations_are_refused_while_the_agent_shuts_down(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost(zones=FakeZones(command_s=30.0))  # the drain takes 30 s
    refused: list[ShuttingDown] = []
    read_during_drain: list[VmmState] = []
    async with trio.open_nursery() as nursery:
        async with agent_on(fast_config(shutdown_drain_s=60.0), fakes) as h:
            live = await h.start_vmm()
            halted = await h.start_vmm()
            fakes.propolis[halted].halt()
            await fakes.nexus.wait_for(halted, VmmState.DESTROYED)

            async def during_the_drain() -> None:
                await trio.sleep(1.0)  # the block below has ended: the agent is draining
                try:
                    h.agent.manager.register(uuid.uuid4(), ensure_body())
                except ShuttingDown as exc:
                    refused.append(exc)
                state = await h.agent.manager.get_state(live)  # still served
                read_during_drain.append(state.vmm_state.state)

            nursery.start_soon(during_the_drain)
            t0 = trio.current_time()
        assert trio.current_time() - t0 == pytest.approx(30.0)  # drained, then stopped
    (exc,) = refused
    assert (exc.status, exc.error_code) == (503, "SHUTTING_DOWN")
    assert read_during_drain == [VmmState.RUNNING]


@pytest.mark.parametrize("status", [500, 400])
async def test_propolis_refusing_the_vm_fails_the_vmm_and_its_zone_is_reaped(
    status: int, autojump_clock: trio.abc.Clock
) -> None:
    fakes = FakeHost()
    pid = uuid.uuid4()
    vm = fakes.propolis.by_id[pid] = FakePropolis(pid)
    vm.refuse(status)  # PUT /instance
    async with agent_on(fast_config(), fakes) as h:
        h.agent.manager.register(pid, ensure_body())
        with pytest.raises(AgentError) as info:
            await h.request(pid, Req.RUNNING)
        assert f"refused with {status} (injected)" in str(info.value)
        # The VMM failed: the caller is told so, whatever Propolis answered (not "retry").
        assert (info.value.status, info.value.error_code) == (410, "NO_SUCH_INSTANCE")
        await fakes.nexus.wait_for(pid, VmmState.FAILED)
        await h.agent.drain()
    assert vm.ensured is None and vm.requests == []  # no VM, no state request sent
    # The zone was installed for it, bundled and torn down.
    (timeline,) = fakes.zones.timeline.values()
    assert timeline.halted_at is not None and len(fakes.store.index) == 1
    assert fakes.zones.zones == {}
    assert [u.state.vmm_state.state for u in fakes.nexus.updates] == [VmmState.FAILED]


async def test_a_state_monitor_refused_with_a_4xx_fails_the_vmm_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost()
    async with agent_on(fast_config(), fakes) as h:
        pid = await h.start_vmm()
        await fakes.nexus.wait_for(pid, VmmState.RUNNING)
        running = fakes.nexus.latest(pid)
        assert running is not None
        t0 = trio.current_time()
        fakes.propolis[pid].error(400)  # a permanent refusal, not an outage
        t = await fakes.nexus.wait_for(pid, VmmState.FAILED)
        assert t == t0  # not retried until propolis_unreachable_s
        failed = fakes.nexus.latest(pid)
        assert failed is not None and failed.gen == running.gen + 1
        await h.agent.drain()
    assert fakes.zones.zones == {} and len(fakes.store.index) == 1


async def test_a_vmm_whose_zone_vanished_fails_at_once_and_nothing_is_left_held(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost()
    config = fast_config(propolis_unreachable_s=60.0)
    async with agent_on(config, fakes) as h:
        pid = await h.start_vmm()
        t0 = trio.current_time()
        del fakes.zones.zones[f"oxz_propolis-server_{pid}"]  # removed under the agent
        fakes.propolis[pid].disconnect()  # its Propolis went with it
        t = await fakes.nexus.wait_for(pid, VmmState.FAILED)
        assert t == t0  # the zone is gone: no 60 s of retries
        await h.agent.drain()
        assert h.agent.reaper.statistics().reaped == 1
        assert h.agent.manager.registry.find(pid) is None
    assert fakes.zones.live_snapshots == set()


async def test_a_reboot_of_a_running_vmm_publishes_rebooting_then_running(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost()
    async with agent_on(fast_config(), fakes) as h:
        pid = await h.start_vmm()
        await fakes.nexus.wait_for(pid, VmmState.RUNNING)
        before = fakes.nexus.latest(pid)
        assert before is not None
        answer = await h.request(pid, Req.REBOOT)
        assert answer is not None and answer.vmm_state.state is VmmState.REBOOTING
        assert answer.gen > before.gen
        entry = h.agent.manager.registry.get(pid)
        await entry.wait_until(lambda e: e.state.vmm_state.state is VmmState.RUNNING)
        await h.agent.notifier.wait_idle()
        after = fakes.nexus.latest(pid)
        assert after is not None and after.vmm_state.state is VmmState.RUNNING
        assert after.gen > answer.gen
        assert fakes.propolis[pid].requests == [
            InstanceStateRequested.RUN,
            InstanceStateRequested.REBOOT,
        ]
        # Still the same VMM, on the same zone: nothing was torn down or bundled.
        assert entry.phase is VmmPhase.ACTIVE and list(fakes.zones.zones) == [
            f"oxz_propolis-server_{pid}"
        ]
        assert h.agent.reaper.backlog == 0 and len(fakes.store.index) == 0


async def test_running_asked_again_of_a_running_vmm_changes_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost()
    async with agent_on(fast_config(), fakes) as h:
        pid = await h.start_vmm()
        await h.agent.notifier.wait_idle()
        before = h.agent.manager.registry.get(pid).state
        published = len(fakes.nexus.states_for(pid))
        answer = await h.request(pid, Req.RUNNING)
        assert answer == before  # same state, same generation
        await h.agent.notifier.wait_idle()
        assert len(fakes.nexus.states_for(pid)) == published  # nothing new for Nexus
        vm = fakes.propolis[pid]
        assert vm.requests == [InstanceStateRequested.RUN, InstanceStateRequested.RUN]
        assert len(fakes.zones.timeline) == 1  # one zone installed, one VM ensured
        assert h.agent.manager.registry.get(pid).phase is VmmPhase.ACTIVE
