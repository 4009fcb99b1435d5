"""The HTTP server's answers to what the app or the client never finished: a head that
never completes (408), an app that answers nothing (500), a request still running when
the shutdown's grace ends (cancelled), a client that leaves mid-answer (nothing logged,
the server goes on), a file streamed to a slow reader (whole). docs/design.md and docs/reliability.md cite these."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from starlette.responses import FileResponse

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


async def test_a_file_download_to_a_slow_reader_arrives_whole(tmp_path: Path) -> None:
    """Starlette's ``FileResponse`` listens for ``http.disconnect`` and cancels its own
    send when it comes. The server said the exchange was over before writing the last
    chunk, so a reader slower than the socket buffers lost up to its last 64 KiB (a
    bundle download over a slow link), and the connection stayed open out of step."""
    payload = random.Random(7).randbytes(3 * 65536 + 60_000)  # a large last chunk
    (tmp_path / "bundle.tar.gz").write_bytes(payload)

    async def download(scope: Scope, receive: Any, send: Any) -> None:
        response = FileResponse(tmp_path / "bundle.tar.gz", media_type="application/gzip")
        await response(scope, receive, send)

    with trio.fail_after(30):
        async with serving(app=download) as server:
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow link
            await sock.connect(("127.0.0.1", server.port))
            await sock.send(b"GET /bundle HTTP/1.1\r\nhost: a\r\n\r\n")
            received = b""
            while b"\r\n\r\n" not in received:
                received += await sock.recv(1024)
            # Whatever the server does while this reader waits, it has done.
            await trio.testing.wait_all_tasks_blocked()
            body = received.split(b"\r\n\r\n", 1)[1]
            while len(body) < len(payload) and (data := await sock.recv(65536)):
                body += data
            assert body == payload
            # The same connection serves the next request.
            await sock.send(b"GET /bundle HTTP/1.1\r\nhost: a\r\n\r\n")
            again = b""
            while len(again) < len(payload) or b"\r\n\r\n" not in again:
                again += await sock.recv(65536)
            assert again.split(b"\r\n\r\n", 1)[1] == payload
            sock.close()
