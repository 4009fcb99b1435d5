"""``sledagent bench restart``: kill -9 the agent with N running VMMs, start it again.

A ``sledagent sim`` process (recording Nexus, simulated Propolis per zone) outlives the
agent, as a sled's Propolis zones outlive its sled agent. The daemon, a process of its
own on a fixed port, registers and runs N VMMs; it is killed (SIGKILL) and started again
on the same data directory. From the new process's spawn the bench measures:

- ``first_read_s``: to the first answered ``GET /vmms/{id}/state`` of a known VMM;
- ``all_readopted_s``: to the daemon's ``readoption_done`` log line (its timestamp):
  every VMM's Propolis has answered its first question. Read from the log, not from
  ``/metrics``: a scrape every 50 ms cost the agent about 5% of its thread in the very
  window it measures (py-spy, session 9);
- reads during the restart: readers in a process of their own (``_probe.py``) read every
  VMM at ``reads_per_s`` in all, from the moment the daemon listens until every VMM is
  re-adopted and ``settle_s`` more; their p50/p99, timeouts and statuses;
- ``failed_published``: ``failed`` states Nexus received for these VMMs (must be 0), and
  every state Nexus received after the kill (nothing changed: ideally none);
- ``running_after``: VMMs that answer ``running`` at the end.

Beside it, the floor: the same start on an empty data directory (no journal, no zones),
with the same readers asking for the same ids (answered 404): what a start costs with
nothing to take back.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

import httpx
import trio

from .._retry_after import RetryOverloaded
from .._stats import summary
from .._wire import VmmState
from ..testing import ensure_body_json
from ._procs import daemon_config, nexus_first_times, sim_process, start_daemon, stop_process
from ._wire import reader_process

_POLL_S = 0.05


async def _logged(log: Path, offset: int, event: str) -> dt.datetime:
    """The timestamp of the first line ``event`` logged in ``log`` past ``offset``."""
    partial = b""
    while True:
        chunk = await trio.to_thread.run_sync(_read_from, log, offset)
        offset += len(chunk)
        lines = (partial + chunk).split(b"\n")
        partial = lines.pop()
        for line in lines:
            if event.encode() in line:
                record: dict[str, Any] = json.loads(line)
                if record.get("event") == event:
                    return dt.datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
        await trio.sleep(_POLL_S)


def _read_from(path: Path, offset: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_restart_bench(
    *, vmms: int = 1000, reads_per_s: float = 400.0, settle_s: float = 3.0
) -> dict[str, object]:
    if vmms < 1:
        raise ValueError("vmms must be >= 1")
    interval = max(0.05, vmms / reads_per_s)
    pids = [uuid.uuid4() for _ in range(vmms)]
    client = httpx.AsyncClient(timeout=120, transport=RetryOverloaded())
    async with sim_process() as (nexus_url, fleet_url), client:
        with tempfile.TemporaryDirectory(prefix="sledagent-restart-") as tmp:
            root = Path(tmp)
            agent = f"max_zones = {max(1024, 2 * vmms)}\nshutdown_drain_s = 600.0\n"
            floor_root = root / "floor"
            floor_root.mkdir()
            config = await _config(floor_root, nexus_url, fleet_url, agent)
            floor = await _measure(
                client, config, floor_root / "daemon.log", pids, interval, settle_s,
                readopting=False,
            )  # fmt: skip
            config, log = await _config(root, nexus_url, fleet_url, agent), root / "daemon.log"
            proc, url = await start_daemon(config, log)
            try:
                gate = trio.CapacityLimiter(16)

                async def start(pid: uuid.UUID) -> None:
                    async with gate:
                        r = await client.put(f"{url}/vmms/{pid}", json=ensure_body_json())
                        r.raise_for_status()
                        body = {"state": {"type": "running"}}
                        (await client.put(f"{url}/vmms/{pid}/state", json=body)).raise_for_status()

                async with trio.open_nursery() as nursery:
                    for pid in pids:
                        nursery.start_soon(start, pid)
                await nexus_first_times(client, nexus_url, pids, VmmState.RUNNING)
                before = len((await client.get(f"{nexus_url}/sim/updates")).json())
            finally:
                await stop_process(proc, signal.SIGKILL)
            restart = await _measure(client, config, log, pids, interval, settle_s)
            updates = (await client.get(f"{nexus_url}/sim/updates")).json()
    ids = {str(p) for p in pids}
    after = [u for u in updates[before:] if u["propolis_id"] in ids]
    restart["failed_published"] = sum(
        1
        for u in updates
        if u["propolis_id"] in ids and u["state"]["vmm_state"]["state"] == "failed"
    )
    restart["states_published_after_kill"] = len(after)
    return {"vmms": vmms, "reads_per_s": reads_per_s, "restart": restart, "floor": floor}


async def _config(root: Path, nexus_url: str, fleet_url: str, agent: str) -> Path:
    """The daemon's config under ``root``, on a fixed port (the same across a restart)."""
    text = daemon_config(root, nexus_url, fleet_url, log_mb=0.0, agent=agent)
    config = root / "sledagent.toml"
    await trio.Path(config).write_text(text.replace("127.0.0.1:0", f"127.0.0.1:{_free_port()}"))
    return config


