"""What the HTTP server's modules share: the ASGI shapes, the ``[http]`` limits, what
the servers of this process turned away (``STATS``), and the server's own answers
(``refusal``). The connection's lifecycle is ``_http``'s; the ASGI exchange of one
request ``_http_exchange``'s."""

from __future__ import annotations

import errno
import json
import resource
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

import attrs
import structlog
from attrs import validators as v

log = structlog.get_logger("sledagent.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


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


#: accept(2) failures that mean "no room now" (not "this connection is bad").
CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
#: After such a failure with no idle connection to close: wait this long, doubling up to
#: the second figure (seconds), or until a connection ends.
BACKOFF_S = (0.01, 1.0)
#: Failures closer together than this are one burst (one log line); a burst that lasts
#: is logged again this often, with its count.
BURST_GAP_S = 10.0
BURST_RELOG_S = 60.0


def fd_limit() -> int:
    """This process's soft limit on open descriptors (RLIMIT_NOFILE)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Burst:
    """Logs a run of failures once (and again each minute while it lasts).

    ``clock``: seconds (the trio servers pass ``trio.current_time``; the front
    process's loop ``time.monotonic``)."""

    def __init__(self, event: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.event = event
        self.clock = clock
        self.last = self.logged = -float("inf")
        self.count = 0

    def failed(self, **fields: object) -> None:
        now = self.clock()
        if now - self.last >= BURST_GAP_S:
            self.count = 0
            self.logged = -float("inf")
        self.last = now
        self.count += 1
        if now - self.logged >= BURST_RELOG_S:
            self.logged = now
            log.warning(self.event, failures_in_burst=self.count, **fields)
