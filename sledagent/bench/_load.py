"""``sledagent bench load``: a thousand requests at once while hundreds of zones are reaped.

The daemon runs as a process of its own (``sledagent run``: local zones with real logs
and bundles), its peers in a ``sledagent sim`` process, and the load from this process
(the waves through ``H1Pool``). ``vmms`` VMMs are registered and run; then ``halting``
of them power off at once and, while their zones are bundled and torn down, waves of
``concurrency`` requests go out at the same time, half ``GET /vmms/{id}/state`` and half
``PUT /vmms/{id}/state`` (``running``: a no-op for a running VMM, but it goes through the
VMM's runner queue), spread over every VMM. Waves repeat until the reaper is idle (at
least ``min_waves``).

Every request must get an answer: the state, or an error body the contract allows
(503 ``INSTANCE_CHANNEL_FULL`` when a runner's queue is full; 503 ``OVERLOADED``, with
``Retry-After``, for a state read the agent sheds while it publishes halts (issue 21);
404/409/410 for a VMM that halted, is being torn down or is gone). A timeout, a cut
connection, a 500 or any other status is a request dropped, and the run fails.
"""

from __future__ import annotations

import json
import signal
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from .._clients import error_fields
from .._failures import UsageError
from .._h1client import ConnectionFailed, H1Pool
from .._host import zone_name_for
from .._stats import summary
from .._wire import VmmState
from ..testing import ensure_body_json
from ._procs import daemon_config, nexus_first_times, sim_process, start_daemon, stop_process

RUN = {"state": {"type": "running"}}
RUN_BODY = json.dumps(RUN).encode()
JSON = (("content-type", "application/json"),)
#: (status, error_code) answers that are not drops: see the module's docstring.
ANSWERS = {
    (200, None),
    (503, "INSTANCE_CHANNEL_FULL"),
    (503, "OVERLOADED"),
    (404, "NO_SUCH_INSTANCE"),
    (409, "VM_NOT_RUNNING"),
    (410, "NO_SUCH_INSTANCE"),
}


@attrs.frozen(kw_only=True)
class LoadParams:
    vmms: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    halting: int = 200
    concurrency: int = 1000
    min_waves: int = 3
    log_mb: float = 1.0
    timeout_s: float = 60.0

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.halting <= self.vmms:
            raise UsageError("halting must be between 0 and vmms")
        if self.concurrency < 1:
            raise UsageError("concurrency must be >= 1")


async def _register_all(client: httpx.AsyncClient, url: str, pids: list[uuid.UUID]) -> None:
    limiter = trio.CapacityLimiter(16)

    async def one(pid: uuid.UUID) -> None:
        async with limiter:
            (await client.put(f"{url}/vmms/{pid}", json=ensure_body_json())).raise_for_status()
            (await client.put(f"{url}/vmms/{pid}/state", json=RUN)).raise_for_status()

    async with trio.open_nursery() as nursery:
        for pid in pids:
            nursery.start_soon(one, pid)


async def run_load_bench(p: LoadParams) -> dict[str, Any]:
    async with sim_process() as (nexus_url, fleet_url):
        with tempfile.TemporaryDirectory(prefix="sledagent-load-") as tmp:
            root = Path(tmp)
            config = root / "sledagent.toml"
            agent = f"max_zones = {max(1024, 2 * p.vmms)}\n"
            text = daemon_config(root, nexus_url, fleet_url, log_mb=p.log_mb, agent=agent)
            await trio.Path(config).write_text(text)
            return await _run(p, config, root / "daemon.log", nexus_url, fleet_url)


