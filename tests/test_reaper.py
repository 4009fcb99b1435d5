"""The reaper: bundles then tears down every defunct zone; retries; NIC handover."""

from __future__ import annotations

import uuid

import pytest
import trio

from sledagent import NicsStillHeld, ReaperStep, VmmPhase, VmmState
from sledagent.testing import FakeHost, FakeZones, fast_config, open_fake_agent


async def test_a_failing_bundle_still_leads_to_teardown(autojump_clock: trio.abc.Clock) -> None:
    fakes = FakeHost()
    fakes.zones.fail_snapshot = 100  # every attempt fails
    async with open_fake_agent(fast_config(bundle_attempts=3), fakes) as h:
        pid = await h.start_vmm()
        fakes.propolis[pid].halt()
        await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        await h.agent.drain()
        stats = h.agent.reaper.statistics()
    assert fakes.zones.fail_snapshot == 97  # three attempts
    assert stats.bundles_failed == 1 and stats.reaped == 1
    assert fakes.zones.zones == {} and len(fakes.store.index) == 0
    assert fakes.zones.live_snapshots == set()


async def test_a_failing_archive_drops_its_snapshot_and_the_zone_is_still_halted(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost()
    fakes.zones.fail_archive = 1
    async with open_fake_agent(fast_config(), fakes) as h:
        pid = await h.start_vmm()
        fakes.propolis[pid].halt()
        await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        await h.agent.drain()
    assert fakes.zones.live_snapshots == set()
    assert fakes.zones.zones == {} and len(fakes.store.index) == 0


async def test_a_failing_teardown_is_retried_until_it_succeeds(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost()
    fakes.zones.fail_halt = 4
    async with open_fake_agent(fast_config(), fakes) as h:
        pid = await h.start_vmm()
        fakes.propolis[pid].halt()
        await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        await trio.sleep(0.1)  # (virtual) halts tried at 0 and 0.05 s failed; next at 0.15 s
        (held,) = h.agent.reaper.holdings()  # what GET /zones/cleanup shows
        assert (held.step, held.halt_attempts) == (ReaperStep.HALTING, 2)
        assert held.halt_error == "InjectedFault('zone halt failed')"
        await h.agent.drain()
        assert h.agent.reaper.statistics().halt_retries == 4
    (timeline,) = fakes.zones.timeline.values()
    assert timeline.halt_attempts == 5 and timeline.halted_at is not None
    assert len(fakes.store.index) == 1


async def test_a_new_vmm_of_the_same_instance_waits_for_the_old_zone_to_release_its_nics(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost(zones=FakeZones(command_s=3.0, copy_s=20.0))
    instance, nic = uuid.uuid4(), uuid.uuid4()
    async with open_fake_agent(fast_config(nic_release_timeout_s=30.0), fakes) as h:
        old = await h.start_vmm(instance_id=instance, nic_ids=[nic])
        fakes.propolis[old].halt()
        await fakes.nexus.wait_for(old, VmmState.DESTROYED)
        assert h.agent.nics.holder(nic) == f"oxz_propolis-server_{old}"
        new = await h.start_vmm(instance_id=instance, nic_ids=[nic])  # waits, no crash
        old_tl = fakes.zones.timeline[f"oxz_propolis-server_{old}"]
        new_tl = fakes.zones.timeline[f"oxz_propolis-server_{new}"]
        assert old_tl.halted_at is not None
        assert new_tl.installed_at >= old_tl.halted_at
        assert h.agent.nics.holder(nic) == f"oxz_propolis-server_{new}"
        # The old zone's archive is still being written: the new VMM did not wait for it.
        assert old_tl.archived_at == []
        assert (await h.agent.manager.get_state(new)).vmm_state.state is VmmState.RUNNING


async def test_nics_held_past_the_deadline_give_a_clear_503_and_keep_the_vmm(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost()
    fakes.zones.fail_halt = 10**6  # the old zone never goes away
    instance, nic = uuid.uuid4(), uuid.uuid4()
    async with open_fake_agent(
        fast_config(nic_release_timeout_s=30.0, shutdown_drain_s=1.0), fakes
    ) as h:
        old = await h.start_vmm(instance_id=instance, nic_ids=[nic])
        fakes.propolis[old].halt()
        await fakes.nexus.wait_for(old, VmmState.DESTROYED)
        new = uuid.uuid4()
        t0 = trio.current_time()
        with pytest.raises(NicsStillHeld) as info:
            await h.start_vmm(instance_id=instance, nic_ids=[nic], propolis_id=new)
        assert trio.current_time() - t0 == pytest.approx(30.0)
        assert info.value.status == 503 and str(nic) in str(info.value)
        assert h.agent.manager.registry.get(new).phase is VmmPhase.ACTIVE


async def test_shutdown_drains_the_reaper_within_its_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost(zones=FakeZones(command_s=1.0, copy_s=2.0))
    async with open_fake_agent(fast_config(shutdown_drain_s=60.0), fakes) as h:
        ids = [await h.start_vmm() for _ in range(10)]
        for pid in ids:
            fakes.propolis[pid].halt()
            await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        t0 = trio.current_time()
    # Leaving the block drained the reaper: every zone bundled and gone.
    assert trio.current_time() - t0 < 60.0
    assert fakes.zones.zones == {} and len(fakes.store.index) == 10


async def test_shutdown_stops_at_its_deadline_and_leaves_the_rest_on_the_host(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost(zones=FakeZones(command_s=1.0, copy_s=100.0))
    async with open_fake_agent(
        fast_config(shutdown_drain_s=5.0, bundle_archive_concurrency=1), fakes
    ) as h:
        ids = [await h.start_vmm() for _ in range(3)]
        for pid in ids:
            fakes.propolis[pid].halt()
            await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        t0 = trio.current_time()
    assert trio.current_time() - t0 == pytest.approx(5.0)
    assert len(fakes.store.index) == 0  # no archive finished; no partial bundle recorded
    # Their zones are torn down; the snapshots (the only copy of the logs) stay for the
    # next start, which finishes the three bundles from them.
    assert fakes.zones.zones == {} and len(fakes.zones.live_snapshots) == 3
    fakes.zones.copy_s = 0.1
    async with open_fake_agent(fast_config(), fakes) as h:
        await h.agent.recovered.wait()  # archived while the agent already serves
        assert len(await h.agent.store.list_all()) == 3
    assert fakes.zones.live_snapshots == set()


async def test_the_reaper_lets_pending_publications_go_first_but_not_forever(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost(zones=FakeZones(command_s=1.0))
    async with open_fake_agent(fast_config(publish_first_s=2.0), fakes) as h:
        a, b = await h.start_vmm(), await h.start_vmm()
        # A Nexus that is down: deliveries back off, and bundling does not wait for them.
        fakes.nexus.fail_for(600.0)
        t1 = trio.current_time()
        fakes.propolis[b].halt()
        entry = h.agent.manager.registry.get(b)
        await entry.wait_until(lambda e: e.phase is not VmmPhase.ACTIVE)
        await h.agent.reaper.wait_idle()
        (released,) = fakes.zones.timeline[f"oxz_propolis-server_{b}"].released_at
        assert released - t1 == pytest.approx(1.0, abs=0.01)  # commands only
        # A slow Nexus: the delivery is under way, so bundling waits for it, up to 2 s.
        fakes.nexus.fail_for(0.0)
        fakes.nexus.latency_s = 60.0
        t0 = trio.current_time()
        fakes.propolis[a].halt()
        entry = h.agent.manager.registry.get(a)
        await entry.wait_until(lambda e: e.phase is not VmmPhase.ACTIVE)
        await h.agent.reaper.wait_idle()
        (released,) = fakes.zones.timeline[f"oxz_propolis-server_{a}"].released_at
        assert released - t0 == pytest.approx(2.0 + 1.0, abs=0.01)  # bound, then commands
        assert fakes.nexus.first_time(b, VmmState.DESTROYED) is None


async def test_a_bundle_cut_short_by_a_crash_is_finished_from_its_snapshot_at_the_next_start(
    autojump_clock: trio.abc.Clock,
) -> None:
    from sledagent._host import ZoneSpec
    from sledagent._wire import ZoneBundleCause

    fakes = FakeHost()
    # What a kill during phase 2 leaves: the zone already torn down, its snapshot still
    # there, no bundle.
    zone = await fakes.zones.install(ZoneSpec(uuid.uuid4(), uuid.uuid4(), "127.0.0.1:1"))
    snapshot = await fakes.zones.snapshot(zone, uuid.uuid4())
    await fakes.zones.halt_and_remove(zone)
    async with open_fake_agent(fast_config(), fakes) as h:
        await h.agent.recovered.wait()  # archived while the agent already serves
        (info,) = await h.agent.store.list_all()
    assert info.bundle_id == snapshot.bundle_id and info.zone_name == zone.name
    assert info.metadata.cause is ZoneBundleCause.OTHER
    assert fakes.zones.live_snapshots == set()
    (job,) = fakes.zones.archived_jobs
    assert [c.name for c in job.commands] == ["recovered"]
