"""The front process as the agent sees it: started, fed the registry's answers, served.

The front process (``_front_main``: why, and what it does there) accepts on the API's
listening sockets and answers state reads from a replica; everything else comes back
here with its connection, and is served by the agent's own server code
(``serve_listeners``'s ``incoming``). Here:

- ``FrontProcess.start`` spawns it early (its imports, ~0.3 s, overlap the agent's start);
- ``serve`` sends it the registry (every VMM, with its journaled answer if it has one),
  then the listening sockets; from then on every change of an answer
  (``Registry.observer``: registered, journaled, removed) is sent the moment it is made,
  before any answer that depends on it can reach a client (read-your-writes);
- connections handed back are served here; the front's counters are counted into
  ``/metrics`` (``ReadAdmission.absorb``, ``HttpStatistics.elsewhere``);
- until the front says it serves, the agent accepts on the sockets too (a front still
  importing must not leave reads in the listen backlog);
- at shutdown the front is told to stop and given the server's grace to finish; if it
  dies before (a crash, an operator's kill), this logs it and serves the port itself:
  the listening sockets never left this process.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence

import attrs
import msgspec
import structlog
import trio
import trio_util

from ._admission import AdmissionStatistics, CpuWait, ReadAdmission
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
    encode_answers,
)
from ._front_handed import AnswersSentFirst, count, room_for_a_descriptor, stream_of
from ._front_publishing import PublishingWatch
from ._http import STATS as HTTP_STATS
from ._http import ASGIApp, ConnectionTable, HttpStatistics
from ._http_common import Burst as _Burst
from ._http_common import fd_limit
from ._log import SETTINGS as LOG_SETTINGS
from ._registry import Registry
from ._server import serve_listeners

log = structlog.get_logger("sledagent.http")

#: The front is killed (and the agent serves the API itself) when it has taken nothing
#: from the channel for this long while changes wait for it (``_flush``): a start's
#: whole registry waits at most its imports (~1 s on a loaded host).
FRONT_STALL_S = 10.0
#: The front is killed too when it has sent nothing for this long once it serves: its
#: counters come every ``_front_loop.STATS_EVERY_S`` (1 s) whatever it does, and one that
#: stopped running (SIGSTOP, wedged) with no change waiting for it held every new
#: connection in the listen backlog, unnoticed.
FRONT_SILENT_S = 10.0


#: The front's interpreter imports only the modules it runs, not the package's
#: ``__init__`` (which imports the whole agent: ~0.7 s against ~0.3 s): the package is
#: put in ``sys.modules`` as a bare namespace first. SIGINT is ignored before anything
#: else (a Ctrl-C at the terminal reaches the whole process group; the agent decides).
_BOOT = """\
import signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
import importlib.util, types
spec = importlib.util.find_spec("sledagent")
package = types.ModuleType("sledagent")
package.__path__ = list(spec.submodule_search_locations)
package.__spec__ = spec
sys.modules["sledagent"] = package
from sledagent._front_main import main
main(sys.argv[1:])
"""


class FrontProcess:
    """A running front process and the agent's end of its channel."""

    def __init__(self, process: trio.Process, channel: Channel) -> None:
        self.process = process
        self.channel = channel
        self._pending: collections.deque[tuple[bytes, bytes, Sequence[int]]] = collections.deque()
        self._wake = trio.Event()
        self._closed = False
        #: Messages ever queued in ``_pending``, and how many of them have been sent;
        #: ``_progress`` is set (and replaced) as they go (``answers_sent``).
        self._queued = 0
        self._dequeued = 0
        self._progress = trio.Event()
        #: The front's counters as they last arrived.
        self.stats: FrontStats | None = None
        #: Set once the front accepts on the API's sockets.
        self.serving = trio.Event()
        #: When the front must refuse reads (``PUBLISHING``): "publication first".
        self.publishing = PublishingWatch(lambda payload: self._send(PUBLISHING, payload))
        self._token: trio.lowlevel.TrioToken | None = None

    @property
    def told_publishing(self) -> float:
        """The agent's lag the front was last told of (``PUBLISHING``; 0.0: none)."""
        return self.publishing.told

    @property
    def cpu_wait(self) -> CpuWait:
        """How much of the time the agent's thread waits for a CPU (tests: their own)."""
        return self.publishing.cpu_wait

    @cpu_wait.setter
    def cpu_wait(self, value: CpuWait) -> None:
        self.publishing.cpu_wait = value

    @classmethod
    async def start(cls) -> FrontProcess:
        """Spawn the front process; it waits for ``serve`` to send it the sockets.
        Raises ``OSError`` if it cannot be spawned."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        logging = json.dumps({"json": LOG_SETTINGS["json"], "level": LOG_SETTINGS["level"]})
        argv = [sys.executable, "-c", _BOOT, str(theirs.fileno()), logging]
        try:
            process = await trio.lowlevel.open_process(
                argv,
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # it logs to stderr; stdout is the agent's
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        log.info("http_front_started", pid=process.pid)
        return cls(process, Channel(ours))

    async def aclose(self) -> None:
        """Make sure the process has ended (killed if it still runs) and is reaped."""
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.process.kill()
            await self.process.wait()
            self.channel.close()

    # --- the registry's answers, one way ------------------------------------------------

    def changed(self, propolis_id: uuid.UUID, answer: bytes | None) -> None:
        """``Registry.observer``: a VMM's answer changed (``b""``: registered, none yet;
        None: removed). Sent now, from the caller's step, unless earlier ones wait."""
        self._send(ANSWERS, encode_answers([(propolis_id.bytes, answer)])[0])

    def _send(self, kind: bytes, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        if self._closed:
            return
        if not self._pending:
            try:
                if self.channel.send_nowait(kind, payload, fds):
                    return
            except ChannelClosed:
                self._closed = True
                return
        self._pending.append((kind, payload, fds))  # in order, behind what waits
        self._queued += 1
        if self._token is not None:  # also safe from a trio instrument (``_batch_ended``)
            self._token.run_sync_soon(self._wake.set)
        else:
            self._wake.set()

    @property
    def lagging(self) -> bool:
        """Changes wait here for the front to read the channel (``answers_sent``)."""
        return bool(self._pending)

    async def answers_sent(self) -> None:
        """Return once every change made so far is in the channel (or the front is
        gone). The front takes every message in the channel before it answers a read
        (``Replica.catch_up``), so an answer sent after this is never followed by an
        older one from the front (read-your-writes). Immediate unless the front lags
        (its end of the channel full: a host out of CPU, a burst of changes)."""
        target = self._queued
        while self._dequeued < target and not self._closed:
            await self._progress.wait()

    def _advanced(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _flush(self) -> None:
        """Send what could not be sent at once (the front was not reading: at start,
        still importing; or busy), in order."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._pending:
                kind, payload, fds = self._pending[0]
                try:
                    with trio.fail_after(FRONT_STALL_S):
                        await self.channel.send(kind, payload, fds)
                except trio.TooSlowError:
                    self._stalled(f"took nothing from its channel for {FRONT_STALL_S} s")
                    return
                except ChannelClosed:
                    self._pending.clear()
                    self._closed = True
                    self._advanced()
                    return
                self._pending.popleft()
                self._dequeued += 1
                self._advanced()

    def _stalled(self, why: str) -> None:
        """The front has taken nothing from the channel for ``FRONT_STALL_S``, or sent
        nothing for ``FRONT_SILENT_S`` (stopped, wedged): answers on the agent's side wait
        for it (``answers_sent``) and new connections wait in the listen backlog. Kill
        it: the agent then serves the sockets itself (``http_front_exited``), as when
        the front dies."""
        log.error(
            "http_front_stalled",
            pid=self.process.pid,
            why=why,
            changes_waiting=len(self._pending),
            action="killed; the agent serves the API itself",
        )
        self._pending.clear()
        self._closed = True
        self._advanced()
        with contextlib.suppress(OSError):
            self.process.kill()

    # --- serving ------------------------------------------------------------------------

    async def serve(
        self,
        app: ASGIApp,
        listeners: list[trio.SocketListener],
        *,
        registry: Registry,
        settings: FrontSettings,
        shutdown: trio.Event,
        admission: ReadAdmission | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve ``app`` on ``listeners`` through the front until ``shutdown`` (graceful,
        as ``serve_listeners``). Started (``nursery.start``) once the registry and the
        sockets are on their way: the front serves from then on, whatever this loop does.

        One server here (one connection table, so one cap) for the whole life: the
        connections the front hands back, and the ones it accepts itself, on the same
        sockets, while the front does not: until the front says it serves (its
        interpreter may still be importing when the agent listens, about a second on a
        loaded host, and a read must not wait in the listen backlog meanwhile) and
        again for good if the front dies (``http_front_exited``)."""
        limits = settings.limits
        for payload in encode_answers(registry.replica()):
            self._send(ANSWERS, payload)
        registry.observer = self.changed
        fds = [lst.socket.fileno() for lst in listeners]
        self._send(LISTEN, msgspec.msgpack.encode(settings), fds)
        task_status.started()
        accepting = trio_util.AsyncBool(not self.serving.is_set())
        gone = trio.Event()
        local_stop = trio.Event()

        async def incoming(
            admit: Callable[[trio.SocketStream, bytes | None], None], table: ConnectionTable
        ) -> None:
            try:
                await self._receive(admit, table, admission, accepting)
            finally:
                gone.set()  # the front closed the channel: it exited
                self._connections_closed()
            if shutdown.is_set():
                return
            registry.observer = None
            accepting.value = True  # the sockets never left this process
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.process.wait()
            log.error(
                "http_front_exited",
                pid=self.process.pid,
                returncode=self.process.returncode,
                action="the agent serves the API itself",
            )

        unwatch = self.watch_publishing(admission) if admission is not None else None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._flush)
                nursery.start_soon(self.publishing.ends)
                async with trio.open_nursery() as serving:
                    serving.start_soon(
                        lambda: serve_listeners(
                            AnswersSentFirst(app, self),
                            listeners,
                            shutdown=local_stop,
                            limits=limits,
                            announce=False,
                            incoming=incoming,
                            accepting=accepting,
                        )
                    )
                    await shutdown.wait()
                    accepting.value = False
                    if not gone.is_set():
                        self._send(STOP)
                        # The front finishes the answers it has begun, within the grace.
                        with trio.move_on_after(limits.graceful_s + 1):
                            await gone.wait()
                    local_stop.set()
                nursery.cancel_scope.cancel()
        finally:
            registry.observer = None
            if unwatch is not None:
                unwatch()
            for listener in listeners:
                listener.socket.close()
            await self.aclose()

    def watch_publishing(self, admission: ReadAdmission) -> Callable[[], None]:
        """Tell the front when reads must step aside for halts being published
        (``PublishingWatch``); returns the function that stops watching."""
        self._token = trio.lowlevel.current_trio_token()
        return self.publishing.watch(admission, self._token)

    async def _receive(
        self,
        admit: Callable[[trio.SocketStream, bytes | None], None],
        table: ConnectionTable,
        admission: ReadAdmission | None,
        accepting: trio_util.AsyncBool,
    ) -> None:
        """Connections handed back, and counters, until the front closes the channel."""
        lost, failing = _Burst("http_handover_lost"), _Burst("http_accept_failing")
        try:
            while True:
                if (waiting := self.channel.next_kind_nowait()) is None:
                    if not self.serving.is_set():
                        await trio.lowlevel.wait_readable(self.channel.sock)
                        continue
                    with trio.move_on_after(FRONT_SILENT_S):
                        await trio.lowlevel.wait_readable(self.channel.sock)
                        continue
                    # One more look: this thread, not the front, may have been the one held.
                    if (waiting := self.channel.next_kind_nowait()) is None:
                        self._stalled(f"sent nothing for {FRONT_SILENT_S} s")
                        continue  # the channel closes with it: ChannelClosed
                if waiting == HANDOVER:  # room for its descriptor; only then (issue 16)
                    await room_for_a_descriptor(self.channel.fileno(), table, failing)
                if (message := self.channel.receive_nowait()) is None:
                    continue
                kind, payload, fds = message
                if kind == HANDOVER and len(fds) == 1:
                    stream = stream_of(fds[0])
                    if stream is not None:
                        admit(stream, payload)
                    continue
                for fd in fds:
                    os.close(fd)
                if kind == HANDOVER:  # its descriptor was dropped (MSG_CTRUNC): none free
                    count(HTTP_STATS.accept_errors, "EMFILE")
                    lost.failed(fd_limit=fd_limit(), action="the client's connection was closed")
                elif kind == STATS:
                    try:
                        stats = msgspec.msgpack.decode(payload, type=FrontStats)
                    except msgspec.DecodeError as exc:  # a bug; the counters can wait
                        log.warning("http_front_stats_unreadable", error=str(exc))
                        continue
                    self._absorb(stats, admission)
                elif kind == SERVING:
                    self.serving.set()
                    accepting.value = False  # the front accepts from now on
        except ChannelClosed:
            return

    def _connections_closed(self) -> None:
        """The front's connections ended with it: they leave the open-connections gauge
        (``sledagent_http_connections``); its counters stay (they only grow)."""
        if (other := HTTP_STATS.elsewhere) is not None:
            HTTP_STATS.elsewhere = attrs.evolve(other, connections_open=0)

    def _absorb(self, stats: FrontStats, admission: ReadAdmission | None) -> None:
        self.stats = stats
        if admission is not None:
            admission.absorb(AdmissionStatistics(admitted=stats.admitted, shed=stats.shed))
            admission.waited.absorb(stats.waited_counts, stats.waited_sum)
        HTTP_STATS.elsewhere = HttpStatistics(
            connections_open=stats.connections_open,
            accept_errors=stats.accept_errors,
            idle_closed=stats.idle_closed,
            refused=stats.refused,
            abandoned=stats.abandoned,
        )
