"""The agent on the real wire: its API, Propolis and Nexus all over loopback HTTP.

The simulators decode every request strictly against the contract models, so a
malformed request from the agent fails these tests. Real time: every test has a
``fail_after``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import httpx
import trio

from sledagent import Host, MemoryBundleStore, SledAgent, VmmState, open_sled_agent
from sledagent._api import build_app
from sledagent._clients import HttpNexusClient, HttpPropolisConnector
from sledagent._h1client import H1Pool
from sledagent._server import serve_api
from sledagent.sim import recording_nexus_app, sim_propolis_app
from sledagent.testing import (
    FakeNexus,
    FakePropolis,
    FakeZones,
    RetryOverloaded,
    ensure_body_json,
    fast_config,
)

from .conftest import Contract


@attrs.define
class Wire:
    api: httpx.AsyncClient  # the agent's API
    sims: httpx.AsyncClient  # for the simulators' control routes
    nexus_url: str
    nexus: FakeNexus
    vms: dict[str, FakePropolis]  # propolis_addr -> state machine
    addrs: list[str]
    agent: SledAgent


@asynccontextmanager
async def open_wire(n_vmms: int) -> AsyncIterator[Wire]:
    nexus = FakeNexus()
    zones = FakeZones()
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=10) as sims:
        stop = trio.Event()

        async def start(app: object) -> str:
            binds = await nursery.start(
                lambda task_status: serve_api(
                    app,  # type: ignore[arg-type]
                    listen="127.0.0.1:0",
                    shutdown=stop,
                    task_status=task_status,
                )
            )
            return str(binds[0])

        nexus_url = await start(recording_nexus_app(nexus))
        vms: dict[str, FakePropolis] = {}
        addrs = []
        for _ in range(n_vmms):
            vm = FakePropolis(None)
            url = await start(sim_propolis_app(vm))
            addr = url.removeprefix("http://")
            vms[addr] = vm
            addrs.append(addr)
        connector = HttpPropolisConnector()
        await nursery.start(connector.run)
        nexus_pool = H1Pool(nexus_url)
        host = Host(
            backend=zones,
            connector=connector,
            nexus=HttpNexusClient(nexus_pool),
            archiver=zones.archiver(),
            store=MemoryBundleStore(),
        )
        async with open_sled_agent(fast_config(), host) as agent:
            api_url = await start(build_app(agent))
            async with httpx.AsyncClient(
                base_url=api_url, timeout=10, transport=RetryOverloaded()
            ) as api:
                yield Wire(api, sims, nexus_url, nexus, vms, addrs, agent)
        await nexus_pool.aclose()
        stop.set()
        nursery.cancel_scope.cancel()  # the connector's pool keeper runs until cancelled


async def test_vmms_run_and_halt_over_http_and_nexus_hears_it(
    nexus_contract: Contract, sled_agent_contract: Contract, propolis_contract: Contract
) -> None:
    with trio.fail_after(30):
        async with open_wire(3) as wire:
            pids = []
            instances = {}  # propolis addr -> the instance registered on it
            for addr in wire.addrs:
                pid = str(uuid.uuid4())
                pids.append(pid)
                instances[addr] = uuid.uuid4()
                body = ensure_body_json(instances[addr], propolis_addr=addr)
                r = await wire.api.put(f"/vmms/{pid}", json=body)
                assert r.status_code == 200, r.text
                r = await wire.api.put(f"/vmms/{pid}/state", json={"state": {"type": "running"}})
                assert r.status_code == 200, r.text
                sled_agent_contract.validate_response(
                    "PUT", "/vmms/{propolis_id}/state", 200, r.json()
                )
            for pid in pids:
                await wire.nexus.wait_for(uuid.UUID(pid), VmmState.RUNNING)
            # The guests power off; the agent learns it through the state-monitor long poll.
            for addr in wire.addrs:
                r = await wire.sims.post(f"http://{addr}/sim/halt")
                assert r.status_code == 204
            for pid in pids:
                await wire.nexus.wait_for(uuid.UUID(pid), VmmState.DESTROYED)
            r = await wire.sims.get(f"{wire.nexus_url}/sim/updates")
            for row in r.json():
                nexus_contract.validate("SledVmmState", row["state"])
            for addr, vm in wire.vms.items():  # each Propolis was given its own VM
                assert vm.ensured is not None and vm.ensured.properties.id == instances[addr]
            # Once Nexus's acknowledgements reached the agent, the VMMs are gone.
            await wire.agent.notifier.wait_idle()
            for pid in pids:
                r = await wire.api.get(f"/vmms/{pid}/state")
                assert r.status_code == 404 and r.json()["error_code"] == "NO_SUCH_INSTANCE"


async def test_a_vanished_propolis_fails_the_vmm_and_a_failing_nexus_is_retried() -> None:
    with trio.fail_after(30):
        async with open_wire(1) as wire:
            (addr,) = wire.addrs
            pid = str(uuid.uuid4())
            await wire.api.put(f"/vmms/{pid}", json=ensure_body_json(propolis_addr=addr))
            await wire.api.put(f"/vmms/{pid}/state", json={"state": {"type": "running"}})
            await wire.nexus.wait_for(uuid.UUID(pid), VmmState.RUNNING)
            running = wire.nexus.latest(uuid.UUID(pid))
            assert running is not None
            r = await wire.sims.post(f"{wire.nexus_url}/sim/fail", params={"seconds": 1.0})
            assert r.status_code == 204
            await wire.sims.post(f"http://{addr}/sim/vanish")
            await wire.nexus.wait_for(uuid.UUID(pid), VmmState.FAILED)
            assert wire.nexus.attempts > len(wire.nexus.updates)  # 503s were retried
            failed = wire.nexus.latest(uuid.UUID(pid))
            assert failed is not None and failed.vmm_state.state is VmmState.FAILED
            assert failed.gen > running.gen  # newer than anything Nexus had
            await wire.agent.drain()
            assert wire.agent.reaper.statistics().reaped == 1  # its zone was reaped
            r = await wire.api.get(f"/vmms/{pid}/state")
            assert r.status_code == 404  # Nexus knows it failed: gone
