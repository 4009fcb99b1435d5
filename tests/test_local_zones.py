"""The local zone backend: real trees, real processes, real commands, real snapshots.

Real time; every test carries a ``fail_after``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest
import trio

from sledagent import (
    ArchiveJob,
    LocalZoneBackend,
    LocalZonesConfig,
    TarArchiver,
    ZoneBundleCause,
    ZoneBundleId,
    ZoneBundleMetadata,
    ZoneCommand,
    ZoneSpec,
)
from sledagent._local_snapshots import SNAPSHOT_TAG
from sledagent._local_zones import LOG_SUBDIR
from sledagent._logwriter import SERVICE_LOG
from sledagent._seed import seed_logs
from sledagent._wire import utcnow


def spec() -> ZoneSpec:
    return ZoneSpec(uuid.uuid4(), uuid.uuid4(), "127.0.0.1:0", frozenset({uuid.uuid4()}))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


async def test_install_creates_the_tree_and_starts_a_log_writing_process(tmp_path: Path) -> None:
    backend = LocalZoneBackend(LocalZonesConfig(root=tmp_path, log_rate_bps=100_000))
    with trio.fail_after(20):
        zone = await backend.install(spec())
        zdir = tmp_path / "zones" / zone.name
        meta = json.loads((zdir / "zone.json").read_text())
        (pid,) = meta["pids"]
        assert alive(pid)
        assert zone.name.startswith("oxz_propolis-server_")
        log_file = zdir / LOG_SUBDIR / SERVICE_LOG
        while not (log_file.exists() and log_file.stat().st_size > 0):  # noqa: ASYNC110
            await trio.sleep(0.05)
        first = json.loads(log_file.read_text().splitlines()[0])
        assert first["name"] == "propolis-server"
        assert await backend.zone_exists(zone)
        await backend.halt_and_remove(zone)
    assert not alive(pid)
    assert not zdir.exists()
    assert not await backend.zone_exists(zone)
    await backend.halt_and_remove(zone)  # idempotent


async def test_commands_are_real_and_a_missing_tool_is_recorded(tmp_path: Path) -> None:
    backend = LocalZoneBackend(LocalZonesConfig(root=tmp_path))
    with trio.fail_after(20):
        zone = await backend.install(spec())
        try:
            commands = await backend.bundle_commands(zone)
            names = [c.name for c in commands]
            (pid,) = json.loads((tmp_path / "zones" / zone.name / "zone.json").read_text())["pids"]
            assert {"ps", "uptime", "ss", "who", "last"} <= set(names)
            assert {f"pargs.{pid}", f"pfiles.{pid}", f"pstack.{pid}"} <= set(names)
            assert all(isinstance(c.argv, tuple) for c in commands)  # never a shell string
            by_name = {c.name: c for c in commands}
            pargs = await backend.run_command(zone, by_name[f"pargs.{pid}"])
            assert zone.name.encode() in pargs.output and pargs.exit_status == 0
            ps = await backend.run_command(zone, by_name["ps"])
            assert str(pid).encode() in ps.output
            missing = await backend.run_command(zone, ZoneCommand(("no-such-tool-xyz", "-a")))
            assert missing.exit_status is None and "not found" in (missing.error or "")
        finally:
            await backend.halt_and_remove(zone)


async def test_a_snapshot_links_every_file_and_archives_the_live_log_as_it_was(
    tmp_path: Path,
) -> None:
    backend = LocalZoneBackend(
        LocalZonesConfig(
            root=tmp_path, log_rate_bps=0, seed_log_bytes=3 << 20, max_live_copy_bytes=1000
        )
    )
    with trio.fail_after(20):
        zone = await backend.install(spec())
        log_dir = tmp_path / "zones" / zone.name / LOG_SUBDIR
        archive_dir = tmp_path / "archive" / zone.name
        bundle_id = uuid.uuid4()
        snap = await backend.snapshot(zone, bundle_id)
        snap_dir = Path(snap.name)
        assert json.loads((snap_dir / SNAPSHOT_TAG).read_text())["bundle_id"] == str(bundle_id)
        names = {f.name for f in snap.files}
        assert SERVICE_LOG in names and f"{SERVICE_LOG}.0" in names
        assert any(
            n.split(".")[-1].isdigit() and len(n.split(".")[-1]) >= 9 for n in names
        )  # archived
        for f in snap.files:
            src = log_dir / f.name if (log_dir / f.name).exists() else archive_dir / f.name
            assert os.stat(f.path).st_ino == os.stat(src).st_ino  # hard link, no copy
            assert f.size == src.stat().st_size
            if f.name == SERVICE_LOG:  # the live log: its newest bytes, up to the cap
                assert f.start == f.size - 1000
        live = log_dir / SERVICE_LOG
        as_snapshotted = live.read_bytes()[-1000:]
        with live.open("ab") as grow:  # the zone keeps logging after phase 1 ...
            grow.write(b'{"msg":"after the snapshot"}\n' * 100)
        live.rename(log_dir / f"{SERVICE_LOG}.0.rotated")  # ... and rotates
        archiver = TarArchiver([tmp_path / "debug"])
        meta = ZoneBundleMetadata(
            cause=ZoneBundleCause.TERMINATED_INSTANCE,
            id=ZoneBundleId(bundle_id=bundle_id, zone_name=zone.name),
            time_created=utcnow(),
            version=0,
        )
        info = await archiver.write(ArchiveJob(meta, (), snap))
        with tarfile.open(info.paths[0], "r:gz") as tar:
            archived = tar.extractfile(SERVICE_LOG).read()  # type: ignore[union-attr]
            manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        assert archived == as_snapshotted  # the log as it was at phase 1
        (cut,) = [t for t in manifest["truncated"] if t["name"] == SERVICE_LOG]
        assert cut["kept"] == 1000  # the manifest says older bytes were left out
        await backend.destroy_snapshot(snap)
        assert not snap_dir.exists()
        await backend.destroy_snapshot(snap)  # idempotent
        await backend.halt_and_remove(zone)


async def test_a_process_that_ignores_sigterm_is_killed_after_the_deadline(tmp_path: Path) -> None:
    backend = LocalZoneBackend(LocalZonesConfig(root=tmp_path, log_rate_bps=0, term_timeout_s=0.5))
    with trio.fail_after(20):
        zone = await backend.install(spec())
        stubborn = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)",
                zone.name,
            ],
            start_new_session=True,
            stdout=subprocess.PIPE,
        )
        assert stubborn.stdout is not None
        await trio.to_thread.run_sync(stubborn.stdout.readline)  # SIGTERM now ignored
        meta_path = tmp_path / "zones" / zone.name / "zone.json"
        meta = json.loads(meta_path.read_text())
        meta["pids"] = [stubborn.pid]
        meta_path.write_text(json.dumps(meta))
        t0 = trio.current_time()
        await backend.halt_and_remove(zone)
        assert trio.current_time() - t0 >= 0.5
        assert await trio.to_thread.run_sync(stubborn.wait) == -9
        stubborn.stdout.close()


async def test_list_zones_and_sweep_find_what_a_crash_left(tmp_path: Path) -> None:
    backend = LocalZoneBackend(LocalZonesConfig(root=tmp_path, log_rate_bps=0))
    with trio.fail_after(20):
        zone = await backend.install(spec())
        snap = await backend.snapshot(zone, uuid.uuid4())
        untagged = tmp_path / "snapshots" / "not-ours"
        untagged.mkdir()
        assert [z.name for z in await backend.list_zones()] == [zone.name]
        assert (await backend.list_zones())[0].nic_ids == zone.nic_ids
        assert await backend.sweep_snapshots() == 1
        assert not Path(snap.name).exists() and untagged.exists()
        await backend.halt_and_remove(zone)


async def test_a_zone_a_kill_left_without_its_record_is_still_listed_and_removed(
    tmp_path: Path,
) -> None:
    """A kill mid-teardown (the tree half removed, ``zone.json`` gone) or mid-install left
    a directory the next start must still see, or it stays on the host for good."""
    backend = LocalZoneBackend(LocalZonesConfig(root=tmp_path, log_rate_bps=0))
    zone_spec = spec()
    name = zone_spec.zone_name
    (tmp_path / "zones" / name / LOG_SUBDIR).mkdir(parents=True)  # what rmtree left
    (tmp_path / "archive" / name).mkdir(parents=True)
    (tmp_path / "zones" / "not-a-zone.txt").write_text("")  # a file is not a zone
    with trio.fail_after(20):
        listed = await backend.list_zones()
        # Whose it was, from its name: the journal pairs it with its VMM.
        assert [(z.name, z.propolis_id) for z in listed] == [(name, zone_spec.propolis_id)]
        await backend.halt_and_remove(listed[0])
    assert not (tmp_path / "zones" / name).exists()
    assert not (tmp_path / "archive" / name).exists()


async def test_a_zone_with_a_garbled_record_is_still_its_vmms(tmp_path: Path) -> None:
    """Listed under the VMM its name carries: the journal pairs it and the guest is taken
    back, not called vanished and torn down as unexpected (a QA drill)."""
    backend = LocalZoneBackend(LocalZonesConfig(root=tmp_path, log_rate_bps=0))
    zone_spec = spec()
    zdir = tmp_path / "zones" / zone_spec.zone_name
    zdir.mkdir(parents=True)
    (zdir / "zone.json").write_text('{"zone_name": ')
    with trio.fail_after(20):
        (listed,) = await backend.list_zones()
    assert (listed.name, listed.propolis_id) == (zone_spec.zone_name, zone_spec.propolis_id)


async def test_a_snapshot_a_kill_cut_short_is_removed_at_the_next_start(tmp_path: Path) -> None:
    """Made under ``.creating-``, removed through ``.removing-``: a kill at any point
    leaves a whole tagged snapshot or a tree the next start deletes, never an untagged
    one it must keep as not its own (a crash drill left one)."""
    backend = LocalZoneBackend(LocalZonesConfig(root=tmp_path, log_rate_bps=0))
    snaps = tmp_path / "snapshots"
    with trio.fail_after(20):
        zone = await backend.install(spec())
        whole = await backend.snapshot(zone, uuid.uuid4())
        assert (Path(whole.name) / SNAPSHOT_TAG).exists()
        assert [p.name for p in snaps.iterdir()] == [Path(whole.name).name]  # no work dir
        (snaps / f".creating-{uuid.uuid4()}").mkdir()  # killed while made: no tag yet
        half_removed = snaps / f".removing-{uuid.uuid4()}"
        (half_removed / "propolis.log").parent.mkdir()
        (half_removed / "propolis.log").write_text("tag already gone")
        left = await backend.leftover_snapshots()
        assert [s.bundle_id for s in left] == [whole.bundle_id]
        assert sorted(p.name for p in snaps.iterdir()) == [Path(whole.name).name]
        await backend.destroy_snapshot(whole)
        await backend.destroy_snapshot(whole)  # idempotent
        assert list(snaps.iterdir()) == []
        await backend.halt_and_remove(zone)


def test_seeded_logs_have_the_requested_volume_in_many_files(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    seed_logs(tmp_path / "log", tmp_path / "archive", 5 << 20, seed=7)
    files = list((tmp_path / "log").iterdir()) + list((tmp_path / "archive").iterdir())
    total = sum(f.stat().st_size for f in files)
    assert 5 << 20 <= total < (5 << 20) + 4096
    assert len(files) >= 6
    line = (tmp_path / "log" / SERVICE_LOG).read_text().splitlines()[0]
    assert json.loads(line)["name"] == "propolis-server"


async def test_install_failure_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise OSError("disk full (injected)")

    monkeypatch.setattr("sledagent._local_zones.seed_logs", broken)
    backend = LocalZoneBackend(LocalZonesConfig(root=tmp_path, log_rate_bps=0, seed_log_bytes=10))
    with trio.fail_after(20), pytest.raises(OSError, match="injected"):
        await backend.install(spec())
    assert list((tmp_path / "zones").iterdir()) == []
