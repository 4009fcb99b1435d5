"""The agent's side of connections the front process hands over (``_front_proc``).

A handed-over connection arrives as a descriptor ``recvmsg`` installs in the agent
(``_room_for_a_descriptor`` makes sure one is free first, as the accept loop does), and
is served by the agent's server (``_stream``); its answers wait for the registry's
changes to reach the front when the front lags (``AnswersSentFirst``: read-your-writes).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from ._http import STATS as HTTP_STATS
from ._http import ASGIApp, ConnectionTable, Message, QuickGet, Scope
from ._http_common import BACKOFF_S as _BACKOFF_S
from ._http_common import Burst as _Burst
from ._http_common import fd_limit

if TYPE_CHECKING:
    from ._front_proc import FrontProcess


def stream_of(fd: int) -> trio.SocketStream | None:
    """A stream over a handed-over connection's descriptor (owned from here on); None if
    it is no longer one (reset by its client on the way: nothing to serve)."""
    try:
        raw = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return None
    try:
        return trio.SocketStream(trio.socket.from_stdlib_socket(raw))
    except OSError:
        raw.close()
        return None


def count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


async def room_for_a_descriptor(probe: int, table: ConnectionTable, failing: _Burst) -> None:
    """Return once this process can take one more descriptor.

    Why: a handed-over connection arrives as a descriptor that ``recvmsg`` installs here;
    with none free the kernel drops it (``MSG_CTRUNC``) and the client's connection is
    closed unanswered. The accept loop this replaces closed an idle connection to make
    room instead (``_server``: issue 16), so does this: the oldest idle connection is
    closed, or with none idle it waits until one of ours ends (or a backoff of up to
    1 s, for descriptors held elsewhere in the process). Counted as an accept error
    (``EMFILE``), logged once per burst. One ``dup`` and ``close`` per handover (called
    only when one waits in the channel: ``Channel.next_kind_nowait``)."""
    backoff = _BACKOFF_S[0]
    while True:
        try:
            os.close(os.dup(probe))
            return
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            name = errno.errorcode[exc.errno]
        count(HTTP_STATS.accept_errors, name)
        shed = table.shed_idle()
        failing.failed(
            errno=name,
            open_connections=len(table.connections),
            fd_limit=fd_limit(),
            action="closed the oldest idle connection" if shed else "waiting",
        )
        if not shed:
            with trio.move_on_after(backoff):
                await table.freed.wait()
            backoff = min(backoff * 2, _BACKOFF_S[1])


class AnswersSentFirst:
    """``app`` for the connections the front hands over: no answer starts before every
    change of the registry's answers made so far is in the channel (``answers_sent``).

    Why: a client that saw this answer (a registration, a state change, a read) may read
    the VMM next on another connection, which the front answers from its replica. When
    the front lags (its end of the channel full: a host out of CPU, a burst of halts),
    changes wait in the agent's queue; answering before they are sent let a client read
    a VMM it had just registered as 404, or an older generation (read-your-writes). The
    wait costs nothing while the front keeps up (the queue is empty)."""

    def __init__(self, app: ASGIApp, front: FrontProcess) -> None:
        self.app, self.front = app, front
        inner: QuickGet | None = getattr(app, "quick_get", None)
        self.quick_get: QuickGet | None = None
        if inner is not None:

            async def quick_get(target: bytes, head: bytes) -> bytes | None:
                answer = await inner(target, head)
                if answer is not None and front.lagging:
                    await front.answers_sent()
                return answer

            self.quick_get = quick_get

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        front = self.front

        async def send_after_answers(message: Message) -> None:
            if message["type"] == "http.response.start" and front.lagging:
                await front.answers_sent()
            await send(message)

        await self.app(scope, receive, send_after_answers)
