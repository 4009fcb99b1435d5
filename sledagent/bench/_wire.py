"""``sledagent bench mass-stop --wire http``: the mass stop over the real wire.

The daemon runs in this process on the embedded default: local zones with real logs
and real tar.gz bundles, a simulated Propolis per zone over HTTP, a recording Nexus over
HTTP. N VMMs are registered and run through the agent's HTTP API; then all guests power
off at once. Four runs, one after the other in one process:

- ``reaper`` and ``inline`` (omicron's policy: bundle, tear down, then publish, one
  bundle at a time), with ``log_mb`` MB of logs per zone and our bundle archiver;
- ``inline_omicron``: the inline policy with omicron's compression too (gzip level 9,
  "best", as its zone bundler): omicron's behaviour as a whole;
- ``floor``: the same halts with no logs and bundling switched off: the best this machine
  does over HTTP, dominated by N requests to Nexus;
- ``no_reads``: the reaper's run with no reader at all: what the reads cost publishing
  (issue 21: with reads, p99 within 1.5x of this).

While zones are reaped every VMM is read over HTTP (``GET /vmms/{id}/state``) every
``get_interval_s`` (or so that ``reads_per_s`` are offered in all) with a
``get_timeout_s`` client timeout, by readers in a process of their own (``_probe.py``), so
that the agent's figures carry only the server's cost. A read the agent refuses (503,
``Retry-After``: it sheds reads while halts are published) is an answer, counted apart.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import attrs
import httpx
import trio

from .._admission import ReadAdmission
from .._config import AgentConfig, BackoffPolicy, TerminationPolicy
from .._daemon import DaemonConfig, run_daemon
from .._host import zone_name_for
from .._http import HttpLimits
from .._stats import summary
from .._wire import VmmState
from ..testing import ensure_body_json
from ._mass_stop import _peak_rss_mb
from ._procs import nexus_first_times, sim_process


@attrs.frozen(kw_only=True)
class WireParams:
    vmms: int = 50
    log_mb: float = 10.0
    get_interval_s: float = 0.5
    get_timeout_s: float = 10.0
    seed: int = 1
    #: ``process``: the simulated Propolis fleet and Nexus run in a ``sledagent sim``
    #: process of their own (the agent's figures are its own); ``inline``: in this process.
    peers: str = "process"
    #: Where the daemon compresses bundles (``DaemonConfig.archive_in``).
    archive_in: Literal["process", "thread"] = "process"
    #: Reads offered per second in all (each VMM every ``vmms / reads_per_s`` s); 0: no
    #: reader. None: each VMM every ``get_interval_s``.
    reads_per_s: float | None = None
    #: Phase-2 slots (``bundle_archive_concurrency``); None: the agent's default.
    archive_slots: int | None = None
    #: Phase-2 slots for small bundles (``bundle_archive_max_concurrency``); None: default.
    archive_max_slots: int | None = None
    #: Who answers state reads: the front process (``[http] front_process``, the
    #: daemon's default) or the agent's own thread.
    api_front: Literal["process", "agent"] = "process"

    def read_interval_s(self) -> float | None:
        """Each VMM's read period, seconds; None: no reads."""
        if self.reads_per_s is None:
            return self.get_interval_s
        return None if self.reads_per_s <= 0 else self.vmms / self.reads_per_s

    def offered_reads_per_s(self) -> float:
        interval = self.read_interval_s()
        return 0.0 if interval is None else round(self.vmms / interval, 1)


#: Every mode ``run_wire`` knows, in the order ``run_wire_bench`` runs them.
MODES = ("reaper", "inline", "inline_omicron", "floor", "no_reads")
#: The modes of each ``--policy``: the policy's own, and the baselines it is compared to.
POLICY_MODES = {
    "reaper": ("reaper", "floor", "no_reads"),
    "inline": ("inline", "inline_omicron", "floor"),
    "both": MODES,
}


@attrs.define
class ReaderProcess:
    """The state readers of ``_probe.py``, running in their own process."""

    proc: trio.Process
    lines: trio.MemoryReceiveChannel[bytes]

    async def go(self) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(b"go\n")

    async def stop(self) -> dict[str, object]:
        """Stop reading; the readers' result (latencies, timeouts, errors)."""
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(b"stop\n")
        return await self.result()

    async def result(self) -> dict[str, object]:
        """The readers' result, once they have ended (by ``stop`` or their count)."""
        result: dict[str, object] = json.loads(await self.lines.receive())
        return result


async def _pump_lines(stream: trio.abc.ReceiveStream, out: trio.MemorySendChannel[bytes]) -> None:
    buf = b""
    async with out:
        while chunk := await stream.receive_some():
            buf += chunk
            *done, buf = buf.split(b"\n")
            for line in done:
                await out.send(line)


