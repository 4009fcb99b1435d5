"""The reaper's and the bundler's promises across faults and restarts: teardowns run
within their bound, a zone handed over twice is reaped once, a snapshot whose bundle a
crash had already written is not archived again, a snapshot that cannot be destroyed
costs neither the bundle nor the teardown and is finished at the next start."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import pytest
import trio

from sledagent import DefunctZone, VmmState, ZoneBundleCause, ZoneSpec
from sledagent._bundler import BUNDLE_VERSION
from sledagent._host import ArchiveJob, CommandOutput
from sledagent._wire import ZoneBundleId, ZoneBundleMetadata, utcnow
from sledagent.testing import FakeHost, FakeZones, LocalHost, fast_config, open_fake_agent


async def test_zones_are_torn_down_at_most_teardown_concurrency_at_a_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost(zones=FakeZones(halt_s=10.0))
    async with open_fake_agent(fast_config(teardown_concurrency=2), fakes) as h:
        ids = [await h.start_vmm() for _ in range(5)]
        t0 = trio.current_time()
        for pid in ids:
            fakes.propolis[pid].halt()
        for pid in ids:
            await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        await h.agent.drain()
    assert fakes.zones.peak_halting == 2
    halted = sorted(t.halted_at - t0 for t in fakes.zones.timeline.values() if t.halted_at)
    assert halted == pytest.approx([10.0, 10.0, 20.0, 20.0, 30.0])  # two by two
    assert fakes.zones.zones == {} and len(fakes.store.index) == 5


async def test_a_zone_handed_to_the_reaper_twice_is_bundled_and_torn_down_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    # E.g. a runner's halt and the startup sweep both finding it.
    fakes = FakeHost(zones=FakeZones(command_s=5.0))
    async with open_fake_agent(fast_config(), fakes) as h:
        zone = await fakes.zones.install(ZoneSpec(uuid.uuid4(), uuid.uuid4(), "127.0.0.1:1"))
        for cause in (ZoneBundleCause.TERMINATED_INSTANCE, ZoneBundleCause.UNEXPECTED_ZONE):
            h.agent.reaper.submit(DefunctZone(zone, cause, utcnow()))
            await trio.sleep(1.0)  # (virtual) the first is being bundled
        await h.agent.reaper.wait_idle()
        assert h.agent.reaper.statistics().reaped == 1
    timeline = fakes.zones.timeline[zone.name]
    assert timeline.halt_attempts == 1 and len(timeline.released_at) == 1
    (job,) = fakes.zones.archived_jobs
    assert job.metadata.cause is ZoneBundleCause.TERMINATED_INSTANCE  # the first one's
    assert len(fakes.store.index) == 1 and fakes.zones.zones == {}


async def test_a_snapshot_whose_bundle_was_written_before_a_crash_is_not_archived_again(
    tmp_path: Path,
) -> None:
    # A kill after the bundle's rename, before its snapshot was dropped: the next start
    # finds both. The bundle stays as it was; the snapshot goes.
    local = LocalHost.at(tmp_path, log_rate_bps=0, seed_log_bytes=256 << 10)
    with trio.fail_after(60):
        zone = await local.zones.install(ZoneSpec(uuid.uuid4(), uuid.uuid4(), "127.0.0.1:1"))
        snapshot = await local.zones.snapshot(zone, uuid.uuid4())
        meta = ZoneBundleMetadata(
            cause=ZoneBundleCause.TERMINATED_INSTANCE,
            id=ZoneBundleId(bundle_id=snapshot.bundle_id, zone_name=zone.name),
            time_created=utcnow(),
            version=BUNDLE_VERSION,
        )
        ps = CommandOutput("ps", ("ps",), b"PID\n", 0, 0.01)
        (path,) = (await local.archiver.write(ArchiveJob(meta, (ps,), snapshot))).paths
        await local.zones.halt_and_remove(zone)
        before = Path(path).stat()
        async with open_fake_agent(fast_config(), local) as h:
            await h.agent.drain()
            (info,) = await h.agent.store.list_all()
    assert info.bundle_id == snapshot.bundle_id and info.paths == (path,)
    assert info.metadata.cause is ZoneBundleCause.TERMINATED_INSTANCE  # not "recovered"
    after = Path(path).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [p for p in (tmp_path / "debug0").rglob("*") if p.is_file()] == [Path(path)]
    assert not (tmp_path / "snapshots").exists() or list((tmp_path / "snapshots").iterdir()) == []


async def test_a_snapshot_that_cannot_be_destroyed_costs_neither_bundle_nor_teardown(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost()
    fakes.zones.fail_destroy_snapshot = 1
    async with open_fake_agent(fast_config(), fakes) as h:
        pid = await h.start_vmm()
        fakes.propolis[pid].halt()
        await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        await h.agent.drain()
    assert len(fakes.zones.live_snapshots) == 1  # logged (snapshot_destroy_failed), kept
    assert len(fakes.store.index) == 1 and fakes.zones.zones == {}
    # The next start finds it: its bundle exists, so it is only destroyed.
    async with open_fake_agent(fast_config(), fakes) as h:
        await h.agent.drain()
    assert fakes.zones.live_snapshots == set()
    assert len(fakes.zones.archived_jobs) == 1 and len(fakes.store.index) == 1


async def test_a_snapshot_destroy_that_hangs_is_given_up_at_its_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost()
    fakes.zones.destroy_snapshot_s = math.inf
    async with open_fake_agent(fast_config(snapshot_cleanup_timeout_s=20.0), fakes) as h:
        pid = await h.start_vmm()
        fakes.propolis[pid].halt()
        t0 = await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        await h.agent.reaper.wait_idle()
        assert trio.current_time() - t0 == pytest.approx(20.0)  # the deadline, not forever
        assert h.agent.reaper.statistics().reaped == 1
    assert len(fakes.store.index) == 1 and fakes.zones.zones == {}
    assert len(fakes.zones.live_snapshots) == 1  # left for the next start
