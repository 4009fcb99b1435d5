"""`sledagent zone-bundle` verbs, as processes, against a daemon running in the test."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import httpx
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


async def test_the_zone_bundle_verbs_work_against_a_running_agent(tmp_path: Path) -> None:
    config = DaemonConfig(
        listen="127.0.0.1:0", data_dir=tmp_path / "data", log_rate_bps=8192, agent=fast_config()
    )
    shutdown = trio.Event()
    with trio.fail_after(90):
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
                out = await cli(url, "get", zone, bundle_id, cwd=tmp_path)
                assert (tmp_path / f"{bundle_id}.tar.gz").stat().st_size > 0, out
                ctx = json.loads(
                    await cli(url, "set-context", "--storage-limit", "10", "--json", cwd=tmp_path)
                )
                assert ctx["storage_limit"] == 10
                context = await cli(url, "context", "--json", cwd=tmp_path)
                assert json.loads(context)["storage_limit"] == 10
                assert json.loads(await cli(url, "utilization", "--json", cwd=tmp_path))
                assert json.loads(await cli(url, "cleanup", "--json", cwd=tmp_path))
                await cli(url, "rm", zone, bundle_id, cwd=tmp_path)
                assert bundle_id not in await cli(url, "ls", cwd=tmp_path)
                await api.delete(f"/vmms/{pid}")
                await nexus.wait_for(pid, VmmState.DESTROYED)
                await info.agent.drain()
            shutdown.set()
