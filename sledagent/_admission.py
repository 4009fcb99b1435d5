"""Read admission: under overload, publication comes first, and reads are shed at once.

The agent serves every VMM-state read and runs every publication (monitor answer,
terminate, journal, ``PUT`` to Nexus) on one trio thread. trio has no priorities: when
reads arrive faster than the thread answers them, every step of a publication waits
behind a batch of reads (issue 21: 1000 halts with 2,000 reads/s offered, halt-to-publish
p99 25 s). So a ``GET /vmms/{id}/state`` is either answered within its bound or refused
at once with ``503`` and ``Retry-After`` (never left to a client timeout), by two rules:

- **publication first**: while a publication is under way (``backlog() > 0``: monitor
  answers waiting to be handled, states waiting for the journal, for a delivery slot, or
  for Nexus's answer; not those backing off from a failing Nexus) and the thread lags by
  more than ``publishing_lag_s`` (it has more runnable work than it can do at once), the
  read is refused: the publication's next step would wait behind it. With an idle thread
  (a slow Nexus only makes deliveries wait, not the thread) reads are served;
- **late**: a read that has waited for the thread longer than ``late_s`` is refused
  rather than answered later still (the answer it would get costs more than the refusal,
  and the time is what the thread needs to catch up);
- **turns**: while the thread lags (more than ``publishing_lag_s``) and nothing is being
  published, reads take turns, ``reads_per_batch`` per scheduler batch (a
  ``CapacityLimiter``: a token is taken with a schedule point, so a batch holds at most
  that many). trio runs every task made runnable in one batch: at 2,000 reads/s on 1000
  connections, batches of 100-260 ms of reads were measured, and every other task (a
  delivery to Nexus, a bundle's next step) waited behind each. A read whose turn comes
  after ``late_s`` is refused (``late``).

The lag is measured by a trio instrument (``LoopLag``): how long the batch of tasks now
running has run, plus how long the one before it ran; a request whose bytes arrived
during either has waited at most that long. Two hook calls per scheduler loop; no timer.

What was shed is counted (``sledagent_reads_shed_total{reason}``) and logged: one line
when a burst of refusals starts, one every ``_LOG_EVERY_S`` while it lasts, and one when
the first read is served again, with the count (docs/operations.md, "Overload").
"""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs
import structlog
import trio
from attrs import validators as v

from ._stats import Histogram

log = structlog.get_logger("sledagent.admission")

#: A burst of refusals is logged again this often while it lasts, with its count.
_LOG_EVERY_S = 10.0

PUBLICATION_FIRST = "publication_first"
LATE = "late"
REASONS = (PUBLICATION_FIRST, LATE)


@attrs.frozen(kw_only=True)
class ReadLimits:
    """When state reads are refused (TOML table ``[reads]``; docs/operations.md)."""

    #: While a publication is under way, reads are refused once the agent's thread lags
    #: by more than this (seconds). 0: whenever anything else is runnable.
    publishing_lag_s: float = attrs.field(default=0.005, validator=v.ge(0))
    #: A read that waited for the agent's thread longer than this is refused (seconds).
    late_s: float = attrs.field(default=0.1, validator=v.gt(0))
    #: The ``Retry-After`` of a refusal, whole seconds (RFC 9110 10.2.3).
    retry_after_s: int = attrs.field(default=1, validator=v.ge(0))
    #: While the thread lags, at most this many reads are answered per scheduler batch.
    reads_per_batch: int = attrs.field(default=16, validator=v.ge(1))


class LoopLag(trio.abc.Instrument):
    """How far behind the trio thread runs: the time the current batch of runnable
    tasks has run plus the time the previous batch ran (seconds, ``time.perf_counter``).

    A batch runs between two I/O waits (``after_io_wait`` .. ``before_io_wait``); a task
    woken by bytes that arrived during the previous batch or this one has waited at most
    that long. Install one per run with ``current_loop_lag``."""

    def __init__(self) -> None:
        self._batch_start = time.perf_counter()
        self._last_batch_s = 0.0
        #: Called with each batch's length as it ends (the front process's "publication
        #: first": ``_front_proc``). It must be quick, and may not call into trio but
        #: through a ``TrioToken``.
        self.on_batch: Callable[[float], None] | None = None

    def after_io_wait(self, timeout: float) -> None:
        self._batch_start = time.perf_counter()

    def before_io_wait(self, timeout: float) -> None:
        self._last_batch_s = time.perf_counter() - self._batch_start
        if self.on_batch is not None:
            self.on_batch(self._last_batch_s)

    def lag_s(self) -> float:
        return time.perf_counter() - self._batch_start + self._last_batch_s