async def _run(
    p: LoadParams, config: Path, log: Path, nexus_url: str, fleet_url: str
) -> dict[str, Any]:
    pids = [uuid.uuid4() for _ in range(p.vmms)]
    limits = httpx.Limits(max_connections=p.concurrency, max_keepalive_connections=p.concurrency)
    answers: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    latency: dict[str, list[float]] = {"GET": [], "PUT": []}
    waves = 0
    async with httpx.AsyncClient(timeout=p.timeout_s, limits=limits) as client:
        proc, url = await start_daemon(config, log)
        try:
            t0 = trio.current_time()
            await _register_all(client, url, pids)
            await nexus_first_times(client, nexus_url, pids, VmmState.RUNNING)
            registered_s = trio.current_time() - t0
            zones = [zone_name_for(pid) for pid in pids[: p.halting]]

            # The waves go through the agent's own lean client (one keep-alive
            # connection per request in flight): an httpx exchange costs this process
            # about 4x more CPU, and on two cores the client's cost showed as latency.
            waves_pool = H1Pool(url, max_connections=p.concurrency, max_idle=p.concurrency)

            async def request(i: int) -> None:
                pid = pids[i % len(pids)]
                method = "GET" if i % 2 == 0 else "PUT"
                started = trio.current_time()
                try:
                    r = await waves_pool.request(
                        method,
                        f"/vmms/{pid}/state",
                        None if method == "GET" else RUN_BODY,
                        headers=JSON if method == "PUT" else (),
                        timeout_s=p.timeout_s,
                    )
                except ConnectionFailed as exc:
                    dropped[type(exc).__name__] += 1
                    return
                latency[method].append(trio.current_time() - started)
                code = None if r.status == 200 else error_fields(r)[0]
                key = f"{r.status} {code or ''}".strip()
                if (r.status, code) in ANSWERS:
                    answers[key] += 1
                else:
                    dropped[key] += 1

            async def reaper_busy() -> bool:
                return bool((await client.get(f"{url}/zones/cleanup")).json())

            t_halt = trio.current_time()
            (await client.post(f"{fleet_url}/fleet/halt", json=zones)).raise_for_status()
            teardown_s = None
            while True:
                async with trio.open_nursery() as nursery:
                    for i in range(waves * p.concurrency, (waves + 1) * p.concurrency):
                        nursery.start_soon(request, i)
                waves += 1
                busy = await reaper_busy()
                if not busy and teardown_s is None:
                    teardown_s = trio.current_time() - t_halt
                if not busy and waves >= p.min_waves:
                    break
            await waves_pool.aclose()
            with trio.move_on_after(120):
                await nexus_first_times(client, nexus_url, pids[: p.halting], VmmState.DESTROYED)
            bundles = (await client.get(f"{url}/zones/bundles")).json()
            updates = (await client.get(f"{nexus_url}/sim/updates")).json()
        finally:
            exit_status = await stop_process(proc, signal.SIGTERM)
    every = latency["GET"] + latency["PUT"]
    return {
        "vmms": p.vmms,
        "halting": p.halting,
        "concurrency": p.concurrency,
        "waves": waves,
        "requests": waves * p.concurrency,
        "answered": dict(answers),
        "dropped": dict(dropped),
        "latency": summary(every),
        "latency_get": summary(latency["GET"]),
        "latency_put": summary(latency["PUT"]),
        "register_and_run_all_s": round(registered_s, 2),
        "halt_to_reaper_idle_s": None if teardown_s is None else round(teardown_s, 2),
        "zones_bundled": len({b["id"]["zone_name"] for b in bundles}),
        "terminal_states_delivered": len(
            {u["propolis_id"] for u in updates if u["state"]["vmm_state"]["state"] == "destroyed"}
            & {str(pid) for pid in pids[: p.halting]}
        ),
        "exit_status": exit_status,
    }


def problems(result: dict[str, Any]) -> list[str]:
    found = []
    if result["dropped"]:
        found.append(f"dropped={result['dropped']}")
    if sum(result["answered"].values()) != result["requests"]:
        found.append("answers do not add up to the requests")
    if result["terminal_states_delivered"] != result["halting"]:
        found.append(f"terminal_states_delivered={result['terminal_states_delivered']}")
    if result["zones_bundled"] != result["halting"]:
        found.append(f"zones_bundled={result['zones_bundled']} of {result['halting']}")
    if result["exit_status"] != 0:
        found.append(f"exit_status={result['exit_status']}")
    return found
