"""A lean HTTP/1.1 server for ASGI apps, on trio and h11: one connection's lifecycle.

Why not hypercorn's trio worker (the first choice, see docs/design.md): it spends about
1.27 ms of CPU per request on this machine (a task for the app and a keep-alive timer
task spawned per request, ~14 protocol events, three ``send_all`` per response). The agent
answers every state read on its one trio thread, so that cost is what a mass stop's
readers wait behind. This server runs the app in the connection's own task, sends a
response of known length with one ``send_all`` and parses with h11 (the same parser
hypercorn uses), for about a third of the CPU (docs/performance.md).

Owning it means owning what hypercorn gets right (issue 16; the limits beside hypercorn's
and httpx's defaults are in docs/design.md). Per connection (this module): keep-alive, one
request at a time (pipelined requests are answered in order); an idle timeout, a deadline
for a request's head, an inactivity timeout while the app reads a body (408, then close);
bounded heads (431) and bodies (413); every framing error of a request is a 400 (h11's
501 for an unknown transfer coding included, and a request with both ``Content-Length``
and ``Transfer-Encoding`` is refused: request smuggling); ``HEAD`` answered with the
headers of ``GET`` and no body; ``100 Continue``; a body the app did not read is read
and dropped up to a bound, else the connection is closed; ``500`` if the app fails before
answering. Listening, the connection cap and accept errors are ``_server.py``'s.

One shortcut (issue 21): an app may offer ``quick_get``; a bodyless ``GET`` that arrives
whole in one read, in a strict shape (``_quick_shape``: never one h11 would refuse), is
offered to it before h11 sees it, and answered with the bytes it returns (the API's state
reads: ``_api.py``). Anything else is h11's.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import attrs
import h11
import structlog
import trio
from attrs import validators as v

from ._quick_shape import simple_get_target

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

#: ``await quick_get(target, head) -> whole answer bytes | None`` (an app's optional
#: attribute): answers a bodyless ``GET`` without h11, the ASGI exchange or the router;
#: ``None`` hands the request to the app as usual. See ``_Connection._quick``.
QuickGet = Callable[[bytes, bytes], Awaitable["bytes | None"]]

#: ``await handover(socket, data)``: give the connection and the bytes read from it to
#: another server (``ConnectionTable.handover``).
Handover = Callable[[trio.socket.SocketType, bytes], Awaitable[None]]

_RECV = 64 * 1024
_DISCONNECT: Message = {"type": "http.disconnect"}
log = structlog.get_logger("sledagent.http")


@attrs.frozen(kw_only=True)
class HttpLimits:
    """The server's limits and timeouts (TOML table ``[http]``; docs/operations.md).

    Defaults follow hypercorn's where it has one (docs/design.md has the table)."""

    #: Connections open at once. Past it the oldest idle connection is closed to make
    #: room; with none idle, a new connection gets 503 and is closed at once.
    max_connections: int = attrs.field(default=2048, validator=v.ge(1))
    #: Largest request head (request line and headers), bytes; larger: 431.
    max_head_bytes: int = attrs.field(default=16 * 1024, validator=v.ge(256))
    #: Largest request body, bytes; larger: 413 (declared: before the app runs).
    max_body_bytes: int = attrs.field(default=16 << 20, validator=v.ge(0))
    #: A connection with no request in progress is closed after this long, seconds.
    keep_alive_s: float = attrs.field(default=5.0, validator=v.gt(0))
    #: A request's head must arrive within this long of its first byte, else 408.
    head_timeout_s: float = attrs.field(default=5.0, validator=v.gt(0))
    #: While the app reads a body, no byte for this long: 408 and close.
    body_timeout_s: float = attrs.field(default=10.0, validator=v.gt(0))
    #: A body the app did not read is read and dropped, up to this many bytes within
    #: ``discard_timeout_s``, to keep the connection; beyond either it is closed.
    max_discard_bytes: int = attrs.field(default=1 << 20, validator=v.ge(0))
    discard_timeout_s: float = attrs.field(default=2.0, validator=v.gt(0))
    #: On shutdown, requests in flight get this long to finish, seconds.
    graceful_s: float = attrs.field(default=5.0, validator=v.ge(0))
    #: While a start re-adopts its VMMs, the API is served from a thread and trio loop
    #: of its own and state reads are answered there, never behind that work
    #: (``_front``; issue 18); then the agent's loop serves it.
    front_thread: bool = True
    #: The API's sockets are served by a process of its own that answers state reads
    #: from a replica of the journaled answers and hands every other request, with its
    #: connection, to the agent (``_front_main``; issue 21): reads never wait for the
    #: agent's thread, nor it for them. Overrides ``front_thread``.
    front_process: bool = True


