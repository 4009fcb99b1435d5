"""One VMM's lifecycle through the manager and its runner, as Nexus would drive it."""

from __future__ import annotations

import json
import uuid

import attrs
import pytest
import trio
import trio.lowlevel

from sledagent import (
    ChannelFull,
    HostFull,
    NoSuchVmm,
    PropolisAlreadyRegistered,
    Terminating,
    VmmPhase,
    VmmState,
    VmNotRunning,
)
from sledagent._codec import encode
from sledagent._wire import InstanceState, InstanceStateRequested, SledVmmState
from sledagent._wire import VmmStateRequestedType as Req
from sledagent.testing import (
    AgentHarness,
    FakeHost,
    FakeZones,
    ensure_body,
    fast_config,
    open_fake_agent,
)

from .conftest import Contract


async def test_a_full_runner_queue_answers_channel_full_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost()
    async with open_fake_agent(fast_config(runner_queue_size=2), fakes) as h:
        pid = await h.start_vmm()
        fakes.propolis[pid].request_delay_s = 10.0  # the runner will be busy
        async with trio.open_nursery() as nursery:
            for _ in range(3):  # one in flight, two queued
                nursery.start_soon(h.request, pid, Req.REBOOT)
            await trio.sleep(1.0)
            t = trio.current_time()
            with pytest.raises(ChannelFull) as info:
                await h.request(pid, Req.REBOOT)
            assert trio.current_time() == t
            assert info.value.status == 503 and info.value.error_code == "INSTANCE_CHANNEL_FULL"
            # Reads still answer at once while the queue is full.
            assert (await h.agent.manager.get_state(pid)).vmm_state.state is VmmState.RUNNING
            assert trio.current_time() == t


async def test_register_is_idempotent_and_refuses_another_instance(
    fake_agent: AgentHarness,
) -> None:
    manager = fake_agent.agent.manager
    pid, body = uuid.uuid4(), ensure_body()
    first = manager.register(pid, body)
    assert manager.register(pid, body) == first
    assert len(manager.registry) == 1
    with pytest.raises(PropolisAlreadyRegistered):
        manager.register(pid, ensure_body())


async def test_unknown_vmms_are_no_such_vmm_and_unregister_is_not_an_error(
    fake_agent: AgentHarness,
) -> None:
    manager, pid = fake_agent.agent.manager, uuid.uuid4()
    with pytest.raises(NoSuchVmm) as info:
        await manager.get_state(pid)
    assert info.value.status == 404 and info.value.error_code == "NO_SUCH_INSTANCE"
    with pytest.raises(NoSuchVmm):
        await fake_agent.request(pid, Req.RUNNING)
    assert (await manager.unregister(pid)).updated_runtime is None


async def test_stop_before_start_goes_straight_to_destroyed(fake_agent: AgentHarness) -> None:
    manager, pid = fake_agent.agent.manager, uuid.uuid4()
    registered = manager.register(pid, ensure_body())
    stopped = await fake_agent.request(pid, Req.STOPPED)
    assert stopped is not None
    assert stopped.vmm_state.state is VmmState.DESTROYED
    assert stopped.gen == registered.gen + 1
    await fake_agent.fakes.nexus.wait_for(pid, VmmState.DESTROYED)
    await trio.lowlevel.checkpoint()
    with pytest.raises(NoSuchVmm):
        await manager.get_state(pid)
    assert fake_agent.fakes.zones.timeline == {}  # no zone was ever made


async def test_reboot_before_start_is_vm_not_running(fake_agent: AgentHarness) -> None:
    pid = uuid.uuid4()
    fake_agent.agent.manager.register(pid, ensure_body())
    with pytest.raises(VmNotRunning):
        await fake_agent.request(pid, Req.REBOOT)


async def test_a_requested_stop_publishes_stopping_then_destroyed_and_reaps_the_zone(
    fake_agent: AgentHarness,
) -> None:
    fakes = fake_agent.fakes
    pid = await fake_agent.start_vmm()
    stopping = await fake_agent.request(pid, Req.STOPPED)
    assert stopping is not None and stopping.vmm_state.state is VmmState.STOPPING
    assert fakes.propolis[pid].requests == [InstanceStateRequested.RUN, InstanceStateRequested.STOP]
    await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
    await fake_agent.agent.drain()
    delivered = fakes.nexus.states_for(pid)
    assert delivered[-1].vmm_state.state is VmmState.DESTROYED
    assert [s.gen for s in delivered] == sorted({s.gen for s in delivered})
    assert fakes.zones.zones == {} and len(fakes.store.index) == 1


