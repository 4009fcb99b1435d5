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
import os
import select
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import h11
import structlog
import trio

from ._http_common import STATS as STATS
from ._http_common import ASGIApp as ASGIApp
from ._http_common import HttpLimits as HttpLimits
from ._http_common import HttpStatistics as HttpStatistics
from ._http_common import Message as Message
from ._http_common import Scope as Scope
from ._http_common import refusal as refusal
from ._http_exchange import Exchange
from ._quick_shape import simple_get_target

#: ``await quick_get(target, head) -> whole answer bytes | None`` (an app's optional
#: attribute): answers a bodyless ``GET`` without h11, the ASGI exchange or the router;
#: ``None`` hands the request to the app as usual. See ``_Connection._quick``.
QuickGet = Callable[[bytes, bytes], Awaitable["bytes | None"]]


_RECV = 64 * 1024
log = structlog.get_logger("sledagent.http")


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

    async def read_event(self) -> Any:
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
                self.h11.receive_data(data)
            with trio.move_on_after(self.limits.head_timeout_s) as head:
                event = await self.read_event()
            if head.cancelled_caught:
                await self.refuse(408, "request head not received in time", linger=False)
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
            await self.refuse(status, f"malformed request: {exc}")
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
            await self.refuse(431, f"request head over {self.limits.max_head_bytes} bytes")
            return None
        if chunked is not None and (length is not None or event.http_version == b"1.0"):
            # RFC 9112 6.1, 6.3: ambiguous framing, the shape of request smuggling.
            await self.refuse(
                400, "transfer-encoding with content-length, or in HTTP/1.0", head_only=head_only
            )
            return None
        if self.body_length is not None and self.body_length > self.limits.max_body_bytes:
            await self.refuse(
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

    async def refuse(
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
                event = await self.read_event()
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
            await self.refuse(400, "request target is not ASCII", head_only=method == "HEAD")
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
        state = Exchange(self, method == "HEAD")
        try:
            await self.table.app(scope, state.receive, state.send)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _Close from None  # the client left while we answered: nothing to log
        except Exception:
            if state.aborted:  # the app failed on the request the server ended: no bug
                raise _Close from None
            log.exception("asgi_app_failed", method=method, path=path)
            if not state.started:
                await self.refuse(500, "internal error", head_only=state.head_only)
            raise _Close from None  # a response cut short cannot be repaired
        finally:
            state.done.set()
        if state.aborted:
            raise _Close
        if not state.started:
            await self.refuse(500, "the application sent no response")
            raise _Close
        if not state.finished:
            raise _Close


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
