"""Two sleds on the real wire: two daemon processes against one recording Nexus.

``open_sled_pair`` starts what an operator would (docs/operations.md, "Two sleds"):

- one ``sledagent sim`` process whose recording Nexus both sleds report to;
- sleds ``a`` and ``b``: ``sledagent run`` each with its own data directory (so its own
  sled id and journal), its own API address, ``nexus_url`` the shared Nexus, and the
  embedded default's simulated Propolis fleet, in a ``sledagent sim`` process per data
  directory that outlives the daemon (``sim/_spawn.py``).

A migration then crosses processes: the target's simulated Propolis (in ``b``'s sim
process) pulls the guest from the source's (in ``a``'s) over HTTP. ``SledPair`` acts as
Nexus would (register, run, migrate: over each daemon's API) and reads what the Nexus
saw. Each Propolis is given its own loopback address (``free_loopback_addr``), as
omicron gives each Propolis zone its own IP, so the address Nexus hands the target is
where the source listens. Used by the tests (``tests/test_migration_wire.py``) and
``sledagent bench migrate``.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from .._host import zone_name_for
from .._retry_after import RetryOverloaded
from ..bench._procs import sim_process, start_daemon, stop_process
from ..testing._examples import ensure_body_json
from ._spawn import _alive, read_state

#: The ``[agent]`` table of both sleds by default: short bounds, so that a failure
#: injected into a migration ends within seconds.
FAST_AGENT = (
    "propolis_unreachable_s = 3.0\nmigration_source_timeout_s = 5.0\n"
    "shutdown_drain_s = 20.0\nreaper_backoff = { initial_s = 0.05, max_s = 1.0 }\n"
)


def free_loopback_addr() -> str:
    """``127.x.y.z:port``, free now: a loopback address of its own for one Propolis (all
    of 127/8 is this host's on Linux), a random one so that concurrent runs never meet."""
    host = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
    with socket.socket() as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


@attrs.define
class SledProcess:
    """``sledagent run`` for one sled, as a process of its own."""

    name: str
    root: Path
    nexus_url: str
    agent: str = FAST_AGENT
    log_rate_bps: int = 4096
    extra: str = ""
    api: str = ""
    proc: trio.Process | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / self.name

    @property
    def config(self) -> Path:
        return self.root / f"{self.name}.toml"

    async def start(self) -> None:
        text = (
            f'listen = "127.0.0.1:0"\ndata_dir = "{self.data_dir}"\n'
            f'nexus_url = "{self.nexus_url}"\nlog_rate_bps = {self.log_rate_bps}\n'
            f"{self.extra}[agent]\n{self.agent}"
        )
        await trio.Path(self.config).write_text(text)
        self.proc, self.api = await start_daemon(self.config, self.root / f"{self.name}.log")

    async def stop(self, sig: int = signal.SIGTERM) -> int | None:
        proc, self.proc = self.proc, None
        return None if proc is None else await stop_process(proc, sig)

    def fleet_url(self) -> str:
        host = read_state(self.data_dir)
        if host is None:
            raise RuntimeError(f"sled {self.name} has no simulated host running")
        return host.fleet_url

    def propolis_addr(self, propolis_id: uuid.UUID) -> str:
        """Where the VMM's simulated Propolis listens (its zone's record)."""
        meta = self.data_dir / "zones" / zone_name_for(propolis_id) / "zone.json"
        return str(json.loads(meta.read_text())["propolis_addr"])

    def zones(self) -> list[str]:
        zones = self.data_dir / "zones"
        return sorted(p.name for p in zones.iterdir()) if zones.exists() else []


@attrs.frozen
class WireMigration:
    migration_id: uuid.UUID
    source: uuid.UUID
    target: uuid.UUID
    source_sled: str
    target_sled: str
    #: The target's registration as it was sent (the bench's clock origin).
    registered_at: float = 0.0


@attrs.define
class SledPair:
    """Sleds ``a`` and ``b`` and their shared recording Nexus; acts as Nexus would."""

    client: httpx.AsyncClient
    nexus_url: str
    sleds: dict[str, SledProcess]
    addrs: dict[uuid.UUID, str] = attrs.Factory(dict)
    instances: dict[uuid.UUID, uuid.UUID] = attrs.Factory(dict)

    @property
    def a(self) -> SledProcess:
        return self.sleds["a"]

    @property
    def b(self) -> SledProcess:
        return self.sleds["b"]

    async def register(
        self,
        sled: str,
        propolis_id: uuid.UUID,
        *,
        instance_id: uuid.UUID | None = None,
        migration_id: uuid.UUID | None = None,
    ) -> None:
        addr = self.addrs[propolis_id] = free_loopback_addr()
        body = ensure_body_json(instance_id, propolis_addr=addr, migration_id=migration_id)
        self.instances[propolis_id] = uuid.UUID(body["instance_id"])
        r = await self.client.put(f"{self.sleds[sled].api}/vmms/{propolis_id}", json=body)
        r.raise_for_status()

    async def put_state(self, sled: str, propolis_id: uuid.UUID, state: Any) -> httpx.Response:
        url = f"{self.sleds[sled].api}/vmms/{propolis_id}/state"
        return await self.client.put(url, json={"state": state})

    async def state(self, sled: str, propolis_id: uuid.UUID) -> httpx.Response:
        return await self.client.get(f"{self.sleds[sled].api}/vmms/{propolis_id}/state")

    async def start_vmms(self, sled: str, n: int) -> list[uuid.UUID]:
        """Register and run ``n`` VMMs on ``sled``; returns once Nexus has them running."""
        pids = [uuid.uuid4() for _ in range(n)]
        gate = trio.CapacityLimiter(16)

        async def one(pid: uuid.UUID) -> None:
            async with gate:
                await self.register(sled, pid)
                (await self.put_state(sled, pid, {"type": "running"})).raise_for_status()

        async with trio.open_nursery() as nursery:
            for pid in pids:
                nursery.start_soon(one, pid)
        await self.wait_vmms(pids, "running")
        return pids

    async def migrate(
        self,
        source: uuid.UUID,
        source_sled: str,
        *,
        src_addr: str | None = None,
        target: uuid.UUID | None = None,
    ) -> WireMigration:
        """Migrate ``source``'s instance to the other sled as Nexus's saga does: register
        the target with a migration id, then ``migration_target`` with the source's
        registered Propolis address (``src_addr`` overrides it: a source elsewhere)."""
        to = "b" if source_sled == "a" else "a"
        target, mid = target or uuid.uuid4(), uuid.uuid4()
        t0 = trio.current_time()
        await self.register(to, target, instance_id=self.instances[source], migration_id=mid)
        value = {"src_propolis_addr": src_addr or self.addrs[source]}
        r = await self.put_state(to, target, {"type": "migration_target", "value": value})
        r.raise_for_status()
        return WireMigration(mid, source, target, source_sled, to, t0)

    async def wait_vmms(self, pids: list[uuid.UUID], state: str, timeout_s: float = 120) -> None:
        body = {"ids": [str(p) for p in pids], "state": state, "timeout_s": timeout_s}
        r = await self.client.post(f"{self.nexus_url}/sim/wait", json=body, timeout=timeout_s + 10)
        if r.status_code != 200:
            raise TimeoutError(f"not every VMM reached {state}: {r.text}")

    async def wait_migrations(
        self, ids: list[uuid.UUID], *, timeout_s: float = 120, both_sides: bool = True
    ) -> list[dict[str, Any]]:
        body = {"ids": [str(i) for i in ids], "timeout_s": timeout_s, "both_sides": both_sides}
        r = await self.client.post(
            f"{self.nexus_url}/sim/migrations/wait", json=body, timeout=timeout_s + 10
        )
        if r.status_code != 200:
            raise TimeoutError(f"migrations did not end: {r.text}")
        rows: list[dict[str, Any]] = r.json()
        return rows

    async def updates(self, propolis_id: uuid.UUID) -> list[dict[str, Any]]:
        """Every state Nexus acknowledged for this VMM, in order."""
        rows = (await self.client.get(f"{self.nexus_url}/sim/updates")).json()
        return [u["state"] for u in rows if u["propolis_id"] == str(propolis_id)]

    async def problems(self) -> list[str]:
        found: list[str] = (await self.client.get(f"{self.nexus_url}/sim/problems")).json()
        return found

    async def propolis(self, sled: str, propolis_id: uuid.UUID, method: str, path: str) -> Any:
        """A request to the VMM's simulated Propolis (its ``/sim/...`` controls)."""
        url = f"http://{self.sleds[sled].propolis_addr(propolis_id)}{path}"
        r = await self.client.request(method, url, timeout=60)
        r.raise_for_status()
        return r.json() if r.content else None


@asynccontextmanager
async def open_sled_pair(
    root: Path, *, agent: str = FAST_AGENT, log_rate_bps: int = 4096, extra: str = ""
) -> AsyncIterator[SledPair]:
    """Start the shared Nexus and sleds ``a`` and ``b`` under ``root``; stop them all (and
    the sleds' simulated hosts, guests included) when the block ends."""
    # The Nexus's address is chosen first, so that it and both sleds start at once (each
    # sled spawns its own simulated host too); a sled's first reports wait for it.
    nexus_url = f"http://{free_loopback_addr()}"
    sleds = {
        name: SledProcess(name, root, nexus_url, agent, log_rate_bps, extra) for name in ("a", "b")
    }
    async with (
        httpx.AsyncClient(timeout=60, transport=RetryOverloaded()) as client,
        trio.open_nursery() as nursery,
    ):
        ready = [trio.Event() for _ in sleds]

        async def start(sled: SledProcess, done: trio.Event) -> None:
            await sled.start()
            done.set()

        for sled, done in zip(sleds.values(), ready, strict=True):
            nursery.start_soon(start, sled, done)
        try:
            async with sim_process(nexus_url.removeprefix("http://")):
                for done in ready:
                    await done.wait()
                yield SledPair(client, nexus_url, sleds)
        finally:
            with trio.CancelScope(shield=True):
                for sled in sleds.values():
                    await sled.stop()
                    host = read_state(sled.data_dir)
                    if host is not None:
                        host.kill()
                        with trio.move_on_after(10):  # gone before its files are
                            while _alive(host.pid):  # noqa: ASYNC110 (another process)
                                await trio.sleep(0.02)
