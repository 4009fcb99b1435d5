"""The simulated peers: Propolis servers that write their zone's log, many per process."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from sledagent._codec import encode
from sledagent._local_zones import LogSpec
from sledagent._logwriter import SERVICE_LOG
from sledagent._wire import InstanceEnsureRequest, InstanceProperties, PropolisInstanceMetadata
from sledagent.sim._fleet import SimPropolisFleet


def sizes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in root.rglob("*") if p.is_file()}


async def until(predicate: Callable[[], bool]) -> None:
    """Wait for ``predicate`` (the test's real-time deadline bounds it)."""
    while not predicate():  # noqa: ASYNC110 (state changed by a thread or a server)
        await trio.sleep(0.01)


async def test_the_simulated_propolis_writes_and_rotates_its_zones_log(tmp_path: Path) -> None:
    fleet = SimPropolisFleet(log_interval_s=0.02)
    logs = LogSpec(
        log_dir=tmp_path / "zone" / "logs", archive_dir=tmp_path / "archive",
        rate_bps=400_000, rotate_bytes=8192, keep=2,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(fleet.run)
        await fleet.launch("oxz_propolis-server_a", logs)
        with trio.fail_after(10):
            while not list((tmp_path / "archive").glob(f"{SERVICE_LOG}.*")):  # noqa: ASYNC110
                await trio.sleep(0.02)
        await fleet.retire("oxz_propolis-server_a")
        # A tick under way may still write; the next one began after the retirement.
        retired_at = fleet.logs.ticks
        await until(lambda: fleet.logs.ticks >= retired_at + 2)
        on_disk = sizes(tmp_path)
        await until(lambda: fleet.logs.ticks >= retired_at + 4)
        assert sizes(tmp_path) == on_disk  # a retired Propolis writes no more
        nursery.cancel_scope.cancel()
    names = {p.name for p in logs.log_dir.iterdir()}
    rotated = {f"{SERVICE_LOG}.0", f"{SERVICE_LOG}.1"}  # keep=2; the rest was archived
    assert rotated <= names <= rotated | {SERVICE_LOG}  # (the live file: unless just rotated)
    line = json.loads((logs.log_dir / f"{SERVICE_LOG}.0").read_text().splitlines()[0])
    assert line["name"] == "propolis-server" and {"msg", "time", "level"} <= set(line)


async def _put(addr: str, target: str, body: bytes) -> bytes:
    host, port = addr.split(":")
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(
            f"PUT {target} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        answer = b""
        while chunk := await stream.receive_some():
            answer += chunk
    return answer


@pytest.mark.deadline_s(180)  # a thousand servers
async def test_a_thousand_simulated_propolis_servers_run_in_one_process() -> None:
    fleet = SimPropolisFleet()
    zones = [f"oxz_propolis-server_{i}" for i in range(1000)]
    async with trio.open_nursery() as nursery:
        await nursery.start(fleet.run)
        addrs = [await fleet.launch(zone) for zone in zones]
        assert len(set(addrs)) == 1000 and len(fleet) == 1000
        ids = uuid.uuid4()
        ensure = encode(
            InstanceEnsureRequest(
                init={"method": "Spec", "value": {"spec": {}}},
                properties=InstanceProperties(
                    description="", id=ids, name="vm",
                    metadata=PropolisInstanceMetadata(ids, ids, ids, "sim", 0, "sim"),
                ),
            )
        )  # fmt: skip
        gate = trio.CapacityLimiter(64)

        async def start(addr: str) -> None:
            async with gate:
                assert (await _put(addr, "/instance", ensure)).startswith(b"HTTP/1.1 201")
                assert (await _put(addr, "/instance/state", b'"Run"')).startswith(b"HTTP/1.1 204")

        with trio.fail_after(120):
            async with trio.open_nursery() as starting:
                for addr in addrs:
                    starting.start_soon(start, addr)
        assert all(fleet.vm(z).state.value == "Running" for z in zones)  # type: ignore[union-attr]
        for zone in zones:
            await fleet.retire(zone)
        assert len(fleet) == 0
        nursery.cancel_scope.cancel()


async def test_the_recording_nexus_answers_a_wait_once_every_vmm_reached_the_state() -> None:
    from sledagent._server import serve_api
    from sledagent._vmm_state import initial_state
    from sledagent._wire import VmmRuntimeState, VmmState, utcnow
    from sledagent.sim import recording_nexus_app
    from sledagent.testing import FakeNexus

    nexus, shutdown = FakeNexus(), trio.Event()
    pids = [uuid.uuid4(), uuid.uuid4()]
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            lambda task_status: serve_api(
                recording_nexus_app(nexus), listen="127.0.0.1:0", shutdown=shutdown,
                task_status=task_status,
            )
        )  # fmt: skip
        async with httpx.AsyncClient(base_url=urls[0], timeout=10) as client:

            async def put(pid: uuid.UUID) -> None:
                vmm = VmmRuntimeState(gen=2, state=VmmState.STARTING, time_updated=utcnow())
                state = encode(initial_state(vmm, None, utcnow()))
                assert (await client.put(f"/vmms/{pid}", content=state)).status_code == 204

            body = {"ids": [str(p) for p in pids], "state": "starting", "timeout_s": 10}
            await put(pids[0])
            # One of the two has not reached the state: the wait ends at its timeout.
            r = await client.post("/sim/wait", json={**body, "timeout_s": 0.2})
            assert r.status_code == 504 and "starting" in r.json()["message"]
            answers: list[httpx.Response] = []

            async def wait() -> None:
                answers.append(await client.post("/sim/wait", json=body))

            async with trio.open_nursery() as waiting:
                waiting.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                assert answers == []  # still waiting for the second
                await put(pids[1])
            (r,) = answers
            assert r.status_code == 200 and set(r.json()) == {str(p) for p in pids}
            assert (await client.post("/sim/wait", json={"ids": ["x"]})).status_code == 400
        shutdown.set()


@pytest.mark.parametrize("damage", ["garbled", "deleted"])
async def test_a_sim_host_whose_state_file_was_damaged_is_found_again_not_doubled(
    damage: str, tmp_path: Path
) -> None:
    """Its guests live in the first host: a second one beside it would leave them
    running unseen (a QA drill: zones reported reaped kept writing their logs)."""
    from sledagent.sim._spawn import STATE_NAME, attach_sim_host

    with trio.fail_after(60):
        first = await attach_sim_host(tmp_path)
        try:
            state_file = tmp_path / STATE_NAME
            if damage == "garbled":
                state_file.write_text('{"pid": ')
            else:
                state_file.unlink()
            again = await attach_sim_host(tmp_path)
            assert again.pid == first.pid
            assert json.loads(state_file.read_text())["pid"] == first.pid  # written again
        finally:
            first.kill()


@pytest.mark.parametrize(("status", "code"), [(403, None), (409, "Conflict"), (503, None)])
async def test_the_simulated_propolis_answers_a_refusal_with_its_status_on_the_wire(
    status: int, code: str | None
) -> None:
    """As the in-process fake does (a migrating source refuses a reboot with 403): over
    the wire the status is kept (it was 503 for every refusal: a QA run of issue 19);
    only a fault is 503."""
    from sledagent._server import serve_api
    from sledagent.sim._propolis import sim_propolis_app
    from sledagent.testing import FakePropolis

    vm = FakePropolis(uuid.uuid4())
    vm.refuse(status, code)
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: serve_api(
                    sim_propolis_app(vm), listen="127.0.0.1:0", shutdown=stop,
                    task_status=task_status,
                )
            )  # fmt: skip
            async with httpx.AsyncClient(base_url=binds[0], timeout=10) as client:
                r = await client.put("/instance/state", json="Reboot")
            stop.set()
    assert r.status_code == status
    assert r.json()["error_code"] == (code if status < 500 else "Unavailable")
