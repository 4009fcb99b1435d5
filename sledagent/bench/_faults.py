"""``sledagent bench faults``: Nexus and Propolis faults against the daemon as a process.

The daemon runs as ``sledagent run`` on local zones with real bundles; its peers are a
``sledagent sim`` process (recording Nexus, one simulated Propolis server per zone).

- Nexus outage (``nexus_outage``): VMMs run, then Nexus goes down (``down``: a proxy in
  front of it closes its listener, so connections are refused), answers 503 (``503``),
  or answers each update ``slow_s`` late (``slow``), for ``down_s``; all guests halt as
  it starts. Meanwhile every VMM is read over HTTP and a new VMM is registered, run and
  stopped: the API and the runners must answer. After it recovers, every terminal
  state must reach Nexus with generations only ever rising, and every zone be bundled
  and torn down.
- Propolis faults (``propolis_faults``): one VMM per fault: its Propolis vanishes (410
  ``NoInstance``), reports failure, drops requests for a while (503s, ridden out), dies
  (its server stops: connection refused until ``propolis_unreachable_s``), or hangs its
  state monitor while a stop is asked (forced after ``stop_grace_s``). Each VMM must
  reach its terminal state at Nexus, bounded in time, and its zone be bundled and reaped.

``problems(result)`` lists what broke; an empty list is a pass.
"""

from __future__ import annotations

import signal
import tempfile
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx
import trio

from .._host import zone_name_for
from .._stats import summary
from .._wire import VmmState
from ..testing import ensure_body_json
from ._procs import daemon_config, nexus_first_times, sim_process, start_daemon, stop_process

RUN = {"state": {"type": "running"}}
STOP = {"state": {"type": "stopped"}}


class SwitchableProxy:
    """A TCP forwarder that can go down: its listener closes (connections refused) and
    every connection through it is cut, until it comes back on the same port."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self.port = 0
        self._up = trio.Event()
        self._up.set()
        self._scope: trio.CancelScope | None = None

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            await self._up.wait()
            with trio.CancelScope() as self._scope:
                listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
                self.port = listeners[0].socket.getsockname()[1]
                if not started:
                    started = True
                    task_status.started(self.port)
                await trio.serve_listeners(self._forward, listeners)

    def down(self) -> None:
        self._up = trio.Event()
        if self._scope is not None:
            self._scope.cancel()

    def up(self) -> None:
        self._up.set()

    async def _forward(self, client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self._target)
        except OSError:
            await client.aclose()
            return
        async with client, server, trio.open_nursery() as nursery:

            async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                try:
                    async for chunk in src:
                        await dst.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, client, server)
            nursery.start_soon(pump, server, client)


@attrs.frozen(kw_only=True)
class FaultParams:
    vmms: int = 20
    down_s: float = 30.0
    #: ``down``, ``503`` or ``slow``.
    mode: str = "503"
    #: With ``slow``: each update answered this late.
    slow_s: float = 2.0
    #: The daemon's Nexus backoff cap (omicron's default is 180 s).
    nexus_backoff_max_s: float = 180.0
    log_mb: float = 1.0
    propolis_unreachable_s: float = 5.0
    stop_grace_s: float = 5.0
    #: The ``drop`` Propolis fault: 503s for this long, to be ridden out (well within
    #: ``propolis_unreachable_s``).
    drop_s: float = 2.0


def _config(root: Path, nexus_url: str, fleet_url: str, p: FaultParams) -> str:
    return daemon_config(
        root,
        nexus_url,
        fleet_url,
        log_mb=p.log_mb,
        agent=(
            "reaper_backoff = { initial_s = 0.05, max_s = 1.0 }\n"
            f"nexus_backoff = {{ initial_s = 0.25, max_s = {p.nexus_backoff_max_s} }}\n"
            f"propolis_unreachable_s = {p.propolis_unreachable_s}\n"
            f"stop_grace_s = {p.stop_grace_s}\n"
        ),
    )


async def _register_and_run(client: httpx.AsyncClient, url: str, pid: uuid.UUID) -> list[float]:
    """Register and run a VMM; the two requests' latencies."""
    times = []
    for method_path, body in ((f"/vmms/{pid}", ensure_body_json()), (f"/vmms/{pid}/state", RUN)):
        t0 = trio.current_time()
        r = await client.put(f"{url}{method_path}", json=body)
        r.raise_for_status()
        times.append(trio.current_time() - t0)
    return times


