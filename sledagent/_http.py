"""A lean HTTP/1.1 server for ASGI apps, on trio and h11.

Why not hypercorn's trio worker (the first choice, see docs/design.md): it spends about
1.27 ms of CPU per request on this machine (a task for the app and a keep-alive timer
task spawned per request, ~14 protocol events, three ``send_all`` per response). The agent
answers every state read on its one trio thread, so that cost is what a mass stop's
readers wait behind. This server runs the app in the connection's own task, sends a
response of known length with one ``send_all`` and parses with h11 (the same parser
hypercorn uses), for about a third of the CPU (docs/performance.md).

What it does: keep-alive connections (one request at a time per connection, as HTTP/1.1
without pipelining), an idle timeout between requests and a deadline for a request's
head, bounded request heads (h11's ``max_incomplete_event_size``), ``100 Continue``,
``400`` for malformed requests, ``500`` if the app fails before answering, and a graceful
shutdown: stop accepting, close idle connections, let requests in flight finish within a
deadline, then cancel. No TLS, no HTTP/2, no websockets: the agent listens on the
underlay (or loopback) like omicron's dropshot servers, over plain HTTP/1.1.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import attrs
import h11
import structlog
import trio

from ._addr import parse_listen

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

_RECV = 64 * 1024
log = structlog.get_logger("sledagent.http")


@attrs.frozen(kw_only=True)
class HttpLimits:
    #: Largest request head (request line and headers) accepted.
    max_head_bytes: int = 16 * 1024
    #: A connection with no request in progress is closed after this long.
    keep_alive_s: float = 75.0
    #: A request's head must arrive within this long of its first byte.
    head_timeout_s: float = 10.0
    #: On shutdown, requests in flight get this long to finish.
    graceful_s: float = 5.0
    #: A body the app did not read is read and dropped up to this much, to keep the
    #: connection; beyond it the connection is closed.
    max_discard_bytes: int = 1 << 20


class _Close(Exception):
    """End the connection (the peer left, or the protocol says so)."""


class _Connection:
    def __init__(
        self, stream: trio.SocketStream, app: ASGIApp, server: _Server, limits: HttpLimits
    ) -> None:
        self.stream, self.app, self.server, self.limits = stream, app, server, limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
        self.idle_scope: trio.CancelScope | None = None
        try:
            self.client = _addr(stream.socket.getpeername())
            self.local = _addr(stream.socket.getsockname())
        except OSError:  # the peer already left; serve() will notice
            self.client = self.local = None

    async def serve(self) -> None:
        try:
            while not self.server.draining:
                request = await self._next_request()
                if request is None:
                    break
                await self._handle(request)
                if self.h11.our_state is h11.MUST_CLOSE or self.h11.their_state is h11.MUST_CLOSE:
                    break
                await self._discard_rest_of_body()
                self.h11.start_next_cycle()
        except (_Close, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            with trio.move_on_after(1, shield=True):
                await self.stream.aclose()

    async def _read_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(_RECV)
            self.h11.receive_data(data)  # b"" tells h11 the peer closed

    async def _next_request(self) -> h11.Request | None:
        """The next request's head, or None when the connection should end."""
        try:
            with trio.CancelScope(deadline=trio.current_time() + self.limits.keep_alive_s) as idle:
                self.idle_scope = idle  # shutdown cancels it: an idle connection just closes
                if not self.h11.trailing_data[0]:  # nothing buffered: wait for a request
                    self.h11.receive_data(await self.stream.receive_some(_RECV))
            self.idle_scope = None
            if idle.cancelled_caught:
                return None
            with trio.move_on_after(self.limits.head_timeout_s) as head:
                event = await self._read_event()
            if head.cancelled_caught:
                await self._refuse(408, "request head not received in time")
                return None
        except h11.RemoteProtocolError as exc:
            await self._refuse(exc.error_status_hint, f"malformed request: {exc}")
            return None
        if not isinstance(event, h11.Request):
            return None  # ConnectionClosed, or the peer left between requests
        # h11 bounds a head that arrives in pieces; one that arrives whole is measured here.
        size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
        if size > self.limits.max_head_bytes:
            await self._refuse(431, f"request head over {self.limits.max_head_bytes} bytes")
            return None
        return event

    async def _refuse(self, status: int, message: str) -> None:
        """Answer with an error the app never saw, then close (the stream may be out of
        step with h11, so the answer is written by hand)."""
        body = json.dumps(
            {"message": message, "error_code": None, "request_id": str(uuid.uuid4())}
        ).encode()
        reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        ).encode()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.stream.send_all(head + body)

    async def _discard_rest_of_body(self) -> None:
        """The app answered without reading the whole body: read and drop the rest, up
        to a bound (then the connection is closed rather than read forever)."""
        left = self.limits.max_discard_bytes
        while self.h11.their_state is h11.SEND_BODY:
            event = await self._read_event()
            if isinstance(event, h11.ConnectionClosed):
                raise _Close
            if isinstance(event, h11.Data):
                left -= len(event.data)
                if left < 0:
                    raise _Close

    async def _handle(self, request: h11.Request) -> None:
        target = request.target
        raw_path, _, query = target.partition(b"?")
        try:
            path = unquote(raw_path.decode("ascii"), errors="strict")
        except UnicodeDecodeError:
            await self._refuse(400, "request target is not ASCII")
            raise _Close from None
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode(),
            "method": request.method.decode("ascii"),
            "scheme": "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": list(request.headers),
            "client": self.client,
            "server": self.local,
            "extensions": {},
        }
        state = _Exchange(self)
        try:
            await self.app(scope, state.receive, state.send)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _Close from None  # the client left while we answered: nothing to log
        except Exception:
            log.exception("asgi_app_failed", method=scope["method"], path=path)
            if not state.started:
                await self._refuse(500, "internal error")
            raise _Close from None  # a response cut short cannot be repaired
        finally:
            state.done.set()
        if not state.started:
            await self._refuse(500, "the application sent no response")
            raise _Close
        if not state.finished:
            raise _Close


