"""The front process's event loop: one epoll, no trio (issue 21; docs/performance.md,
"Session 11: the front's own loop").

Why not trio here: the front's work per state read is a ``recv``, two regular
expressions, a dict lookup and a ``send``. Under trio it cost 0.08-0.13 ms of CPU per
read, most of it trio's per-wakeup machinery (a task switch per read, a cancel scope per
idle wait, the epoll registration redone per wait); on a 2-core sled at 2,000 reads/s
that is a quarter of a core taken from the halts being published (and from the readers'
own clients). This loop keeps one level-triggered registration per connection and no
task per connection; measured, it costs a read a fraction of that (the figure is in
docs/performance.md).

What it serves is deliberately little, so there is little here to get wrong: after each
idle wait a connection's first bytes are either exactly one quick read
(``_quick_shape``: never one h11 would refuse) that the replica answers, written back at
once, or the connection is handed to the agent with those bytes (``HANDOVER``), whose
server (h11, limits, timeouts, errors) goes on from there as if it had accepted it. So
there is no HTTP parser here, no body, no timer but the keep-alive; what the agent's
server does at the edges is kept: the connection cap (the oldest idle connection makes
room, else 503 and close), accept(2) out of descriptors (an idle connection is closed, or
accepting pauses with a backoff), every failure counted and logged once per burst.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import selectors
import socket
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from ._front_channel import HANDOVER, SERVING, STATS, Channel, ChannelClosed
from ._http_common import BACKOFF_S, CAPACITY_ERRNOS, Burst, HttpLimits, fd_limit, refusal
from ._http_common import STATS as HTTP_STATS

log = structlog.get_logger("sledagent.front")

_RECV = 64 * 1024
#: Connections accepted per listener per wake-up: a flood of new connections does not
#: hold up the reads of those already open.
_ACCEPTS_PER_WAKE = 64
#: accept(2) failures that are the client's, not ours (trio ignores the same).
_IGNORED_ACCEPT = {
    errno.EPERM, errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT,
    errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH,
}  # fmt: skip
#: The front sends its counters this often (seconds): ``/metrics`` is that far behind.
STATS_EVERY_S = 1.0
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class Peer(Protocol):
    """What the loop needs of the agent's side (``_front_main.Replica``)."""

    #: The agent closed the channel: stop at once.
    gone: bool
    #: The agent said stop: finish what was begun, then stop.
    stopping: bool

    def catch_up(self) -> None:
        """Apply every message already in the channel, without waiting."""