async def _settled(client: httpx.AsyncClient, url: str, timeout_s: float) -> bool:
    """Wait until the daemon holds no zone and reaps nothing; False on timeout."""
    with trio.move_on_after(timeout_s):
        while (await client.get(f"{url}/zones/cleanup")).json() or (  # noqa: ASYNC110
            await client.get(f"{url}/zones")
        ).json():
            await trio.sleep(0.1)
        return True
    return False


def _generations(updates: list[dict[str, Any]]) -> dict[str, list[tuple[int, str]]]:
    per_vmm: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for u in updates:
        vmm = u["state"]["vmm_state"]
        per_vmm[u["propolis_id"]].append((vmm["gen"], vmm["state"]))
    return per_vmm


async def nexus_outage(p: FaultParams) -> dict[str, Any]:
    async with sim_process() as (nexus_url, fleet_url), trio.open_nursery() as nursery:
        proxy = SwitchableProxy(urlsplit(nexus_url).port or 80)
        port = await nursery.start(proxy.run)
        with tempfile.TemporaryDirectory(prefix="sledagent-faults-") as tmp:
            root = Path(tmp)
            config = root / "sledagent.toml"
            text = _config(root, f"http://127.0.0.1:{port}", fleet_url, p)
            await trio.Path(config).write_text(text)
            result = await _outage_run(p, config, root / "daemon.log", nexus_url, fleet_url, proxy)
        nursery.cancel_scope.cancel()
    return result