async def test_a_vm_that_halts_before_propolis_answers_the_stop_stays_destroyed(
    fake_agent: AgentHarness,
) -> None:
    # Found over HTTP: the monitor saw Destroyed while the stop request was still being
    # answered, and the late "stopping" overwrote the terminal state (and was published
    # with a newer generation), so Nexus never learned that the VMM was gone.
    fakes = fake_agent.fakes
    pid = await fake_agent.start_vmm()
    fakes.propolis[pid].answer_late = True
    answer = await fake_agent.request(pid, Req.STOPPED)
    assert answer is not None and answer.vmm_state.state is VmmState.DESTROYED
    with trio.fail_after(5):
        await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        await fake_agent.agent.drain()
    delivered = fakes.nexus.states_for(pid)
    assert delivered[-1].vmm_state.state is VmmState.DESTROYED
    assert [s.gen for s in delivered] == sorted({s.gen for s in delivered})
    assert fake_agent.agent.manager.registry.find(pid) is None  # published and removed


async def test_a_stop_overtaken_by_the_halt_is_answered_with_the_terminal_state(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Found over HTTP with the lean client: Propolis halted the guest and the monitor
    # heard it before Propolis's answer to the stop, so the stop was cancelled and the
    # caller got 410 for a stop that had done what it asked.
    fakes = FakeHost()
    async with open_fake_agent(fast_config(), fakes) as h:
        pid = await h.start_vmm()
        vm = fakes.propolis[pid]
        vm.request_delay_s = 5.0
        answers: list[SledVmmState | None] = []

        async def stop() -> None:
            answers.append(await h.request(pid, Req.STOPPED))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop)
            await trio.sleep(1.0)
            vm.halt()  # the guest powers off while the stop waits on Propolis
        assert len(answers) == 1 and answers[0] is not None
        assert answers[0].vmm_state.state is VmmState.DESTROYED
        await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        await h.agent.drain()


