"""The API server on a front thread (``_front``): state reads never wait for the agent.

Issues 18 and 21: while the agent's trio thread re-adopts 1000 VMMs or publishes 1000
halts, a state read used to wait behind that work. With ``front=True`` (the daemon's
default) the server runs on a thread and loop of its own. The proof here does not
depend on speed: the agent's loop is *blocked* (its thread waits on a
``threading.Event``) while another thread reads; an answer can then only come from the
front. Everything else goes through the bridge to the agent's loop and must behave as
it does without the front: bodies, streamed answers, errors, disconnects, shutdown.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import httpx
import pytest
import trio

from sledagent._admission import LATE, PUBLICATION_FIRST, ReadAdmission
from sledagent._api import build_app
from sledagent._server import serve_api
from sledagent.testing import AgentHarness, ensure_body_json, fast_config, open_fake_agent

from ._front import http_get, port_of, serve_with_front, while_blocked

DEADLINE_S = 30


@attrs.define
class Front:
    harness: AgentHarness
    client: httpx.AsyncClient
    port: int
    admission: ReadAdmission
    stop: trio.Event


@asynccontextmanager
async def front_server(*, token: str | None = None) -> AsyncIterator[Front]:
    async with open_fake_agent(fast_config()) as harness, trio.open_nursery() as nursery:
        app = build_app(harness.agent, token=token)
        stop = trio.Event()
        urls = await nursery.start(
            lambda task_status: serve_with_front(app, stop=stop, task_status=task_status)
        )
        headers = {"authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=urls[0], timeout=10, headers=headers) as client:
            assert app.admission is not None
            yield Front(harness, client, port_of(urls[0]), app.admission, stop)
        stop.set()


async def test_a_state_read_is_answered_while_the_agents_loop_is_blocked() -> None:
    with trio.fail_after(DEADLINE_S):
        async with front_server() as f:
            pid = await f.harness.start_vmm()
            expected = f.harness.agent.manager.registry.get(pid).state
            # Nothing on its way to Nexus: "publication first" has nothing to protect.
            await f.harness.agent.notifier.wait_idle()
            status, body = while_blocked(lambda: http_get(f.port, f"/vmms/{pid}/state"))  # type: ignore[misc]
            assert status == 200
            answer = json.loads(body)
            assert answer["vmm_state"]["state"] == "running"
            assert answer["vmm_state"]["gen"] == expected.vmm_state.gen
            unknown = uuid.uuid4()
            status, body = while_blocked(lambda: http_get(f.port, f"/vmms/{unknown}/state"))  # type: ignore[misc]
            assert status == 404
            assert json.loads(body)["error_code"] == "NO_SUCH_INSTANCE"


async def test_a_registration_waits_for_the_agents_loop_while_reads_do_not() -> None:
    with trio.fail_after(DEADLINE_S):
        async with front_server() as f:
            running = await f.harness.start_vmm()
            await f.harness.agent.notifier.wait_idle()
            pid = uuid.uuid4()
            answered: list[int] = []

            def register() -> None:
                conn = http.client.HTTPConnection("127.0.0.1", f.port, timeout=DEADLINE_S)
                conn.request(
                    "PUT",
                    f"/vmms/{pid}",
                    body=json.dumps(ensure_body_json()),
                    headers={"content-type": "application/json"},
                )
                answered.append(conn.getresponse().status)
                conn.close()

            thread = threading.Thread(target=register, daemon=True)
            thread.start()
            status, _ = while_blocked(lambda: http_get(f.port, f"/vmms/{running}/state"))  # type: ignore[misc]
            assert status == 200
            assert answered == []  # the app runs on the agent's loop: it was blocked
            await trio.to_thread.run_sync(thread.join, DEADLINE_S)
            assert answered == [200]
            r = await f.client.get(f"/vmms/{pid}/state")
            assert r.status_code == 200, r.text
            assert r.json()["vmm_state"]["state"] == "starting"


async def test_registration_state_change_and_errors_cross_the_bridge_as_without_it() -> None:
    with trio.fail_after(DEADLINE_S):
        async with front_server() as f:
            pid = uuid.uuid4()
            r = await f.client.put(f"/vmms/{pid}", json=ensure_body_json())
            assert r.status_code == 200, r.text
            r = await f.client.put(f"/vmms/{pid}/state", json={"state": {"type": "running"}})
            assert r.status_code == 200, r.text
            r = await f.client.put(
                f"/vmms/{pid}/state",
                content=b"{not json",
                headers={"content-type": "application/json"},
            )
            assert r.status_code == 400
            assert r.json()["request_id"] == r.headers["x-request-id"]
            r = await f.client.get("/no/such/route")
            assert r.status_code == 404 and r.json()["error_code"] == "NOT_FOUND"
            r = await f.client.get("/metrics")
            assert r.status_code == 200 and b"sledagent_reads_admitted_total" in r.content
            r = await f.client.delete(f"/vmms/{pid}")
            assert r.status_code == 200, r.text


async def test_a_wrong_token_is_refused_on_the_front_and_through_the_bridge() -> None:
    with trio.fail_after(DEADLINE_S):
        async with front_server(token="s3cret") as f:
            pid = await f.harness.start_vmm()
            wrong = {"authorization": "Bearer nope"}
            r = await f.client.get(f"/vmms/{pid}/state", headers=wrong)
            assert r.status_code == 401
            assert r.json()["error_code"] == "UNAUTHORIZED"
            r = await f.client.get(f"/vmms/{pid}/state")
            assert r.status_code == 200


async def test_on_the_front_a_publication_sheds_no_read_but_a_late_one_is_refused_at_once() -> None:
    """While a front serves (a start re-adopting), reads cost the agent's loop only
    their GIL share: "publication first" sheds none of them; a read that waited past
    ``late_s`` on the front's own loop is still refused at once with 503."""
    with trio.fail_after(DEADLINE_S):
        async with front_server() as f:
            pid = await f.harness.start_vmm()
            f.admission.backlog = lambda: 3  # three halts on their way to Nexus
            r = await f.client.get(f"/vmms/{pid}/state")
            assert r.status_code == 200, r.text
            f.admission.lag = lambda: 0.2  # the front's own loop is 200 ms behind
            r = await f.client.get(f"/vmms/{pid}/state")
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert r.json()["error_code"] == "OVERLOADED"
            assert f.admission.statistics().shed == {PUBLICATION_FIRST: 0, LATE: 1}