async def _outage_run(
    p: FaultParams, config: Path, log: Path, nexus_url: str, fleet_url: str, proxy: SwitchableProxy
) -> dict[str, Any]:
    pids = [uuid.uuid4() for _ in range(p.vmms)]
    extra = uuid.uuid4()  # registered, run and stopped during the outage
    reads: list[float] = []
    read_failures = read_refused = 0
    during: list[float] = []
    async with httpx.AsyncClient(timeout=30) as client:
        proc, url = await start_daemon(config, log)
        try:
            for pid in pids:
                await _register_and_run(client, url, pid)
            await nexus_first_times(client, nexus_url, pids, VmmState.RUNNING)
            if p.mode == "down":
                proxy.down()
            elif p.mode == "503":
                r = await client.post(f"{nexus_url}/sim/fail", params={"seconds": p.down_s})
                r.raise_for_status()
            elif p.mode == "slow":
                r = await client.post(f"{nexus_url}/sim/latency", params={"seconds": p.slow_s})
                r.raise_for_status()
            else:
                raise ValueError(f"unknown mode {p.mode!r}")
            zones = [zone_name_for(pid) for pid in pids]
            (await client.post(f"{fleet_url}/fleet/halt", json=zones)).raise_for_status()
            t_fault = trio.current_time()

            async def read_all() -> None:
                nonlocal read_failures, read_refused
                while True:  # every VMM read at least once, however slow the machine
                    for pid in pids:
                        t0 = trio.current_time()
                        try:
                            r = await client.get(f"{url}/vmms/{pid}/state", timeout=5)
                        except httpx.HTTPError:
                            read_failures += 1
                            continue
                        # 404: Nexus acknowledged its terminal state, so it is gone.
                        if r.status_code in (200, 404):
                            reads.append(trio.current_time() - t0)
                        elif r.status_code == 503 and _overloaded(r):
                            read_refused += 1  # shed at once, Retry-After: an answer
                        else:
                            read_failures += 1
                    if trio.current_time() - t_fault >= p.down_s:
                        break
                    await trio.sleep(0.2)

            async def drive_one() -> None:
                during.extend(await _register_and_run(client, url, extra))
                t0 = trio.current_time()
                (await client.put(f"{url}/vmms/{extra}/state", json=STOP)).raise_for_status()
                during.append(trio.current_time() - t0)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all)
                nursery.start_soon(drive_one)
            if p.mode == "down":
                proxy.up()
            elif p.mode == "slow":
                await client.post(f"{nexus_url}/sim/latency", params={"seconds": 0})
            t_recovered = trio.current_time()
            with trio.move_on_after(p.nexus_backoff_max_s * 2 + 60):
                await nexus_first_times(client, nexus_url, [*pids, extra], VmmState.DESTROYED)
            delivered_after_s = trio.current_time() - t_recovered
            settled = await _settled(client, url, 120)
            bundles = (await client.get(f"{url}/zones/bundles")).json()
        finally:
            exit_status = await stop_process(proc, signal.SIGTERM)
        updates = (await client.get(f"{nexus_url}/sim/updates")).json()
    per_vmm = _generations(updates)
    everyone = [str(pid) for pid in [*pids, extra]]
    return {
        "scenario": f"nexus_{p.mode}",
        "vmms": p.vmms,
        "down_s": p.down_s,
        "terminal_states_delivered": sum(
            bool(per_vmm[i]) and per_vmm[i][-1][1] == "destroyed" for i in everyone
        ),
        "expected_terminal_states": len(everyone),
        "delivered_after_recovery_s": round(delivered_after_s, 2),
        "generations_rising": all(
            all(a[0] < b[0] for a, b in zip(per_vmm[i], per_vmm[i][1:], strict=False))
            for i in everyone
        ),
        "updates_per_vmm_max": max(len(per_vmm[i]) for i in everyone),
        "get_state_during_fault": summary(reads),
        "get_state_answered": len(reads),
        "get_state_failures": read_failures,
        "get_state_refused": read_refused,
        "register_run_stop_during_fault_s": [round(t, 3) for t in during],
        "zones_bundled": len({b["id"]["zone_name"] for b in bundles}),
        "settled": settled,
        "exit_status": exit_status,
    }


#: fault -> the terminal state Nexus must hear
PROPOLIS_FAULTS = {
    "vanish": "failed",
    "fail": "failed",
    "drop": "destroyed",  # 503s for a while, ridden out; then the guest halts
    "die": "failed",  # its server stops; unreachable past the bound
    "hang_then_stop": "destroyed",  # state monitor hung, a stop asked: forced after grace
}


