"""The agent on real local zones with real bundles (fake Propolis and Nexus).

Real time and real threads (no mock clock); every test carries a ``fail_after``.
"""

from __future__ import annotations

import errno
import tarfile
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from sledagent import BundleJobState, NoSuchZone, VmmState, ZoneBundleCause, ZoneSpec
from sledagent._archive import BUNDLE_SUFFIX
from sledagent._local_zones import LOG_SUBDIR
from sledagent.testing import LocalHost, fast_config, open_fake_agent

from ._hold import HeldArchiver, held_source, partial_files, until_writing

LOG_MB = 2


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def check_bundle(path: str, zone_name: str, cause: ZoneBundleCause) -> list[str]:
    with tarfile.open(path, "r:gz") as tar:
        names = tar.getnames()
        meta = tomllib.loads(tar.extractfile("metadata.toml").read().decode())  # type: ignore[union-attr]
    assert names[0] == "metadata.toml"
    assert meta["id"]["zone_name"] == zone_name and meta["cause"] == cause.value
    assert Path(path).name == f"{meta['id']['bundle_id']}{BUNDLE_SUFFIX}"
    assert "manifest.json" in names and "oxide-propolis-server:default.log" in names
    return names


@pytest.mark.deadline_s(180)  # real zones and bundles
async def test_eight_zones_with_limiters_at_two_give_eight_correct_bundles(tmp_path: Path) -> None:
    local = LocalHost.at(tmp_path, log_rate_bps=4096, seed_log_bytes=LOG_MB << 20, debug_dirs=2)
    config = fast_config(
        bundle_collect_concurrency=2,
        bundle_archive_concurrency=2,
        bundle_archive_max_concurrency=2,  # a fixed count (no more slots for small bundles)
    )
    with trio.fail_after(120):
        async with open_fake_agent(config, local) as h:
            ids = [await h.start_vmm() for _ in range(8)]
            peak = [0, 0]

            async def watch() -> None:
                while True:
                    stats = h.agent.bundler.statistics()
                    peak[0] = max(peak[0], stats.collect.borrowed)
                    peak[1] = max(peak[1], stats.archive.borrowed)
                    await trio.sleep(0.005)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                for pid in ids:
                    local.propolis[pid].halt()
                for pid in ids:
                    await local.nexus.wait_for(pid, VmmState.DESTROYED)
                await h.agent.drain()
                nursery.cancel_scope.cancel()
            bundles = await h.agent.store.list_all()
    assert 1 <= peak[0] <= 2 and 1 <= peak[1] <= 2
    assert len(bundles) == 8
    for b in bundles:
        assert len(b.paths) == 2
        names = check_bundle(b.paths[0], b.zone_name, ZoneBundleCause.TERMINATED_INSTANCE)
        assert any(n.startswith("pargs.") for n in names)  # the zone's process was there
    assert files_under(tmp_path / "zones") == [] and files_under(tmp_path / "snapshots") == []


