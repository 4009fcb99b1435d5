"""The HTTP server and client against hostile and broken peers, case by case (issue 16).

The bar is hypercorn's and httpx's behaviour. Every server case asserts the exact answer
(status, and that an error has the contract's body) and then that a request on a fresh
connection is still served. The client's cases run ``H1Pool`` against a raw-socket
server (trio sockets) that misbehaves on purpose, and check that every answer is the
answer to its own request. Real sockets and real time: each test waits for the event it
means (an answer, a close, a log line of the server) under a ``fail_after``, never for a
duration; the timeouts under test are short so that waiting for them is quick.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import structlog
import trio
import trio.testing
from hypothesis import given, note, settings
from hypothesis import strategies as st

from sledagent._api import build_app
from sledagent._daemon import ConfigError, DaemonConfig, config_from_toml, run_daemon
from sledagent._h1client import ConnectionFailed, H1Pool
from sledagent._http import STATS, HttpLimits, Message, Scope
from sledagent._server import serve_http
from sledagent.testing import fast_config, open_fake_agent

DEADLINE_S = 10


# --- a raw client ------------------------------------------------------------------------


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        """The contract's error body (``{message, error_code, request_id}``)."""
        err = json.loads(self.body)
        assert set(err) == {"message", "error_code", "request_id"}, err
        return err  # type: ignore[no-any-return]


