"""``sledagent bench crash --workload mixed``: kill -9 while everything happens at once.

One point: a ``sledagent sim`` process (recording Nexus, simulated Propolis per zone)
that outlives the agent, and the daemon as a process of its own. Four groups of VMMs:

- *survivors*: running, left alone: a restart must cost none of them;
- *halters*: their guests power off at once (a mass halt);
- *stoppers*: Nexus asks them to stop, all at once;
- *newcomers*: registered and run while the rest happens.

After a seeded delay the daemon gets SIGKILL; it is started again on the same data
directory and left until every halter and stopper has reached Nexus in a terminal state
and the reaper is idle. Then the point reports (``leaks`` names what must be zero):

- ``running_guests_lost``: survivors not ``running`` after the restart, or that Nexus
  heard fail or end;
- ``registrations_lost``: newcomers whose registration was answered but that the
  restarted agent does not know (404);
- ``terminal_states_lost``: halters and stoppers whose end never reached Nexus;
- ``zones_without_bundle``: ended VMMs with no bundle; ``zones_left``: zones on the host
  that no live VMM owns; partial files, snapshots, bad bundles as ``bench crash``;
- ``generation_regressions``: a VMM's generation at Nexus going back, or repeated with
  different content. A repeat with the same content is counted apart
  (``generation_repeats``): delivery is at least once (an acknowledgement is journaled
  after Nexus answered; a kill in between sends that state again, which Nexus ignores).
"""

from __future__ import annotations

import json
import random
import signal
import tempfile
import uuid
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from .._host import zone_name_for
from .._retry_after import RetryOverloaded
from .._wire import VmmState
from ..testing import ensure_body_json
from ._crash import _holdings, _inspect
from ._procs import daemon_config, nexus_first_times, sim_process, start_daemon, stop_process

RUN = {"state": {"type": "running"}}
STOP = {"state": {"type": "stopped"}}


@attrs.frozen(kw_only=True)
class MixedParams:
    #: VMMs per group (survivors, halters, stoppers, newcomers).
    per_group: int = 4
    log_mb: float = 5.0
    max_delay_s: float = 1.0


async def run_mixed_point(seed: int, p: MixedParams) -> dict[str, object]:
    delay = random.Random(seed).uniform(0.0, p.max_delay_s)
    n = p.per_group
    groups = {g: [uuid.uuid4() for _ in range(n)] for g in ("survivors", "halters", "stoppers")}
    newcomers = [uuid.uuid4() for _ in range(n)]
    answered: set[uuid.UUID] = set()
    async with sim_process() as (nexus_url, fleet_url):
        with tempfile.TemporaryDirectory(prefix="sledagent-crash-") as tmp:
            root = Path(tmp)
            config = root / "sledagent.toml"
            agent = "reaper_backoff = { initial_s = 0.05, max_s = 1.0 }\n"
            text = daemon_config(root, nexus_url, fleet_url, log_mb=p.log_mb, agent=agent)
            await trio.Path(config).write_text(text)
            log = root / "daemon.log"
            async with httpx.AsyncClient(timeout=60, transport=RetryOverloaded()) as client:
                proc, url = await start_daemon(config, log)
                try:
                    started = [pid for g in groups.values() for pid in g]
                    for pid in started:
                        await _register_and_run(client, url, pid)
                    await nexus_first_times(client, nexus_url, started, VmmState.RUNNING)

                    async def newcomer(pid: uuid.UUID) -> None:
                        try:
                            r = await client.put(f"{url}/vmms/{pid}", json=ensure_body_json())
                            if r.status_code == 200:
                                answered.add(pid)
                                await client.put(f"{url}/vmms/{pid}/state", json=RUN)
                        except httpx.HTTPError:
                            pass  # the kill cut it: Nexus would retry

                    async def stop(pid: uuid.UUID) -> None:
                        try:
                            await client.put(f"{url}/vmms/{pid}/state", json=STOP)
                        except httpx.HTTPError:
                            pass

                    async with trio.open_nursery() as nursery:
                        zones = [zone_name_for(pid) for pid in groups["halters"]]

                        async def halt() -> None:
                            await client.post(f"{fleet_url}/fleet/halt", json=zones)

                        nursery.start_soon(halt)
                        for pid in groups["stoppers"]:
                            nursery.start_soon(stop, pid)
                        for pid in newcomers:
                            nursery.start_soon(newcomer, pid)
                        await trio.sleep(delay)
                        nursery.cancel_scope.cancel()
                finally:
                    await stop_process(proc, signal.SIGKILL)
                killed_with = await _holdings(root / "data")
                proc, url = await start_daemon(config, log)
                try:
                    ended = groups["halters"] + groups["stoppers"]
                    # The stoppers whose stop the kill cut are asked again, as Nexus would.
                    for pid in groups["stoppers"]:
                        r = await client.get(f"{url}/vmms/{pid}/state")
                        if r.status_code == 200 and r.json()["vmm_state"]["state"] != "destroyed":
                            await client.put(f"{url}/vmms/{pid}/state", json=STOP)
                    with trio.fail_after(300):
                        await _until_ended(client, nexus_url, ended)
                        while (await client.get(f"{url}/zones/cleanup")).json():  # noqa: ASYNC110
                            await trio.sleep(0.1)
                    states = {
                        pid: await client.get(f"{url}/vmms/{pid}/state")
                        for pid in groups["survivors"] + newcomers
                    }
                    live_zones = set((await client.get(f"{url}/zones")).json())
                finally:
                    await stop_process(proc, signal.SIGTERM)
                updates = (await client.get(f"{nexus_url}/sim/updates")).json()
            result = await trio.to_thread.run_sync(_inspect, root / "data")
    bundled = set(result.pop("bundled_zones"))  # type: ignore[call-overload]
    survivors = groups["survivors"]
    heard = _by_vmm(updates)
    lost_guests = [
        str(pid)
        for pid in survivors
        if states[pid].status_code != 200
        or states[pid].json()["vmm_state"]["state"] != "running"
        or any(s["vmm_state"]["state"] in ("failed", "destroyed") for s in heard.get(str(pid), []))
    ]
    terminal = {
        pid
        for pid, seen in heard.items()
        if any(s["vmm_state"]["state"] in ("failed", "destroyed") for s in seen)
    }
    ended_ids = groups["halters"] + groups["stoppers"]
    owned = {zone_name_for(pid) for pid in survivors + newcomers}
    regressions, repeats = _generations(updates)
    return {
        "seed": seed,
        "workload": "mixed",
        "kill_after_s": round(delay, 3),
        "at_kill": killed_with,
        **{k: v for k, v in result.items() if k not in ("zones_left", "zones_left_files")},
        "zones_left": len(live_zones - owned),
        "zones_without_bundle": sorted({zone_name_for(p) for p in ended_ids} - bundled),
        "running_guests_lost": lost_guests,
        "registrations_answered": len(answered),
        "registrations_lost": [str(p) for p in answered if states[p].status_code == 404],
        "terminal_states_lost": len({str(p) for p in ended_ids} - terminal),
        "generation_regressions": regressions,
        "generation_repeats": repeats,
        "vmms": 4 * n,
    }


