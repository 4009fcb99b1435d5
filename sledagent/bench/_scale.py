"""``sledagent bench scale``: what each managed VMM costs the agent's process.

The daemon runs in this process on local zones (no logs), every VMM's simulated
Propolis in a ``sledagent sim`` process of its own, so the figures are the agent's.
N VMMs are registered and run through the API; then the process's resident memory,
open file descriptors and trio tasks are read and divided by N (after subtracting what
the idle agent had). Then all guests halt at once and the same figures are read again
when the reaper is idle (what a mass stop leaves behind).
"""

from __future__ import annotations

import gc
import os
import tempfile
import uuid
from pathlib import Path

import httpx
import trio

from .._config import AgentConfig
from .._daemon import DaemonConfig, run_daemon
from .._failures import UsageError
from .._host import zone_name_for
from .._wire import VmmState
from ..testing import ensure_body_json
from ._procs import nexus_first_times, sim_process


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _snapshot() -> dict[str, int]:
    gc.collect()
    return {
        "rss_kib": _rss_kib(),
        "fds": len(os.listdir("/proc/self/fd")),
        "tasks": trio.lowlevel.current_statistics().tasks_living,
    }


async def run_scale_bench(*, vmms: int = 1000) -> dict[str, object]:
    if vmms < 1:
        raise UsageError("vmms must be >= 1")
    async with sim_process() as (nexus_url, fleet_url):
        with tempfile.TemporaryDirectory(prefix="sledagent-scale-") as tmp:
            config = DaemonConfig(
                listen="127.0.0.1:0",
                data_dir=Path(tmp),
                nexus_url=nexus_url,
                propolis="remote",
                sim_fleet_url=fleet_url,
                log_rate_bps=0,
                agent=AgentConfig(max_zones=max(1024, 2 * vmms), shutdown_drain_s=600.0),
            )
            shutdown = trio.Event()
            async with trio.open_nursery() as nursery:
                info = await nursery.start(run_daemon, config, shutdown)
                limits = httpx.Limits(max_connections=16)
                async with (
                    httpx.AsyncClient(base_url=info.api_url, limits=limits, timeout=60) as api,
                    httpx.AsyncClient(timeout=60) as peers,
                ):
                    await api.get("/zones")  # the client's pool exists before the baseline
                    idle = _snapshot()
                    pids = [uuid.uuid4() for _ in range(vmms)]
                    gate = trio.CapacityLimiter(16)
                    t0 = trio.current_time()

                    async def start(pid: uuid.UUID) -> None:
                        async with gate:
                            r = await api.put(f"/vmms/{pid}", json=ensure_body_json())
                            r.raise_for_status()
                            r = await api.put(
                                f"/vmms/{pid}/state", json={"state": {"type": "running"}}
                            )
                            r.raise_for_status()

                    async with trio.open_nursery() as starting:
                        for pid in pids:
                            starting.start_soon(start, pid)
                    await nexus_first_times(peers, nexus_url, pids, VmmState.RUNNING)
                    start_s = trio.current_time() - t0
                    running = _snapshot()
                    t1 = trio.current_time()
                    zones = [zone_name_for(pid) for pid in pids]
                    (await peers.post(f"{fleet_url}/fleet/halt", json=zones)).raise_for_status()
                    await nexus_first_times(peers, nexus_url, pids, VmmState.DESTROYED)
                    await info.agent.drain()
                    stop_s = trio.current_time() - t1
                    after = _snapshot()
                shutdown.set()

    def per_vmm(key: str) -> float:
        return round((running[key] - idle[key]) / vmms, 2)

    return {
        "params": {"vmms": vmms},
        "idle": idle,
        "running": running,
        "after_mass_stop": after,
        "per_vmm": {
            "rss_kib": per_vmm("rss_kib"),
            "fds": per_vmm("fds"),
            "tasks": per_vmm("tasks"),
        },
        "start_all_s": round(start_s, 2),
        "stop_all_s": round(stop_s, 2),
    }
