"""Serve an ASGI app (the API, the simulators) inside the caller's nursery.

Listening is here; one connection's lifecycle is ``_http.py``'s. What a flood of
connections or an exhausted descriptor table can do (issue 16, measured against
hypercorn): connections are capped (``HttpLimits.max_connections``): past the cap the
connection idle the longest is closed to make room, and with none idle a new connection
is answered 503 and closed at once. An accept(2) that fails for lack of resources
(``EMFILE``, ``ENFILE``, ``ENOBUFS``, ``ENOMEM``) closes the oldest idle connection and
tries again; with none idle the loop waits until one of its connections ends (or a
backoff of up to 1 s, for descriptors held elsewhere in the process), then resumes.
Each failure is counted (``sledagent_http_accept_errors``); it is logged once per burst.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Awaitable, Callable

import structlog
import trio
import trio_util

from ._addr import parse_listen
from ._front import duplicate_listeners, serve_front, watch_agent_loop
from ._http import STATS, ASGIApp, ConnectionTable, HttpLimits, refusal
from ._http_common import BACKOFF_S as _BACKOFF_S
from ._http_common import CAPACITY_ERRNOS as _CAPACITY_ERRNOS
from ._http_common import Burst as _Burst
from ._http_common import fd_limit

DEFAULT_LISTEN = "127.0.0.1:12345"
log = structlog.get_logger("sledagent.http")

#: ``await incoming(admit, table)``: brings connections to ``admit(stream, first_bytes)``;
#: ``table``: the server's connections (to close an idle one when descriptors run out).
Incoming = Callable[
    [Callable[[trio.SocketStream, "bytes | None"], None], ConnectionTable], Awaitable[None]
]


async def serve_http(
    app: ASGIApp,
    listen: str,
    *,
    shutdown: trio.Event,
    limits: HttpLimits | None = None,
    announce: bool = True,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` (``host:port``; port 0 picks one) until ``shutdown``.

    Reports the bound URLs through ``task_status`` (start it with ``nursery.start``).
    With ``announce`` the URLs, the connection cap and the descriptor limit are logged
    (``http_serving``). On ``shutdown`` it stops accepting, closes idle connections and
    lets requests in flight finish within ``limits.graceful_s``, then cancels them.
    """
    listeners, urls = await bind_listeners(listen)
    task_status.started(urls)
    await serve_listeners(app, listeners, shutdown=shutdown, limits=limits, announce=announce)


async def bind_listeners(listen: str) -> tuple[list[trio.SocketListener], list[str]]:
    """Listening sockets on ``listen`` (``host:port``), and their URLs."""
    host, port = parse_listen(listen)  # ValueError for a port over 65535, not port % 65536
    listeners = await trio.open_tcp_listeners(port, host=host)
    return listeners, _urls(listeners)


def _urls(listeners: list[trio.SocketListener]) -> list[str]:
    names = [listener.socket.getsockname() for listener in listeners]
    return [f"http://[{h}]:{p}" if ":" in h else f"http://{h}:{p}" for h, p, *_ in names]


async def serve_listeners(
    app: ASGIApp,
    listeners: list[trio.SocketListener],
    *,
    shutdown: trio.Event,
    limits: HttpLimits | None = None,
    announce: bool = True,
    retire: Callable[[], bool] | None = None,
    incoming: Incoming | None = None,
    accepting: trio_util.AsyncBool | None = None,
) -> None:
    """``serve_http`` on listeners already bound (closed on return). ``retire``: asked
    at ``shutdown``; True: another server takes over the port: connections are not closed under
    their clients but told to close with their next answer (``ConnectionTable.retiring``),
    idle ones at their keep-alive timeout; after ``keep_alive_s + graceful_s`` the rest
    are cancelled. ``incoming(admit, table)``: a task that brings connections from elsewhere (handed
    over by the front process) and passes each to ``admit(stream, first_bytes)``; it
    runs as the accept loops do, until ``shutdown``. ``accepting``: the listeners are
    accepted on only while it is True (the front process accepts on them otherwise)."""
    limits = limits or HttpLimits()
    table = ConnectionTable(app, limits)
    gate = accepting
    if announce:
        announce_serving(listeners, limits)
    try:
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    if gate is None:
                        accepting.start_soon(_accept_loop, listener, table, connections)
                    else:
                        accepting.start_soon(_gated, gate, listener, table, connections)
                if incoming is not None:
                    at_cap = _Burst("http_connection_cap_reached", trio.current_time)
                    accepting.start_soon(
                        incoming,
                        lambda stream, first: _admit(table, connections, at_cap, stream, first),
                        table,
                    )
                await shutdown.wait()
                accepting.cancel_scope.cancel()
            for listener in listeners:
                listener.socket.close()
            if retire is not None and retire():
                # Not a shutdown: answers in flight (a bundle download) end whole, however
                # long they take; idle connections end at their keep-alive timeout. The
                # caller cancels what is left at its own shutdown (``serve_api``).
                table.retiring = True
            else:
                table.draining = True
                table.close_idle()
                # Requests in flight finish within the deadline; then the rest is cancelled.
                connections.cancel_scope.deadline = trio.current_time() + limits.graceful_s
    finally:
        for listener in listeners:  # also when cancelled rather than shut down
            listener.socket.close()


def announce_serving(listeners: list[trio.SocketListener], limits: HttpLimits) -> None:
    """Log where a server listens, its connection cap and the descriptor limit
    (``http_serving``), and warn if descriptors would run out before the cap."""
    fds = fd_limit()
    log.info(
        "http_serving",
        urls=_urls(listeners),
        max_connections=limits.max_connections,
        fd_limit=fds,
    )
    if limits.max_connections >= fds:
        log.warning(
            "http_connection_cap_over_fd_limit",
            max_connections=limits.max_connections,
            fd_limit=fds,
            hint="descriptors run out before the cap: raise the limit (ulimit -n)",
        )


