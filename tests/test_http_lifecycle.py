"""The HTTP server's answers to what the app or the client never finished: a head that
never completes (408), an app that answers nothing (500), a request still running when
the shutdown's grace ends (cancelled), a client that leaves mid-answer (nothing logged,
the server goes on). docs/design.md and docs/reliability.md cite these."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

import sledagent._http
from sledagent._http import HttpLimits, Scope

from .test_http import read_response, serving


async def test_a_request_head_that_never_completes_gets_408_and_the_connection_closes() -> None:
    with trio.fail_after(10):
        async with serving(HttpLimits(head_timeout_s=0.2)) as server:
            stream = await server.connect()
            await stream.send_all(b"GET /x HTTP/1.1\r\nhost: a\r\n")  # never the blank line
            status, head, body = await read_response(stream, bytearray())
            assert status == 408 and b"connection: close" in head
            assert json.loads(body)["message"] == "request head not received in time"
            assert await stream.receive_some() == b""
            other = await server.connect()  # the server goes on
            await other.send_all(b"GET /next HTTP/1.1\r\nhost: a\r\n\r\n")
            assert (await read_response(other, bytearray()))[0] == 200


async def test_an_app_that_answers_nothing_gives_500_and_the_server_goes_on() -> None:
    async def silent_app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()  # and returns without a response

    with trio.fail_after(10):
        async with serving(app=silent_app) as server:
            for _ in range(2):  # the next connection is served the same way
                stream = await server.connect()
                await stream.send_all(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n")
                status, _, body = await read_response(stream, bytearray())
                assert status == 500
                error = json.loads(body)
                assert error["message"] == "the application sent no response"
                assert set(error) == {"message", "error_code", "request_id"}
                assert await stream.receive_some() == b""


async def test_shutdown_cancels_a_request_still_in_the_app_when_the_grace_period_ends() -> None:
    entered = trio.Event()
    cancelled: list[bool] = []

    async def stuck_app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()
        entered.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(True)
            raise

    with trio.fail_after(10):
        async with serving(HttpLimits(graceful_s=0.2), app=stuck_app) as server:
            stream = await server.connect()
            await stream.send_all(b"GET /stuck HTTP/1.1\r\nhost: a\r\n\r\n")
            await entered.wait()
            server.shutdown.set()
            assert await stream.receive_some() == b""  # cut, never answered
        # serving() returned: the server's task ended with the request cancelled
    assert cancelled == [True]


async def test_a_client_that_leaves_mid_answer_is_not_an_error_and_the_server_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logged: list[str] = []

    class Recorder:
        def __getattr__(self, level: str) -> Any:
            return lambda event, **kw: logged.append(f"{level}:{event}")

    monkeypatch.setattr(sledagent._http, "log", Recorder())
    broke: list[BaseException] = []
    gone = trio.Event()

    async def streaming_app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()
        if scope["path"] != "/stream":
            body = b"{}"
            head = [(b"content-length", b"2"), (b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": head})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:  # a long answer, streamed until the client is gone
                await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        except BaseException as exc:
            broke.append(exc)
            gone.set()
            raise

    with trio.fail_after(10):
        async with serving(app=streaming_app) as server:
            stream = await server.connect()
            await stream.send_all(b"GET /stream HTTP/1.1\r\nhost: a\r\n\r\n")
            assert (await stream.receive_some()).startswith(b"HTTP/1.1 200 ")
            await stream.aclose()  # leaves mid-answer
            await gone.wait()
            other = await server.connect()
            await other.send_all(b"GET /next HTTP/1.1\r\nhost: a\r\n\r\n")
            assert (await read_response(other, bytearray()))[:1] == (200,)
    assert [type(e) for e in broke] == [trio.BrokenResourceError]
    assert [entry for entry in logged if not entry.startswith(("debug:", "info:"))] == []