_LOOP_LAG: trio.lowlevel.RunVar[LoopLag] = trio.lowlevel.RunVar("sledagent_loop_lag")


def loop_lag() -> LoopLag:
    """The running trio loop's ``LoopLag`` (installed on first use)."""
    try:
        return _LOOP_LAG.get()
    except LookupError:
        lag = LoopLag()
        trio.lowlevel.add_instrument(lag)
        _LOOP_LAG.set(lag)
        return lag


def current_loop_lag() -> float:
    """The lag of the running trio loop (``LoopLag``, installed on first use)."""
    return loop_lag().lag_s()


@attrs.frozen
class AdmissionStatistics:
    admitted: int
    #: Reads refused, by reason (``publication_first``, ``late``).
    shed: dict[str, int]


#: ``sledagent_read_wait_seconds`` buckets: how long a state read waited for the thread.
READ_WAIT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ReadAdmission:
    """Decides, for each state read, whether it is served now or refused at once.

    ``backlog``: publications under way (``SledAgent.publication_backlog``). ``lag``: how
    long a request waits for the thread now, seconds (``current_loop_lag``; a test
    passes its own). ``now``: the lag's clock, for the time a read waits for its turn.
    ``clock``: for the log's burst timing (trio's, mockable).

    With the server on a front thread (``_front``) the quick path's reads are decided on
    the front's loop: ``lag`` is then the front loop's (how long the read waited) and
    ``busy`` what ``publication first`` compares (``_front.watch_agent_loop``). Counters
    are plain integers bumped from either thread under the GIL."""

    def __init__(
        self,
        backlog: Callable[[], int],
        limits: ReadLimits | None = None,
        *,
        lag: Callable[[], float] = current_loop_lag,
        now: Callable[[], float] = time.perf_counter,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.limits = limits or ReadLimits()
        self.backlog = backlog
        #: How long a request waits for the thread now (seconds); tests set their own.
        self.lag = lag
        #: The lag "publication first" looks at (seconds); None: ``lag`` (one thread).
        self.busy: Callable[[], float] | None = None
        #: Reads take turns while the loop lags (False: a loop that only reads, the
        #: front process's, where turns would only reorder them).
        self.turns = True
        #: Which process decides these reads (``agent`` or ``front``), in the log lines.
        self.decided_in = "agent"
        self.now = now
        self._clock = clock
        self._turns = trio.CapacityLimiter(self.limits.reads_per_batch)
        #: How long each read waited for the thread before it was decided (its lag).
        self.waited = Histogram(READ_WAIT_BUCKETS)
        self._admitted = 0
        self._shed = dict.fromkeys(REASONS, 0)
        self._elsewhere: AdmissionStatistics | None = None
        # The burst of refusals being logged: its start, count and last log line.
        self._burst_start: float | None = None
        self._burst_count = 0
        self._burst_logged = 0.0

    @property
    def retry_after_s(self) -> int:
        return self.limits.retry_after_s

    def check(self) -> str | None:
        """None: serve the read now. Else the reason it is refused (answer 503 at once).
        Without turns (reads that do not take the quick path)."""
        lag = self.lag()
        limits = self.limits
        reason = None
        if lag > limits.late_s:
            reason = LATE
        elif lag > limits.publishing_lag_s and self.backlog() > 0:
            reason = PUBLICATION_FIRST
        return self._decided(reason, lag)

    def decide(self) -> str | None:
        """``admit`` without turns, for a loop that only reads (the front process's):
        None: serve the read now; else the reason it is refused."""
        lag = self.lag()
        return self._decided(self._reason(lag), lag)

    async def admit(self) -> str | None:
        """``check``, and while the thread lags with nothing to publish, wait for a turn
        first (``reads_per_batch`` per scheduler batch). Serve the read at once (no
        schedule point) when this returns None."""
        lag = self.lag()
        reason = self._reason(lag)
        if reason is not None or not self.turns or lag <= self.limits.publishing_lag_s:
            return self._decided(reason, lag)  # refused, or the thread keeps up
        arrived = self.now() - lag
        await self._turns.acquire()
        self._turns.release()  # the next read's turn comes in the next batch
        waited = self.now() - arrived
        return self._decided(LATE if waited > self.limits.late_s else None, waited)

    def _reason(self, lag: float) -> str | None:
        busy = lag if self.busy is None else self.busy()
        limits = self.limits
        if lag <= limits.publishing_lag_s and busy <= limits.publishing_lag_s:
            return None  # the threads keep up
        if lag > limits.late_s:
            return LATE
        if busy > limits.publishing_lag_s and self.backlog() > 0:
            return PUBLICATION_FIRST
        return None

    def _decided(self, reason: str | None, lag: float) -> str | None:
        self.waited.observe(lag)
        if reason is None:
            self._admitted += 1
            if self._burst_start is not None:
                self._burst_ended()
            return None
        self._shed[reason] += 1
        self._shed_one(reason, lag)
        return reason

    def statistics(self) -> AdmissionStatistics:
        """Reads decided here and, with a front process, there (``absorb``)."""
        admitted, shed = self._admitted, dict(self._shed)
        if self._elsewhere is not None:
            admitted += self._elsewhere.admitted
            for reason, count in self._elsewhere.shed.items():
                shed[reason] = shed.get(reason, 0) + count
        return AdmissionStatistics(admitted=admitted, shed=shed)

    def absorb(self, elsewhere: AdmissionStatistics) -> None:
        """Count in the reads another process decided (the front process's cumulative
        counts: each call replaces the last)."""
        self._elsewhere = elsewhere

    def _shed_one(self, reason: str, lag: float) -> None:
        now = self._clock()
        if self._burst_start is None:
            self._burst_start = self._burst_logged = now
            self._burst_count = 1
            fields: dict[str, object] = {"decided_in": self.decided_in}
            if self.decided_in == "agent":  # the front knows only whether, not how many
                fields["publications_under_way"] = self.backlog()
            log.warning(
                "reads_shedding",
                reason=reason,
                lag_ms=round(lag * 1000, 1),
                retry_after_s=self.limits.retry_after_s,
                **fields,
            )
            return
        self._burst_count += 1
        if now - self._burst_logged >= _LOG_EVERY_S:
            self._burst_logged = now
            log.warning(
                "reads_shedding",
                reason=reason,
                decided_in=self.decided_in,
                shed_in_burst=self._burst_count,
                lasted_s=round(now - self._burst_start, 1),
                lag_ms=round(lag * 1000, 1),
            )

    def _burst_ended(self) -> None:
        assert self._burst_start is not None
        log.info(
            "reads_shed",
            decided_in=self.decided_in,
            shed=self._burst_count,
            lasted_s=round(self._clock() - self._burst_start, 3),
            total_by_reason=dict(self._shed),
        )
        self._burst_start = None
        self._burst_count = 0


#: Reads step aside for publications only while the agent's thread waited for a CPU
#: more than this share of the time (``CpuWait``; the front process's "publication
#: first": ``_front_proc``).
CPU_WAIT_SHED = 0.1


class CpuWait:
    """The share of wall time the calling thread spent runnable but waiting for a CPU
    since the last call (Linux ``/proc/thread-self/schedstat``: its run delay). Where
    the kernel does not say, 1.0: the host is assumed to be short of CPU (as before
    the front process, when every read cost the agent's own thread).

    ``read``: the run delay so far, nanoseconds (tests pass their own)."""

    def __init__(self, read: Callable[[], int | None] | None = None) -> None:
        self._read = read or _run_delay_ns
        self._last = (time.monotonic_ns(), self._read())

    def fraction(self) -> float:
        now, delay = time.monotonic_ns(), self._read()
        (then, before), self._last = self._last, (now, delay)
        if delay is None or before is None or now <= then:
            return 1.0
        return (delay - before) / (now - then)


def _run_delay_ns() -> int | None:
    try:
        with open("/proc/thread-self/schedstat", "rb") as stat:
            return int(stat.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