class Raw:
    """One client connection speaking bytes; reads answers with a Content-Length."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _more(self) -> bool:
        try:
            chunk = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:  # reset: closed too
            chunk = b""
        self.buf += chunk
        return bool(chunk)

    async def answer(self, *, head: bool = False) -> Answer:
        """The next answer (``head``: to a HEAD request, so no body whatever the length)."""
        with trio.fail_after(DEADLINE_S):
            while b"\r\n\r\n" not in self.buf:
                if not await self._more():
                    raise EOFError(f"closed before an answer; got {bytes(self.buf)!r}")
            raw_head, _, _ = bytes(self.buf).partition(b"\r\n\r\n")
            del self.buf[: len(raw_head) + 4]
            lines = raw_head.decode("latin-1").split("\r\n")
            assert re.fullmatch(r"HTTP/1\.1 \d{3} .*", lines[0]), raw_head
            status = int(lines[0].split(" ")[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = 0 if head or status < 200 else int(headers.get("content-length", "0"))
            while len(self.buf) < length:
                if not await self._more():
                    raise EOFError("closed mid-body")
            body = bytes(self.buf[:length])
            del self.buf[:length]
            return Answer(status, headers, body)

    async def closed(self) -> bool:
        """True once the server closes the connection with nothing more to say."""
        with trio.fail_after(DEADLINE_S):
            while await self._more():
                pass
        return not self.buf

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def settled() -> None:
    """Until every task of this process (the server's included) waits: what was sent on
    loopback has been read and acted on."""
    with trio.fail_after(DEADLINE_S):
        await trio.testing.wait_all_tasks_blocked()


@attrs.define
class Server:
    port: int
    conns: list[Raw] = attrs.Factory(list)

    async def connect(self) -> Raw:
        with trio.fail_after(DEADLINE_S):
            raw = Raw(await trio.open_tcp_stream("127.0.0.1", self.port))
        self.conns.append(raw)
        return raw

    async def assert_serves_a_fresh_connection(self, target: str = "/echo") -> None:
        raw = await self.connect()
        await raw.send(f"GET {target} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
        assert (await raw.answer()).status == 200
        await raw.aclose()


async def echo(scope: Scope, receive: Callable[[], Awaitable[Message]], send: Any) -> None:
    """``/echo`` reads the body and answers with it; ``/ignore`` answers 404 without
    reading it; ``/wait`` holds the request until ``HELD`` is set."""
    path = scope["path"]
    body = b""
    if path.startswith("/echo"):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
    elif path == "/wait":
        await HELD.wait()
    status = 404 if path == "/ignore" else 200
    answer = json.dumps({"method": scope["method"], "body": body.decode("latin-1")}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


HELD = trio.Event()


@asynccontextmanager
async def serving(app: Any = echo, **limits: Any) -> AsyncIterator[Server]:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            partial(serve_http, app, "127.0.0.1:0", shutdown=shutdown, limits=HttpLimits(**limits))
        )
        server = Server(int(urls[0].rsplit(":", 1)[1]))
        try:
            yield server
        finally:
            for raw in server.conns:
                await raw.aclose()
            shutdown.set()


@asynccontextmanager
async def serving_the_api(token: str | None = None) -> AsyncIterator[tuple[Server, uuid.UUID]]:
    async with open_fake_agent() as harness:
        vmm = await harness.start_vmm()
        async with serving(build_app(harness.agent, token=token)) as server:
            yield server, vmm


def no_error_logged(logs: list[dict[str, Any]]) -> bool:
    return not [e for e in logs if e["log_level"] in ("error", "critical")]


# --- HEAD and methods --------------------------------------------------------------------


async def test_head_on_a_get_route_answers_the_headers_of_get_without_a_body() -> None:
    async with serving_the_api() as (server, vmm):
        raw = await server.connect()
        target = f"/vmms/{vmm}/state"
        await raw.send(f"GET {target} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
        got = await raw.answer()
        await raw.send(f"HEAD {target} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
        head = await raw.answer(head=True)
        assert head.status == got.status == 200
        assert head.headers["content-length"] == got.headers["content-length"] != "0"
        assert head.headers["content-type"] == "application/json"
        # No body went out: the next answer on the same connection starts right here.
        await raw.send(f"GET {target} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
        again = await raw.answer()
        assert again.status == 200 and json.loads(again.body) == json.loads(got.body)
        await server.assert_serves_a_fresh_connection("/openapi.json")


async def test_head_to_an_unknown_route_or_without_the_token_is_answered_not_dropped() -> None:
    async with serving_the_api(token="s3cret") as (server, vmm):
        with structlog.testing.capture_logs() as logs:
            raw = await server.connect()
            await raw.send(b"HEAD /no/such/route HTTP/1.1\r\nhost: t\r\n\r\n")
            unknown = await raw.answer(head=True)
            await raw.send(f"HEAD /vmms/{vmm}/state HTTP/1.1\r\nhost: t\r\n\r\n".encode())
            unauthorized = await raw.answer(head=True)
            await raw.send(b"HEAD /metrics HTTP/1.1\r\nhost: t\r\n\r\n")
            metrics = await raw.answer(head=True)
        assert (unknown.status, unauthorized.status, metrics.status) == (404, 401, 200)
        assert int(unknown.headers["content-length"]) > 0  # the length GET would have
        assert no_error_logged(logs), logs
        raw = await server.connect()
        await raw.send(b"GET /metrics HTTP/1.1\r\nhost: t\r\n\r\n")
        assert (await raw.answer()).status == 200


async def test_a_method_the_route_lacks_gets_405_with_every_allowed_method() -> None:
    async with serving_the_api() as (server, vmm):
        raw = await server.connect()
        await raw.send(
            f"POST /vmms/{vmm}/state HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n".encode()
        )
        answer = await raw.answer()
        assert answer.status == 405
        assert answer.headers["allow"] == "GET, HEAD, PUT"
        assert answer.error()["error_code"] == "METHOD_NOT_ALLOWED"
        await server.assert_serves_a_fresh_connection("/openapi.json")


# --- timeouts ------------------------------------------------------------------------------


async def test_an_idle_keep_alive_connection_is_closed_after_keep_alive_s() -> None:
    async with serving(keep_alive_s=0.2) as server:
        raw = await server.connect()
        await raw.send(b"GET /echo HTTP/1.1\r\nhost: t\r\n\r\n")
        assert (await raw.answer()).status == 200
        assert await raw.closed()  # idle after its answer: closed by the server
        silent = await server.connect()
        assert await silent.closed()  # connected, never spoke
        await server.assert_serves_a_fresh_connection()


async def test_a_head_that_never_completes_gets_408_and_a_close() -> None:
    async with serving(head_timeout_s=0.2) as server:
        raw = await server.connect()
        await raw.send(b"GET /echo HTTP/1.1\r\nhost: t\r\nx-slow:")
        answer = await raw.answer()
        assert answer.status == 408
        assert answer.error()["message"] == "request head not received in time"
        assert await raw.closed()
        await server.assert_serves_a_fresh_connection()


async def test_a_head_dripped_a_byte_at_a_time_still_gets_408() -> None:
    """Slowloris: every byte resets no timer; the head has a deadline as a whole."""
    async with serving(head_timeout_s=0.3, keep_alive_s=30) as server:
        raw = await server.connect()

        async def drip() -> None:
            try:
                await raw.send(b"GET /echo HTTP/1.1\r\n")
                while True:
                    await raw.send(b"x")
                    await trio.sleep(0.01)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drip)
            answer = await raw.answer()
            nursery.cancel_scope.cancel()
        assert answer.status == 408
        await server.assert_serves_a_fresh_connection()


async def test_a_stalled_upload_gets_408_and_the_connection_closes() -> None:
    async with serving(body_timeout_s=0.2) as server:
        with structlog.testing.capture_logs() as logs:
            raw = await server.connect()
            await raw.send(b"PUT /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\nabc")
            answer = await raw.answer()
            assert answer.status == 408
            assert answer.error()["message"] == "request body not received in time"
            assert await raw.closed()
        assert no_error_logged(logs), logs
        await server.assert_serves_a_fresh_connection()


async def test_a_body_never_sent_after_an_early_404_does_not_hold_the_connection() -> None:
    async with serving(discard_timeout_s=0.2, keep_alive_s=30) as server:
        raw = await server.connect()
        await raw.send(b"PUT /ignore HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\n")
        assert (await raw.answer()).status == 404
        assert await raw.closed()  # within discard_timeout_s, not keep_alive_s
        await server.assert_serves_a_fresh_connection()


async def test_an_unread_body_within_the_bound_is_dropped_and_the_connection_kept() -> None:
    async with serving() as server:
        raw = await server.connect()
        body = b"x" * 5000
        await raw.send(b"PUT /ignore HTTP/1.1\r\nhost: t\r\ncontent-length: 5000\r\n\r\n" + body)
        first = await raw.answer()
        assert first.status == 404 and "connection" not in first.headers
        await raw.send(b"PUT /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\nok")
        second = await raw.answer()
        assert (second.status, json.loads(second.body)["body"]) == (200, "ok")
        await server.assert_serves_a_fresh_connection()


async def test_an_unread_body_over_the_discard_bound_is_answered_then_closed() -> None:
    async with serving(max_discard_bytes=1000) as server:
        raw = await server.connect()
        await raw.send(b"PUT /ignore HTTP/1.1\r\nhost: t\r\ncontent-length: 5000\r\n\r\n")
        answer = await raw.answer()
        assert answer.status == 404 and answer.headers["connection"] == "close"
        await raw.send(b"y" * 5000)  # read and dropped, so our answer is not lost to a reset
        assert await raw.closed()
        await server.assert_serves_a_fresh_connection()


# --- framing -------------------------------------------------------------------------------

BAD_CHUNKS = {
    "size not hex": b"zz\r\nab\r\n0\r\n\r\n",
    "negative size": b"-1\r\nab\r\n0\r\n\r\n",
    "0x prefix": b"0x2\r\nab\r\n0\r\n\r\n",
    "more data than declared": b"2\r\nabcdef\r\n0\r\n\r\n",
    "no CRLF after data": b"2\r\nab0\r\n\r\n",
    "size too long": b"1" * 30 + b"\r\nab\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("chunks", BAD_CHUNKS.values(), ids=BAD_CHUNKS.keys())
async def test_a_malformed_chunked_body_is_400_never_500(chunks: bytes) -> None:
    async with serving_the_api() as (server, _):
        with structlog.testing.capture_logs() as logs:
            raw = await server.connect()
            await raw.send(
                f"PUT /vmms/{uuid.uuid4()} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json"
                "\r\ntransfer-encoding: chunked\r\n\r\n".encode()
                + chunks
            )
            answer = await raw.answer()
            assert answer.status == 400, answer
            assert answer.error()["message"].startswith("malformed request body")
            assert await raw.closed()
        assert no_error_logged(logs), logs
        await server.assert_serves_a_fresh_connection("/openapi.json")


async def test_a_client_that_resets_mid_upload_is_no_error() -> None:
    async with serving_the_api() as (server, _):
        with structlog.testing.capture_logs() as logs:
            raw = await server.connect()
            await raw.send(
                f"PUT /vmms/{uuid.uuid4()} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json"
                "\r\ncontent-length: 100\r\n\r\n{".encode()
            )
            await settled()  # the API is reading the body
            linger_0 = struct.pack("ii", 1, 0)  # close with a reset, not a FIN
            raw.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_0)
            await raw.aclose()
            await settled()  # the server saw it
        assert no_error_logged(logs), logs
        await server.assert_serves_a_fresh_connection("/openapi.json")


async def test_clients_that_leave_mid_request_are_counted_apart_never_as_400() -> None:
    # The QA case: 20 clients send half a head and close, 20 half a body and close, and
    # one resets mid-head: no 400 was answered, so none is counted; the metric says they
    # left, by stage.
    async with serving_the_api() as (server, _):
        refused_before, left_before = dict(STATS.refused), dict(STATS.abandoned)
        with structlog.testing.capture_logs() as logs:
            for _ in range(20):
                raw = await server.connect()
                await raw.send(b"GET /zones HTTP/1.1\r\nhost: t\r\nx-half: ")
                await raw.stream.send_eof()
                assert await raw.closed()  # closed without an answer
            for _ in range(20):
                raw = await server.connect()
                await raw.send(
                    f"PUT /vmms/{uuid.uuid4()} HTTP/1.1\r\nhost: t\r\ncontent-type: "
                    "application/json\r\ncontent-length: 100\r\n\r\n{".encode()
                )
                await raw.stream.send_eof()
                assert await raw.closed()
            raw = await server.connect()
            await raw.send(b"GET /zones HTTP/1.1\r\nhost")
            await settled()  # the server holds the half head
            raw.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await raw.aclose()
            await settled()
        assert STATS.refused == refused_before
        assert STATS.abandoned.get("head", 0) - left_before.get("head", 0) == 21
        assert STATS.abandoned.get("body", 0) - left_before.get("body", 0) == 20
        assert no_error_logged(logs), logs
        raw = await server.connect()
        await raw.send(b"GET /metrics HTTP/1.1\r\nhost: t\r\n\r\n")
        metrics = (await raw.answer()).body.decode()
        assert (
            f'sledagent_http_abandoned_total{{stage="body"}} {STATS.abandoned["body"]}.0' in metrics
        )
        await server.assert_serves_a_fresh_connection("/openapi.json")


SMUGGLING = {
    "content-length and chunked": b"content-length: 4\r\ntransfer-encoding: chunked\r\n",
    "chunked and content-length": b"transfer-encoding: chunked\r\ncontent-length: 4\r\n",
    "unknown coding": b"transfer-encoding: xchunked\r\n",
    "chunked not last": b"transfer-encoding: chunked, identity\r\n",
    "two transfer-encodings": b"transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n",
    "conflicting lengths": b"content-length: 4\r\ncontent-length: 5\r\n",
    "a list of lengths": b"content-length: 4, 5\r\n",
    "signed length": b"content-length: +4\r\n",
    "negative length": b"content-length: -4\r\n",
    "space before colon": b"content-length : 4\r\n",
    "NUL in a header": b"x-a: b\x00c\r\n",
}


@pytest.mark.parametrize("headers", SMUGGLING.values(), ids=SMUGGLING.keys())
async def test_ambiguous_request_framing_is_refused_with_400_and_a_close(headers: bytes) -> None:
    async with serving() as server:
        raw = await server.connect()
        await raw.send(
            b"PUT /echo HTTP/1.1\r\nhost: t\r\n" + headers + b"\r\n4\r\nabcd\r\n0\r\n\r\n"
        )
        answer = await raw.answer()
        assert answer.status == 400, answer
        assert answer.headers["connection"] == "close"
        assert await raw.closed()
        await server.assert_serves_a_fresh_connection()


async def test_transfer_encoding_in_http_1_0_is_refused() -> None:
    async with serving() as server:
        raw = await server.connect()
        await raw.send(b"PUT /echo HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
        assert (await raw.answer()).status == 400
        assert await raw.closed()
        await server.assert_serves_a_fresh_connection()


@pytest.mark.parametrize("pieces", [1, 64], ids=["whole", "in pieces"])
async def test_an_oversized_head_is_431(pieces: int) -> None:
    async with serving(max_head_bytes=4096) as server:
        raw = await server.connect()
        head = b"GET /echo HTTP/1.1\r\nhost: t\r\n" + b"x-a: b\r\n" * 1000 + b"\r\n"
        step = len(head) // pieces + 1
        for i in range(0, len(head), step):
            await raw.send(head[i : i + step])
        answer = await raw.answer()
        assert answer.status == 431
        assert await raw.closed()
        await server.assert_serves_a_fresh_connection()


async def test_a_declared_body_over_the_cap_is_413_before_the_app_runs() -> None:
    async with serving(max_body_bytes=1000) as server:
        raw = await server.connect()
        await raw.send(b"PUT /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 1001\r\n\r\n")
        answer = await raw.answer()
        assert answer.status == 413 and "over 1000 bytes" in answer.error()["message"]
        assert await raw.closed()
        await server.assert_serves_a_fresh_connection()


async def test_a_chunked_body_growing_over_the_cap_is_413() -> None:
    async with serving(max_body_bytes=1000) as server:
        raw = await server.connect()
        await raw.send(b"PUT /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
        await raw.send(b"400\r\n" + b"a" * 1024 + b"\r\n")
        assert (await raw.answer()).status == 413
        assert await raw.closed()
        await server.assert_serves_a_fresh_connection()


async def test_a_request_target_that_is_not_ascii_is_400() -> None:
    async with serving() as server:
        raw = await server.connect()
        await raw.send(b"GET /%FF%FE HTTP/1.1\r\nhost: t\r\n\r\n")
        assert (await raw.answer()).status == 400
        await server.assert_serves_a_fresh_connection()


async def ok(scope: Scope, receive: Callable[[], Awaitable[Message]], send: Any) -> None:
    """Reads the whole body, answers 200 with no body (so answers parse alike)."""
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


EOL = st.sampled_from([b"\r\n", b"\n"])
HEADER = st.sampled_from(
    [b"host: t", b"content-length: 3", b"content-length: -1", b"content-length: 3, 4",
     b"content-length: 99999999999999999999", b"transfer-encoding: chunked",
     b"transfer-encoding: gzip, chunked", b"expect: 100-continue", b"connection: close",
     b" folded", b"x-a: \x00", b"x-a: \xff", b": empty name"]
) | st.binary(max_size=24)  # fmt: skip
BODY = st.sampled_from(
    [b"", b"abc", b"3\r\nabc\r\n0\r\n\r\n", b"zz\r\nab\r\n", b"0\r\n\r\n", b"2\r\nabcd\r\n"]
) | st.binary(max_size=40)  # fmt: skip


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"PUT", b"POST", b"G T", b""]))
    target = draw(
        st.sampled_from([b"/", b"/x?y=1", b"/%ff", b"*", b"http://h/p"]) | st.binary(max_size=12)
    )
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x", b""]))
    eol = draw(EOL)
    head = method + b" " + target + b" " + version + eol
    head += b"".join(h + eol for h in draw(st.lists(HEADER, max_size=5)))
    return head + eol + draw(BODY)


@settings(max_examples=150, deadline=None)
@given(st.lists(requests(), min_size=1, max_size=3))
async def test_no_request_bytes_get_a_5xx_log_an_error_or_stop_the_server(
    pipeline: list[bytes],
) -> None:
    """Whatever a client sends (pipelined, then half-closed): every answer is below 500,
    nothing is logged as an error, and a fresh connection is served after."""
    note(repr(pipeline))
    with structlog.testing.capture_logs() as logs:
        async with serving(ok, head_timeout_s=5, body_timeout_s=5) as server:
            raw = await server.connect()
            with contextlib.suppress(trio.BrokenResourceError):
                await raw.send(b"".join(pipeline))
                await raw.stream.send_eof()
            statuses = []
            with contextlib.suppress(EOFError):
                while True:
                    statuses.append((await raw.answer()).status)
            assert all(status < 500 for status in statuses), statuses
            await server.assert_serves_a_fresh_connection()
    assert no_error_logged(logs), logs


# --- connection lifecycle --------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with serving() as server:
        raw = await server.connect()
        await raw.send(
            b"PUT /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\none"
            b"GET /echo HTTP/1.1\r\nhost: t\r\n\r\n"
            b"PUT /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n"
        )
        answers = [await raw.answer() for _ in range(3)]
        assert [json.loads(a.body) for a in answers] == [
            {"method": "PUT", "body": "one"},
            {"method": "GET", "body": ""},
            {"method": "PUT", "body": "two"},
        ]
        await server.assert_serves_a_fresh_connection()


async def test_an_http_1_0_request_is_answered_and_the_connection_closed() -> None:
    async with serving() as server:
        raw = await server.connect()
        await raw.send(b"GET /echo HTTP/1.0\r\n\r\n")
        answer = await raw.answer()
        assert answer.status == 200 and json.loads(answer.body)["method"] == "GET"
        assert await raw.closed()
        await server.assert_serves_a_fresh_connection()


async def test_a_client_that_half_closes_after_its_request_still_gets_the_answer() -> None:
    async with serving() as server:
        raw = await server.connect()
        await raw.send(b"PUT /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\nhi")
        await raw.stream.send_eof()
        answer = await raw.answer()
        assert (answer.status, json.loads(answer.body)["body"]) == (200, "hi")
        assert await raw.closed()
        await server.assert_serves_a_fresh_connection()


async def test_100_continue_is_sent_when_the_app_reads_the_body() -> None:
    async with serving() as server:
        raw = await server.connect()
        await raw.send(
            b"PUT /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n"
        )
        assert (await raw.answer()).status == 100
        await raw.send(b"ok")
        answer = await raw.answer()
        assert (answer.status, json.loads(answer.body)["body"]) == (200, "ok")
        await server.assert_serves_a_fresh_connection()


async def test_a_100_continue_request_answered_without_its_body_is_told_close() -> None:
    async with serving() as server:
        raw = await server.connect()
        await raw.send(
            b"PUT /ignore HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n"
        )
        answer = await raw.answer()  # no 100 first: the final answer at once
        assert answer.status == 404 and answer.headers["connection"] == "close"
        await raw.aclose()  # as a client does that will not send the body
        await server.assert_serves_a_fresh_connection()


# --- the connection cap ----------------------------------------------------------------------


async def test_past_the_connection_cap_the_oldest_idle_connection_makes_room() -> None:
    async with serving(max_connections=3, keep_alive_s=30) as server:
        idle = [await server.connect() for _ in range(3)]
        await settled()  # all three accepted, idle
        closed_before = STATS.idle_closed
        newcomer = await server.connect()
        await newcomer.send(b"GET /echo HTTP/1.1\r\nhost: t\r\n\r\n")
        assert (await newcomer.answer()).status == 200
        assert await idle[0].closed()  # the oldest went
        assert STATS.idle_closed == closed_before + 1
        await idle[2].send(b"GET /echo HTTP/1.1\r\nhost: t\r\n\r\n")
        assert (await idle[2].answer()).status == 200  # the others were kept


async def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503_at_once() -> None:
    global HELD
    HELD = trio.Event()
    async with serving(max_connections=2) as server:
        busy = [await server.connect() for _ in range(2)]
        for raw in busy:
            await raw.send(b"GET /wait HTTP/1.1\r\nhost: t\r\n\r\n")
        await settled()  # both requests are in the app
        turned_away = await server.connect()
        answer = await turned_away.answer()
        assert answer.status == 503 and answer.error()["message"].startswith("too many")
        assert await turned_away.closed()
        HELD.set()
        assert [(await raw.answer()).status for raw in busy] == [200, 200]
        await server.assert_serves_a_fresh_connection()


async def test_the_connection_cap_and_the_fd_limit_are_logged_at_start() -> None:
    with structlog.testing.capture_logs() as logs:
        async with serving(max_connections=77) as server:
            await server.assert_serves_a_fresh_connection()
    started = [e for e in logs if e["event"] == "http_serving"]
    assert len(started) == 1
    assert started[0]["max_connections"] == 77
    assert started[0]["fd_limit"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- descriptors exhausted (a child process with a lowered RLIMIT_NOFILE) ------------------

_CHILD = r"""
import json, os, resource, sys
from functools import partial
from pathlib import Path
import structlog, trio
from sledagent import _http_common, _server
from sledagent._http import STATS, HttpLimits

_http_common.BURST_GAP_S = 3600.0  # one burst for the whole test, however slow the machine
structlog.configure(
    processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
    logger_factory=structlog.PrintLoggerFactory(sys.stdout),
)

async def app(scope, receive, send):
    if scope["path"] == "/hold":  # busy: read a first byte of the body, then the rest
        await receive()
        print(json.dumps({"event": "held"}), flush=True)
    while (await receive()).get("more_body"):
        pass
    body = json.dumps(attrs_dict()).encode() if scope["path"] == "/stats" else b"{}"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})

