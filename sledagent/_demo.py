"""Part 2 of ``sledagent demo``: VMMs on real local zones, real bundles."""

from __future__ import annotations

import tarfile
from pathlib import Path

import attrs
import trio

from ._wire import VmmState, VmmStateRequestedType
from .testing import LocalHost, fast_config, open_fake_agent


@attrs.frozen
class DemoBundle:
    zone: str
    cause: str
    size: int
    entries: int
    path: str


def _entries(path: str) -> int:
    with tarfile.open(path, "r:gz") as tar:
        return len(tar.getnames())


async def run_local_demo(data_dir: Path, *, vmms: int, log_mb: float) -> list[DemoBundle]:
    """Start ``vmms`` VMMs on local zones, stop them, and return the bundles written."""
    local = LocalHost.at(data_dir, log_rate_bps=8192, seed_log_bytes=int(log_mb * (1 << 20)))
    async with open_fake_agent(fast_config(), local) as h:
        ids = [await h.start_vmm() for _ in range(vmms)]
        await trio.sleep(1.0)  # let the zones' processes write a little
        for pid in ids:
            await h.request(pid, VmmStateRequestedType.STOPPED)
        for pid in ids:
            await local.nexus.wait_for(pid, VmmState.DESTROYED)
        await h.agent.drain()
        listed = await h.agent.store.list_all()
    return [
        DemoBundle(
            zone=b.zone_name,
            cause=b.metadata.cause.value,
            size=b.size,
            entries=await trio.to_thread.run_sync(_entries, b.paths[0]),
            path=str(Path(b.paths[0]).relative_to(data_dir.parent)),
        )
        for b in listed
    ]
