"""NexusNotifier: delivers the newest state of each VMM to Nexus, retrying.

Who starts it: the ``SledAgent``, in its own nursery, before any runner.
What it owns: one slot per VMM with an undelivered state, and one delivery task per
slot while there is something to send (tasks live in the notifier's nursery, so none
outlives it).
What it hands on: each acknowledged (or refused) state goes to ``on_delivered``, which
lets the manager remove a VMM whose terminal state Nexus now knows.

Rules (omicron's, plus what omicron lacks):
- ``publish`` never blocks and never fails: it stores the state and returns.
- Per VMM only the newest state is pending; an older generation is never sent after a
  newer one (one sequential sender per VMM, and stale states are dropped on arrival).
- Connection errors and 5xx are retried with backoff (250 ms doubling to 3 min);
  a 4xx is final: logged, counted, and reported as not acknowledged.
- On cancellation (agent shutdown) undelivered states are dropped; they are recorded
  in ``statistics().pending``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import attrs
import structlog
import trio

from ._config import BackoffPolicy
from ._errors import PeerError
from ._host import NexusClient
from ._journal import StateJournal
from ._wire import InstanceEnsureBody, SledVmmState

log = structlog.get_logger("sledagent.notifier")

#: ``on_delivered(propolis_id, state, acknowledged)``
DeliveredHook = Callable[[uuid.UUID, SledVmmState, bool], None]
#: ``answerable(propolis_id, state)``
AnswerableHook = Callable[[uuid.UUID, SledVmmState], None]


@attrs.frozen
class NotifierStatistics:
    pending: int  # VMMs with a state not yet delivered
    in_flight: int  # requests to Nexus outstanding now
    delivered: int  # states acknowledged by Nexus
    retries: int  # transient failures retried
    gave_up: int  # states refused by Nexus (4xx)
    superseded: int  # states replaced by a newer one before delivery


@attrs.define
class _Slot:
    pending: SledVmmState | None = None
    pending_seq: int = 0  # its journal line: sent only once that is on disk
    newest_gen: int = -1  # newest generation accepted for this VMM
    sending: bool = False


class NexusNotifier:
    def __init__(
        self,
        client: NexusClient,
        *,
        backoff: BackoffPolicy,
        concurrency: int,
        on_delivered: DeliveredHook | None = None,
        journal: StateJournal | None = None,
    ) -> None:
        self._client = client
        #: Every state is journaled before it is sent (write-ahead: after a crash the
        #: next start publishes what Nexus may have missed, never an older generation).
        self.journal = journal
        self._backoff = backoff
        self._limiter = trio.CapacityLimiter(concurrency)
        self.on_delivered = on_delivered
        self._slots: dict[uuid.UUID, _Slot] = {}
        self._nursery: trio.Nursery | None = None
        self._idle = trio.Event()
        self._idle.set()
        # Deliveries under way (queued for or holding the limiter); not those sleeping in
        # backoff. Zero: publishing is "settled" (done, or waiting on Nexus to recover).
        self._active = 0
        self._settled = trio.Event()
        self._settled.set()
        self._delivered = self._retries = self._gave_up = self._superseded = 0
        #: Why the latest failed delivery failed; cleared by the next success.
        self.last_error: str | None = None
        #: Told each state a read may answer: once it is journaled (at once without a
        #: journal). The manager points it at ``Registry.set_answer``.
        self.answerable: AnswerableHook | None = None
        if journal is not None:
            journal.on_durable = self._journaled

    def _journaled(self, states: dict[uuid.UUID, SledVmmState]) -> None:
        if self.answerable is not None:
            for propolis_id, state in states.items():
                self.answerable(propolis_id, state)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve deliveries until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def publish(self, propolis_id: uuid.UUID, state: SledVmmState) -> None:
        """Make ``state`` the newest state to deliver for this VMM; returns at once."""
        if self._nursery is None:
            raise RuntimeError("NexusNotifier.publish() before run() started")
        slot = self._slots.setdefault(propolis_id, _Slot())
        if state.gen <= slot.newest_gen:
            return  # stale: a newer generation was already accepted
        slot.newest_gen = state.gen
        if self.journal is not None:
            slot.pending_seq = self.journal.record(propolis_id, state)
        elif self.answerable is not None:
            self.answerable(propolis_id, state)
        if slot.pending is not None:
            self._superseded += 1  # the older pending state will never be sent
        slot.pending = state
        if not slot.sending:
            slot.sending = True
            self._idle = trio.Event() if self._idle.is_set() else self._idle
            self._busy(+1)
            self._nursery.start_soon(self._deliver, propolis_id, slot)

    async def wait_idle(self) -> None:
        """Return once nothing is pending (used by shutdown and tests)."""
        while not self._idle.is_set():
            await self._idle.wait()

    async def wait_settled(self) -> None:
        """Return once no delivery is under way: every state is delivered, or waits in
        backoff for Nexus to recover. The reaper bundles after this (publish first),
        so a healthy Nexus gets the terminal states before bundling competes for the
        CPU, and a Nexus that is down delays nothing."""
        while not self._settled.is_set():
            await self._settled.wait()

    @property
    def under_way(self) -> int:
        """Deliveries under way: waiting for the journal, for a slot, or in flight (not
        those sleeping in backoff)."""
        return self._active

    def _busy(self, delta: int) -> None:
        self._active += delta
        if self._active == 0:
            self._settled.set()
        elif self._settled.is_set():
            self._settled = trio.Event()

    def statistics(self) -> NotifierStatistics:
        return NotifierStatistics(
            pending=sum(1 for s in self._slots.values() if s.sending),
            in_flight=self._limiter.borrowed_tokens,
            delivered=self._delivered,
            retries=self._retries,
            gave_up=self._gave_up,
            superseded=self._superseded,
        )

    async def _deliver(self, propolis_id: uuid.UUID, slot: _Slot) -> None:
        try:
            while slot.pending is not None:
                state, seq, slot.pending = slot.pending, slot.pending_seq, None
                state, acknowledged = await self._send_until_done(propolis_id, slot, state, seq)
                if self.journal is not None and state.vmm_state.state.is_halted:
                    self.journal.delivered(propolis_id, state.gen)  # answered: 2xx or final 4xx
                elif self.journal is not None and acknowledged:
                    self.journal.acknowledged(propolis_id, state.gen)
                if self.on_delivered is not None:
                    self.on_delivered(propolis_id, state, acknowledged)
        finally:
            slot.sending = False
            self._busy(-1)
            if not any(s.sending for s in self._slots.values()):
                self._idle.set()

    def record_registration(
        self, propolis_id: uuid.UUID, body: InstanceEnsureBody, state: SledVmmState
    ) -> None:
        """Journal a new VMM whole (``journaled`` waits until it is on disk), so that one
        registered just before a crash is still known (and re-adopted) after it."""
        if self.journal is not None:
            slot = self._slots.setdefault(propolis_id, _Slot())
            slot.pending_seq = self.journal.record_registration(propolis_id, body, state)
        elif self.answerable is not None:
            self.answerable(propolis_id, state)

    async def journaled(self, propolis_id: uuid.UUID) -> None:
        """Return once everything journaled for this VMM so far is on disk."""
        slot = self._slots.get(propolis_id)
        if self.journal is not None and slot is not None:
            await self.journal.durable(slot.pending_seq)

    def is_journaled(self, propolis_id: uuid.UUID) -> bool:
        """Everything journaled for this VMM so far is on disk (no wait)."""
        slot = self._slots.get(propolis_id)
        return self.journal is None or slot is None or self.journal.is_durable(slot.pending_seq)

    def forget(self, propolis_id: uuid.UUID) -> None:
        """Drop a VMM's slot once the VMM has left the registry."""
        slot = self._slots.get(propolis_id)
        if slot is not None and not slot.sending:
            del self._slots[propolis_id]

    async def _send_until_done(
        self, propolis_id: uuid.UUID, slot: _Slot, state: SledVmmState, seq: int
    ) -> tuple[SledVmmState, bool]:
        """Send until Nexus answers; switches to a newer pending state between retries.

        Returns the state that was finally sent and whether Nexus acknowledged it
        (``False``: refused with a 4xx)."""
        delays = self._backoff.delays()
        while True:
            if self.journal is not None:
                await self.journal.durable(seq)  # one fsync shared by a whole batch
            try:
                async with self._limiter:
                    await self._client.put_vmm_state(propolis_id, state)
            except PeerError as exc:
                bound = log.bind(propolis_id=str(propolis_id))
                if not exc.transient:
                    self._gave_up += 1
                    bound.error(
                        "nexus_refused_state", gen=state.gen, status=exc.status, error=str(exc)
                    )
                    return state, False
                self._retries += 1
                delay = next(delays)
                self.last_error = str(exc)
                bound.warning(
                    "nexus_retry",
                    gen=state.gen,
                    status=exc.status,  # None: no answer at all (refused, reset, timed out)
                    error=str(exc),
                    delay_s=delay,
                )
                self._busy(-1)  # backing off is not "under way"
                try:
                    await trio.sleep(delay)
                finally:
                    self._busy(+1)
                if slot.pending is not None:  # a newer state arrived: send that instead
                    self._superseded += 1
                    state, seq, slot.pending = slot.pending, slot.pending_seq, None
                continue
            self._delivered += 1
            self.last_error = None
            return state, True
