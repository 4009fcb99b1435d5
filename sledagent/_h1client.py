"""A lean HTTP/1.1 client for the agent's hot peers (Propolis, Nexus), on trio and h11.

Why not httpx (the stack's first choice, still used by the CLI, the demo and the sim's
fleet launcher): every halt costs the agent a monitor answer from Propolis and a few
``PUT``s to Nexus, all on its one trio thread, and an httpx exchange costs about 1.7 ms
of CPU on this machine against about 0.3 ms for an h11 exchange on a kept-alive socket
(docs/design.md, "HTTP client"). At 1000 VMMs halted at once that difference is the
floor of halt-to-publish and what state readers wait behind.

What it does: one pool per peer (``host:port``) of keep-alive connections, at most
``max_connections`` requests in flight (the rest wait their turn), ``max_idle`` kept
between requests; a connect deadline; a whole-request deadline when asked (none for a
long poll: the caller's cancel scope bounds it); once an answer has begun, at most
``read_timeout_s`` of silence between its reads (a long poll waits for its answer to
begin, never for a stalled body); responses with ``Content-Length`` or chunked bodies,
capped (an announced length over the cap is refused at the head).
A request that finds its kept-alive connection closed by the
peer before any answer byte is sent again once on a new connection: every method the
agent sends (``GET``, ``PUT``) is idempotent. A cancelled or failed exchange closes its
connection, never returns it to the pool.

The answer to a request is always the answer to that request (issue 16; httpx does the
same): a connection is kept only if nothing follows its answer (bytes after a
``Content-Length`` body, a second response); before it is reused it is checked without
blocking, and one that became readable while idle (a ``408`` or any bytes sent before a
request, or the peer's close) is closed, as is one idle longer than ``idle_expiry_s``
(under the 5 s after which hypercorn and our server close an idle connection, so a reuse
does not race the peer's close). No TLS, no proxies, no redirects: the agent
speaks plain HTTP on the underlay, as omicron's services do.
"""

from __future__ import annotations

import contextlib
import select
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

import attrs
import h11
import trio

from ._failures import underlying_reason

_RECV = 64 * 1024


class ConnectionFailed(Exception):
    """No answer: the peer refused, reset, closed early or broke the protocol."""


class RequestTimeout(ConnectionFailed):
    """No whole answer within the deadline (connect or request)."""


@attrs.frozen
class H1Response:
    status: int
    body: bytes


class _Stale(Exception):
    """A kept-alive connection the peer had closed: nothing of an answer arrived."""


class _Refused(Exception):
    """The answer cannot be taken (stalled, over the body cap): ``request`` names the
    request in front of the reason, as in every other ``ConnectionFailed``."""

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


@attrs.define
class _Answer:
    """An answer as it is parsed."""

    status: int = 0
    chunks: list[bytes] = attrs.Factory(list)
    size: int = 0
    #: Any byte of it arrived: a close before that means a stale kept-alive connection.
    heard: bool = False


