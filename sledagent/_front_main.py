"""The front process: the API's listening sockets, and state reads answered off the agent.

Why a process (issue 21; docs/performance.md, "Session 10"): the agent answers state
reads and publishes halts on one trio thread. Under 1000 halts with 2,000 reads/s
offered, reads either waited behind publications or were refused late (p99 0.6 s), and
a front *thread* made it worse, not better: it shares the GIL with a saturated agent
thread (the convoy: "Session 9"). A process has its own GIL and its own core.

What it does (``main``, started by ``_front_proc.FrontProcess``): it accepts on the
agent's listening sockets (sent over the channel, ``_front_channel``), and serves each
connection with the agent's own server code (``_http``: keep-alive, limits, the connection
cap) and an app with only the quick path: ``GET /vmms/{id}/state`` is answered from a
replica of the registry's journaled answers (``_quick_reads``, the same answers the
agent gives), refused with 503 when this process lags (``late``). Every other request,
and a read the replica cannot answer (not journaled yet, no token, a bad id), is handed
to the agent with its connection: the socket (``SCM_RIGHTS``) and the bytes read so far;
the agent's server goes on from there as if it had accepted it. So everything but the
hot read is served by exactly the code that served it before.

Read-your-writes: the agent sends each answer before the client can learn of it (a
state change's own answer waits for the journal, which sets the answer); before each
read this process takes every message already in the channel (``catch_up``).

Lifetime: the agent ends it (``STOP``: stop accepting, let answers in flight finish,
exit). If the agent dies (kill -9), the kernel closes the agent's end of the channel
(no other process holds it: sockets are not inherited), this process wakes on its end
and exits at once: the listening sockets are not held past the agent, so the next start
can bind them. (Not ``PR_SET_PDEATHSIG``: it fires when the *thread* that spawned the
child exits, and trio spawns from a worker thread that ends when idle.) SIGINT and
SIGTERM are ignored: a Ctrl-C reaches the whole process group, and the agent's shutdown
decides.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable

import msgspec
import structlog
import trio

from ._admission import ReadAdmission
from ._front_channel import (
    ANSWERS,
    HANDOVER,
    LISTEN,
    PUBLISHING,
    SERVING,
    STATS,
    STOP,
    Channel,
    ChannelClosed,
    FrontSettings,
    FrontStats,
    decode_answers,
)
from ._http import STATS as HTTP_STATS
from ._http import Scope
from ._log import configure_logging
from ._quick_reads import state_reads
from ._server import serve_listeners

log = structlog.get_logger("sledagent.front")

#: The front sends its counters this often (seconds): ``/metrics`` is that far behind.
STATS_EVERY_S = 1.0


class Replica:
    """The registry's answers as the front knows them (``_front_channel.ANSWERS``)."""

    def __init__(self, channel: Channel, gone: trio.CancelScope) -> None:
        self.channel = channel
        #: Cancelled when the agent closes the channel: nothing here outlives it.
        self.gone = gone
        self.answers: dict[uuid.UUID, bytes] = {}
        self.stop = trio.Event()
        self.listen: tuple[FrontSettings, list[int]] | None = None
        self.listening = trio.Event()
        #: How far behind the agent's thread runs while it publishes halts (seconds).
        self.agent_behind_s = 0.0

    def publishing(self) -> int:
        """1 while the agent says it publishes behind time (the admission's backlog)."""
        return 1 if self.agent_behind_s > 0 else 0

    def agent_lag(self) -> float:
        return self.agent_behind_s

    def answer(self, propolis_id: uuid.UUID) -> bytes | None:
        return self.answers.get(propolis_id) or None  # b"": registered, not journaled

    def known(self, propolis_id: uuid.UUID) -> bool:
        return propolis_id in self.answers

    def catch_up(self) -> None:
        """Apply every message already waiting, without waiting for one."""
        try:
            while (message := self.channel.receive_plain_nowait()) is not None:
                self._apply(*message, [])
        except ChannelClosed:
            self.gone.cancel()

    async def follow(self) -> None:
        """Apply messages as they come, until the agent closes the channel."""
        try:
            while True:
                self._apply(*await self.channel.receive())
        except ChannelClosed:
            self.gone.cancel()

    async def send(self, kind: bytes, payload: bytes, fds: list[int] | None = None) -> bool:
        """Send to the agent; False if it is gone (everything here is then cancelled)."""
        try:
            await self.channel.send(kind, payload, fds or ())
        except ChannelClosed:
            self.gone.cancel()
            return False
        return True

    def _apply(self, kind: bytes, payload: bytes, fds: list[int]) -> None:
        if kind == ANSWERS:
            answers = self.answers
            for raw_id, value in decode_answers(payload):
                propolis_id = uuid.UUID(bytes=raw_id)
                if value is None:
                    answers.pop(propolis_id, None)
                else:
                    answers[propolis_id] = value
        elif kind == LISTEN and self.listen is None:
            self.listen = (msgspec.msgpack.decode(payload, type=FrontSettings), fds)
            self.listening.set()
        elif kind == PUBLISHING:
            self.agent_behind_s = msgspec.msgpack.decode(payload, type=float)
        elif kind == STOP:
            self.stop.set()
        else:
            for fd in fds:
                os.close(fd)
            log.warning("front_message_unknown", kind=kind.decode("latin-1"))