@attrs.define
class HttpStatistics:
    """What the servers of this process turned away, read at scrape time (``_metrics``).

    Counted only off the hot path (errors, refusals, connection open/close)."""

    connections_open: int = 0
    #: accept(2) failures by errno name (``EMFILE``, ``ENFILE``, ``ENOBUFS``, ...).
    accept_errors: dict[str, int] = attrs.Factory(dict)
    #: Idle connections closed to make room (connection cap or descriptors exhausted).
    idle_closed: int = 0
    #: Answers the server gave itself (the app never saw the request), by status.
    refused: dict[int, int] = attrs.Factory(dict)
    #: Requests their client left before sending them whole (closed or reset mid-head or
    #: mid-body), by stage (``head``, ``body``): no answer was sent, so no refusal is
    #: counted (hypercorn, too, closes such a connection without an answer).
    abandoned: dict[str, int] = attrs.Factory(dict)
    #: The front process's counts (``_front_proc``: cumulative, as they last arrived).
    elsewhere: HttpStatistics | None = None

    def left(self, stage: str) -> None:
        self.abandoned[stage] = self.abandoned.get(stage, 0) + 1

    def with_elsewhere(self) -> HttpStatistics:
        """These counts and the front process's (``elsewhere``), for ``/metrics``."""
        other = self.elsewhere
        if other is None:
            return self

        def add(a: dict[Any, int], b: dict[Any, int]) -> dict[Any, int]:
            return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}

        return HttpStatistics(
            connections_open=self.connections_open + other.connections_open,
            accept_errors=add(self.accept_errors, other.accept_errors),
            idle_closed=self.idle_closed + other.idle_closed,
            refused=add(self.refused, other.refused),
            abandoned=add(self.abandoned, other.abandoned),
        )


STATS = HttpStatistics()


def refusal(status: int, message: str, *, head_only: bool = False) -> bytes:
    """A whole ``connection: close`` answer in the contract's error shape."""
    STATS.refused[status] = STATS.refused.get(status, 0) + 1
    body = json.dumps(
        {"message": message, "error_code": None, "request_id": str(uuid.uuid4())}
    ).encode()
    reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
    retry = "retry-after: 1\r\n" if status == 503 else ""  # RFC 9110 10.2.3
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{retry}connection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + body


#: ``_next_request``'s answer for a request the quick path has answered.
_QUICK = h11.Request(method="GET", target="/", headers=[("host", "quick")])


class _Close(Exception):
    """End the connection (the peer left, or the protocol says so)."""