class _Connection:
    def __init__(
        self, stream: trio.SocketStream, host_header: str, max_body: int, read_timeout_s: float
    ) -> None:
        self.stream = stream
        self.host_header = host_header
        self.max_body = max_body
        self.read_timeout_s = read_timeout_s
        self.h11 = h11.Connection(h11.CLIENT)
        self.reusable = False
        #: When it was last put back in the pool (trio clock).
        self.idle_since = 0.0

    def readable(self) -> bool:
        """Whether bytes (or the peer's close, or an error) wait on an idle connection:
        nothing may be waiting before a request is sent. Never blocks (poll, timeout 0)."""
        poller = select.poll()
        poller.register(self.stream.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    async def exchange(
        self,
        method: str,
        target: str,
        body: bytes | None,
        headers: Sequence[tuple[str, str]],
        parse_gate: trio.CapacityLimiter | None = None,
    ) -> H1Response:
        conn = self.h11
        self.reusable = False
        head = [("host", self.host_header), *headers]
        if body is not None:
            head.append(("content-length", str(len(body))))
        data = conn.send(h11.Request(method=method, target=target, headers=head))
        if body:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError as exc:
            raise _Stale from exc
        answer = _Answer()
        while True:
            try:
                received = await self._receive(answer.heard)
            except trio.BrokenResourceError as exc:  # reset
                if not answer.heard:
                    raise _Stale from exc
                raise
            if not received and not answer.heard:
                raise _Stale
            answer.heard = True
            # Only the parsing holds a token of the gate: never a wait on the peer.
            if parse_gate is None:
                done = self._digest(received, answer)
            else:
                async with parse_gate:
                    done = self._digest(received, answer)
            if done:
                break
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            # Bytes after the answer belong to no request of ours: never reuse.
            self.reusable = conn.trailing_data == (b"", False)
        return H1Response(answer.status, b"".join(answer.chunks))

    async def _receive(self, begun: bool) -> bytes:
        """The next bytes of the answer. Before its first byte the wait is the caller's
        (a long poll waits for its answer to begin as long as it likes); once it has
        begun, silence between reads is bounded by ``read_timeout_s``, as httpx's read
        timeout is: a peer that stops mid-answer fails the request (issue 16)."""
        if not begun:
            return await self.stream.receive_some(_RECV)
        with trio.move_on_after(self.read_timeout_s):
            return await self.stream.receive_some(_RECV)
        raise _Refused(f"the answer stalled: no byte for {self.read_timeout_s:g} s", timed_out=True)

    def _digest(self, received: bytes, answer: _Answer) -> bool:
        """Feed ``received`` to h11 (b"": the peer closed); True once the answer is whole."""
        conn = self.h11
        conn.receive_data(received)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return False
            if isinstance(event, h11.Response):
                answer.status = event.status_code
                self._check_length(event.headers)
            elif isinstance(event, h11.Data):
                answer.size += len(event.data)
                if answer.size > self.max_body:
                    raise _Refused(f"answer body over {self.max_body} bytes")
                answer.chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return True
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionFailed("the peer closed the connection mid-answer")
            elif event is h11.PAUSED:  # 101 Switching Protocols: not HTTP any more
                raise ConnectionFailed("the peer switched protocols")
            # InformationalResponse (100 Continue, 103) and the like: read on.

    def _check_length(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """Refuse at the head an answer whose announced length is over the cap, rather
        than after reading ``max_body`` bytes of it (h11 has checked the value's form)."""
        for name, value in headers:
            if name == b"content-length" and int(value) > self.max_body:
                raise _Refused(
                    f"answer body over {self.max_body} bytes (content-length {int(value)})"
                )

    async def close(self) -> None:
        await trio.aclose_forcefully(self.stream)


@contextlib.contextmanager
def _deadline(seconds: float | None, what: str) -> Iterator[None]:
    if seconds is None:
        yield
        return
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise RequestTimeout(f"{what}: no answer within {seconds:g} s") from None


class H1Pool:
    """Keep-alive HTTP/1.1 connections to the peer at ``base_url`` (``http://host:port``)."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 8,
        max_idle: int = 4,
        connect_timeout_s: float = 5.0,
        max_body_bytes: int = 8 << 20,
        idle_expiry_s: float = 4.0,
        read_timeout_s: float = 5.0,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"need an http://host:port URL, not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._host = url.hostname
        self._port = url.port or 80
        self._host_header = url.netloc
        self._slots = trio.Semaphore(max_connections)
        self._max_idle = max_idle
        self._connect_timeout_s = connect_timeout_s
        self._max_body = max_body_bytes
        self._idle_expiry_s = idle_expiry_s
        self._read_timeout_s = read_timeout_s
        self._idle: list[_Connection] = []
        self._closed = False
        #: Connections opened over the pool's life (tests and benchmarks read it).
        self.connects = 0
        #: Idle connections closed rather than reused (expired, or readable while idle).
        self.discarded = 0

    async def request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        *,
        headers: Sequence[tuple[str, str]] = (),
        timeout_s: float | None = None,
        parse_gate: trio.CapacityLimiter | None = None,
    ) -> H1Response:
        """One exchange; raises ``ConnectionFailed`` (``RequestTimeout``) if no answer.

        ``parse_gate``: the answer's bytes are parsed holding one of its tokens (never
        while waiting for them). Many long polls answered at once (every guest halting
        together) then wake for a read each, and are parsed and handled a few at a time
        (see ``HttpPropolisConnector``)."""
        what = f"{method} {self.base_url}{target}"
        if self._closed:
            raise ConnectionFailed(f"{what}: the pool is closed")
        async with self._slots:
            with _deadline(timeout_s, what):
                while True:
                    conn = await self._take_idle()
                    reused = conn is not None
                    if conn is None:
                        conn = await self._connect(what)
                    try:
                        response = await conn.exchange(method, target, body, headers, parse_gate)
                    except _Stale:
                        await conn.close()
                        if reused:
                            continue  # the peer closed it while idle: once more, anew
                        raise ConnectionFailed(f"{what}: closed without an answer") from None
                    except _Refused as exc:  # stalled or over the body cap: never reuse
                        await conn.close()
                        failure = RequestTimeout if exc.timed_out else ConnectionFailed
                        raise failure(f"{what}: {exc}") from None
                    except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
                        await conn.close()
                        raise ConnectionFailed(f"{what}: {type(exc).__name__}: {exc}") from exc
                    except BaseException:  # cancelled: never reuse
                        await conn.close()
                        raise
                    break
        if conn.reusable and not self._closed and len(self._idle) < self._max_idle:
            conn.idle_since = trio.current_time()
            self._idle.append(conn)
        else:
            await conn.close()
        return response

    async def _take_idle(self) -> _Connection | None:
        """The most recently used idle connection fit to carry a request, if any; the
        expired and the readable are closed on the way."""
        oldest = trio.current_time() - self._idle_expiry_s
        while self._idle and self._idle[0].idle_since < oldest:  # oldest first: expired
            self.discarded += 1
            await self._idle.pop(0).close()
        while self._idle:
            conn = self._idle.pop()
            if conn.idle_since >= oldest and not conn.readable():
                return conn
            self.discarded += 1
            await conn.close()
        return None

    async def _connect(self, what: str) -> _Connection:
        with _deadline(self._connect_timeout_s, f"{what}: connect"):
            try:
                stream = await trio.open_tcp_stream(self._host, self._port)
            except OSError as exc:
                raise ConnectionFailed(f"{what}: connect: {underlying_reason(exc)}") from exc
        self.connects += 1
        return _Connection(stream, self._host_header, self._max_body, self._read_timeout_s)

    async def aclose(self) -> None:
        """Close idle connections; those in use close when their exchange ends."""
        self.close_idle_now()
        await trio.lowlevel.checkpoint()

    def close_idle_now(self) -> None:
        """``aclose`` without a checkpoint per socket: many pools are retired at once
        when many guests halt together (see ``HttpPropolisConnector.forget``)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.stream.socket.close()
