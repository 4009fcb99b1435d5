"""The two-phase bundler: bounded phases; the zone released before phase 2 ends."""

from __future__ import annotations

import pytest
import trio

from sledagent import VmmState
from sledagent.testing import FakeHost, FakeZones, fast_config, open_fake_agent


async def test_phases_never_exceed_their_limiters_and_every_bundle_finishes(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost(zones=FakeZones(command_s=2.0, copy_s=5.0))
    # The fake bundles are small: phase 2 takes its slots for small bundles too.
    config = fast_config(
        bundle_collect_concurrency=3,
        bundle_archive_concurrency=2,
        bundle_archive_max_concurrency=3,
    )
    async with open_fake_agent(config, fakes) as h:
        ids = [await h.start_vmm() for _ in range(20)]
        for pid in ids:
            fakes.propolis[pid].halt()
        # Watch the limiters while the work runs.
        peak_collect = peak_archive = 0
        while len(fakes.store.index) < 20:
            stats = h.agent.bundler.statistics()
            peak_collect = max(peak_collect, stats.collect.borrowed)
            peak_archive = max(peak_archive, stats.archive.borrowed)
            await trio.sleep(0.5)
        await h.agent.drain()
    assert fakes.zones.peak_collecting == 3 and peak_collect == 3
    assert fakes.zones.peak_archiving == 3 and peak_archive == 3
    assert len(fakes.store.index) == 20
    assert h.agent.bundler.statistics().created == 20
    assert fakes.zones.live_snapshots == set()
    assert fakes.zones.zones == {}


async def test_zone_is_released_and_halted_before_its_archive_is_written(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost(zones=FakeZones(command_s=1.0, copy_s=30.0))
    async with open_fake_agent(fast_config(), fakes) as h:
        pid = await h.start_vmm()
        fakes.propolis[pid].halt()
        await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        await h.agent.drain()
    (timeline,) = fakes.zones.timeline.values()
    (released,) = timeline.released_at
    (archived,) = timeline.archived_at
    assert timeline.halted_at is not None
    assert released <= timeline.halted_at < archived
    held = h.agent.bundler.statistics().zone_held_s
    assert held == pytest.approx((1.0,))


async def test_a_hanging_command_times_out_and_the_bundle_still_completes(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost(zones=FakeZones(command_s=0.5))
    fakes.zones.hanging_commands.add("ss")
    async with open_fake_agent(fast_config(command_timeout_s=10.0), fakes) as h:
        pid = await h.start_vmm()
        fakes.propolis[pid].halt()
        await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        await h.agent.drain()
    (job,) = fakes.zones.archived_jobs
    by_tool = {c.argv[0]: c for c in job.commands}
    assert by_tool["ss"].timed_out and by_tool["ss"].duration_s == pytest.approx(10.0)
    assert all(not c.timed_out and c.exit_status == 0 for t, c in by_tool.items() if t != "ss")
    assert len(fakes.store.index) == 1
    assert fakes.zones.zones == {}


async def test_listing_bundles_does_not_wait_for_bundles_in_progress(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost(zones=FakeZones(command_s=5.0, copy_s=60.0))
    async with open_fake_agent(fast_config(bundle_archive_concurrency=4), fakes) as h:
        ids = [await h.start_vmm() for _ in range(4)]
        for pid in ids:
            fakes.propolis[pid].halt()
            await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        await trio.sleep(10.0)  # all four in phase 2 now
        assert h.agent.bundler.statistics().archive.borrowed == 4
        t = trio.current_time()
        assert await h.agent.store.list_all() == []
        assert trio.current_time() == t
        await h.agent.drain()
        assert len(await h.agent.store.list_all("oxz_propolis-server_")) == 4
