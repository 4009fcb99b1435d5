"""A peer's answer at the edges, on the real wire: malformed or boundary state-monitor
answers, Propolis error codes and oversized messages, 2xx statuses, a failed ensure.
Each case costs at most its own VMM, never the daemon (issue 15, QA).

Propolis is the simulator behind ``ScriptedAnswers``: a test scripts what a route
answers. Real time: every test has a ``fail_after``; nothing waits on a duration.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import httpx
import pytest
import structlog
import trio

from sledagent import Host, MemoryBundleStore, SledAgent, VmmState, open_sled_agent
from sledagent._api import build_app
from sledagent._clients import HttpNexusClient, HttpPropolisClient, HttpPropolisConnector
from sledagent._config import AgentConfig, BackoffPolicy
from sledagent._errors import PEER_TEXT_MAX, MalformedAnswer
from sledagent._h1client import H1Pool
from sledagent._server import serve_api
from sledagent.sim import recording_nexus_app, sim_propolis_app
from sledagent.testing import (
    FakeNexus,
    FakePropolis,
    FakeZones,
    ScriptedAnswers,
    ensure_body_json,
    fast_config,
)

MONITOR = ("GET", "/instance/state-monitor")
STATE = ("PUT", "/instance/state")
ENSURE = ("PUT", "/instance")
U64_MAX = 2**64 - 1

#: 200 answers to the state monitor that are not the contract's.
MALFORMED_MONITOR_BODIES = [
    pytest.param(b'{"gen": 3, "state": "Bogus"}', id="unknown-state"),
    pytest.param(b'{"gen": -1, "state": "Running"}', id="negative-gen"),
    pytest.param(b'{"gen": 1.5, "state": "Running"}', id="fractional-gen"),
    pytest.param(b'{"gen": 18446744073709551616, "state": "Running"}', id="gen-2^64"),
    pytest.param(b'{"gen": 3}', id="no-state"),
    pytest.param(b"[]", id="array"),
    pytest.param(b"", id="empty"),
    pytest.param(b"<html>not json", id="not-json"),
]


def _config() -> AgentConfig:
    return fast_config(
        propolis_unreachable_s=1.0,
        monitor_backoff=BackoffPolicy(initial_s=0.02, max_s=0.1),
    )


@attrs.define
class Wire:
    api: httpx.AsyncClient
    nexus: FakeNexus
    vms: list[FakePropolis]
    scripts: list[ScriptedAnswers]
    addrs: list[str]
    agent: SledAgent

    async def start_vmm(self, i: int) -> uuid.UUID:
        pid = uuid.uuid4()
        body = ensure_body_json(propolis_addr=self.addrs[i])
        r = await self.api.put(f"/vmms/{pid}", json=body)
        assert r.status_code == 200, r.text
        r = await self.api.put(f"/vmms/{pid}/state", json={"state": {"type": "running"}})
        assert r.status_code == 200, r.text
        return pid


@asynccontextmanager
async def open_wire(n_vmms: int, config: AgentConfig | None = None) -> AsyncIterator[Wire]:
    nexus, zones = FakeNexus(), FakeZones()
    async with trio.open_nursery() as nursery:
        stop = trio.Event()

        async def start(app: object) -> str:
            binds = await nursery.start(
                lambda task_status: serve_api(
                    app,  # type: ignore[arg-type]
                    listen="127.0.0.1:0",
                    shutdown=stop,
                    announce=False,
                    task_status=task_status,
                )
            )
            return str(binds[0])

        nexus_url = await start(recording_nexus_app(nexus))
        vms, scripts, addrs = [], [], []
        for _ in range(n_vmms):
            vm = FakePropolis(None)
            script = ScriptedAnswers(sim_propolis_app(vm))
            addrs.append((await start(script)).removeprefix("http://"))
            vms.append(vm)
            scripts.append(script)
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
        async with open_sled_agent(config or _config(), host) as agent:
            api_url = await start(build_app(agent))
            async with httpx.AsyncClient(base_url=api_url, timeout=10) as api:
                yield Wire(api, nexus, vms, scripts, addrs, agent)
        await nexus_pool.aclose()
        stop.set()
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def _client(addr: str) -> AsyncIterator[HttpPropolisClient]:
    pool = H1Pool(f"http://{addr}")
    try:
        yield HttpPropolisClient(pool)
    finally:
        await pool.aclose()


@pytest.mark.parametrize("body", MALFORMED_MONITOR_BODIES)
async def test_a_malformed_state_monitor_answer_is_a_propolis_fault_not_a_crash(
    body: bytes,
) -> None:
    """The client turns it into ``MalformedAnswer``, a transient Propolis fault."""
    with trio.fail_after(30):
        async with open_wire(1) as wire:
            wire.scripts[0].answer(*MONITOR, 200, body)
            async with _client(wire.addrs[0]) as client:
                with pytest.raises(MalformedAnswer) as caught:
                    await client.state_monitor(0)
            assert caught.value.transient


async def test_a_get_instance_without_its_description_is_a_malformed_answer() -> None:
    with trio.fail_after(30):
        async with open_wire(1) as wire:
            body = {"instance": {"properties": {"id": str(uuid.uuid4())}, "state": "Running"}}
            wire.scripts[0].answer("GET", "/instance", 200, json.dumps(body).encode())
            async with _client(wire.addrs[0]) as client:
                with pytest.raises(MalformedAnswer, match="description"):
                    await client.instance()


@pytest.mark.parametrize("body", MALFORMED_MONITOR_BODIES)
async def test_a_propolis_answering_garbage_fails_only_its_vmm(body: bytes) -> None:
    """Retried with backoff like an outage, failed after ``propolis_unreachable_s``; the
    daemon and the other VMM go on."""
    with trio.fail_after(30):
        async with open_wire(2) as wire:
            wire.scripts[0].answer(*MONITOR, 200, body)
            bad, good = await wire.start_vmm(0), await wire.start_vmm(1)
            await wire.scripts[0].wait_answered(*MONITOR, 3)  # retried
            await wire.nexus.wait_for(good, VmmState.RUNNING)
            await wire.nexus.wait_for(bad, VmmState.FAILED)
            assert wire.nexus.first_time(bad, VmmState.RUNNING) is None
            r = await wire.api.get(f"/vmms/{good}/state")
            assert r.status_code == 200 and r.json()["vmm_state"]["state"] == "running"
            r = await wire.api.put(f"/vmms/{good}/state", json={"state": {"type": "reboot"}})
            assert r.status_code == 200, r.text


async def test_a_propolis_at_the_last_generation_ends_the_monitoring_cleanly() -> None:
    """gen 2^64 - 1 is legal; nothing later can be asked for. The VMM is still served and
    stopped; the agent does not exit."""
    with trio.fail_after(30), structlog.testing.capture_logs() as logs:
        async with open_wire(1) as wire:
            answer = json.dumps({"gen": U64_MAX, "state": "Running"}).encode()
            wire.scripts[0].answer(*MONITOR, 200, answer)
            pid = await wire.start_vmm(0)
            await wire.nexus.wait_for(pid, VmmState.RUNNING)
            r = await wire.api.put(f"/vmms/{pid}/state", json={"state": {"type": "stopped"}})
            assert (
                r.status_code == 200
                and r.json()["updated_runtime"]["vmm_state"]["state"] == "stopping"
            )
            r = await wire.api.delete(f"/vmms/{pid}")
            assert r.status_code == 200, r.text
            await wire.nexus.wait_for(pid, VmmState.DESTROYED)
            assert wire.scripts[0].answered[MONITOR] == 1  # never asked for 2^64
    assert [e for e in logs if e["event"] == "propolis_generation_exhausted"]


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        # Propolis's code is quoted, never ours: 404 NO_SUCH_INSTANCE would tell Nexus
        # the VMM is gone while it runs.
        (404, {"error_code": "NO_SUCH_INSTANCE", "message": "x"}, (404, "PROPOLIS_REFUSED")),
        (409, {"error_code": "AlreadyRunning", "message": "y"}, (409, "PROPOLIS_REFUSED")),
        (400, {"error_code": "E" * 100_000, "message": "m" * 2_000_000}, (400, "PROPOLIS_REFUSED")),
        (500, {"message": "z" * 2_000_000}, (503, "SERVICE_UNAVAILABLE")),
    ],
)
async def test_a_propolis_refusal_carries_only_our_code_and_a_bounded_message(
    status: int, body: dict[str, str], expected: tuple[int, str]
) -> None:
    with trio.fail_after(30), structlog.testing.capture_logs() as logs:
        async with open_wire(1) as wire:
            pid = await wire.start_vmm(0)
            await wire.nexus.wait_for(pid, VmmState.RUNNING)
            wire.scripts[0].answer(*STATE, status, json.dumps(body).encode(), times=1)
            r = await wire.api.put(f"/vmms/{pid}/state", json={"state": {"type": "reboot"}})
            assert (r.status_code, r.json()["error_code"]) == expected
            assert len(r.content) < 3 * PEER_TEXT_MAX
            if "error_code" in body:
                assert body["error_code"][:50] in r.json()["message"]
            r = await wire.api.get(f"/vmms/{pid}/state")  # untouched
            assert r.status_code == 200 and r.json()["vmm_state"]["state"] == "running"
    assert all(len(repr(e)) < 4 * PEER_TEXT_MAX for e in logs), "a peer's text in a log line"


@pytest.mark.parametrize("status", [201, 202])
async def test_any_2xx_from_propolis_is_success(status: int) -> None:
    with trio.fail_after(30):
        async with open_wire(1) as wire:
            pid = await wire.start_vmm(0)
            await wire.nexus.wait_for(pid, VmmState.RUNNING)
            wire.scripts[0].answer(*STATE, status, b"", times=1)
            r = await wire.api.put(f"/vmms/{pid}/state", json={"state": {"type": "reboot"}})
            assert r.status_code == 200, r.text
            assert r.json()["updated_runtime"]["vmm_state"]["state"] == "rebooting"


@pytest.mark.parametrize(
    ("status", "body"),
    [(500, {"message": "boom"}), (410, {"error_code": "NoInstance", "message": "gone"})],
)
async def test_a_failed_ensure_tells_the_caller_the_vmm_failed(
    status: int, body: dict[str, str]
) -> None:
    """The VMM is failed (as omicron's runner does); the answer says so: 410
    NO_SUCH_INSTANCE, not "retry" nor Propolis's own code."""
    with trio.fail_after(30):
        async with open_wire(1) as wire:
            wire.scripts[0].answer(*ENSURE, status, json.dumps(body).encode(), times=1)
            pid = uuid.uuid4()
            reg = ensure_body_json(propolis_addr=wire.addrs[0])
            assert (await wire.api.put(f"/vmms/{pid}", json=reg)).status_code == 200
            r = await wire.api.put(f"/vmms/{pid}/state", json={"state": {"type": "running"}})
            assert (r.status_code, r.json()["error_code"]) == (410, "NO_SUCH_INSTANCE")
            assert "has failed" in r.json()["message"]
            await wire.nexus.wait_for(pid, VmmState.FAILED)