def attrs_dict():
    return {"accept_errors": STATS.accept_errors, "idle_closed": STATS.idle_closed}

async def watch():
    seen = None
    while True:
        if STATS.connections_open != seen:
            seen = STATS.connections_open
            print(json.dumps({"event": "open", "n": seen}), flush=True)
        await trio.sleep(0.005)

async def main():
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        limits = HttpLimits(keep_alive_s=60, head_timeout_s=60, body_timeout_s=60)
        urls = await nursery.start(partial(
            _server.serve_http, app, "127.0.0.1:0", shutdown=shutdown, limits=limits))
        in_use = len(os.listdir("/proc/self/fd")) - 1
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 8, hard))
        nursery.start_soon(watch)
        print(json.dumps({"event": "ready", "url": urls[0]}), flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        while await stdin.receive_some():
            pass
        shutdown.set()
        nursery.cancel_scope.cancel()

trio.run(main)
"""


class Child:
    """The server in a child process; its JSON log lines, as they come."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.changed = trio.Event()
        self.done = trio.Event()

    async def pump(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while chunk := await self.proc.stdout.receive_some():
            buf += chunk
            *lines, buf = buf.split(b"\n")
            self.lines += [json.loads(line) for line in lines if line.strip()]
            self.changed.set()
            self.changed = trio.Event()
        self.done.set()

    async def wait_for(self, pred: Callable[[dict[str, Any]], bool], start: int = 0) -> int:
        """The index of the first line from ``start`` that matches."""
        with trio.fail_after(DEADLINE_S):
            while True:
                for i in range(start, len(self.lines)):
                    if pred(self.lines[i]):
                        return i
                await self.changed.wait()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.lines if e["event"] == name]


@asynccontextmanager
async def child_server() -> AsyncIterator[tuple[Child, Server]]:
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    async with trio.open_nursery() as nursery:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        child = Child(proc)
        nursery.start_soon(child.pump)
        try:
            ready = child.lines[await child.wait_for(lambda e: e["event"] == "ready")]
            server = Server(int(ready["url"].rsplit(":", 1)[1]))
            try:
                yield child, server
            finally:
                for raw in server.conns:
                    await raw.aclose()
        finally:
            assert proc.stdin is not None
            await proc.stdin.aclose()
            with trio.fail_after(DEADLINE_S):
                await proc.wait()
                await child.done.wait()  # every line it wrote has been read


async def _fill_until_accept_fails(child: Child, server: Server, *, busy: bool) -> Raw:
    """Connect one by one until the server cannot accept one; returns that one. Each is
    idle (says nothing) or busy (a request whose body never ends, its first byte read);
    the next is connected only once the server has taken the last one in (its log)."""
    for k in range(1, 1000):
        raw = await server.connect()
        if busy:
            await raw.send(b"PUT /hold HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\nx")

        def taken_in(e: dict[str, Any], k: int = k) -> bool:
            if e["event"] == "http_accept_failing":
                return True
            if busy:
                return e["event"] == "held" and len(child.events("held")) >= k
            return e["event"] == "open" and e["n"] >= k

        i = await child.wait_for(taken_in)
        if child.lines[i]["event"] == "http_accept_failing":
            return raw
    raise AssertionError("the server never ran out of descriptors")


async def test_with_descriptors_exhausted_idle_connections_make_room_and_it_is_logged_once() -> (
    None
):
    async with child_server() as (child, server):
        newest = await _fill_until_accept_fails(child, server, busy=False)
        failing = child.events("http_accept_failing")
        assert failing[0]["errno"] == "EMFILE"
        assert failing[0]["action"] == "closed the oldest idle connection"
        assert await server.conns[0].closed()  # the oldest idle one made room
        await newest.send(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        assert (await newest.answer()).status == 200
        stats_conn = await server.connect()  # fails to be accepted once more, makes room
        await stats_conn.send(b"GET /stats HTTP/1.1\r\nhost: t\r\n\r\n")
        stats = json.loads((await stats_conn.answer()).body)
        assert stats["accept_errors"]["EMFILE"] >= 2 and stats["idle_closed"] >= 2
    # Every failure counted, one log line for the burst.
    assert len(child.events("http_accept_failing")) == 1


async def test_with_descriptors_exhausted_and_none_idle_it_resumes_when_one_frees() -> None:
    async with child_server() as (child, server):
        waiting = await _fill_until_accept_fails(child, server, busy=True)
        failing = child.events("http_accept_failing")
        assert (failing[0]["errno"], failing[0]["action"]) == ("EMFILE", "waiting"), child.lines
        await waiting.send(b"123456789")  # its request is whole; nobody has accepted it yet
        await server.conns[0].aclose()  # one busy client leaves: a descriptor is free
        assert (await waiting.answer()).status == 200
        await waiting.aclose()
        for raw in server.conns[1:-1]:
            await raw.aclose()
        await server.assert_serves_a_fresh_connection()
    assert len(child.events("http_accept_failing")) == 1


# --- the client (H1Pool) against a hostile raw-socket server -------------------------------


class Hostile:
    """A raw HTTP/1.1 server: answers each request with its target as the body, and
    does on purpose what ``misbehave`` says."""

    def __init__(self, misbehave: str = "") -> None:
        self.misbehave = misbehave
        self.requests: list[bytes] = []
        self.sent_extra = trio.Event()
        self.connections = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        first = self.connections == 1
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                while len(buf) < length:
                    buf += await stream.receive_some(65536)
                buf = buf[length:]
                target = head.split(b" ")[1]
                self.requests.append(target)
                answer = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(target), target)
                if first and self.misbehave == "bytes after the body":
                    answer += b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n/evil"
                elif first and self.misbehave == "two answers at once":
                    answer += answer
                elif first and self.misbehave == "switching protocols":
                    answer = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n"
                elif first and self.misbehave == "endless head":
                    await stream.send_all(b"HTTP/1.1 200 OK\r\n")
                    while True:
                        await stream.send_all(b"x-a: " + b"b" * 1000 + b"\r\n")
                elif first and self.misbehave == "no framing":
                    await stream.send_all(b"HTTP/1.1 200 OK\r\n\r\n" + target)
                    return
                await stream.send_all(answer)
                if first and self.misbehave in ("408 while idle", "408 then close"):
                    await stream.send_all(
                        b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    )
                    self.sent_extra.set()
                    if self.misbehave == "408 then close":
                        return
                    await trio.sleep_forever()
                if self.misbehave in ("bytes after the body", "two answers at once"):
                    self.sent_extra.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def hostile(misbehave: str) -> AsyncIterator[tuple[Hostile, str]]:
    peer = Hostile(misbehave)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, peer.handle, 0, host="127.0.0.1"))
        yield peer, f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "misbehave", ["bytes after the body", "two answers at once", "408 while idle", "408 then close"]
)
async def test_bytes_nobody_asked_for_are_never_read_as_the_next_answer(misbehave: str) -> None:
    async with hostile(misbehave) as (peer, url):
        pool = H1Pool(url)
        with trio.fail_after(DEADLINE_S):
            assert (await pool.request("GET", "/first")).body == b"/first"
            await peer.sent_extra.wait()  # on the wire before the next request
            answers = [(await pool.request("GET", f"/r{i}")).body for i in range(5)]
        assert answers == [f"/r{i}".encode() for i in range(5)]  # each its own answer
        assert pool.connects == 2  # the tainted connection was dropped, the next kept
        assert peer.requests == [b"/first", *answers]
        await pool.aclose()


