"""The front process: the API's listening sockets, and state reads answered off the agent.

Why a process (issue 21; docs/performance.md, "Session 10"): the agent answers state
reads and publishes halts on one trio thread. Under 1000 halts with 2,000 reads/s
offered, reads either waited behind publications or were refused late (p99 0.6 s), and
a front *thread* made it worse, not better: it shares the GIL with a saturated agent
thread (the convoy: "Session 9"). A process has its own GIL and its own core.

What it does (``main``, started by ``_front_proc.FrontProcess``): it accepts on the
agent's listening sockets (sent over the channel, ``_front_channel``) and serves them
with a loop of its own (``_front_loop``: epoll, no trio, for the CPU a read costs): only
the quick path: ``GET /vmms/{id}/state`` is answered from a replica of the registry's
journaled answers (``_quick_reads``, the same answers the agent gives), refused with 503
when this process lags (``late``) or the agent publishes halts behind time. Every other request,
and a read the replica cannot answer (not journaled yet, no token, a bad id), is handed
to the agent with its connection: the socket (``SCM_RIGHTS``) and the bytes read so far;
the agent's server goes on from there as if it had accepted it. So everything but the
hot read is served by exactly the code that served it before.

Read-your-writes: the agent sends each answer before the client can learn of it (a
state change's own answer waits for the journal, which sets the answer); before each
batch of reads this process takes every message already in the channel (``catch_up``).

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
import select
import signal
import socket
import time
import uuid

import msgspec
import structlog

from ._admission import ReadAdmission
from ._front_channel import (
    ANSWERS,
    LISTEN,
    PUBLISHING,
    STOP,
    Channel,
    ChannelClosed,
    FrontSettings,
    FrontStats,
    decode_answers,
)
from ._front_loop import FrontLoop
from ._http_common import STATS as HTTP_STATS
from ._log import configure_logging
from ._quick_reads import StateReads

log = structlog.get_logger("sledagent.front")


class Replica:
    """The registry's answers as the front knows them (``_front_channel.ANSWERS``), and
    what else the agent says (``LISTEN``, ``PUBLISHING``, ``STOP``)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.answers: dict[uuid.UUID, bytes] = {}
        #: The agent closed the channel (it exited or was killed): stop at once.
        self.gone = False
        #: The agent said stop: finish the answers begun, then exit.
        self.stopping = False
        self.listen: tuple[FrontSettings, list[int]] | None = None
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
        channel = self.channel
        try:
            if self.listen is None:  # the sockets come with a message of their own
                while (message := channel.receive_nowait()) is not None:
                    self._apply(*message)
            else:  # a plain recv, a third of recvmsg's cost
                while (plain := channel.receive_plain_nowait()) is not None:
                    self._apply(*plain, [])
        except ChannelClosed:
            self.gone = True

    def wait_for_sockets(self) -> tuple[FrontSettings, list[int]] | None:
        """The settings and listening sockets (``LISTEN``, sent after the whole registry);
        None if the agent goes away first."""
        while self.listen is None and not self.gone:
            select.select([self.channel.sock], [], [])
            self.catch_up()
        return None if self.gone else self.listen

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
        elif kind == PUBLISHING:
            self.agent_behind_s = msgspec.msgpack.decode(payload, type=float)
        elif kind == STOP:
            self.stopping = True
        else:
            for fd in fds:
                os.close(fd)
            log.warning("front_message_unknown", kind=kind.decode("latin-1"))


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


def serve(channel: Channel) -> None:
    """Serve until the agent says stop (or goes away)."""
    replica = Replica(channel)
    listen = replica.wait_for_sockets()
    if listen is None:
        return
    settings, fds = listen
    listeners = [socket.socket(fileno=fd) for fd in fds]
    loop = FrontLoop(channel, replica, listeners, settings.limits)
    # "Publication first" as the agent reports it (``PUBLISHING``): while its thread
    # lags publishing halts, reads are refused here at once (on a small host they take
    # the CPU the publication needs, and a refused client waits its Retry-After). Reads
    # are all this loop does: no turns among them.
    admission = ReadAdmission(
        replica.publishing, settings.reads, lag=loop.lag, clock=time.monotonic
    )
    admission.busy = replica.agent_lag
    admission.turns = False
    admission.decided_in = "front"
    reads = StateReads(
        replica.answer,
        replica.known,
        admission,
        token=settings.token.encode() if settings.token else None,
        debug_requests=settings.debug_requests,
    )
    loop.answer = reads.answer_now
    loop.stats = lambda: _stats(admission, loop.handed_over)
    gc.freeze()  # imports and the replica: a full collection need not walk them
    log.info("http_front_serving", pid=os.getpid(), answers=len(replica.answers))
    loop.run()


def main(argv: list[str]) -> None:
    """``argv``: the channel's descriptor and the logging settings (JSON:
    ``{"json": bool | null, "level": str}``)."""
    fd = int(argv[0])
    settings = json.loads(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(json=settings["json"], level=settings["level"])
    serve(Channel(socket.socket(fileno=fd)))