async def _gated(
    gate: trio_util.AsyncBool,
    listener: trio.SocketListener,
    table: ConnectionTable,
    nursery: trio.Nursery,
) -> None:
    """``_accept_loop`` while ``gate`` is True."""
    while True:
        await gate.wait_value(True)
        async with trio.open_nursery() as accepting:
            accepting.start_soon(_accept_loop, listener, table, nursery)
            await gate.wait_value(False)
            accepting.cancel_scope.cancel()


async def _accept_loop(
    listener: trio.SocketListener, table: ConnectionTable, nursery: trio.Nursery
) -> None:
    backoff = _BACKOFF_S[0]
    accept_failures = _Burst("http_accept_failing", trio.current_time)
    at_cap = _Burst("http_connection_cap_reached", trio.current_time)
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            STATS.accept_errors[name] = STATS.accept_errors.get(name, 0) + 1
            shed = False
            if exc.errno in _CAPACITY_ERRNOS:
                # Linux fails accept(2) for want of a descriptor before it looks for a
                # connection: wait for one to be there before closing an idle one for it.
                await trio.lowlevel.wait_readable(listener.socket)
                shed = table.shed_idle()
            accept_failures.failed(
                errno=name,
                error=os.strerror(exc.errno) if exc.errno else str(exc),
                open_connections=len(table.connections),
                fd_limit=fd_limit(),
                action="closed the oldest idle connection" if shed else "waiting",
            )
            if not shed:  # until one of ours ends, or descriptors held elsewhere free up
                with trio.move_on_after(backoff):
                    await table.freed.wait()
                backoff = min(backoff * 2, _BACKOFF_S[1])
            continue
        backoff = _BACKOFF_S[0]
        _admit(table, nursery, at_cap, stream)


def _admit(
    table: ConnectionTable,
    nursery: trio.Nursery,
    at_cap: _Burst,
    stream: trio.SocketStream,
    first: bytes | None = None,
) -> None:
    """Serve ``stream`` (whose first bytes, read elsewhere, are ``first``), or turn it
    away with 503 at the connection cap when no idle connection can make room."""
    if len(table.connections) >= table.limits.max_connections and not table.shed_idle():
        at_cap.failed(max_connections=table.limits.max_connections)
        nursery.start_soon(_turn_away, stream)
        return
    nursery.start_soon(table.open(stream, first).serve)


async def _turn_away(stream: trio.SocketStream) -> None:
    """503 and close: every connection is busy with a request and the cap is reached."""
    with (
        trio.move_on_after(1),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await stream.send_all(refusal(503, "too many connections; try again"))
    await trio.aclose_forcefully(stream)


async def serve_api(
    app: ASGIApp,
    *,
    listen: str = DEFAULT_LISTEN,
    shutdown: trio.Event,
    limits: HttpLimits | None = None,
    announce: bool = True,
    front: bool = False,
    front_until: trio.Event | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` until ``shutdown`` is set; reports the bound URLs.

    Started with ``await nursery.start(...)``: the caller learns the real port (use
    port 0 in tests). On ``shutdown`` the server stops accepting, closes idle
    connections and lets requests in flight finish (``limits.graceful_s``).

    ``front``: the server first runs on a thread and trio loop of its own and answers
    state reads there while the app runs on the caller's loop (``_front``), until
    ``front_until`` is set (None: to the end). Then the front stops accepting and
    retires its connections (each one's next answer says ``connection: close``, idle
    ones close at their keep-alive timeout: ``serve_listeners``'s ``retire``) while
    this loop accepts and serves everything itself. The daemon hands over once a
    restart's VMMs are taken back (``[http] front_thread``): the front keeps reads
    answered while the agent's loop re-adopts, but shares the GIL, and with the agent's
    loop saturated (a mass halt at 2,000 reads/s) a read on the front waited longer
    than on the agent's own loop (docs/performance.md, "Session 9").
    """
    listeners, urls = await bind_listeners(listen)
    if not front:
        task_status.started(urls)
        await serve_listeners(app, listeners, shutdown=shutdown, limits=limits, announce=announce)
        return
    limits = limits or HttpLimits()
    fds = duplicate_listeners(listeners)  # the front's own descriptors, closed by it
    watch_agent_loop(app)
    task_status.started(urls)
    handover = trio.Event()

    async def hand_over_when_due() -> None:
        async with trio.open_nursery() as waiting:
            for event in (shutdown, front_until):
                if event is not None:
                    waiting.start_soon(_set_when, event, handover, waiting.cancel_scope)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: serve_front(
                    serve_listeners,
                    app,
                    fds,
                    shutdown=handover,
                    limits=limits,
                    announce=announce,
                    retire=lambda: not shutdown.is_set(),
                )
            )
            await hand_over_when_due()
            watch_agent_loop(app, front=False)
            if not shutdown.is_set():
                log.info("http_front_handed_over")
                await serve_listeners(
                    app, listeners, shutdown=shutdown, limits=limits, announce=False
                )
                # Shutdown: this loop's connections had their grace; the front's retiring
                # ones (an answer still in flight since the handover) had as long.
                nursery.cancel_scope.cancel()
    finally:
        for listener in listeners:
            listener.socket.close()


async def _set_when(event: trio.Event, then: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    then.set()
    scope.cancel()


__all__ = [
    "DEFAULT_LISTEN",
    "HttpLimits",
    "fd_limit",
    "serve_api",
    "serve_http",
    "serve_listeners",
]