class _QuickOnly:
    """The front's app: the quick path alone. The server hands every other request to
    the agent before any app sees it (``ConnectionTable.handover``)."""

    def __init__(self, quick_get: Callable[[bytes, bytes], Awaitable[bytes | None]]) -> None:
        self.quick_get = quick_get

    async def __call__(self, scope: Scope, receive: object, send: object) -> None:
        raise RuntimeError("the front hands every request but quick reads to the agent")


def _stats(admission: ReadAdmission, handed_over: int) -> bytes:
    statistics = admission.statistics()
    counts, total = admission.waited.raw()
    s = HTTP_STATS
    return msgspec.msgpack.encode(
        FrontStats(
            admitted=statistics.admitted,
            shed=statistics.shed,
            waited_counts=counts,
            waited_sum=total,
            connections_open=s.connections_open,
            accept_errors=dict(s.accept_errors),
            idle_closed=s.idle_closed,
            refused=dict(s.refused),
            abandoned=dict(s.abandoned),
            handed_over=handed_over,
        )
    )


async def serve(channel: Channel) -> None:
    """Serve until the agent says stop (or goes away)."""
    async with trio.open_nursery() as nursery:
        replica = Replica(channel, nursery.cancel_scope)
        nursery.start_soon(replica.follow)
        await replica.listening.wait()
        assert replica.listen is not None
        settings, fds = replica.listen
        listeners = [
            trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
            for fd in fds
        ]
        # "Publication first" as the agent reports it (``PUBLISHING``): while its
        # thread lags publishing halts, reads are refused here at once (on a small
        # host they take the CPU the publication needs, and a refused client waits
        # its Retry-After). Reads are all this loop does: no turns among them.
        admission = ReadAdmission(replica.publishing, settings.reads)
        admission.busy = replica.agent_lag
        admission.turns = False
        admission.decided_in = "front"
        token = settings.token.encode() if settings.token else None
        quick = state_reads(
            replica.answer,
            replica.known,
            admission,
            token=token,
            debug_requests=settings.debug_requests,
        )

        async def quick_get(target: bytes, head: bytes) -> bytes | None:
            replica.catch_up()  # every answer the agent sent before this read arrived
            return await quick(target, head)

        handed = [0]

        async def handover(sock: trio.socket.SocketType, data: bytes) -> None:
            if await replica.send(HANDOVER, data, [sock.fileno()]):
                handed[0] += 1

        async def report() -> None:
            while True:
                await trio.sleep(STATS_EVERY_S)
                await replica.send(STATS, _stats(admission, handed[0]))

        nursery.start_soon(report)
        gc.freeze()  # imports and the replica: a full collection need not walk them
        log.info("http_front_serving", pid=os.getpid(), answers=len(replica.answers))
        nursery.start_soon(replica.send, SERVING, b"")  # the agent stops accepting
        await serve_listeners(
            _QuickOnly(quick_get),
            listeners,
            shutdown=replica.stop,
            limits=settings.limits,
            announce=False,
            handover=handover,
        )
        await replica.send(STATS, _stats(admission, handed[0]))
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> None:
    """``argv``: the channel's descriptor and the logging settings (JSON:
    ``{"json": bool | null, "level": str}``)."""
    fd = int(argv[0])
    settings = json.loads(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(json=settings["json"], level=settings["level"])
    trio.run(serve, Channel(socket.socket(fileno=fd)))