async def _register_and_run(client: httpx.AsyncClient, url: str, pid: uuid.UUID) -> None:
    (await client.put(f"{url}/vmms/{pid}", json=ensure_body_json())).raise_for_status()
    (await client.put(f"{url}/vmms/{pid}/state", json=RUN)).raise_for_status()


async def _until_ended(client: httpx.AsyncClient, nexus_url: str, pids: list[uuid.UUID]) -> None:
    wanted = {str(p) for p in pids}
    while True:
        updates = (await client.get(f"{nexus_url}/sim/updates")).json()
        done = {
            u["propolis_id"]
            for u in updates
            if u["state"]["vmm_state"]["state"] in ("failed", "destroyed")
        }
        if wanted <= done:
            return
        await trio.sleep(0.2)


def _by_vmm(updates: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for u in updates:
        out.setdefault(u["propolis_id"], []).append(u["state"])
    return out


def _generations(updates: list[dict[str, Any]]) -> tuple[list[str], int]:
    """Regressions (a generation going back, or repeated with other content) and the
    number of same-content repeats, per VMM in arrival order."""
    regressions, repeats = [], 0
    for pid, states in _by_vmm(updates).items():
        last: dict[str, Any] | None = None
        for state in states:
            gen = state["vmm_state"]["gen"]
            if last is not None:
                last_gen = last["vmm_state"]["gen"]
                if gen < last_gen or (gen == last_gen and state != last):
                    regressions.append(f"{pid}: {json.dumps(last)} -> {json.dumps(state)}")
                elif gen == last_gen:
                    repeats += 1
            last = state
    return regressions, repeats


def mixed_leaks(result: dict[str, object]) -> list[str]:
    """What a mixed crash point left that it must not."""
    found = []
    for key in ("partial_files", "snapshots_left", "zones_left", "terminal_states_lost"):
        if result[key]:
            found.append(f"{key}={result[key]}")
    for key in (
        "bad_bundles",
        "zones_without_bundle",
        "running_guests_lost",
        "registrations_lost",
        "generation_regressions",
    ):
        if result[key]:
            found.append(f"{key}={result[key]}")
    return found