class _Exchange:
    """ASGI ``receive``/``send`` for one request on a connection."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.started = self.finished = False
        self.head: h11.Response | None = None
        self.head_sent = self.body_done = False
        self.done = trio.Event()

    async def receive(self) -> Message:
        conn = self.conn
        if self.body_done:
            # ASGI: once the body is read, receive() waits for the end of the exchange
            # (apps that stream a response listen for the client leaving this way).
            await self.done.wait()
            return {"type": "http.disconnect"}
        if conn.h11.their_state is not h11.SEND_BODY:
            self.body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if conn.h11.they_are_waiting_for_100_continue:
            await conn.stream.send_all(
                conn.h11.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
            )
        event = await conn._read_event()
        if isinstance(event, h11.Data):
            return {"type": "http.request", "body": bytes(event.data), "more_body": True}
        if isinstance(event, h11.EndOfMessage):
            self.body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        self.body_done = True
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        conn = self.conn
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("response already started")
            self.started = True
            self.head = h11.Response(
                status_code=message["status"], headers=list(message.get("headers", []))
            )
            return
        if kind != "http.response.body" or self.head is None or self.finished:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        out = b""
        if not self.head_sent:
            out += conn.h11.send(self.head) or b""
            self.head_sent = True
        body = message.get("body", b"")
        if body:
            out += conn.h11.send(h11.Data(data=body)) or b""
        if not message.get("more_body", False):
            out += conn.h11.send(h11.EndOfMessage()) or b""
            self.finished = True
            self.done.set()
        if out:  # a response of known length goes out in one write
            await conn.stream.send_all(out)


@attrs.define
class _Server:
    draining: bool = False
    connections: set[_Connection] = attrs.field(factory=set)


def _addr(sockaddr: Any) -> tuple[str, int] | None:
    return (sockaddr[0], sockaddr[1]) if isinstance(sockaddr, tuple) else None


async def serve_http(
    app: ASGIApp,
    listen: str,
    *,
    shutdown: trio.Event,
    limits: HttpLimits | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` (``host:port``; port 0 picks one) until ``shutdown``.

    Reports the bound URLs through ``task_status`` (start it with ``nursery.start``).
    """
    limits = limits or HttpLimits()
    host, port = parse_listen(listen)  # ValueError for a port over 65535, not port % 65536
    listeners = await trio.open_tcp_listeners(port, host=host)
    urls = []
    for listener in listeners:
        name = listener.socket.getsockname()
        h = f"[{name[0]}]" if ":" in name[0] else name[0]
        urls.append(f"http://{h}:{name[1]}")
    server = _Server()

    async def handle(stream: trio.SocketStream) -> None:
        conn = _Connection(stream, app, server, limits)
        server.connections.add(conn)
        try:
            await conn.serve()
        finally:
            server.connections.discard(conn)

    try:
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(_accept_loop, listener, handle, connections)
                task_status.started(urls)
                await shutdown.wait()
                accepting.cancel_scope.cancel()
            for listener in listeners:
                listener.socket.close()
            server.draining = True
            for conn in list(server.connections):
                if conn.idle_scope is not None:
                    conn.idle_scope.cancel()
            # Requests in flight finish within the deadline; then the rest is cancelled.
            connections.cancel_scope.deadline = trio.current_time() + limits.graceful_s
    finally:
        for listener in listeners:  # also when cancelled rather than shut down
            listener.socket.close()


async def _accept_loop(
    listener: trio.SocketListener,
    handle: Callable[[trio.SocketStream], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    while True:
        try:
            stream = await listener.accept()
        except OSError:  # e.g. EMFILE: wait a little rather than spin
            await trio.sleep(0.1)
            continue
        nursery.start_soon(handle, stream)