@asynccontextmanager
async def reader_process(
    api_url: str,
    ids: list[uuid.UUID],
    *,
    interval_s: float,
    timeout_s: float,
    seed: int = 1,
    count: int | None = None,
) -> AsyncIterator[ReaderProcess]:
    """Start the readers (one connection per id), connected and waiting for ``go``."""
    spec = {
        "api": api_url,
        "ids": [str(i) for i in ids],
        "interval_s": interval_s,
        "timeout_s": timeout_s,
        "seed": seed,
        "count": count,
    }
    script = str(Path(__file__).with_name("_probe.py"))
    proc = await trio.lowlevel.open_process(
        [sys.executable, script, json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    send, lines = trio.open_memory_channel[bytes](16)
    try:
        async with trio.open_nursery() as nursery:
            assert proc.stdout is not None
            nursery.start_soon(_pump_lines, proc.stdout, send)
            if await lines.receive() != b"ready":
                raise RuntimeError("the reader process did not start")
            yield ReaderProcess(proc, lines)
            nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(5, shield=True) as scope:
            if proc.stdin is not None:
                await proc.stdin.aclose()
            await proc.wait()
        if scope.cancelled_caught:
            proc.kill()


async def run_wire(mode: str, p: WireParams, cache: Path) -> dict[str, object]:
    """One run: ``mode`` is ``reaper``, ``inline`` or ``floor``."""
    if p.peers == "process":
        async with sim_process() as (nexus_url, fleet_url):
            return await _run_wire(mode, p, cache, nexus_url, fleet_url)
    return await _run_wire(mode, p, cache, None, None)


async def _run_wire(
    mode: str, p: WireParams, cache: Path, nexus_url: str | None, fleet_url: str | None
) -> dict[str, object]:
    floor = mode == "floor"
    inline = mode in ("inline", "inline_omicron")
    if mode == "no_reads":
        p = attrs.evolve(p, reads_per_s=0.0)
    interval = p.read_interval_s()
    agent = AgentConfig(
        termination_policy=TerminationPolicy.INLINE if inline else TerminationPolicy.REAPER,
        compression_level=9 if mode == "inline_omicron" else 2,
        max_zones=max(1024, 2 * p.vmms),
        bundle_defunct_zones=not floor,
        reaper_backoff=BackoffPolicy(initial_s=0.05, max_s=1.0),
        shutdown_drain_s=3600.0,
    )
    if p.archive_slots is not None:
        agent = attrs.evolve(agent, bundle_archive_concurrency=p.archive_slots)
    if p.archive_max_slots is not None:
        agent = attrs.evolve(agent, bundle_archive_max_concurrency=p.archive_max_slots)
    with tempfile.TemporaryDirectory(prefix="sledagent-wire-") as tmp:
        config = DaemonConfig(
            listen="127.0.0.1:0",
            data_dir=Path(tmp),
            nexus_url=nexus_url,
            propolis="remote" if fleet_url else "sim-inprocess",
            sim_fleet_url=fleet_url,
            log_rate_bps=0,
            seed_log_mb=0.0 if floor else p.log_mb,
            seed_cache=cache,
            archive_in=p.archive_in,
            agent=agent,
            http=HttpLimits(front_process=p.api_front == "process"),
        )
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            info = await nursery.start(run_daemon, config, shutdown)
            nexus, fleet = info.recording_nexus, info.fleet
            limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
            async with (
                httpx.AsyncClient(base_url=info.api_url, limits=limits, timeout=60) as api,
                httpx.AsyncClient(timeout=60) as peers,
            ):
                pids = [uuid.uuid4() for _ in range(p.vmms)]
                zones = [zone_name_for(pid) for pid in pids]
                gate = trio.CapacityLimiter(16)

                async def start(pid: uuid.UUID) -> None:
                    async with gate:
                        (await api.put(f"/vmms/{pid}", json=ensure_body_json())).raise_for_status()
                        body = {"state": {"type": "running"}}
                        (await api.put(f"/vmms/{pid}/state", json=body)).raise_for_status()

                async with trio.open_nursery() as starting:
                    for pid in pids:
                        starting.start_soon(start, pid)
                if nexus is not None:
                    for pid in pids:
                        await nexus.wait_for(pid, VmmState.RUNNING)
                else:
                    assert nexus_url is not None
                    await nexus_first_times(peers, nexus_url, pids, VmmState.RUNNING)
                async with reader_process(
                    info.api_url,
                    pids if interval is not None else [],
                    interval_s=interval or 1.0,
                    timeout_s=p.get_timeout_s,
                    seed=p.seed,
                ) as readers:
                    t_halt = trio.current_time()
                    if fleet is not None:  # peers in this process
                        halted_at = {}
                        for zone in zones:
                            vm = fleet.vm(zone)
                            assert vm is not None
                            vm.halt()  # the guests power off at once
                            halted_at[zone] = vm.halted_at
                    else:
                        r = await peers.post(f"{fleet_url}/fleet/halt", json=zones)
                        halted_at = r.json()
                    await readers.go()
                    if nexus is not None:
                        published = {
                            pid: await nexus.wait_for(pid, VmmState.DESTROYED) for pid in pids
                        }
                    else:
                        assert nexus_url is not None
                        published = await nexus_first_times(
                            peers, nexus_url, pids, VmmState.DESTROYED
                        )
                    await info.agent.drain()
                    drain_s = trio.current_time() - t_halt
                    read_result = await readers.stop()
                reads: list[float] = read_result["latencies_s"]  # type: ignore[assignment]
                refused: list[float] = read_result["refused_latencies_s"]  # type: ignore[assignment]
                h2p = [
                    published[pid] - halted_at[zone] for pid, zone in zip(pids, zones, strict=True)
                ]
                stats = info.agent.bundler.statistics()
                held = stats.zone_held_s
                slots = stats.archive.total
                bundles = len(await info.agent.store.list_all())
            shutdown.set()
    return {
        "halt_to_publish_s": summary(h2p),
        "get_state_s": {
            **summary(reads),
            "timeouts": read_result["timeouts"],
            "errors": read_result["errors"],
            "status": read_result["status"],
            "reads": len(reads),
            "offered_per_s": p.offered_reads_per_s(),
            # The agent's refusals (503 at once, publication first or late): how many, and
            # how quickly they came.
            "refused": len(refused),
            "refused_p99": summary(refused)["p99"],
            # The readers' own loop lag (their process on the same 2 cores): part of every
            # latency above that is not the agent's.
            "readers_own_lag_p99": summary(read_result.get("own_lag_s", []))["p99"],  # type: ignore[arg-type]
            # The agent's own view: how long reads waited for its thread (p99 estimated
            # from the histogram's buckets: the bucket's upper bound).
            "agent_wait_p99_bucket": _bucket_p99(info.admission),
        },
        "zone_held_s": {k: v for k, v in summary(held).items() if k != "max"},
        "drain_s": round(drain_s, 3),
        "bundles": bundles,
        # How busy phase 2 kept its slots over the drain, and the rate it achieved:
        # log MB in / (slot-seconds busy / slots), in this run, beside the rest of it.
        "archive": {
            "slots": slots,
            "busy_slot_s": round(stats.archive_busy_s, 3),
            "input_mb": round(stats.archive_input_bytes / 1e6, 1),
            "occupancy": round(stats.archive_busy_s / (slots * drain_s), 3) if drain_s else None,
            "mb_per_s_in_run": round(
                stats.archive_input_bytes / 1e6 / (stats.archive_busy_s / slots), 1
            )
            if stats.archive_busy_s
            else None,
        },
        "peak_rss_mb": _peak_rss_mb(),
    }


def _bucket_p99(admission: ReadAdmission | None) -> float | None:
    if admission is None:
        return None
    snap = admission.waited.snapshot()
    total = snap.buckets[-1][1] if snap.buckets else 0
    for bound, count in snap.buckets:
        if total and count >= 0.99 * total:
            return bound
    return None


async def run_wire_bench(
    p: WireParams, modes: tuple[str, ...] = MODES, progress: Any = None
) -> dict[str, object]:
    """Each of ``modes`` once, in ``MODES`` order (``POLICY_MODES`` for a ``--policy``)."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; known: {MODES}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sledagent-seed-") as cache:
        for mode in (m for m in MODES if m in modes):
            results[mode] = await run_wire(mode, p, Path(cache))
            if progress is not None:
                progress(mode, results[mode])

    def p99(mode: str) -> float | None:
        r = results.get(mode)
        return None if r is None else r["halt_to_publish_s"]["p99"]

    def ratio(a: float | None, b: float | None, digits: int = 1) -> float | None:
        return round(a / b, digits) if a is not None and b else None

    reaper, floor = p99("reaper"), p99("floor")
    return {
        "params": {**attrs.asdict(p), "offered_reads_per_s": p.offered_reads_per_s()},
        "policies": {m: results[m] for m in ("reaper", "inline", "inline_omicron") if m in results},
        "floor": results.get("floor"),
        "no_reads": results.get("no_reads"),
        "ratios": {
            # the policy alone (same archiver), and omicron as a whole (its gzip -9 too)
            "halt_to_publish_p99": ratio(p99("inline"), reaper),
            "halt_to_publish_p99_vs_omicron": ratio(p99("inline_omicron"), reaper),
            "reaper_p99_over_floor_p99_plus_50ms": ratio(
                reaper, None if floor is None else floor + 0.05, 3
            ),
            # what the reads cost publishing: the same halts with and without readers
            "reaper_p99_over_no_reads_p99": ratio(reaper, p99("no_reads"), 2),
        },
    }