class _Conn:
    __slots__ = ("out", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        #: Bytes of an answer the socket did not take at once.
        self.out = b""


class FrontLoop:
    """Serves ``listeners`` until the agent says stop or goes away (``run``).

    ``answer(request, max_head_bytes)``: the quick path (``StateReads.answer_now``):
    the whole answer, or None to hand the request to the agent. ``stats()``: the counters' message
    (``FrontStats``), sent every ``STATS_EVERY_S`` and once at the end. Set both before
    ``run``."""

    def __init__(
        self, channel: Channel, peer: Peer, listeners: list[socket.socket], limits: HttpLimits
    ) -> None:
        self.channel, self.peer, self.limits = channel, peer, limits
        self.listeners = listeners
        self.answer: Callable[[bytes, int], bytes | None] = lambda request, max_head: None
        self.stats: Callable[[], bytes] = lambda: b""
        self.handed_over = 0
        self._sel = selectors.DefaultSelector()
        self._conns: dict[int, _Conn] = {}
        #: Connections waiting for a request, oldest first, with their keep-alive deadline.
        self._idle: collections.OrderedDict[_Conn, float] = collections.OrderedDict()
        #: Messages the channel did not take at once (a handover's socket is closed here
        #: once it is sent).
        self._outbox: collections.deque[tuple[bytes, bytes, socket.socket | None]] = (
            collections.deque()
        )
        self._batch_start = time.perf_counter()
        self._last_batch_s = 0.0
        self._now = time.monotonic()
        self._accepting = False
        self._resume_at: float | None = None
        self._backoff = BACKOFF_S[0]
        self._stop_by: float | None = None
        self._failing = Burst("http_accept_failing")
        self._at_cap = Burst("http_connection_cap_reached")

    def lag(self) -> float:
        """How long a request read now has waited at most (seconds): the time the current
        batch of events has run plus the time the one before it ran (as
        ``_admission.LoopLag`` measures a trio loop)."""
        return time.perf_counter() - self._batch_start + self._last_batch_s

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        sel = self._sel
        sel.register(self.channel.sock, _READ, None)
        for listener in self.listeners:
            listener.setblocking(False)
        self._accept_on()
        self._send(SERVING, b"")  # the agent stops accepting on the sockets
        next_stats = time.monotonic() + STATS_EVERY_S
        peer = self.peer
        try:
            while not peer.gone:
                events = sel.select(self._timeout(next_stats))
                self._batch_start = time.perf_counter()
                self._now = now = time.monotonic()
                # Every answer the agent sent before these requests' first bytes came is
                # in the channel now: applied before any is answered (read-your-writes).
                peer.catch_up()
                for key, mask in events:
                    data = key.data
                    if isinstance(data, _Conn):
                        if data.sock.fileno() < 0:
                            continue  # closed earlier in this batch (made room, expired)
                        if mask & _WRITE:
                            self._write(data)
                        elif mask & _READ:
                            self._read(data)
                    elif data is None:
                        if mask & _WRITE:
                            self._flush()
                    else:
                        self._accept(data)
                self._expire(now)
                if peer.stopping and self._stop_by is None:
                    self._begin_stop(now)
                if self._stop_by is not None and (now >= self._stop_by or self._finished()):
                    break
                if now >= next_stats:
                    next_stats = now + STATS_EVERY_S
                    self._send(STATS, self.stats())
                self._last_batch_s = time.perf_counter() - self._batch_start
        finally:
            self._end()

    def _timeout(self, next_stats: float) -> float:
        due = next_stats
        if self._idle:
            due = min(due, next(iter(self._idle.values())))
        if self._resume_at is not None:
            due = min(due, self._resume_at)
        if self._stop_by is not None:
            due = min(due, self._stop_by)
        return max(0.0, due - time.monotonic())

    def _end(self) -> None:
        self._resume_at = None
        if not self.peer.gone:  # the last counters, then the channel closes with us
            self._send(STATS, self.stats())
            self._flush_for(1.0)
        for conn in list(self._conns.values()):
            self._close(conn)
        for listener in self.listeners:
            listener.close()
        for _kind, _payload, sock in self._outbox:
            if sock is not None:
                sock.close()
        self._sel.close()
        self.channel.close()  # the agent sees the front gone

    # --- shutdown: stop accepting, close idle connections, finish answers begun ----------

    def _begin_stop(self, now: float) -> None:
        self._accept_off()
        self._resume_at = None
        for listener in self.listeners:
            listener.close()
        for conn in list(self._idle):
            self._close(conn)
        self._stop_by = now + self.limits.graceful_s

    def _finished(self) -> bool:
        return not self._conns and not self._outbox

    # --- accepting -----------------------------------------------------------------------

    def _accept_on(self) -> None:
        if not self._accepting:
            for listener in self.listeners:
                self._sel.register(listener, _READ, listener)
            self._accepting = True

    def _accept_off(self) -> None:
        if self._accepting:
            for listener in self.listeners:
                self._sel.unregister(listener)
            self._accepting = False

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPTS_PER_WAKE):
            try:
                sock, _addr = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _IGNORED_ACCEPT:
                    continue
                if exc.errno in CAPACITY_ERRNOS and not _readable(listener):
                    # Linux fails accept(2) for want of a descriptor before it looks for
                    # a connection: none waits, so no idle connection is closed for it.
                    return
                if not self._accept_failed(exc):
                    return
                continue
            self._backoff = BACKOFF_S[0]
            self._admit(sock)

    def _accept_failed(self, exc: OSError) -> bool:
        """Count and log a failed accept(2); True: room was made, try again."""
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        counts = HTTP_STATS.accept_errors
        counts[name] = counts.get(name, 0) + 1
        shed = exc.errno in CAPACITY_ERRNOS and self._shed_idle()
        self._failing.failed(
            errno=name,
            error=os.strerror(exc.errno) if exc.errno else str(exc),
            open_connections=len(self._conns),
            fd_limit=fd_limit(),
            action="closed the oldest idle connection" if shed else "waiting",
        )
        if not shed:  # until one of ours ends, or the backoff (descriptors held elsewhere)
            self._accept_off()
            self._resume_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_S[1])
        return shed

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as trio's streams
        except OSError:  # reset already; its first read says so
            pass
        if len(self._conns) >= self.limits.max_connections and not self._shed_idle():
            self._at_cap.failed(max_connections=self.limits.max_connections)
            try:  # a fresh socket's buffer takes the short answer whole
                sock.send(refusal(503, "too many connections; try again"))
            except OSError:
                pass
            sock.close()
            return
        conn = _Conn(sock)
        self._conns[sock.fileno()] = conn
        HTTP_STATS.connections_open += 1
        self._sel.register(sock, _READ, conn)
        self._idle[conn] = self._now + self.limits.keep_alive_s

    def _shed_idle(self) -> bool:
        """Close the connection idle the longest; False if none is. One whose request has
        arrived (not read yet) is not idle: it is kept."""
        for conn in self._idle:
            try:
                conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                self._close(conn)
                HTTP_STATS.idle_closed += 1
                return True
            except OSError:
                pass
        return False

    # --- one connection --------------------------------------------------------------------

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(_RECV)
        except BlockingIOError:
            return
        except OSError:  # reset by its client
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        answer = self.answer(data, self.limits.max_head_bytes)
        if answer is None:
            self._hand_over(conn, data)
            return
        try:
            sent = conn.sock.send(answer)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn)
            return
        idle = self._idle
        del idle[conn]  # to the end: idle the shortest
        if sent == len(answer):
            idle[conn] = self._now + self.limits.keep_alive_s
        else:  # the client does not read: no more requests from it until it does
            conn.out = answer[sent:]
            self._sel.modify(conn.sock, _WRITE, conn)

    def _write(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            return
        if self._stop_by is not None:
            self._close(conn)  # stopping: its answer is whole, no further request
            return
        self._sel.modify(conn.sock, _READ, conn)
        self._idle[conn] = self._now + self.limits.keep_alive_s

    def _expire(self, now: float) -> None:
        idle = self._idle
        while idle:
            conn, deadline = next(iter(idle.items()))
            if deadline > now:
                break
            self._close(conn)
        if self._resume_at is not None and now >= self._resume_at:
            self._resume()

    def _forget(self, conn: _Conn) -> None:
        self._sel.unregister(conn.sock)
        del self._conns[conn.sock.fileno()]
        self._idle.pop(conn, None)
        HTTP_STATS.connections_open -= 1
        if self._resume_at is not None:  # a descriptor is free: accept again
            self._resume()

    def _resume(self) -> None:
        self._resume_at = None
        if self._stop_by is None:
            self._accept_on()

    def _close(self, conn: _Conn) -> None:
        self._forget(conn)
        conn.sock.close()

    def _hand_over(self, conn: _Conn, data: bytes) -> None:
        """The agent serves this connection from here on, starting with ``data``."""
        self._forget(conn)
        self.handed_over += 1
        self._send(HANDOVER, data, conn.sock)

    # --- the channel's other direction -------------------------------------------------

    def _send(self, kind: bytes, payload: bytes, sock: socket.socket | None = None) -> None:
        """Send to the agent, in order; what the channel does not take now waits."""
        if not self._outbox:
            try:
                if self.channel.send_nowait(kind, payload, () if sock is None else [sock.fileno()]):
                    if sock is not None:
                        sock.close()  # the agent holds it now
                    return
            except ChannelClosed:
                self.peer.gone = True
                if sock is not None:
                    sock.close()
                return
            self._sel.modify(self.channel.sock, _READ | _WRITE, None)
        self._outbox.append((kind, payload, sock))

    def _flush(self) -> None:
        outbox = self._outbox
        try:
            while outbox:
                kind, payload, sock = outbox[0]
                fds = () if sock is None else [sock.fileno()]
                if not self.channel.send_nowait(kind, payload, fds):
                    return
                outbox.popleft()
                if sock is not None:
                    sock.close()
        except ChannelClosed:
            self.peer.gone = True
            return
        self._sel.modify(self.channel.sock, _READ, None)

    def _flush_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._outbox and not self.peer.gone:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            select.select([], [self.channel.sock], [], left)
            self._flush()


def _readable(sock: socket.socket) -> bool:
    """A connection (or bytes) waits on ``sock``; never blocks, needs no descriptor."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))
