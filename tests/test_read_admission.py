"""Under overload, publication comes first: state reads answered, or refused at once.

Issue 21. No outcome here depends on the machine's speed: the thread's lag is injected
(``ReadAdmission.lag``), and a publication is held under way by a Nexus that answers only
when the test lets it (an event), never by a sleep. Real sockets, so every test carries a
``fail_after``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import httpx
import pytest
import structlog
import trio

from sledagent._admission import LATE, PUBLICATION_FIRST, ReadAdmission, ReadLimits
from sledagent._api import _Api, build_app
from sledagent._daemon_config import ConfigError, config_from_toml
from sledagent._server import serve_api
from sledagent._wire import SledVmmState
from sledagent.testing import AgentHarness, fast_config, open_fake_agent

DEADLINE_S = 30


@attrs.define
class Served:
    harness: AgentHarness
    app: _Api
    client: httpx.AsyncClient
    port: int

    @property
    def admission(self) -> ReadAdmission:
        assert self.app.admission is not None
        return self.app.admission


@asynccontextmanager
async def serve(
    *, token: str | None = None, reads: ReadLimits | None = None
) -> AsyncIterator[Served]:
    async with open_fake_agent(fast_config()) as harness, trio.open_nursery() as nursery:
        app = build_app(harness.agent, token=token, reads=reads)
        stop = trio.Event()
        urls = await nursery.start(
            lambda task_status: serve_api(
                app, listen="127.0.0.1:0", shutdown=stop, announce=False, task_status=task_status
            )
        )
        headers = {"authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=urls[0], timeout=10, headers=headers) as client:
            yield Served(harness, app, client, int(urls[0].rsplit(":", 1)[1]))
        stop.set()


class HeldNexus:
    """Holds every delivery to Nexus until ``release`` is set: a publication under way."""

    def __init__(self, harness: AgentHarness) -> None:
        self.entered = trio.Event()
        self.release = trio.Event()
        nexus = harness.fakes.nexus
        original = nexus.put_vmm_state

        async def held(propolis_id: uuid.UUID, state: SledVmmState) -> None:
            self.entered.set()
            await self.release.wait()
            await original(propolis_id, state)

        nexus.put_vmm_state = held


async def raw_get(port: int, request: bytes) -> bytes:
    """Send ``request`` bytes as they are; everything answered until the server closes
    or goes quiet after a whole answer (the quick path keeps the connection)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while True:
            with trio.move_on_after(0.5 if data.count(b"\r\n\r\n") else 10):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return data
                data += chunk
                continue
            return data  # quiet after at least one answer


def status_of(answer: bytes) -> int:
    return int(answer[9:12])


async def test_a_read_while_halts_are_published_and_the_thread_lags_is_refused_at_once() -> None:
    with trio.fail_after(DEADLINE_S):
        async with serve() as s:
            pid = await s.harness.start_vmm()
            held = HeldNexus(s.harness)
            s.admission.lag = lambda: 0.02  # behind by 20 ms: above 5 ms, under 100 ms
            with structlog.testing.capture_logs() as logs:
                await s.harness.agent.manager.unregister(pid)  # the halt: published now
                await held.entered.wait()
                assert s.harness.agent.publication_backlog() == 1
                quick = await s.client.get(f"/vmms/{pid}/state")
                routed = await s.client.get(f"/vmms/{pid}/state", params={"via": "router"})
                for r in (quick, routed):
                    assert r.status_code == 503, r.text
                    assert r.headers["retry-after"] == "1"
                    body = r.json()
                    assert body["error_code"] == "OVERLOADED"
                    assert "publication first" in body["message"]
                    assert body["request_id"] == r.headers["x-request-id"]
                metrics = (await s.client.get("/metrics")).text  # never shed
                assert 'sledagent_reads_shed_total{reason="publication_first"} 2.0' in metrics
                held.release.set()
                await s.harness.agent.notifier.wait_idle()
                assert s.harness.agent.publication_backlog() == 0
                after = await s.client.get(f"/vmms/{pid}/state")
            assert after.status_code == 404  # published, then removed: served, not shed
            assert [e["event"] for e in logs if e["event"].startswith("reads_shed")] == [
                "reads_shedding",
                "reads_shed",
            ]
            ended = next(e for e in logs if e["event"] == "reads_shed")
            assert ended["shed"] == 2 and ended["total_by_reason"][PUBLICATION_FIRST] == 2
            # Not one error line per refused read: the burst is the log's unit.
            assert not [e for e in logs if e["event"] == "api_refused" and e["status"] == 503]


async def test_reads_are_served_while_a_publication_waits_on_nexus_and_the_thread_is_idle() -> None:
    with trio.fail_after(DEADLINE_S):
        async with serve() as s:
            pid = await s.harness.start_vmm()
            other = await s.harness.start_vmm()
            held = HeldNexus(s.harness)
            s.admission.lag = lambda: 0.001  # nothing else to run: reads cost no one
            await s.harness.agent.manager.unregister(pid)
            await held.entered.wait()
            r = await s.client.get(f"/vmms/{other}/state")
            assert r.status_code == 200 and r.json()["vmm_state"]["state"] == "running"
            r = await s.client.get(f"/vmms/{pid}/state")
            assert r.status_code == 200 and r.json()["vmm_state"]["state"] == "destroyed"
            assert s.admission.statistics().shed == {PUBLICATION_FIRST: 0, LATE: 0}
            held.release.set()