async def test_an_answer_without_framing_is_read_to_the_close_and_not_reused() -> None:
    async with hostile("no framing") as (_peer, url):
        pool = H1Pool(url)
        with trio.fail_after(DEADLINE_S):
            assert (await pool.request("GET", "/a")).body == b"/a"
            assert (await pool.request("GET", "/b")).body == b"/b"
        assert pool.connects == 2
        await pool.aclose()


@pytest.mark.parametrize("misbehave", ["switching protocols", "endless head"])
async def test_an_answer_that_is_not_http_fails_at_once_and_the_next_is_served(
    misbehave: str,
) -> None:
    async with hostile(misbehave) as (_, url):
        pool = H1Pool(url)
        with trio.fail_after(DEADLINE_S):
            with pytest.raises(ConnectionFailed):
                await pool.request("GET", "/a")
            assert (await pool.request("GET", "/b")).body == b"/b"
        await pool.aclose()


async def test_a_connection_idle_past_its_expiry_is_replaced(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.rate = 1.0  # real time flows (sockets), and can be jumped
    async with hostile("") as (_peer, url):
        pool = H1Pool(url, idle_expiry_s=4.0)
        with trio.fail_after(DEADLINE_S):
            assert (await pool.request("GET", "/a")).body == b"/a"
            assert (await pool.request("GET", "/b")).body == b"/b"
            assert pool.connects == 1
            mock_clock.jump(5.0)
            assert (await pool.request("GET", "/c")).body == b"/c"
        assert (pool.connects, pool.discarded) == (2, 1)
        await pool.aclose()


async def test_the_pool_survives_our_own_server_closing_idle_connections() -> None:
    async with serving(keep_alive_s=0.1) as server:
        pool = H1Pool(f"http://127.0.0.1:{server.port}")
        with trio.fail_after(DEADLINE_S):
            assert (await pool.request("PUT", "/echo", b"1")).status == 200
            raw = await server.connect()
            assert await raw.closed()  # the server's keep-alive has passed for both
            answer = await pool.request("PUT", "/echo", b"2")
        assert json.loads(answer.body)["body"] == "2"
        assert pool.connects == 2
        await pool.aclose()


# --- the daemon's [http] table -------------------------------------------------------------


def test_the_daemon_config_takes_an_http_table_and_names_a_bad_key_or_value() -> None:
    config = config_from_toml("[http]\nmax_connections = 10\nkeep_alive_s = 2.5\n")
    assert config.http == HttpLimits(max_connections=10, keep_alive_s=2.5)
    assert config_from_toml("").http == HttpLimits()
    with pytest.raises(ConfigError, match=r"x: http\.keepalive: unknown key"):
        config_from_toml("[http]\nkeepalive = 1\n", source="x")
    with pytest.raises(
        ConfigError, match=r"http\.max_connections: expected an integer >= 1, got 0"
    ):
        config_from_toml("[http]\nmax_connections = 0\n")
    with pytest.raises(ConfigError, match=r'http\.keep_alive_s: expected a number > 0, got "5"'):
        config_from_toml('[http]\nkeep_alive_s = "5"\n')
    with pytest.raises(ConfigError, match=r"http: expected a table, got 3"):
        config_from_toml("http = 3\n")


async def test_the_daemon_serves_its_api_with_the_configured_limits(tmp_path: Path) -> None:
    config = DaemonConfig(
        listen="127.0.0.1:0",
        data_dir=tmp_path,
        archive_in="thread",
        agent=fast_config(),
        http=HttpLimits(max_connections=1, keep_alive_s=60),
    )
    shutdown = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(run_daemon, config, shutdown)
            server = Server(int(info.api_url.rsplit(":", 1)[1]))
            first = await server.connect()
            await first.send(b"GET /openapi.json HTTP/1.1\r\nhost: t\r\n\r\n")
            assert (await first.answer()).status == 200
            await settled()  # the first is idle now
            await server.assert_serves_a_fresh_connection("/openapi.json")
            assert await first.closed()  # the cap of one made room for the newcomer
            await first.aclose()
            shutdown.set()