async def test_a_vmm_that_ignores_stop_is_destroyed_when_the_grace_period_expires(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost()
    async with open_fake_agent(fast_config(stop_grace_s=600.0), fakes) as h:
        pid = await h.start_vmm()
        fakes.propolis[pid].auto = False  # Propolis accepts Stop and then does nothing
        t0 = trio.current_time()
        await h.request(pid, Req.STOPPED)
        await h.request(pid, Req.STOPPED)  # a second stop does not reset the clock
        t = await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        assert t - t0 == pytest.approx(600.0)
        await h.agent.drain()
        assert fakes.zones.zones == {}


@pytest.mark.parametrize("how", ["vanish", "gone_410", "fail"])
async def test_a_vmm_whose_propolis_fails_or_vanishes_becomes_failed_and_is_reaped(
    how: str, fake_agent: AgentHarness
) -> None:
    fakes = fake_agent.fakes
    pid = await fake_agent.start_vmm()
    propolis = fakes.propolis[pid]
    {
        "vanish": propolis.vanish,
        "gone_410": lambda: propolis.error(410, "NoInstance"),
        "fail": propolis.fail,
    }[how]()
    with trio.fail_after(5):
        await fakes.nexus.wait_for(pid, VmmState.FAILED)
        await fake_agent.agent.drain()
    assert fakes.zones.zones == {}


async def test_the_monitor_rides_out_connection_drops(autojump_clock: trio.abc.Clock) -> None:
    fakes = FakeHost()
    async with open_fake_agent(fast_config(), fakes) as h:
        pid = await h.start_vmm()
        propolis = fakes.propolis[pid]
        propolis.disconnect()
        propolis.error(503, times=3)
        await trio.sleep(5.0)
        assert h.agent.manager.registry.get(pid).phase is VmmPhase.ACTIVE
        propolis.disconnect(False)
        propolis.halt()
        await fakes.nexus.wait_for(pid, VmmState.DESTROYED)


async def test_a_propolis_unreachable_past_the_bound_fails_the_vmm_and_is_reaped(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Its process died: every state-monitor poll is refused. Nothing waits forever.
    fakes = FakeHost()
    config = attrs.evolve(fast_config(), propolis_unreachable_s=20.0)
    async with open_fake_agent(config, fakes) as h:
        pid = await h.start_vmm()
        fakes.propolis[pid].disconnect()
        t0 = trio.current_time()
        await fakes.nexus.wait_for(pid, VmmState.FAILED)
        assert 20.0 <= trio.current_time() - t0 <= 22.0
        await h.agent.drain()
    assert fakes.zones.zones == {}


async def test_unregister_destroys_a_running_vmm_at_once_and_reaps_its_zone(
    fake_agent: AgentHarness,
) -> None:
    fakes = fake_agent.fakes
    pid = await fake_agent.start_vmm()
    response = await fake_agent.agent.manager.unregister(pid)
    assert response.updated_runtime is not None
    assert response.updated_runtime.vmm_state.state is VmmState.DESTROYED
    with pytest.raises(Terminating):
        await fake_agent.request(pid, Req.RUNNING)
    await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
    await fake_agent.agent.drain()
    assert fakes.zones.zones == {}


async def test_a_zone_that_cannot_be_installed_fails_the_vmm_with_a_clear_error(
    fake_agent: AgentHarness,
) -> None:
    fake_agent.fakes.zones.fail_install = 1
    pid = uuid.uuid4()
    with pytest.raises(Terminating, match="has failed: could not install zone") as caught:
        await fake_agent.start_vmm(propolis_id=pid)
    # The caller is told what happened: the VMM failed (not "retry").
    assert (caught.value.status, caught.value.error_code) == (410, "NO_SUCH_INSTANCE")
    await fake_agent.fakes.nexus.wait_for(pid, VmmState.FAILED)
    assert [u.state.vmm_state.state for u in fake_agent.fakes.nexus.updates] == [VmmState.FAILED]


async def test_registration_beyond_max_zones_is_refused(autojump_clock: trio.abc.Clock) -> None:
    fakes = FakeHost()
    async with open_fake_agent(fast_config(max_zones=2), fakes) as h:
        await h.start_vmm()
        await h.start_vmm()
        with pytest.raises(HostFull) as info:
            h.agent.manager.register(uuid.uuid4(), ensure_body())
        assert info.value.status == 503


async def test_propolis_receives_a_contract_valid_ensure_request(
    fake_agent: AgentHarness, propolis_contract: Contract
) -> None:
    pid = await fake_agent.start_vmm()
    ensured = fake_agent.fakes.propolis[pid].ensured
    assert ensured is not None
    propolis_contract.validate("InstanceEnsureRequest", json.loads(encode(ensured)))
    assert ensured.init["method"] == "Spec"


async def test_a_migration_target_starts_with_a_pending_migration_in(
    fake_agent: AgentHarness,
) -> None:
    from sledagent import VmmStateRequested, VmmStateRequestedType
    from sledagent._wire import InstanceMigrationTargetParams

    pid, mig = uuid.uuid4(), uuid.uuid4()
    manager = fake_agent.agent.manager
    state = manager.register(pid, ensure_body(migration_id=mig))
    assert state.migration_in is not None and state.migration_in.migration_id == mig
    requested = VmmStateRequested(
        VmmStateRequestedType.MIGRATION_TARGET, InstanceMigrationTargetParams("127.0.0.1:1")
    )
    await manager.put_state(pid, requested)
    ensured = fake_agent.fakes.propolis[pid].ensured
    assert ensured is not None and ensured.init["method"] == "MigrationTarget"
    assert ensured.init["value"]["migration_id"] == str(mig)
    fake_agent.fakes.propolis[pid].push(InstanceState.MIGRATING)


async def test_a_hung_state_monitor_does_not_keep_a_stopped_vmm_alive(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost()
    async with open_fake_agent(fast_config(stop_grace_s=120.0), fakes) as h:
        pid = await h.start_vmm()
        propolis = fakes.propolis[pid]
        propolis.hang()  # the monitor long-poll never answers again
        t0 = trio.current_time()
        await h.request(pid, Req.STOPPED)  # Propolis walks to Destroyed, unseen
        t = await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        assert t - t0 == pytest.approx(120.0)  # forced by the grace period, not waited forever
        await h.agent.drain()
        assert fakes.zones.zones == {}


async def test_unregister_while_the_zone_installs_leaks_neither_zone_nor_nics(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost(zones=FakeZones(install_s=5.0))
    nic = uuid.uuid4()
    async with open_fake_agent(fast_config(), fakes) as h:
        pid = uuid.uuid4()
        h.agent.manager.register(pid, ensure_body(nic_ids=[nic]))
        outcome: list[BaseException] = []

        async def start() -> None:
            try:
                await h.request(pid, Req.RUNNING)
            except Terminating as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(start)
            await trio.sleep(1.0)
            assert h.agent.nics.holder(nic) is not None  # reserved for the install
            await h.agent.manager.unregister(pid)
        assert len(outcome) == 1
        await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        await h.agent.drain()
        assert h.agent.nics.holder(nic) is None
        assert fakes.zones.zones == {}


async def test_inline_reads_queue_behind_the_teardown_as_in_omicron(
    autojump_clock: trio.abc.Clock,
) -> None:
    from sledagent import TerminationPolicy

    fakes = FakeHost(zones=FakeZones(command_s=10.0, copy_s=10.0))
    config = fast_config(termination_policy=TerminationPolicy.INLINE)
    async with open_fake_agent(config, fakes) as h:
        pid = await h.start_vmm()
        fakes.propolis[pid].halt()
        await trio.sleep(0.5)
        t0 = trio.current_time()
        state = await h.agent.manager.get_state(pid)
        assert state.vmm_state.state is VmmState.DESTROYED
        assert trio.current_time() - t0 >= 19.0  # waited for the bundle (20 s) to finish
