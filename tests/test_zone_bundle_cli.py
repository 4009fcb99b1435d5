"""`sledagent zone-bundle` verbs, as processes, against a daemon running in the test."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import trio

from sledagent import VmmState
from sledagent._daemon import DaemonConfig, run_daemon
from sledagent.testing import ensure_body_json, fast_config


async def cli(url: str, *args: str, cwd: Path) -> str:
    argv = [
        sys.executable,
        "-c",
        "from sledagent._cli import main; main()",
        "zone-bundle",
        *args,
        "--url",
        url,
    ]
    result = await trio.run_process(
        argv, capture_stdout=True, capture_stderr=True, check=False, cwd=cwd
    )
    assert result.returncode == 0, (args, result.stderr.decode())
    return result.stdout.decode()


@pytest.mark.deadline_s(300)
async def test_the_zone_bundle_verbs_work_against_a_running_agent(tmp_path: Path) -> None:
    config = DaemonConfig(
        listen="127.0.0.1:0", data_dir=tmp_path / "data", log_rate_bps=8192,
        bundle_quota_bytes=100_000, agent=fast_config(),
    )  # fmt: skip
    debug = str(tmp_path / "data" / "debug")
    shutdown = trio.Event()
    with trio.fail_after(270):  # a dozen CLI processes: 12 s idle, ~115 s loaded
        async with trio.open_nursery() as nursery:
            info = await nursery.start(run_daemon, config, shutdown)
            url, nexus = info.api_url, info.recording_nexus
            assert nexus is not None
            async with httpx.AsyncClient(base_url=url) as api:
                pid = uuid.uuid4()
                await api.put(f"/vmms/{pid}", json=ensure_body_json())
                await api.put(f"/vmms/{pid}/state", json={"state": {"type": "running"}})
                await nexus.wait_for(pid, VmmState.RUNNING)
                zone = f"oxz_propolis-server_{pid}"
                assert (await cli(url, "list-zones", cwd=tmp_path)).split() == [zone]
                created = await cli(url, "create", zone, cwd=tmp_path)
                bundle_id = created.split()[1]
                listed = await cli(url, "ls", "propolis", "-o", "bundle-id,cause", cwd=tmp_path)
                assert bundle_id in listed and "other" in listed
                await cli(url, "get", zone, bundle_id, cwd=tmp_path)
                served = await api.get(f"/zones/bundles/{zone}/{bundle_id}")
                got = (tmp_path / f"{bundle_id}.tar.gz").read_bytes()
                assert got == served.content  # the bundle, byte for byte
                size = len(got)
                # What the bundle takes, against the quota and the default limit (25 %).
                assert json.loads(await cli(url, "utilization", "--json", cwd=tmp_path)) == {
                    debug: {"bytes_available": 25_000, "bytes_used": size,
                            "dataset_quota": 100_000},
                }  # fmt: skip
                ctx = json.loads(
                    await cli(url, "set-context", "--storage-limit", "10", "--json", cwd=tmp_path)
                )
                assert ctx["storage_limit"] == 10
                assert (
                    json.loads(await cli(url, "context", "--json", cwd=tmp_path))["storage_limit"]
                    == 10
                )
                await cli(url, "rm", zone, bundle_id, cwd=tmp_path)
                assert bundle_id not in await cli(url, "ls", cwd=tmp_path)
                # Two bundles over a limit of 10 000 bytes: cleanup deletes until it fits.
                ids = []
                for _ in "ab":  # (through the API: one CLI process fewer each)
                    job = info.agent.jobs.create(zone)
                    while job.bundle is None:
                        assert job.error is None
                        await trio.sleep(0.01)
                    ids.append(str(job.bundle.id.bundle_id))
                sizes = [b.size for b in await info.agent.store.list_zone(zone)]
                assert len(sizes) == 2 and sum(sizes) > 10_000
                counts = json.loads(await cli(url, "cleanup", "--json", cwd=tmp_path))
                left = await info.agent.store.list_zone(zone)
                deleted = sum(sizes) - sum(b.size for b in left)
                assert counts == {debug: {"bundles": 2 - len(left), "bytes": deleted}}
                assert deleted > 0 and sum(b.size for b in left) <= 10_000
                assert {b.bundle_id for b in left} <= {uuid.UUID(i) for i in ids}
                await api.delete(f"/vmms/{pid}")
                await nexus.wait_for(pid, VmmState.DESTROYED)
                await info.agent.drain()
            shutdown.set()
