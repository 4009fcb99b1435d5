"""QA of issue 18: the front's handover (``serve_api(front=True, front_until=...)``)
must not cut an answer the front is still sending. A bundle download started while a
restart re-adopts (bridged to the agent's loop, written by the front) was cut mid-body
(curl: "transfer closed with N bytes remaining") ``keep_alive_s + graceful_s`` after
the handover, with the agent still running: the retiring front cancelled it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from sledagent._http import HttpLimits, Message, Scope

from ._front import port_of, serve_with_front

DEADLINE_S = 30
CHUNK = b"x" * 65536


async def test_an_answer_in_flight_at_handover_is_sent_whole() -> None:
    more = trio.Event()  # set by the test: the app sends the rest of its answer

    async def app(
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        headers = [(b"content-length", str(2 * len(CHUNK)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await more.wait()  # a slow download: the rest comes after the handover
        await send({"type": "http.response.body", "body": CHUNK, "more_body": False})

    limits = HttpLimits(keep_alive_s=0.1, graceful_s=0.1)
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            stop, until = trio.Event(), trio.Event()
            urls = await nursery.start(
                lambda task_status: serve_with_front(
                    app, stop=stop, until=until, limits=limits, task_status=task_status
                )
            )
            port = port_of(urls[0])
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(b"GET /bundle HTTP/1.1\r\nhost: x\r\n\r\n")
                data = b""
                while len(data.partition(b"\r\n\r\n")[2]) < len(CHUNK):
                    chunk = await stream.receive_some(1 << 20)
                    assert chunk, "closed before the first half"
                    data += chunk
                until.set()  # re-adoption done: the front retires
                # Well past the front's keep-alive and grace periods (0.1 s each).
                await trio.sleep(1.0)
                more.set()
                while len(body := data.partition(b"\r\n\r\n")[2]) < 2 * len(CHUNK):
                    chunk = await stream.receive_some(1 << 20)
                    assert chunk, f"the answer was cut at {len(body)} of {2 * len(CHUNK)} bytes"
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200")
            stop.set()


async def test_a_shutdown_after_handover_ends_what_the_front_still_sends() -> None:
    """The front keeps an answer in flight past the handover, but not past a shutdown:
    the server returns within its grace, not when the slow client is done."""
    never = trio.Event()

    async def app(
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        headers = [(b"content-length", str(2 * len(CHUNK)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await never.wait()

    limits = HttpLimits(keep_alive_s=0.1, graceful_s=0.1)
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            stop, until, served = trio.Event(), trio.Event(), trio.Event()

            async def serve(task_status: trio.TaskStatus[list[str]]) -> None:
                await serve_with_front(
                    app, stop=stop, until=until, limits=limits, task_status=task_status
                )
                served.set()

            urls = await nursery.start(serve)
            port = port_of(urls[0])
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(b"GET /bundle HTTP/1.1\r\nhost: x\r\n\r\n")
                data = b""
                while len(data.partition(b"\r\n\r\n")[2]) < len(CHUNK):
                    chunk = await stream.receive_some(1 << 20)
                    assert chunk, "closed before the first half"
                    data += chunk
                until.set()
                stop.set()  # SIGTERM: the server returns (fail_after bounds the wait)
                await served.wait()
                while chunk := await stream.receive_some(1 << 20):
                    data += chunk  # the front closed the connection: no more comes
            assert len(data.partition(b"\r\n\r\n")[2]) < 2 * len(CHUNK)
