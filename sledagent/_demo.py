"""Part 2 of ``sledagent demo``: the daemon on the embedded default, driven over HTTP."""

from __future__ import annotations

import uuid
from pathlib import Path

import attrs
import httpx
import trio

from ._daemon import DaemonConfig, DaemonInfo
from ._wire import VmmState
from .testing import ensure_body_json, fast_config


@attrs.frozen
class DemoBundle:
    zone: str
    cause: str
    bundle_id: str


async def drive_scenario(info: DaemonInfo, vmms: int) -> list[DemoBundle]:
    """As Nexus would: register VMMs, run them, stop them; then list their bundles."""
    nexus = info.recording_nexus
    async with httpx.AsyncClient(base_url=info.api_url, timeout=30) as api:
        pids = [uuid.uuid4() for _ in range(vmms)]
        for pid in pids:
            (await api.put(f"/vmms/{pid}", json=ensure_body_json())).raise_for_status()
            body = {"state": {"type": "running"}}
            (await api.put(f"/vmms/{pid}/state", json=body)).raise_for_status()
        if nexus is not None:
            for pid in pids:
                await nexus.wait_for(pid, VmmState.RUNNING)
        await trio.sleep(1.0)  # let the zones' processes write some logs
        for pid in pids:
            body = {"state": {"type": "stopped"}}
            (await api.put(f"/vmms/{pid}/state", json=body)).raise_for_status()
        if nexus is not None:
            for pid in pids:
                await nexus.wait_for(pid, VmmState.DESTROYED)
        await info.agent.drain()
        wanted = {f"oxz_propolis-server_{pid}" for pid in pids}
        listed = (await api.get("/zones/bundles")).json()
    return [
        DemoBundle(b["id"]["zone_name"], b["cause"], b["id"]["bundle_id"])
        for b in listed
        if b["id"]["zone_name"] in wanted
    ]


def demo_config(data_dir: Path, listen: str, log_mb: float) -> DaemonConfig:
    return DaemonConfig(
        listen=listen,
        data_dir=data_dir,
        log_rate_bps=8192,
        seed_log_mb=log_mb,
        agent=fast_config(),
    )