async def test_a_read_that_waited_past_its_bound_is_refused_even_with_nothing_to_publish() -> None:
    with trio.fail_after(DEADLINE_S):
        async with serve(reads=ReadLimits(late_s=0.05, retry_after_s=3)) as s:
            pid = await s.harness.start_vmm()
            s.admission.lag = lambda: 0.2
            r = await s.client.get(f"/vmms/{pid}/state")
            assert r.status_code == 503 and r.headers["retry-after"] == "3"
            assert "late" in r.json()["message"]
            assert s.admission.statistics().shed[LATE] == 1
            s.admission.lag = lambda: 0.0
            assert (await s.client.get(f"/vmms/{pid}/state")).status_code == 200


async def test_the_quick_path_answers_as_the_router_does() -> None:
    with trio.fail_after(DEADLINE_S):
        async with serve() as s:
            pid = await s.harness.start_vmm()
            quick = await s.client.get(f"/vmms/{pid}/state")
            routed = await s.client.get(f"/vmms/{pid}/state?via=router")
            assert quick.status_code == routed.status_code == 200
            assert quick.json() == routed.json()
            for h in ("content-type", "content-length"):
                assert quick.headers[h] == routed.headers[h]
            assert uuid.UUID(quick.headers["x-request-id"]).version == 4
            gone = uuid.uuid4()
            quick = await s.client.get(f"/vmms/{gone}/state")
            routed = await s.client.get(f"/vmms/{gone}/state?via=router")
            assert quick.status_code == routed.status_code == 404
            q, r = quick.json(), routed.json()
            assert q["error_code"] == r["error_code"] == "NO_SUCH_INSTANCE"
            assert q["message"] == r["message"] == f"no such VMM: {gone}"
            assert q["request_id"] == quick.headers["x-request-id"]


async def test_requests_the_quick_path_does_not_take_are_answered_by_h11_as_before() -> None:
    with trio.fail_after(DEADLINE_S):
        async with serve() as s:
            pid = await s.harness.start_vmm()
            get = f"GET /vmms/{pid}/state HTTP/1.1\r\nhost: t\r\n\r\n".encode()
            # Two requests in one read: both answered, in order.
            answers = await raw_get(s.port, get + get)
            assert answers.count(b"HTTP/1.1 200 ") == 2
            # A head split across writes, HTTP/1.0, a folded header (h11 unfolds it), no Host.
            stream = await trio.open_tcp_stream("127.0.0.1", s.port)
            async with stream:
                await stream.send_all(get[:20])
                await trio.testing.wait_all_tasks_blocked()
                await stream.send_all(get[20:])
                assert status_of(await stream.receive_some(65536)) == 200
            http10 = f"GET /vmms/{pid}/state HTTP/1.0\r\n\r\n".encode()
            assert status_of(await raw_get(s.port, http10)) == 200
            folded = f"GET /vmms/{pid}/state HTTP/1.1\r\nhost: t\r\n x\r\n\r\n".encode()
            assert status_of(await raw_get(s.port, folded)) == 200
            no_host = f"GET /vmms/{pid}/state HTTP/1.1\r\nx: y\r\n\r\n".encode()
            assert status_of(await raw_get(s.port, no_host)) == 400
            # A GET with a body is framed by h11, not taken as bodyless.
            with_body = (
                f"GET /vmms/{pid}/state HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{{}}"
            )
            assert status_of(await raw_get(s.port, with_body.encode())) == 200


async def test_with_a_token_the_quick_path_answers_only_the_bearer() -> None:
    with trio.fail_after(DEADLINE_S):
        async with serve(token="s3cret") as s:
            pid = await s.harness.start_vmm()
            assert (await s.client.get(f"/vmms/{pid}/state")).status_code == 200
            r = await s.client.get(f"/vmms/{pid}/state", headers={"authorization": "Bearer no"})
            assert r.status_code == 401 and r.json()["error_code"] == "UNAUTHORIZED"
            anon = f"GET /vmms/{pid}/state HTTP/1.1\r\nhost: t\r\n\r\n".encode()
            assert status_of(await raw_get(s.port, anon)) == 401