async def _measure(
    client: httpx.AsyncClient,
    config: Path,
    log: Path,
    pids: list[uuid.UUID],
    interval: float,
    settle_s: float,
    *,
    readopting: bool = True,
) -> dict[str, object]:
    """One start, measured (module doc). ``readopting``: the start has VMMs to take
    back (it logs ``readoption_done``); else nothing to wait for past listening."""
    offset = (await trio.Path(log).stat()).st_size if await trio.Path(log).exists() else 0
    wall0 = dt.datetime.now(dt.UTC)
    t0 = trio.current_time()
    proc, url = await start_daemon(config, log)
    listening_s = trio.current_time() - t0
    marks: dict[str, float] = {}

    async def first_read() -> None:
        while True:
            r = await client.get(f"{url}/vmms/{pids[0]}/state")
            if r.status_code in (200, 404):
                marks["first_read"] = trio.current_time() - t0
                return

    async def all_readopted() -> None:
        if not readopting:
            marks["all_readopted"] = listening_s
            return
        done = await _logged(log, offset, "readoption_done")
        marks["all_readopted"] = (done - wall0).total_seconds()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first_read)
            nursery.start_soon(all_readopted)
            async with reader_process(url, pids, interval_s=interval, timeout_s=5.0) as readers:
                await readers.go()
                with trio.move_on_after(120):
                    while "all_readopted" not in marks:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                await trio.sleep(settle_s)
                reads = await readers.stop()
            nursery.cancel_scope.cancel()
        running = 0
        for pid in pids:
            r = await client.get(f"{url}/vmms/{pid}/state")
            running += r.status_code == 200 and r.json()["vmm_state"]["state"] == "running"
    finally:
        await stop_process(proc, signal.SIGTERM)
    latencies: list[float] = reads.pop("latencies_s")  # type: ignore[assignment]
    # Other per-sample lists (refusals' latencies, the readers' own lag): summarized.
    samples: dict[str, list[float]] = {
        k: reads.pop(k)  # type: ignore[misc]
        for k in [k for k, v in reads.items() if isinstance(v, list)]
    }
    result: dict[str, Any] = {
        "listening_s": round(listening_s, 3),
        "first_read_s": round(marks.get("first_read", -1), 3),
        "all_readopted_s": round(marks["all_readopted"], 3) if "all_readopted" in marks else None,
        "reads": {
            **summary(latencies),
            **reads,
            **{k.removesuffix("_s") + "_p99_s": summary(v)["p99"] for k, v in samples.items()},
        },
        "running_after": running,
    }
    return result


def targets(result: dict[str, Any]) -> dict[str, bool]:
    """Issue 18's targets, each met or not."""
    restart = result["restart"]
    vmms = result["vmms"]
    readopted = restart["all_readopted_s"]
    return {
        "all_readopted": restart["running_after"] == vmms,
        "none_failed": restart["failed_published"] == 0,
        "readopted_within_5s": readopted is not None and readopted <= 5.0,
        "reads_p99_le_100ms": restart["reads"]["p99"] <= 0.1,
        "no_read_timeouts": not restart["reads"].get("timeouts"),
    }
