"""``sledagent bench mass-stop --wire http``: the mass stop over the real wire.

The daemon runs in this process on the embedded default: local zones with real logs
and real tar.gz bundles, a simulated Propolis per zone over HTTP, a recording Nexus over
HTTP. N VMMs are registered and run through the agent's HTTP API; then all guests power
off at once. Three runs, one after the other in one process:

- ``reaper`` and ``inline`` (omicron's behaviour), with ``log_mb`` MB of logs per zone;
- ``floor``: the same halts with no logs and bundling switched off: the best this machine
  does over HTTP, dominated by N requests to Nexus.

While zones are reaped every VMM is read over HTTP (``GET /vmms/{id}/state``) every
``get_interval_s`` with a ``get_timeout_s`` client timeout.
"""

from __future__ import annotations

import random
import tempfile
import uuid
from pathlib import Path

import attrs
import httpx
import trio

from .._config import AgentConfig, BackoffPolicy, TerminationPolicy
from .._daemon import DaemonConfig, run_daemon
from .._host import zone_name_for
from .._stats import summary
from .._wire import VmmState
from ..testing import ensure_body_json
from ._mass_stop import _peak_rss_mb


@attrs.frozen(kw_only=True)
class WireParams:
    vmms: int = 50
    log_mb: float = 10.0
    get_interval_s: float = 0.5
    get_timeout_s: float = 10.0
    seed: int = 1


async def _reads(
    api: httpx.AsyncClient, pid: uuid.UUID, p: WireParams, out: list[float], timeouts: list[int]
) -> None:
    await trio.sleep(random.Random(f"{p.seed}{pid}").uniform(0, p.get_interval_s))
    while True:
        t0 = trio.current_time()
        try:
            with trio.fail_after(p.get_timeout_s):
                await api.get(f"/vmms/{pid}/state")
            out.append(trio.current_time() - t0)
        except (trio.TooSlowError, httpx.HTTPError):
            timeouts[0] += 1
        await trio.sleep(p.get_interval_s)


async def run_wire(mode: str, p: WireParams, cache: Path) -> dict[str, object]:
    """One run: ``mode`` is ``reaper``, ``inline`` or ``floor``."""
    floor = mode == "floor"
    agent = AgentConfig(
        termination_policy=TerminationPolicy.INLINE
        if mode == "inline"
        else TerminationPolicy.REAPER,
        max_zones=max(1024, 2 * p.vmms),
        bundle_defunct_zones=not floor,
        reaper_backoff=BackoffPolicy(initial_s=0.05, max_s=1.0),
        shutdown_drain_s=3600.0,
    )
    with tempfile.TemporaryDirectory(prefix="sledagent-wire-") as tmp:
        config = DaemonConfig(
            listen="127.0.0.1:0",
            data_dir=Path(tmp),
            log_rate_bps=0,
            seed_log_mb=0.0 if floor else p.log_mb,
            seed_cache=cache,
            agent=agent,
        )
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            info = await nursery.start(run_daemon, config, shutdown)
            nexus, fleet = info.recording_nexus, info.fleet
            assert nexus is not None and fleet is not None
            limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
            async with httpx.AsyncClient(base_url=info.api_url, limits=limits, timeout=60) as api:
                pids = [uuid.uuid4() for _ in range(p.vmms)]
                gate = trio.CapacityLimiter(16)

                async def start(pid: uuid.UUID) -> None:
                    async with gate:
                        (await api.put(f"/vmms/{pid}", json=ensure_body_json())).raise_for_status()
                        body = {"state": {"type": "running"}}
                        (await api.put(f"/vmms/{pid}/state", json=body)).raise_for_status()
                        await nexus.wait_for(pid, VmmState.RUNNING)

                async with trio.open_nursery() as starting:
                    for pid in pids:
                        starting.start_soon(start, pid)
                reads: list[float] = []
                timeouts = [0]
                t_halt = trio.current_time()
                async with trio.open_nursery() as probing:
                    vms = [fleet.vm(zone_name_for(pid)) for pid in pids]
                    for vm in vms:
                        assert vm is not None
                        vm.halt()  # the guests power off at once
                    for pid in pids:
                        probing.start_soon(_reads, api, pid, p, reads, timeouts)
                    for pid in pids:
                        await nexus.wait_for(pid, VmmState.DESTROYED)
                    await info.agent.drain()
                    drain_s = trio.current_time() - t_halt
                    probing.cancel_scope.cancel()
                h2p = []
                for pid, vm in zip(pids, vms, strict=True):
                    published = nexus.first_time(pid, VmmState.DESTROYED)
                    assert vm is not None and vm.halted_at is not None and published is not None
                    h2p.append(published - vm.halted_at)
                held = info.agent.bundler.statistics().zone_held_s
                bundles = len(await info.agent.store.list_all())
            shutdown.set()
    return {
        "halt_to_publish_s": summary(h2p),
        "get_state_s": {**summary(reads), "timeouts": timeouts[0], "reads": len(reads)},
        "zone_held_s": {k: v for k, v in summary(held).items() if k != "max"},
        "drain_s": round(drain_s, 3),
        "bundles": bundles,
        "peak_rss_mb": _peak_rss_mb(),
    }


async def run_wire_bench(p: WireParams) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="sledagent-seed-") as cache:
        results = {
            mode: await run_wire(mode, p, Path(cache)) for mode in ("reaper", "inline", "floor")
        }
    reaper = results["reaper"]["halt_to_publish_s"]["p99"]  # type: ignore[index]
    inline = results["inline"]["halt_to_publish_s"]["p99"]  # type: ignore[index]
    floor = results["floor"]["halt_to_publish_s"]["p99"]  # type: ignore[index]
    return {
        "params": attrs.asdict(p),
        "policies": {"reaper": results["reaper"], "inline": results["inline"]},
        "floor": results["floor"],
        "ratios": {
            "halt_to_publish_p99": round(inline / reaper, 1) if reaper else None,
            "reaper_p99_over_floor_p99_plus_50ms": round(reaper / (floor + 0.05), 3),
        },
    }
