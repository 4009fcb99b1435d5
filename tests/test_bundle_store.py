"""The on-disk bundle store: index from files, delete, utilization, cleanup, context."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import pytest
import trio
import trio.testing

from sledagent import BadRequest, DiskBundleStore, TarArchiver, ZoneBundleCause
from sledagent._wire import CleanupContextUpdate, Duration, PriorityDimension

from .test_archive import make_job


async def write_bundle(
    tmp_path: Path, dirs: list[Path], cause: ZoneBundleCause, age_h: int = 0, big: int = 0
) -> object:
    import attrs

    work = tmp_path / f"w{uuid.uuid4()}"
    work.mkdir()
    job = make_job(work, big=big)
    meta = attrs.evolve(
        job.metadata,
        cause=cause,
        time_created=job.metadata.time_created - dt.timedelta(hours=age_h),
    )
    return await TarArchiver(dirs).write(attrs.evolve(job, metadata=meta))


def store_at(tmp_path: Path, dirs: list[Path], quota: int | None = None) -> DiskBundleStore:
    return DiskBundleStore(dirs, context_path=tmp_path / "ctx.toml", quota_bytes=quota)


async def test_the_index_is_rebuilt_from_the_files_and_corrupt_ones_are_quarantined(
    tmp_path: Path,
) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    written = [
        await write_bundle(tmp_path, dirs, ZoneBundleCause.TERMINATED_INSTANCE) for _ in range(3)
    ]
    bad = dirs[0] / "oxz_propolis-server_bad" / f"{uuid.uuid4()}.tar.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"\x1f\x8bnot really gzip")
    store = store_at(tmp_path, dirs)
    await store.open()
    listed = await store.list_all()
    assert sorted(b.bundle_id for b in listed) == sorted(w.bundle_id for w in written)  # type: ignore[attr-defined]
    assert all(len(b.paths) == 2 for b in listed)  # both copies found
    assert [q.original_path for q in await store.quarantine()] == [str(bad)]
    assert await store.list_all("no-such-zone") == []


async def test_delete_removes_every_copy(tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    info = await write_bundle(tmp_path, dirs, ZoneBundleCause.OTHER)
    store = store_at(tmp_path, dirs)
    await store.open()
    assert await store.delete(info.zone_name, info.bundle_id)  # type: ignore[attr-defined]
    assert not any(Path(p).exists() for p in info.paths)  # type: ignore[attr-defined]
    assert not await store.delete(info.zone_name, info.bundle_id)  # type: ignore[attr-defined]
    assert await store.list_all() == []


async def test_utilization_is_per_directory_against_the_quota(tmp_path: Path) -> None:
    dirs = [tmp_path / "a"]
    info = await write_bundle(tmp_path, dirs, ZoneBundleCause.OTHER)
    store = store_at(tmp_path, dirs, quota=1_000_000)
    await store.open()
    (util,) = (await store.utilization()).values()
    assert util.dataset_quota == 1_000_000
    assert util.bytes_available == 250_000  # 25 %
    assert util.bytes_used == info.size  # type: ignore[attr-defined]


async def test_cleanup_deletes_in_priority_order_and_counts_per_directory(tmp_path: Path) -> None:
    dirs = [tmp_path / "a"]
    keep = await write_bundle(tmp_path, dirs, ZoneBundleCause.TERMINATED_INSTANCE, age_h=10)
    old_other = await write_bundle(tmp_path, dirs, ZoneBundleCause.OTHER, age_h=5)
    new_other = await write_bundle(tmp_path, dirs, ZoneBundleCause.OTHER, age_h=1)
    size = keep.size  # type: ignore[attr-defined]
    # Room for about one and a half bundles: the two `other` bundles must go, oldest first.
    store = store_at(tmp_path, dirs, quota=int(size * 1.5 * 100 / 25))
    await store.open()
    counts = await store.cleanup()
    assert counts[str(dirs[0])].bundles == 2
    assert counts[str(dirs[0])].bytes == old_other.size + new_other.size  # type: ignore[attr-defined]
    assert [b.bundle_id for b in await store.list_all()] == [keep.bundle_id]  # type: ignore[attr-defined]
    assert Path(keep.paths[0]).exists() and not Path(old_other.paths[0]).exists()  # type: ignore[attr-defined]


async def test_the_context_is_validated_persisted_and_survives_a_restart(tmp_path: Path) -> None:
    dirs = [tmp_path / "a"]
    store = store_at(tmp_path, dirs)
    await store.open()
    with pytest.raises(BadRequest, match="storage_limit"):
        await store.update_context(CleanupContextUpdate(storage_limit=80))
    new = await store.update_context(
        CleanupContextUpdate(
            period=Duration(secs=120, nanos=0),
            priority=[PriorityDimension.TIME, PriorityDimension.CAUSE],
        )
    )
    again = store_at(tmp_path, dirs)
    await again.open()
    assert again.context.value == new
    assert again.context.value.period.secs == 120 and again.context.value.storage_limit == 25


async def test_a_new_period_takes_effect_at_once(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    dirs = [tmp_path / "a"]
    store = store_at(tmp_path, dirs)
    await store.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run_periodic_cleanup)
        mock_clock.jump(300)  # default period is 600 s: nothing yet
        await trio.testing.wait_all_tasks_blocked()
        assert store.cleanup_runs.value == 0
        await store.update_context(CleanupContextUpdate(period=Duration(secs=60, nanos=0)))
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(61)
        await store.cleanup_runs.wait_value(lambda n: n >= 1)
        nursery.cancel_scope.cancel()