async def test_a_client_that_leaves_mid_request_cancels_the_apps_task() -> None:
    """A registration whose body never comes whole: the client leaves; the server
    (front) ends the exchange and the app's task on the agent's loop ends too."""
    with trio.fail_after(DEADLINE_S):
        async with front_server() as f:
            sock = socket.create_connection(("127.0.0.1", f.port))
            body = json.dumps(ensure_body_json()).encode()
            sock.sendall(
                b"PUT /vmms/%s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (str(uuid.uuid4()).encode(), len(body), body[:10])
            )
            sock.close()
            r = await f.client.get("/metrics")  # the server still serves
            assert r.status_code == 200
            # And no app task was left behind on the agent's side (the bridge's nursery
            # would keep the server from stopping): shutdown completes.
            f.stop.set()


async def test_shutdown_stops_the_front_and_cancellation_stops_it_at_once() -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_fake_agent(fast_config()) as harness:
            app = build_app(harness.agent)
            for how in ("shutdown", "cancel"):
                stop = trio.Event()
                async with trio.open_nursery() as nursery:
                    urls = await nursery.start(
                        lambda task_status, stop=stop: serve_with_front(
                            app, stop=stop, task_status=task_status
                        )
                    )
                    async with httpx.AsyncClient(base_url=urls[0], timeout=10) as client:
                        assert (await client.get("/metrics")).status_code == 200
                    if how == "shutdown":
                        stop.set()
                    else:
                        nursery.cancel_scope.cancel()
                port = port_of(urls[0])
                with pytest.raises(OSError):  # the listener is closed
                    socket.create_connection(("127.0.0.1", port), timeout=5).close()


async def test_a_port_in_use_fails_before_the_front_starts() -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_fake_agent(fast_config()) as harness:
            taken = socket.socket()
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            try:
                port = taken.getsockname()[1]
                async with trio.open_nursery() as nursery:
                    with pytest.raises(OSError):
                        await nursery.start(
                            lambda task_status: serve_api(
                                build_app(harness.agent),
                                listen=f"127.0.0.1:{port}",
                                shutdown=trio.Event(),
                                announce=False,
                                front=True,
                                task_status=task_status,
                            )
                        )
            finally:
                taken.close()


async def test_at_handover_each_connection_is_told_to_close_and_the_agents_loop_serves_next() -> (
    None
):
    """The daemon keeps the front only while a start re-adopts (``front_until``): then
    a kept-alive connection's next answer says ``connection: close`` (never a
    connection closed under a client that may reuse it) and new ones are served."""
    with trio.fail_after(DEADLINE_S):
        async with open_fake_agent(fast_config()) as harness, trio.open_nursery() as nursery:
            app = build_app(harness.agent)
            stop, until = trio.Event(), trio.Event()
            urls = await nursery.start(
                lambda task_status: serve_with_front(
                    app, stop=stop, until=until, task_status=task_status
                )
            )
            port = port_of(urls[0])
            pid = await harness.start_vmm()
            request = f"GET /vmms/{pid}/state HTTP/1.1\r\nhost: x\r\n\r\n".encode()
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:

                async def ask() -> bytes:
                    await stream.send_all(request)
                    data = b""
                    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                        chunk = await stream.receive_some(65536)
                        assert chunk, "the server closed the connection without an answer"
                        data += chunk
                    return data

                assert b"connection: close" not in (await ask()).lower()
                assert app.admission is not None and app.admission.busy is not None
                until.set()
                while b"connection: close" not in (answer := await ask()).lower():
                    pass  # answered before the front heard of the handover
                assert answer.startswith(b"HTTP/1.1 200")
                assert await stream.receive_some(65536) == b""  # then it closed
            async with httpx.AsyncClient(base_url=urls[0], timeout=10) as client:
                for _ in range(3):
                    r = await client.get(f"/vmms/{pid}/state")
                    assert r.status_code == 200
            assert app.admission.busy is None  # one loop decides reads again
            stop.set()
