"""``sledagent bench migrate``: N live migrations at once from sled A to sled B.

Two daemons on the embedded default (``sim/_sleds.py``: their own data directories,
sled ids, API addresses and simulated hosts) report to one recording Nexus in a process
of its own. N VMMs run on A. Then, all at once, Nexus's part is played for each: the
target is registered on B with a migration id and asked to migrate in from the source's
Propolis (``migration_target``); the target Propolis pulls the guest over HTTP from A's
sim process; the source stops and A reaps its zone (a bundle of ``log_mb`` of logs)
while the other migrations go on.

Per migration: from the moment its target's registration is sent to the moment Nexus
holds ``completed`` from both sides (``/sim/migrations``: the later of the two arrival
times), split at the target's first ``in_progress`` at Nexus (its zone and Propolis are
up and the source has answered). The floor: the same N registrations on B with no
migration (register, then ``running``), from the registration sent to ``running`` at
Nexus. Times at Nexus are on the sim process's clock, lined up with this process's from
the least-delayed of a few ``GET /sim/clock`` round trips (error: half that round trip,
well under a millisecond on loopback). Nexus's checks of the protocol
(``/sim/problems``) must come back empty.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

import httpx
import trio

from .._stats import summary
from ..sim._sleds import FAST_AGENT, SledPair, open_sled_pair


async def _clock_offset(client: httpx.AsyncClient, nexus_url: str) -> float:
    """Nexus's clock minus ours (the least-delayed of 7 round trips)."""
    best: tuple[float, float] | None = None
    for _ in range(7):
        t0 = trio.current_time()
        now = float((await client.get(f"{nexus_url}/sim/clock")).json()["now"])
        t1 = trio.current_time()
        if best is None or t1 - t0 < best[0]:
            best = (t1 - t0, now - (t0 + t1) / 2)
    assert best is not None
    return best[1]


async def _floor(pair: SledPair, n: int, offset: float) -> list[float]:
    """N registrations on B with no migration: sent -> ``running`` at Nexus."""
    pids = [uuid.uuid4() for _ in range(n)]
    sent: dict[uuid.UUID, float] = {}

    async def one(pid: uuid.UUID) -> None:
        sent[pid] = trio.current_time() + offset
        await pair.register("b", pid)
        (await pair.put_state("b", pid, {"type": "running"})).raise_for_status()

    async with trio.open_nursery() as nursery:
        for pid in pids:
            nursery.start_soon(one, pid)
    body = {"ids": [str(p) for p in pids], "state": "running", "timeout_s": 600}
    r = await pair.client.post(f"{pair.nexus_url}/sim/wait", json=body, timeout=660)
    r.raise_for_status()
    times = {uuid.UUID(k): float(v) for k, v in r.json().items()}
    # Leave B as it was: these VMMs stop, and their zones are reaped before migrating.
    async with trio.open_nursery() as nursery:
        for pid in pids:
            nursery.start_soon(pair.put_state, "b", pid, {"type": "stopped"})
    await pair.wait_vmms(pids, "destroyed", timeout_s=600)
    while pair.b.zones():  # noqa: ASYNC110 (zones are directories)
        await trio.sleep(0.1)
    return [times[p] - sent[p] for p in pids]


async def run_migrate_bench(*, vmms: int = 100, log_mb: float = 1.0) -> dict[str, object]:
    if vmms < 1:
        raise ValueError("vmms must be >= 1")
    agent = FAST_AGENT + f"max_zones = {max(1024, 4 * vmms)}\n"
    with tempfile.TemporaryDirectory(prefix="sledagent-migrate-") as tmp:
        root = Path(tmp)
        extra = f'seed_log_mb = {log_mb}\nseed_cache = "{root / "seed"}"\n'
        async with open_sled_pair(root, agent=agent, log_rate_bps=1024, extra=extra) as pair:
            pair.client.timeout = httpx.Timeout(600)
            sources = await pair.start_vmms("a", vmms)
            offset = await _clock_offset(pair.client, pair.nexus_url)
            floor = await _floor(pair, vmms, offset)
            sent: dict[uuid.UUID, float] = {}
            migrations: dict[uuid.UUID, uuid.UUID] = {}  # migration id -> source

            async def migrate(src: uuid.UUID) -> None:
                m = await pair.migrate(src, "a")
                sent[m.migration_id] = m.registered_at + offset
                migrations[m.migration_id] = src

            t0 = trio.current_time()
            async with trio.open_nursery() as nursery:
                for src in sources:
                    nursery.start_soon(migrate, src)
            rows = await pair.wait_migrations(list(migrations), timeout_s=600)
            all_done_s = trio.current_time() - t0
            await pair.wait_vmms(sources, "destroyed", timeout_s=600)
            while pair.a.zones():  # noqa: ASYNC110 (A reaps every source's zone)
                await trio.sleep(0.1)
            reaped_s = trio.current_time() - t0
            bundles: list[dict[str, Any]] = []
            with trio.move_on_after(120):  # phase 2 archives after the zone is gone
                while len(bundles) < vmms:
                    bundles = (await pair.client.get(f"{pair.a.api}/zones/bundles")).json()
                    await trio.sleep(0.2)
            problems = await pair.problems()
    outcomes: dict[str, int] = {}
    latencies, under_way, exchange = [], [], []
    for row in rows:
        outcomes[row["outcome"]] = outcomes.get(row["outcome"], 0) + 1
        t0 = sent[uuid.UUID(row["migration_id"])]
        if row["completed_at"] is not None:
            latencies.append(float(row["completed_at"]) - t0)
        began = next((r["time"] for r in row["target"] if r["state"] == "in_progress"), None)
        if began is not None and row["completed_at"] is not None:
            under_way.append(float(began) - t0)
            exchange.append(float(row["completed_at"]) - float(began))
    mig, flo = summary(latencies, digits=3), summary(floor, digits=3)
    report: dict[str, Any] = {
        "vmms": vmms,
        "log_mb": log_mb,
        "migration_s": mig,
        "floor_s": flo,
        "p50_over_floor": round(mig["p50"] / flo["p50"], 2) if flo["p50"] else None,
        "p99_over_floor": round(mig["p99"] / flo["p99"], 2) if flo["p99"] else None,
        # Where a migration's time goes: registration -> Nexus has the target under way
        # (zone, Propolis, the source's first answer); then -> both sides completed.
        "to_under_way_s": summary(under_way, digits=3),
        "under_way_to_completed_s": summary(exchange, digits=3),
        "all_completed_s": round(all_done_s, 3),
        "sources_reaped_s": round(reaped_s, 3),
        "source_bundles": sum(1 for b in bundles if b["cause"] == "terminated_instance"),
        "outcomes": outcomes,
        "problems": problems,
    }
    return report
