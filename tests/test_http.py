"""The HTTP/1.1 server the API runs on (``sledagent._http``), over real sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

from sledagent._http import HttpLimits, Message, Scope
from sledagent._server import serve_http


async def echo_app(scope: Scope, receive: Any, send: Any) -> None:
    """Answers with what it was sent; ``/boom`` fails."""
    body = b""
    while True:
        message: Message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/boom":
        raise RuntimeError("a bug in the app")
    answer = json.dumps(
        {"method": scope["method"], "path": scope["path"], "query": scope["query_string"].decode(),
         "body": body.decode()}
    ).encode()  # fmt: skip
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


@attrs.define
class Server:
    port: int
    shutdown: trio.Event
    streams: list[trio.SocketStream] = attrs.field(factory=list)

    async def connect(self) -> trio.SocketStream:
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        self.streams.append(stream)
        return stream


@asynccontextmanager
async def serving(limits: HttpLimits | None = None, app: Any = echo_app) -> AsyncIterator[Server]:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            lambda task_status: serve_http(
                app, "127.0.0.1:0", shutdown=shutdown, limits=limits, task_status=task_status
            )
        )
        server = Server(int(urls[0].rsplit(":", 1)[1]), shutdown)
        try:
            yield server
        finally:
            for stream in server.streams:
                await stream.aclose()
            shutdown.set()


async def read_response(stream: trio.SocketStream, buf: bytearray) -> tuple[int, bytes, bytes]:
    """(status, head, body) of one response with a content-length; keeps leftovers."""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some()
        if not chunk:
            raise EOFError(bytes(buf))
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = int(next(
        line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    ))  # fmt: skip
    while len(rest) < length:
        rest += await stream.receive_some()
    buf[:] = rest[length:]
    return int(head.split(b" ")[1]), head, rest[:length]


async def test_two_requests_share_one_keep_alive_connection() -> None:
    async with serving() as server:
        stream = await server.connect()
        buf = bytearray()
        for i in range(2):
            await stream.send_all(f"GET /vmms/{i}?x=%2F HTTP/1.1\r\nhost: a\r\n\r\n".encode())
            status, _, body = await read_response(stream, buf)
            assert status == 200
            assert json.loads(body) == {
                "method": "GET",
                "path": f"/vmms/{i}",
                "query": "x=%2F",
                "body": "",
            }
        await stream.aclose()


async def test_a_chunked_body_reaches_the_app_and_100_continue_is_sent() -> None:
    async with serving() as server:
        stream = await server.connect()
        await stream.send_all(
            b"PUT /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nexpect: 100-continue\r\n\r\n"
        )
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive_some()
        assert bytes(buf).startswith(b"HTTP/1.1 100 ")
        del buf[: buf.index(b"\r\n\r\n") + 4]
        await stream.send_all(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        status, _, body = await read_response(stream, buf)
        assert status == 200 and json.loads(body)["body"] == "hello world"


async def test_a_malformed_request_gets_400_with_an_error_body_and_the_connection_closes() -> None:
    async with serving() as server:
        stream = await server.connect()
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        buf = bytearray()
        status, _, body = await read_response(stream, buf)
        assert status == 400
        assert set(json.loads(body)) == {"message", "error_code", "request_id"}
        assert await stream.receive_some() == b""


async def test_an_oversized_request_head_is_refused_with_431() -> None:
    async with serving(HttpLimits(max_head_bytes=4096)) as server:
        stream = await server.connect()
        await stream.send_all(b"GET / HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * 8192 + b"\r\n\r\n")
        status, _, _ = await read_response(stream, bytearray())
        assert status == 431


async def test_an_app_that_fails_gives_500_and_the_server_keeps_serving() -> None:
    async with serving() as server:
        stream = await server.connect()
        await stream.send_all(b"GET /boom HTTP/1.1\r\nhost: a\r\n\r\n")
        status, _, body = await read_response(stream, bytearray())
        assert status == 500 and json.loads(body)["message"] == "internal error"
        other = await server.connect()
        await other.send_all(b"GET /fine HTTP/1.1\r\nhost: a\r\n\r\n")
        assert (await read_response(other, bytearray()))[0] == 200


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout() -> None:
    async with serving(HttpLimits(keep_alive_s=0.2)) as server:
        stream = await server.connect()
        with trio.fail_after(5):
            assert await stream.receive_some() == b""


async def test_shutdown_finishes_requests_in_flight_and_closes_idle_connections() -> None:
    entered, release = trio.Event(), trio.Event()

    async def held_app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":  # in the app until the test lets it answer
            entered.set()
            await release.wait()
        await echo_app(scope, receive, send)

    with trio.fail_after(10):
        async with serving(app=held_app) as server:
            busy = await server.connect()
            idle = await server.connect()
            await busy.send_all(b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n")
            await entered.wait()  # the slow request is in the app
            server.shutdown.set()
            # The idle connection is closed while the request is still in the app.
            assert await idle.receive_some() == b""
            assert not release.is_set()
            release.set()
            status, _, body = await read_response(busy, bytearray())
            assert status == 200 and json.loads(body)["path"] == "/slow"  # answered
            # No longer listening: a new connection is refused.
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", server.port)