async def answered(port: int, request: bytes) -> int:
    """The status answered to ``request``, sent whole and followed by the end of our
    writes (the server answers, then closes: no wait for quiet)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        await stream.send_eof()
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return status_of(data)


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        ("Bearer s3cret", 200),
        ("bearer s3cret", 200),  # RFC 9110 11.1: the scheme is case-insensitive
        ("BEARER s3cret", 200),
        ("bEaReR  s3cret", 200),  # 11.4: one or more spaces before the credentials
        ("Bearer S3CRET", 401),  # the token itself is compared exactly
        ("Basic s3cret", 401),
        ("Bearers3cret", 401),
        ("bearer", 401),
    ],
)
async def test_the_bearer_scheme_is_case_insensitive_on_the_quick_path_and_the_router(
    authorization: str, status: int
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with serve(token="s3cret") as s:
            pid = await s.harness.start_vmm()
            head = (
                f"GET /vmms/{pid}/state HTTP/1.1\r\nhost: t\r\nauthorization: {authorization}\r\n"
            )
            quick = (head + "\r\n").encode()  # the quick path's shape
            routed = (head + "connection: keep-alive\r\n\r\n").encode()  # the router's
            zones = f"GET /zones HTTP/1.1\r\nhost: t\r\nauthorization: {authorization}\r\n\r\n"
            assert await answered(s.port, quick) == status
            assert await answered(s.port, routed) == status
            assert await answered(s.port, zones.encode()) == status


def test_admission_rules_in_order() -> None:
    lag, backlog = [0.0], [0]
    clock = [0.0]
    a = ReadAdmission(lambda: backlog[0], ReadLimits(), lag=lambda: lag[0], clock=lambda: clock[0])
    assert a.check() is None  # idle, nothing to publish
    backlog[0] = 5
    lag[0] = 0.004
    assert a.check() is None  # publishing, but the thread keeps up
    lag[0] = 0.006
    assert a.check() == PUBLICATION_FIRST
    lag[0] = 0.2
    assert a.check() == LATE  # past the bound: late, whatever is published
    backlog[0] = 0
    assert a.check() == LATE
    lag[0] = 0.0
    assert a.check() is None
    stats = a.statistics()
    assert stats.admitted == 3 and stats.shed == {PUBLICATION_FIRST: 1, LATE: 2}


def test_a_long_burst_of_refusals_is_logged_again_with_its_count() -> None:
    clock = [100.0]
    a = ReadAdmission(lambda: 1, ReadLimits(), lag=lambda: 0.01, clock=lambda: clock[0])
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            a.check()
            clock[0] += 3.0  # 15 s of refusals
        a.lag = lambda: 0.0
        a.check()
    events = [e for e in logs if e["event"].startswith("reads_shed")]
    assert [e["event"] for e in events] == ["reads_shedding", "reads_shedding", "reads_shed"]
    assert events[1]["shed_in_burst"] == 5 and events[1]["lasted_s"] == 12.0
    assert events[2]["shed"] == 5 and events[2]["lasted_s"] == 15.0
    assert {e["decided_in"] for e in events} == {"agent"}
    assert events[0]["publications_under_way"] == 1


def test_the_front_process_says_its_refusals_are_its_own_and_gives_no_count() -> None:
    a = ReadAdmission(lambda: 1, ReadLimits(), lag=lambda: 0.01, clock=lambda: 0.0)
    a.decided_in = "front"  # as ``_front_main`` sets it: it knows whether, not how many
    with structlog.testing.capture_logs() as logs:
        assert a.check() == PUBLICATION_FIRST
    (line,) = [e for e in logs if e["event"] == "reads_shedding"]
    assert line["decided_in"] == "front" and "publications_under_way" not in line


async def test_while_the_thread_lags_reads_take_turns_a_few_per_scheduler_batch() -> None:
    class Batches(trio.abc.Instrument):
        count = 0

        def before_io_wait(self, timeout: float) -> None:
            self.count += 1

    batches = Batches()
    trio.lowlevel.add_instrument(batches)
    try:
        a = ReadAdmission(
            lambda: 0, ReadLimits(reads_per_batch=2), lag=lambda: 0.02, now=lambda: 0.0
        )
        served_in: list[int] = []

        async def read() -> None:
            assert await a.admit() is None
            served_in.append(batches.count)

        with trio.fail_after(DEADLINE_S):
            async with trio.open_nursery() as nursery:
                for _ in range(7):
                    nursery.start_soon(read)
        assert len(served_in) == 7
        per_batch = [served_in.count(b) for b in set(served_in)]
        assert max(per_batch) <= 2 and len(per_batch) >= 4, served_in
        assert a.statistics().admitted == 7
    finally:
        trio.lowlevel.remove_instrument(batches)


async def test_a_read_whose_turn_comes_after_its_bound_is_refused_as_late() -> None:
    clock = iter([10.0, 10.5])  # arrived (now - lag), then when its turn came
    a = ReadAdmission(lambda: 0, ReadLimits(), lag=lambda: 0.02, now=lambda: next(clock))
    with trio.fail_after(DEADLINE_S):
        assert await a.admit() == LATE
    assert a.statistics().shed[LATE] == 1


def test_the_daemon_config_takes_a_reads_table_and_names_a_bad_value() -> None:
    config = config_from_toml("[reads]\nlate_s = 0.25\nretry_after_s = 2\n")
    assert config.reads == ReadLimits(late_s=0.25, retry_after_s=2)
    assert config_from_toml("").reads == ReadLimits()
    with pytest.raises(ConfigError, match=r"reads\.late_s: expected a number > 0, got 0"):
        config_from_toml("[reads]\nlate_s = 0\n")
    with pytest.raises(ConfigError, match=r"reads\.reads_per_batch: expected an integer >= 1"):
        config_from_toml("[reads]\nreads_per_batch = 0\n")
