"""Publication first across the two processes: when the front process must refuse reads.

The front process (``_front_main``) answers state reads on a core of its own, so a read
it answers never waits for the agent's thread. But on a small host the reads it answers,
and their clients, take CPU that the publication of halts needs (issue 21: 1000 halts at
2,000 reads/s on 2 cores). So the agent tells the front (``PUBLISHING``), when it
changes, whether reads must step aside: a read refused there is refused at once, with
503 and ``Retry-After`` (``ReadAdmission``'s "publication first", decided in the front).

They must when halts are under way (``backlog``), the agent's thread lags (a scheduler
batch longer than ``publishing_lag_s``) *and* it waits for a CPU (``CpuWait``: more than
``CPU_WAIT_SHED`` of the time since it last looked). With a core of its own (a large
host) the agent's lag is its own work, and reads answered on another core cost it
nothing: they are not shed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
import trio

from ._admission import CPU_WAIT_SHED, CpuWait, ReadAdmission, loop_lag

#: How often, at most, the agent looks whether it publishes behind time while its
#: thread lags.
PUBLISHING_EVERY_S = 0.02


class PublishingWatch:
    """Tells the front (``send(payload)``: a ``PUBLISHING`` message's msgpack float, the
    agent's lag in seconds, 0.0: serve reads) whether reads must step aside."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self._send = send
        #: The agent's lag the front was last told of (0.0: none).
        self.told = 0.0
        #: How much of the time the agent's thread waits for a CPU (tests: their own).
        self.cpu_wait = CpuWait()
        self._token: trio.lowlevel.TrioToken | None = None
        self._checked = 0.0
        #: Set (through the token) when the front is told to refuse reads.
        self._on = trio.Event()

    def watch(self, admission: ReadAdmission, token: trio.lowlevel.TrioToken) -> Callable[[], None]:
        """Watch the running trio loop (``token``'s) for ``admission``'s backlog; returns
        the function that stops watching.

        Watched at the end of each batch (``LoopLag.on_batch``), not by a timer: one
        comparison per batch while the thread keeps up; the backlog and the CPU wait
        are looked at every ``PUBLISHING_EVERY_S`` at most while it lags. The value
        sent is the batch's length."""
        threshold = admission.limits.publishing_lag_s
        self._token = token
        lag = loop_lag()

        def batch_ended(batch_s: float) -> None:
            told = self.told
            if batch_s <= threshold:
                if told > 0:  # it keeps up again: reads are served at once
                    self._tell(0.0)
                return
            now = time.monotonic()
            if now - self._checked < PUBLISHING_EVERY_S:
                return
            self._checked = now
            if admission.backlog() <= 0 or self.cpu_wait.fraction() < CPU_WAIT_SHED:
                batch_s = 0.0
            if (batch_s > 0) != (told > 0) or abs(batch_s - told) > threshold * 4:
                self._tell(batch_s)

        lag.on_batch = batch_ended

        def stop() -> None:
            if lag.on_batch is batch_ended:
                lag.on_batch = None

        return stop

    def _tell(self, behind: float) -> None:
        self.told = behind
        self._send(msgspec.msgpack.encode(behind))
        if behind > 0 and self._token is not None:  # from an instrument: only the token
            self._token.run_sync_soon(self._on.set)

    async def ends(self) -> None:
        """While the front refuses reads, wake this thread every ``PUBLISHING_EVERY_S``.

        Why: "publication first" is turned off at the end of a short batch; an agent that
        goes idle right after the long batch that turned it on runs no further batch (no
        I/O, no timer due), and the front went on refusing every read until something
        else woke the agent (the front's counters, a second later). The wake-up is a
        batch of its own: short when idle, so the front is told to serve again. No timer
        while the front serves."""
        while True:
            await self._on.wait()
            self._on = trio.Event()
            await trio.sleep(PUBLISHING_EVERY_S)  # its end is a batch: it looks again
            if self.told > 0:
                self._on.set()
