"""A Propolis's log exists from its start, and a bundle says which log source was missing
(issue 15, part 6). Real processes, sockets and files: every test carries a ``fail_after``.
"""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import httpx
import trio

from sledagent import TarArchiver, VmmState, ZoneSpec
from sledagent._bundler import BUNDLE_VERSION
from sledagent._daemon import DaemonConfig, run_daemon
from sledagent._host import ArchiveJob
from sledagent._local_zones import LOG_SUBDIR, LocalZoneBackend, LocalZonesConfig, LogSpec
from sledagent._logwriter import SERVICE_LOG
from sledagent._wire import ZoneBundleCause, ZoneBundleId, ZoneBundleMetadata, utcnow
from sledagent.sim._fleet import SimPropolisFleet
from sledagent.testing import RetryOverloaded, ensure_body_json, fast_config


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


async def test_a_vmm_that_lives_a_few_milliseconds_leaves_its_propolis_log_in_its_bundle(
    tmp_path: Path,
) -> None:
    config = DaemonConfig(listen="127.0.0.1:0", data_dir=tmp_path, agent=fast_config())
    shutdown = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(run_daemon, config, shutdown)
            nexus = info.recording_nexus
            assert nexus is not None
            async with httpx.AsyncClient(
                base_url=info.api_url, timeout=10, transport=RetryOverloaded()
            ) as api:
                pid = uuid.uuid4()
                # Registered, run and stopped at once: no time for a log tick.
                r = await api.put(f"/vmms/{pid}", json=ensure_body_json())
                assert r.status_code == 200, r.text
                r = await api.put(f"/vmms/{pid}/state", json={"state": {"type": "running"}})
                assert r.status_code == 200, r.text
                r = await api.put(f"/vmms/{pid}/state", json={"state": {"type": "stopped"}})
                assert r.status_code == 200, r.text
                await nexus.wait_for(pid, VmmState.DESTROYED)
                await info.agent.drain()
                (b,) = (await api.get("/zones/bundles")).json()
                r = await api.get(f"/zones/bundles/{b['id']['zone_name']}/{b['id']['bundle_id']}")
                assert r.status_code == 200, r.text
            shutdown.set()
    entries = members(r.content)
    assert SERVICE_LOG in entries
    first = json.loads(entries[SERVICE_LOG].splitlines()[0])
    assert first["msg"] == "propolis-server starting" and first["name"] == "propolis-server"
    assert json.loads(entries["manifest.json"])["missing"] == []


async def test_the_simulated_propolis_log_exists_as_soon_as_it_is_launched(tmp_path: Path) -> None:
    fleet = SimPropolisFleet(log_interval_s=3600)  # no tick will come during this test
    logs = LogSpec(log_dir=tmp_path / "zone" / "log", archive_dir=tmp_path / "archive")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(fleet.run)
            await fleet.launch("oxz_propolis-server_a", logs)
            lines = (logs.log_dir / SERVICE_LOG).read_bytes().splitlines()
            await fleet.retire("oxz_propolis-server_a")
            nursery.cancel_scope.cancel()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["zone_name"] == "oxz_propolis-server_a" and line["level"] == 30


async def test_the_stand_in_log_writer_has_created_the_log_when_install_returns(
    tmp_path: Path,
) -> None:
    backend = LocalZoneBackend(LocalZonesConfig(root=tmp_path, log_rate_bps=1))
    spec = ZoneSpec(uuid.uuid4(), uuid.uuid4(), "127.0.0.1:1")
    with trio.fail_after(20):
        zone = await backend.install(spec)
        try:
            log_file = tmp_path / "zones" / zone.name / LOG_SUBDIR / SERVICE_LOG
            first = json.loads(log_file.read_bytes().splitlines()[0])
            assert first["msg"] == "propolis-server starting"
        finally:
            await backend.halt_and_remove(zone)


async def test_a_bundle_of_a_zone_without_its_propolis_log_says_it_was_missing(
    tmp_path: Path,
) -> None:
    backend = LocalZoneBackend(LocalZonesConfig(root=tmp_path, log_rate_bps=0))  # no writer
    spec = ZoneSpec(uuid.uuid4(), uuid.uuid4(), "127.0.0.1:1")
    with trio.fail_after(20):
        zone = await backend.install(spec)
        bundle_id = uuid.uuid4()
        snapshot = await backend.snapshot(zone, bundle_id)
        meta = ZoneBundleMetadata(
            cause=ZoneBundleCause.OTHER,
            id=ZoneBundleId(bundle_id=bundle_id, zone_name=zone.name),
            time_created=utcnow(),
            version=BUNDLE_VERSION,
        )
        info = await TarArchiver([tmp_path / "debug"]).write(ArchiveJob(meta, (), snapshot))
        await backend.destroy_snapshot(snapshot)
        await backend.halt_and_remove(zone)
    assert snapshot.missing == (SERVICE_LOG,)
    entries = members(Path(info.paths[0]).read_bytes())
    assert SERVICE_LOG not in entries
    assert json.loads(entries["manifest.json"])["missing"] == [
        {"name": SERVICE_LOG, "reason": "not found when the snapshot was taken"}
    ]