async def propolis_faults(p: FaultParams) -> dict[str, Any]:
    async with sim_process() as (nexus_url, fleet_url):
        with tempfile.TemporaryDirectory(prefix="sledagent-faults-") as tmp:
            root = Path(tmp)
            config = root / "sledagent.toml"
            await trio.Path(config).write_text(_config(root, nexus_url, fleet_url, p))
            pids = {fault: uuid.uuid4() for fault in PROPOLIS_FAULTS}
            took: dict[str, float] = {}
            async with httpx.AsyncClient(timeout=30) as client:
                proc, url = await start_daemon(config, root / "daemon.log")
                try:
                    for pid in pids.values():
                        await _register_and_run(client, url, pid)
                    await nexus_first_times(
                        client, nexus_url, list(pids.values()), VmmState.RUNNING
                    )
                    addr = {}
                    for fault, pid in pids.items():
                        r = await client.post(f"{fleet_url}/fleet/zones/{zone_name_for(pid)}")
                        addr[fault] = f"http://{r.json()['addr']}"

                    async def inject(fault: str) -> None:
                        """The fault, then the time until Nexus hears the wanted state."""
                        sim, t0 = addr[fault], trio.current_time()
                        if fault in ("vanish", "fail"):
                            (await client.post(f"{sim}/sim/{fault}")).raise_for_status()
                        elif fault == "drop":  # 503s for drop_s, ridden out; then a halt
                            (await client.post(f"{sim}/sim/drop")).raise_for_status()
                            await trio.sleep(p.drop_s)
                            await client.post(f"{sim}/sim/drop", params={"on": "false"})
                            (await client.post(f"{sim}/sim/halt")).raise_for_status()
                        elif fault == "die":
                            zone = zone_name_for(pids[fault])
                            r = await client.delete(f"{fleet_url}/fleet/zones/{zone}?kill=true")
                            r.raise_for_status()
                        else:  # the state monitor hangs; then a stop is asked
                            (await client.post(f"{sim}/sim/hang")).raise_for_status()
                            r = await client.put(f"{url}/vmms/{pids[fault]}/state", json=STOP)
                            r.raise_for_status()
                        wanted = VmmState(PROPOLIS_FAULTS[fault])
                        with trio.move_on_after(120):
                            await nexus_first_times(client, nexus_url, [pids[fault]], wanted)
                            took[fault] = round(trio.current_time() - t0, 2)

                    async with trio.open_nursery() as nursery:
                        for fault in PROPOLIS_FAULTS:
                            nursery.start_soon(inject, fault)
                    settled = await _settled(client, url, 120)
                    bundles = (await client.get(f"{url}/zones/bundles")).json()
                finally:
                    exit_status = await stop_process(proc, signal.SIGTERM)
                updates = (await client.get(f"{nexus_url}/sim/updates")).json()
    per_vmm = _generations(updates)
    return {
        "scenario": "propolis_faults",
        "terminal_state": {f: per_vmm[str(pid)][-1][1] for f, pid in pids.items()},
        "seconds_from_fault_to_terminal_state": took,
        "bounds_s": {"die": p.propolis_unreachable_s, "hang_then_stop": p.stop_grace_s},
        "zones_bundled": len({b["id"]["zone_name"] for b in bundles}),
        "expected_bundles": len(pids),
        "settled": settled,
        "exit_status": exit_status,
    }


def _overloaded(r: httpx.Response) -> bool:
    """The agent shed the read (issue 21): 503 ``OVERLOADED`` with ``Retry-After``."""
    try:
        code = r.json().get("error_code")
    except ValueError:
        return False
    return code == "OVERLOADED" and "retry-after" in r.headers


def problems(result: dict[str, Any], *, latency_bounds: bool = True) -> list[str]:
    """What a fault run broke (empty: it passed). ``latency_bounds=False`` leaves out
    the checks against wall-clock bounds (a fault taking more than its bound + 5 s to
    end): a test on a loaded machine checks outcomes, the benchmark the figures."""
    found = []
    if result["exit_status"] != 0:
        found.append(f"exit_status={result['exit_status']}")
    if not result["settled"]:
        found.append("zones left held or unreaped")
    if result["scenario"] == "propolis_faults":
        for fault, wanted in PROPOLIS_FAULTS.items():
            if result["terminal_state"][fault] != wanted:
                found.append(f"{fault}: {result['terminal_state'][fault]} (wanted {wanted})")
            took = result["seconds_from_fault_to_terminal_state"].get(fault)
            if took is None:
                found.append(f"{fault}: no terminal state in time")
            elif (
                latency_bounds
                and fault in result["bounds_s"]
                and took > result["bounds_s"][fault] + 5
            ):
                found.append(f"{fault}: {took} s, past its bound")
        if result["zones_bundled"] != result["expected_bundles"]:
            found.append(f"zones_bundled={result['zones_bundled']}")
        return found
    lost = result["expected_terminal_states"] - result["terminal_states_delivered"]
    if lost:
        found.append(f"terminal_states_lost={lost}")
    if not result["generations_rising"]:
        found.append("a generation went backwards at Nexus")
    if result["get_state_failures"]:
        found.append(f"get_state_failures={result['get_state_failures']}")
    if result["zones_bundled"] != result["expected_terminal_states"]:
        found.append(f"zones_bundled={result['zones_bundled']}")
    return found