@pytest.mark.parametrize("step", ["command", "snapshot", "archive", "rename"])
async def test_a_failure_at_any_step_leaves_no_partial_file_and_no_snapshot(
    step: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = LocalHost.at(tmp_path, log_rate_bps=0, seed_log_bytes=1 << 20)
    if step == "command":

        async def broken_command(*args: object) -> object:
            raise OSError("command failed (injected)")

        monkeypatch.setattr(local.zones, "run_command", broken_command)
    elif step == "snapshot":

        def fail(*a: object) -> None:
            raise OSError("snapshot failed (injected)")

        monkeypatch.setattr("sledagent._local_snapshots.link_or_copy", fail)
    elif step == "archive":

        def broken_tail(*args: object) -> None:
            raise OSError("disk full (injected)")

        monkeypatch.setattr("sledagent._archive._add_tail", broken_tail)
    else:

        def broken_rename(*args: object) -> None:
            raise OSError("rename failed (injected)")

        monkeypatch.setattr("sledagent._archive.os.rename", broken_rename)

    config = fast_config(bundle_attempts=2)
    with trio.fail_after(60):
        async with open_fake_agent(config, local) as h:
            pid = await h.start_vmm()
            local.propolis[pid].halt()
            await local.nexus.wait_for(pid, VmmState.DESTROYED)
            await h.agent.drain()
            bundles = await h.agent.store.list_all()
    debug = files_under(tmp_path / "debug0")
    assert files_under(tmp_path / "snapshots") == []
    assert files_under(tmp_path / "zones") == []  # teardown proceeded
    if step == "command":  # a failed command is recorded; the bundle is complete
        (b,) = bundles
        with tarfile.open(b.paths[0], "r:gz") as tar:
            uptime = tar.extractfile("uptime").read()  # type: ignore[union-attr]
        assert b"injected" in uptime
    else:
        assert bundles == [] and debug == []


async def test_the_startup_sweep_handles_every_leftover(tmp_path: Path) -> None:
    local = LocalHost.at(tmp_path, log_rate_bps=4096, seed_log_bytes=1 << 20)
    with trio.fail_after(60):
        # What a crash leaves: a zone nobody owns (its process still running), a tagged
        # snapshot, and a temporary bundle file.
        orphan = await local.zones.install(ZoneSpec(uuid.uuid4(), uuid.uuid4(), "127.0.0.1:0"))
        leftover_snap = await local.zones.snapshot(orphan, uuid.uuid4())
        partial = tmp_path / "debug0" / orphan.name / f".{uuid.uuid4()}.tar.gz.tmp"
        partial.parent.mkdir(parents=True)
        partial.write_bytes(b"half")
        async with open_fake_agent(fast_config(), local) as h:
            assert not partial.exists()
            await h.agent.drain()
            assert not Path(leftover_snap.name).exists()
            bundles = {b.metadata.cause: b for b in await h.agent.store.list_all()}
    assert set(bundles) == {ZoneBundleCause.UNEXPECTED_ZONE, ZoneBundleCause.OTHER}
    check_bundle(bundles[ZoneBundleCause.UNEXPECTED_ZONE].paths[0], orphan.name,
                 ZoneBundleCause.UNEXPECTED_ZONE)  # fmt: skip
    # The snapshot is finished into the bundle it was taken for, saying so.
    recovered = bundles[ZoneBundleCause.OTHER]
    assert recovered.bundle_id == leftover_snap.bundle_id
    check_bundle(recovered.paths[0], orphan.name, ZoneBundleCause.OTHER)
    with tarfile.open(recovered.paths[0], "r:gz") as tar:
        assert "recovered" in tar.getnames()
        assert {f.name for f in leftover_snap.files} <= set(tar.getnames())
    assert files_under(tmp_path / "zones") == [] and files_under(tmp_path / "snapshots") == []


async def test_an_explicit_bundle_of_a_live_zone_runs_as_a_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = LocalHost.at(tmp_path, log_rate_bps=4096, seed_log_bytes=1 << 20)
    commands_go = trio.Event()  # phase 1 holds the zone until this is set
    run_command = local.zones.run_command

    async def held_command(*args: Any) -> Any:
        await commands_go.wait()
        return await run_command(*args)

    monkeypatch.setattr(local.zones, "run_command", held_command)
    with trio.fail_after(60), held_source(tmp_path / "fifo") as held:
        local.archiver = HeldArchiver(local.archiver, held)  # type: ignore[assignment]
        async with open_fake_agent(fast_config(bundle_collect_concurrency=1), local) as h:
            pid = await h.start_vmm()
            zone_name = f"oxz_propolis-server_{pid}"
            busy = object()  # every phase-1 slot taken (by zones being reaped, say)
            await h.agent.bundler.collect_limiter.acquire_on_behalf_of(busy)
            job = h.agent.jobs.create(zone_name)
            assert h.agent.jobs.get(job.job_id) is job
            await trio.testing.wait_all_tasks_blocked()
            assert job.state is BundleJobState.QUEUED  # waiting for a slot
            h.agent.bundler.collect_limiter.release_on_behalf_of(busy)
            while job.state is BundleJobState.QUEUED:  # noqa: ASYNC110 (a job's state)
                await trio.sleep(0.001)
            assert job.state is BundleJobState.COLLECTING  # its commands are held
            commands_go.set()
            await until_writing(tmp_path / "debug0")
            assert job.state is BundleJobState.ARCHIVING  # its archive is held
            held.release()
            while job.state is BundleJobState.ARCHIVING:  # noqa: ASYNC110 (a job's state)
                await trio.sleep(0.001)
            assert job.state is BundleJobState.DONE, job.error
            assert job.bundle is not None and job.bundle.cause is ZoneBundleCause.OTHER
            (b,) = await h.agent.store.list_zone(zone_name)
            assert b.metadata == job.bundle
            check_bundle(b.paths[0], zone_name, ZoneBundleCause.OTHER)
            assert (tmp_path / "zones" / zone_name / LOG_SUBDIR).exists()  # still live
            with pytest.raises(NoSuchZone):
                h.agent.jobs.create("oxz_propolis-server_not-a-vmm")
            await h.agent.manager.unregister(pid)  # leave no zone process behind
            await h.agent.drain()
    assert files_under(tmp_path / "zones") == []


@pytest.mark.deadline_s(180)  # real zones and bundles
async def test_listing_answers_while_four_bundles_are_being_written(tmp_path: Path) -> None:
    local = LocalHost.at(tmp_path, log_rate_bps=0, seed_log_bytes=1 << 20)
    config = fast_config(bundle_archive_concurrency=4)
    with trio.fail_after(120), held_source(tmp_path / "fifo") as held:
        local.archiver = HeldArchiver(local.archiver, held)  # type: ignore[assignment]
        async with open_fake_agent(config, local) as h:
            ids = [await h.start_vmm() for _ in range(4)]
            for pid in ids:
                local.propolis[pid].halt()
            # Four archives are mid-write, and stay so until released: whatever listing
            # and utilization answer, they answer it while those bundles are written.
            await until_writing(tmp_path / "debug0", count=4)
            assert await h.agent.store.list_all() == []
            utilization = await h.agent.store.utilization()  # type: ignore[attr-defined]
            assert list(utilization) == [str(tmp_path / "debug0")]
            assert h.agent.bundler.statistics().archive.borrowed == 4  # still writing
            held.release()
            await h.agent.drain()
            listed = await h.agent.store.list_all()
    assert sorted(b.zone_name for b in listed) == sorted(f"oxz_propolis-server_{p}" for p in ids)
    assert partial_files(tmp_path / "debug0") == []


class _FullDisk:
    """A file that takes ``room`` bytes, then fails every write with ENOSPC."""

    def __init__(self, f: Any, room: int) -> None:
        self._f, self._room = f, room

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return int(self._f.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


async def test_a_full_disk_fails_the_bundle_cleanly_and_teardown_proceeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sledagent._archive as archive

    real_fdopen = archive.os.fdopen
    monkeypatch.setattr(
        archive.os, "fdopen", lambda fd, mode: _FullDisk(real_fdopen(fd, mode), 64 << 10)
    )
    local = LocalHost.at(tmp_path, log_rate_bps=0, seed_log_bytes=4 << 20)
    with trio.fail_after(60):
        async with open_fake_agent(fast_config(bundle_attempts=1), local) as h:
            pid = await h.start_vmm()
            local.propolis[pid].halt()
            await local.nexus.wait_for(pid, VmmState.DESTROYED)
            await h.agent.drain()
            stats = h.agent.bundler.statistics()
            assert stats.failed >= 1 and stats.created == 0  # counted: sledagent_bundles_failed
            assert await h.agent.store.list_all() == []
    # No partial file under any name, no snapshot, and the zone was torn down anyway.
    assert [p for p in files_under(tmp_path / "debug0")] == []
    assert files_under(tmp_path / "snapshots") == [] and files_under(tmp_path / "zones") == []