class ConnectionTable:
    """The open connections of one server, and which of them are idle (oldest first)."""

    def __init__(self, app: ASGIApp, limits: HttpLimits) -> None:
        self.app, self.limits = app, limits
        self.quick_get: QuickGet | None = getattr(app, "quick_get", None)
        self.draining = False
        #: Handing over to another server on the same port (``_server.serve_api``): each
        #: connection's next answer says ``connection: close`` and the connection ends;
        #: idle ones end at their keep-alive timeout. No client meets a closed
        #: connection it was told it could reuse (as it would if they were closed now).
        self.retiring = False
        #: Set in the front process (``_front_main``): a request the quick path did not
        #: answer is handed, with the bytes read so far, to the agent with the connection.
        self.handover: Handover | None = None
        self.connections: set[_Connection] = set()
        self.idle: dict[_Connection, None] = {}
        #: Set (and replaced) whenever a connection ends: a descriptor is free.
        self.freed = trio.Event()

    def open(self, stream: trio.SocketStream, initial: bytes | None = None) -> _Connection:
        """A connection of this table; ``initial``: its first bytes, read by another
        server that handed it over (``_front_proc``)."""
        conn = _Connection(stream, self, initial)
        self.connections.add(conn)
        STATS.connections_open += 1
        return conn

    def closed(self, conn: _Connection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
            STATS.connections_open -= 1
            self.freed.set()
            self.freed = trio.Event()
        self.idle.pop(conn, None)

    def shed_idle(self) -> bool:
        """Close the connection idle the longest, now; False if none is idle. One whose
        request has arrived (its task has not run yet) is not idle: it is kept."""
        for conn in self.idle:
            if not _readable(conn.stream.socket):
                conn.shed()
                STATS.idle_closed += 1
                return True
        return False

    def close_idle(self) -> None:
        for conn in list(self.idle):
            conn.shed()


class _Connection:
    def __init__(
        self, stream: trio.SocketStream, table: ConnectionTable, initial: bytes | None = None
    ) -> None:
        self.stream, self.table, self.limits = stream, table, table.limits
        #: Bytes another server read from this connection before handing it over.
        self.initial = initial
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head_bytes)
        self.idle_scope: trio.CancelScope | None = None
        #: The request's declared Content-Length (None: chunked or no body).
        self.body_length: int | None = None
        #: The client closed its side (h11 was told: ``receive_data(b"")``).
        self.peer_left = False
        try:
            self.client = _addr(stream.socket.getpeername())
            self.local = _addr(stream.socket.getsockname())
        except OSError:  # the peer already left; serve() will notice
            self.client = self.local = None

    def shed(self) -> None:
        """Close an idle connection at once: its descriptor is free on return."""
        if self.idle_scope is not None:
            self.idle_scope.cancel()
        self.table.closed(self)
        self.stream.socket.close()

    async def serve(self) -> None:
        try:
            while not self.table.draining:
                request = await self._next_request()
                if request is None:
                    break
                if request is _QUICK:
                    if self.table.retiring:
                        break  # its answer said connection: close
                    continue  # answered without h11: it is still between requests
                await self._handle(request)
                conn = self.h11
                if conn.their_state is h11.SEND_BODY and not await self._discard_body():
                    break
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break  # either side said close (or HTTP/1.0)
                conn.start_next_cycle()
        except (_Close, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            self.table.closed(self)
            with trio.move_on_after(1, shield=True):
                await self.stream.aclose()

    async def _read_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(_RECV)
            self.peer_left = not data
            self.h11.receive_data(data)  # b"" tells h11 the peer closed

    async def _next_request(self) -> h11.Request | None:
        """The next request's head, or None when the connection should end."""
        try:
            if not self.h11.trailing_data[0]:  # nothing buffered: idle until a request
                table = self.table
                if self.initial is not None:  # handed over with these bytes (``_front_proc``)
                    data, self.initial = self.initial, None
                else:
                    received = await self._await_request()
                    if received is None:
                        return None
                    data = received
                if table.quick_get is not None and await self._quick(data, table.quick_get):
                    return _QUICK
                if table.handover is not None and data:
                    await table.handover(self.stream.socket, data)
                    return None  # the connection is another server's now: ours just closes
                self.h11.receive_data(data)
            with trio.move_on_after(self.limits.head_timeout_s) as head:
                event = await self._read_event()
            if head.cancelled_caught:
                await self._refuse(408, "request head not received in time", linger=False)
                return None
        except trio.BrokenResourceError:  # reset: mid-head if any of it had come
            if self.h11.trailing_data[0]:
                STATS.left("head")
            return None
        except h11.RemoteProtocolError as exc:
            if self.peer_left:  # closed mid-head: it left, nothing was malformed
                STATS.left("head")
                return None
            status = 431 if exc.error_status_hint == 431 else 400  # h11's 501 included
            await self._refuse(status, f"malformed request: {exc}")
            return None
        if not isinstance(event, h11.Request):
            return None  # ConnectionClosed, or the peer left between requests
        # h11 bounds a head that arrives in pieces; one that arrives whole is measured here.
        size = len(event.target)
        length = chunked = None
        for name, value in event.headers:
            size += len(name) + len(value) + 4
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = value
        self.body_length = None if length is None else int(length)
        head_only = event.method == b"HEAD"
        if size > self.limits.max_head_bytes:
            await self._refuse(431, f"request head over {self.limits.max_head_bytes} bytes")
            return None
        if chunked is not None and (length is not None or event.http_version == b"1.0"):
            # RFC 9112 6.1, 6.3: ambiguous framing, the shape of request smuggling.
            await self._refuse(
                400, "transfer-encoding with content-length, or in HTTP/1.0", head_only=head_only
            )
            return None
        if self.body_length is not None and self.body_length > self.limits.max_body_bytes:
            await self._refuse(
                413, f"request body over {self.limits.max_body_bytes} bytes", head_only=head_only
            )
            return None
        if chunked is None and not self.body_length:
            # No body: take h11's EndOfMessage now, so that nothing is left to discard.
            self.h11.next_event()
        return event

    async def _await_request(self) -> bytes | None:
        """The next bytes of the connection between requests (b"": the peer closed);
        None once it has been idle ``keep_alive_s`` (or was shed)."""
        table = self.table
        table.idle[self] = None
        try:
            deadline = trio.current_time() + self.limits.keep_alive_s
            with trio.CancelScope(deadline=deadline) as idle:
                self.idle_scope = idle  # shed or shutdown: closes it
                return await _receive_idle(self.stream)
        finally:
            self.idle_scope = None
            table.idle.pop(self, None)
        return None

    async def _quick(self, data: bytes, quick_get: QuickGet) -> bool:
        """Answer ``data`` without h11 if it is exactly one simple bodyless ``GET`` and
        the app's ``quick_get`` answers it; True if it did. h11 has seen nothing of this
        exchange (both sides stay idle), so the connection goes on as if it had none.

        Why: a state read costs the agent's one thread about 750 Python calls through
        h11, the ASGI exchange and Starlette's router; readers polling every VMM are the
        load that competes with publishing halts (issue 21; docs/performance.md)."""
        target = simple_get_target(data, self.limits.max_head_bytes)
        if target is None:
            return False
        answer = await quick_get(target, data)
        if answer is None:
            return False
        if self.table.retiring:  # the head ends at the first blank line
            answer = answer.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
        # One write(2) almost always takes a small answer whole; the rest, if any, the
        # usual way. (trio's send_all first enters a conflict detector and two contexts.)
        try:
            sent = os.write(self.stream.socket.fileno(), answer)
        except BlockingIOError:
            sent = 0
        except OSError:
            raise _Close from None  # reset, broken pipe: the client left
        if sent < len(answer):
            await self.stream.send_all(answer[sent:])
        return True

    async def _refuse(
        self, status: int, message: str, *, head_only: bool = False, linger: bool = True
    ) -> None:
        """Answer with an error the app never saw; the connection then ends (the stream
        may be out of step with h11, so the answer is written by hand). ``linger``: say
        we are done writing, then read and drop what the client is still sending (up to
        a bound), as a lingering close does: closing with unread bytes resets the
        connection, and the client would lose the answer."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.stream.send_all(refusal(status, message, head_only=head_only))
            if not linger:
                return
            await self.stream.send_eof()
            left = self.limits.max_discard_bytes
            with trio.move_on_after(self.limits.discard_timeout_s):
                while left >= 0 and (data := await self.stream.receive_some(_RECV)):
                    left -= len(data)

    async def _discard_body(self) -> bool:
        """The app answered without reading the whole body: read and drop the rest, up
        to a bound in bytes and time. True if the connection can serve another request
        (a client waiting for ``100 Continue`` was told ``connection: close``, and is
        read until it closes, so that our answer is not lost to a reset)."""
        left = self.limits.max_discard_bytes
        with trio.move_on_after(self.limits.discard_timeout_s):
            while self.h11.their_state is h11.SEND_BODY:
                event = await self._read_event()
                if isinstance(event, h11.ConnectionClosed):
                    return False
                if isinstance(event, h11.Data):
                    left -= len(event.data)
                    if left < 0:
                        return False
            return True
        return False

    async def _handle(self, request: h11.Request) -> None:
        target = request.target
        raw_path, _, query = target.partition(b"?")
        method = request.method.decode("ascii")
        try:
            path = unquote(raw_path.decode("ascii"), errors="strict")
        except UnicodeDecodeError:
            await self._refuse(400, "request target is not ASCII", head_only=method == "HEAD")
            raise _Close from None
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode(),
            "method": method,
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
        state = _Exchange(self, method == "HEAD")
        try:
            await self.table.app(scope, state.receive, state.send)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _Close from None  # the client left while we answered: nothing to log
        except Exception:
            if state.aborted:  # the app failed on the request the server ended: no bug
                raise _Close from None
            log.exception("asgi_app_failed", method=method, path=path)
            if not state.started:
                await self._refuse(500, "internal error", head_only=state.head_only)
            raise _Close from None  # a response cut short cannot be repaired
        finally:
            state.done.set()
        if state.aborted:
            raise _Close
        if not state.started:
            await self._refuse(500, "the application sent no response")
            raise _Close
        if not state.finished:
            raise _Close


class _Exchange:
    """ASGI ``receive``/``send`` for one request on a connection."""

    def __init__(self, conn: _Connection, head_only: bool) -> None:
        self.conn = conn
        self.head_only = head_only
        self.started = self.finished = self.aborted = False
        self.head: h11.Response | None = None
        self.head_sent = self.body_done = False
        self.received = 0
        self.done = trio.Event()

    async def _abort(self, status: int, message: str, *, linger: bool = True) -> Message:
        """The server ends the request (bad body, too slow, too big): it answers if the
        app has not, and the app sees the client leave."""
        if not self.started:
            await self.conn._refuse(status, message, linger=linger)
        self.aborted = self.body_done = self.started = self.finished = True
        return _DISCONNECT

    async def receive(self) -> Message:
        conn = self.conn
        if self.body_done:
            # ASGI: once the body is read, receive() waits for the end of the exchange
            # (apps that stream a response listen for the client leaving this way).
            await self.done.wait()
            return _DISCONNECT
        if conn.h11.their_state is not h11.SEND_BODY:
            self.body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        limits = conn.limits
        try:
            if conn.h11.they_are_waiting_for_100_continue:
                await conn.stream.send_all(
                    conn.h11.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                )
            with trio.move_on_after(limits.body_timeout_s) as stalled:
                event = await conn._read_event()
        except h11.RemoteProtocolError as exc:
            if not conn.peer_left:  # bad chunk, more than declared: the client's error
                return await self._abort(400, f"malformed request body: {exc}")
            STATS.left("body")  # closed mid-body: it left, nothing to answer
            self.aborted = self.body_done = self.started = self.finished = True
            return _DISCONNECT
        except (trio.BrokenResourceError, trio.ClosedResourceError):  # reset mid-body
            STATS.left("body")
            self.aborted = self.body_done = self.started = self.finished = True
            return _DISCONNECT
        if stalled.cancelled_caught:
            return await self._abort(408, "request body not received in time", linger=False)
        if isinstance(event, h11.Data):
            self.received += len(event.data)
            if self.received > limits.max_body_bytes:
                return await self._abort(413, f"request body over {limits.max_body_bytes} bytes")
            return {"type": "http.request", "body": bytes(event.data), "more_body": True}
        if isinstance(event, h11.EndOfMessage):
            self.body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        self.body_done = True
        return _DISCONNECT

    async def send(self, message: Message) -> None:
        if self.aborted:
            return  # the server answered already; the app's answer goes nowhere
        conn = self.conn
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("response already started")
            self.started = True
            headers = list(message.get("headers", []))
            h = conn.h11
            if h.their_state is h11.SEND_BODY and (
                h.they_are_waiting_for_100_continue
                or self._unread() > conn.limits.max_discard_bytes
            ):
                # The body will not come (no 100 Continue) or is too big to drop: say so.
                headers.append((b"connection", b"close"))
            elif conn.table.retiring:  # this server hands over: the next request, elsewhere
                headers.append((b"connection", b"close"))
            self.head = h11.Response(status_code=message["status"], headers=headers)
            return
        if kind != "http.response.body" or self.head is None or self.finished:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        out = b""
        if not self.head_sent:
            out += conn.h11.send(self.head) or b""
            self.head_sent = True
        body = message.get("body", b"")
        if body and not self.head_only:  # HEAD: the headers of GET, no body (RFC 9110 9.3.2)
            out += conn.h11.send(h11.Data(data=body)) or b""
        if not message.get("more_body", False):
            out += conn.h11.send(h11.EndOfMessage()) or b""
            self.finished = True
            self.done.set()
        if out:  # a response of known length goes out in one write
            await conn.stream.send_all(out)

    def _unread(self) -> int:
        """Declared body bytes not read yet (a chunked body: 0, unknown)."""
        length = self.conn.body_length
        return 0 if length is None else length - self.received


async def _receive_idle(stream: trio.SocketStream) -> bytes:
    """The next bytes of an idle connection (b"": the peer closed).

    ``stream.receive_some`` first tries a ``recv`` that, on a connection waiting for its
    next request, fails with ``EAGAIN``, and goes through trio's socket wrappers; this
    waits for readability, then reads once: one system call and a few Python calls fewer
    per request on the path every state read takes."""
    fd = stream.socket.fileno()
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.read(fd, _RECV)
        except BlockingIOError:
            continue  # readable, then not: wait again
        except OSError as exc:  # reset by the peer, and the like
            raise trio.BrokenResourceError(str(exc)) from exc


def _readable(sock: trio.socket.SocketType) -> bool:
    """Bytes (or a close) are waiting on ``sock``; never blocks."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _addr(sockaddr: Any) -> tuple[str, int] | None:
    return (sockaddr[0], sockaddr[1]) if isinstance(sockaddr, tuple) else None
