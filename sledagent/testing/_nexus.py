"""FakeNexus: records every VMM state update with its arrival time, and checks the
protocol of VMMs and migrations (``MigrationLedger``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import attrs
import trio

from .._errors import PeerError
from .._wire import SledVmmState, VmmState
from ._ledger import MigrationLedger, MigrationRecord


@attrs.frozen
class NexusUpdate:
    time: float  # trio clock
    propolis_id: uuid.UUID
    state: SledVmmState


class FakeNexus:
    """A ``NexusClient`` with injectable latency, 5xx, refusals and connection failures.

    Only acknowledged updates are recorded in ``updates``; ``attempts`` counts every call.
    ``ledger`` checks each acknowledged update against the protocol (per VMM and per
    migration, both sides): ``ledger.problems`` lists every break.
    """

    def __init__(self, *, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self.updates: list[NexusUpdate] = []
        self._by_vmm: dict[uuid.UUID, list[NexusUpdate]] = {}
        self._first: dict[tuple[uuid.UUID, VmmState], float] = {}
        self.attempts = 0
        self._fail_until = float("-inf")
        self._fail_status: int | None = 503
        self._refusals = 0
        self._refuse_status = 400
        self._arrived = trio.Event()
        self.ledger = MigrationLedger()

    # --- scripting ----------------------------------------------------------------------

    def fail_for(self, seconds: float, *, status: int | None = 503) -> None:
        """Fail every update for ``seconds`` from now: ``status`` 5xx, or ``None`` for a
        connection failure."""
        self._fail_until = trio.current_time() + seconds
        self._fail_status = status

    def refuse(self, times: int = 1, *, status: int = 400) -> None:
        """Answer the next ``times`` updates with a 4xx."""
        self._refusals = times
        self._refuse_status = status

    # --- NexusClient --------------------------------------------------------------------

    async def put_vmm_state(self, propolis_id: uuid.UUID, state: SledVmmState) -> None:
        self.attempts += 1
        if self.latency_s:
            await trio.sleep(self.latency_s)
        if trio.current_time() < self._fail_until:
            raise PeerError("Nexus unavailable (injected)", status=self._fail_status)
        if self._refusals > 0:
            self._refusals -= 1
            raise PeerError("Nexus refused the update (injected)", status=self._refuse_status)
        update = NexusUpdate(trio.current_time(), propolis_id, state)
        self.updates.append(update)
        self._by_vmm.setdefault(propolis_id, []).append(update)
        self._first.setdefault((propolis_id, state.vmm_state.state), update.time)
        self.ledger.observe(update.time, propolis_id, state)
        self._arrived.set()
        self._arrived = trio.Event()

    # --- reading ------------------------------------------------------------------------

    def states_for(self, propolis_id: uuid.UUID) -> list[SledVmmState]:
        return [u.state for u in self._by_vmm.get(propolis_id, ())]

    def latest(self, propolis_id: uuid.UUID) -> SledVmmState | None:
        states = self.states_for(propolis_id)
        return states[-1] if states else None

    def first_time(self, propolis_id: uuid.UUID, state: VmmState) -> float | None:
        return self._first.get((propolis_id, state))

    async def wait_for(self, propolis_id: uuid.UUID, state: VmmState) -> float:
        """Wait until Nexus has acknowledged ``state`` for this VMM; returns the time."""
        while (t := self.first_time(propolis_id, state)) is None:
            await self._arrived.wait()
        return t

    def migration(self, migration_id: uuid.UUID) -> MigrationRecord | None:
        """Both sides of a migration as received (``None``: no report yet)."""
        return self.ledger.migrations.get(migration_id)

    async def wait_migration(
        self,
        migration_id: uuid.UUID,
        until: Callable[[MigrationRecord], bool] = lambda r: r.outcome != "in_progress",
    ) -> MigrationRecord:
        """Wait until the migration's record satisfies ``until`` (default: it ended)."""
        while (record := self.migration(migration_id)) is None or not until(record):
            await self._arrived.wait()
        return record
